"""Train a tiny GPT2 with a real transformers Trainer and print one JSON line describing its checkpoints.

CPU only, deterministic, no network: the model is built from a GPT2Config (2 layers, n_embd 32, vocab 64)
and trained on a fixed random token dataset. Everything the Trainer prints goes to stderr; stdout gets
exactly one JSON line at the end.

Examples:
    python tests/trainers/hf_trainer.py --output-dir out --max-steps 6 --save-steps 2 --save-total-limit 2
    python tests/trainers/hf_trainer.py --output-dir out --max-steps 8 --save-steps 2 --resume true
    python tests/trainers/hf_trainer.py --output-dir out --max-steps 4 --save-steps 2 --crash-in-save 4
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

VOCAB = 64
SEQ = 16
MAJOR = int(transformers.__version__.split(".")[0])
CRASH_EXIT = 17


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    """A fixed set of random token sequences; labels are the inputs (causal LM)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """The tiny GPT2 of the brief, initialised from a fixed seed."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def adam_step(optimizer: torch.optim.Optimizer | None) -> int | None:
    """The AdamW 'step' counter of the first parameter that has state, or None when there is no state."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return None


class Recorder(TrainerCallback):
    """Records what the trainer looked like at train begin, every save, and sleeps after each step."""

    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep
        self.start: dict[str, Any] = {}
        self.saves: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        sched = kw.get("lr_scheduler")
        self.start = {
            "global_step": state.global_step,
            "optimizer_step": adam_step(kw.get("optimizer")),
            "scheduler_last_epoch": getattr(sched, "last_epoch", None),
        }

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.step_sleep > 0:
            time.sleep(self.step_sleep)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.saves.append({"step": state.global_step, "path": str(path), "time": time.time()})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", required=True, type=Path, help="TrainingArguments.output_dir")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=1)
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: no eval)")
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument(
        "--load-best",
        action="store_true",
        help="load_best_model_at_end with metric_for_best_model=eval_loss (eval-steps defaults to save-steps)",
    )
    p.add_argument("--resume", default=None, help='checkpoint dir for resume_from_checkpoint, or "true"')
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--safetensors", dest="bin", action="store_false", help="weights as safetensors (default)")
    fmt.add_argument(
        "--bin",
        dest="bin",
        action="store_true",
        help="weights as pytorch_model.bin; transformers>=5 cannot do this and the script exits 2",
    )
    p.set_defaults(bin=False)
    p.add_argument("--max-shard-size", default=None, help='e.g. "20KB": shard the model in every checkpoint')
    p.add_argument(
        "--crash-in-save",
        type=int,
        default=None,
        metavar="STEP",
        help=f"os._exit({CRASH_EXIT}) while saving checkpoint-STEP: after the weights and optimizer.pt, "
        "before rng_state.pth and trainer_state.json (a half-written checkpoint)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-size", type=int, default=32)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.bin and MAJOR >= 5:
        print(
            f"--bin: transformers {transformers.__version__} always saves safetensors "
            "(save_safetensors was removed in v5)",
            file=sys.stderr,
        )
        return 2
    eval_steps = a.eval_steps if a.eval_steps is not None else (a.save_steps if a.load_best else None)
    extra: dict[str, Any] = {}
    if MAJOR < 5:
        extra["save_safetensors"] = not a.bin
    targs = TrainingArguments(
        output_dir=str(a.output_dir),
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        learning_rate=a.lr,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_total_limit=a.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        load_best_model_at_end=a.load_best,
        metric_for_best_model="eval_loss" if a.load_best else None,
        greater_is_better=False if a.load_best else None,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=a.seed,
        data_seed=a.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )
    model = tiny_gpt2(a.seed)
    if a.max_shard_size:
        # Trainer._save calls model.save_pretrained(output_dir, state_dict=...) without max_shard_size.
        model.save_pretrained = functools.partial(model.save_pretrained, max_shard_size=a.max_shard_size)  # type: ignore[method-assign]
    recorder = Recorder(a.step_sleep)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=RandomTokens(a.train_size, a.seed + 1),
        eval_dataset=RandomTokens(8, a.seed + 2) if eval_steps else None,
        callbacks=[recorder],
    )
    if a.crash_in_save is not None:
        original = trainer._save_optimizer_and_scheduler

        def crashing(output_dir: str) -> None:
            original(output_dir)
            if trainer.state.global_step == a.crash_in_save:
                sys.stderr.flush()
                os._exit(CRASH_EXIT)

        trainer._save_optimizer_and_scheduler = crashing  # type: ignore[method-assign]

    resume: str | bool | None = a.resume
    if isinstance(resume, str) and resume.lower() == "true":
        resume = True
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # PrinterCallback prints log dicts to stdout
        out = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    checkpoints = sorted(
        (str(p) for p in a.output_dir.glob("checkpoint-*") if p.is_dir()),
        key=lambda s: int(s.rsplit("-", 1)[1]) if s.rsplit("-", 1)[1].isdigit() else -1,
    )
    start = recorder.start
    report = {
        "trainer": "hf",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "output_dir": str(a.output_dir),
        "checkpoints": checkpoints,
        "saves": recorder.saves,
        "global_step": trainer.state.global_step,
        "resume": resume,
        "start_global_step": start.get("global_step"),
        "start_optimizer_step": start.get("optimizer_step"),
        "start_scheduler_last_epoch": start.get("scheduler_last_epoch"),
        # On a resume from checkpoint-N, AdamW's own step counter is N before the first new step.
        "optimizer_state_restored": bool(resume)
        and start.get("optimizer_step") is not None
        and start.get("optimizer_step") == start.get("global_step"),
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "best_global_step": getattr(trainer.state, "best_global_step", None),
        "losses": [h["loss"] for h in history if "loss" in h],
        "eval_losses": {str(h["step"]): h["eval_loss"] for h in history if "eval_loss" in h},
        "train_loss": out.training_loss,
        "final_adam_step": adam_step(trainer.optimizer),
        "seconds": round(time.time() - t0, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
