"""Train a tiny MLP with accelerate and call Accelerator.save_state() --saves times; print one JSON line.

ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True, total_limit=N) gives
<project-dir>/checkpoints/checkpoint_<i>/{model.safetensors, optimizer.bin, scheduler.bin, random_states_0.pkl,
custom_checkpoint_0.pkl}; <i> counts saves (it is not the training step). The registered custom object is
{"step": optimizer steps so far, "epoch": finished passes over the data}, so it is the only place the step lives.

--hold-after-first-save FILE pauses after the first save until FILE exists, so a test can let a watcher see that
save before the quick saves that follow rotate it.

--resume PATH runs accelerator.load_state(PATH) ("auto" means load_state() with no path: accelerate picks the
highest-numbered entry of checkpoints/), checks what came back, sets project_configuration.iteration to one past
the highest existing checkpoint_<i> (accelerate does not restore it, and save_state would otherwise fail with
"Checkpoint directory ... already exists"), then trains and saves --saves more times.

Examples:
    python tests/trainers/accelerate_state.py --project-dir P --saves 3 --total-limit 2
    python tests/trainers/accelerate_state.py --project-dir P --saves 2 --resume P/checkpoints/checkpoint_2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file


class Progress:
    """The custom object registered for checkpointing: it holds the training step and epoch."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])


def adam_step(optimizer: torch.optim.Optimizer) -> int | None:
    """AdamW's 'step' counter of the first parameter with state (None before the first step)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return None


def index_of(name: str) -> int:
    """accelerate's own sort key: the first run of digits in the last path component."""
    return int(re.findall(r"[\/]?([0-9]+)(?=[^\/]*$)", name)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project-dir", required=True, type=Path)
    p.add_argument("--saves", type=int, default=3, help="how many save_state() calls")
    p.add_argument("--steps-per-save", type=int, default=2, help="optimizer steps between saves")
    p.add_argument("--total-limit", type=int, default=None, help="ProjectConfiguration.total_limit")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    p.add_argument(
        "--hold-after-first-save",
        type=Path,
        default=None,
        help="after the first save, wait (up to 120 s) until this file exists",
    )
    p.add_argument("--resume", default=None, help='checkpoint_<i> dir to load_state() from, or "auto"')
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    set_seed(a.seed)
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=str(a.project_dir), automatic_checkpoint_naming=True, total_limit=a.total_limit
        ),
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    gen = torch.Generator().manual_seed(a.seed + 1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 8, generator=gen), torch.randn(24, 1, generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)

    ckpt_root = a.project_dir / "checkpoints"
    resumed: dict[str, Any] | None = None
    if a.resume is not None:
        with contextlib.redirect_stdout(sys.stderr):
            accelerator.load_state(None if a.resume == "auto" else a.resume)
        loaded_from = Path(a.resume) if a.resume != "auto" else max(ckpt_root.iterdir(), key=lambda q: index_of(q.name))
        on_disk = load_file(str(loaded_from / "model.safetensors"))
        current = accelerator.unwrap_model(model).state_dict()
        weights_match = all(torch.equal(on_disk[k], current[k].cpu()) for k in on_disk) and set(on_disk) == set(current)
        optimizer_step = adam_step(optimizer)
        resumed = {
            "path": str(loaded_from),
            "progress": progress.state_dict(),
            "optimizer_step": optimizer_step,
            "scheduler_last_epoch": scheduler.scheduler.last_epoch,  # type: ignore[attr-defined]
            "weights_match_checkpoint": weights_match,
            # one optimizer step per training step, so AdamW's counter must equal the saved custom step
            "optimizer_state_restored": optimizer_step is not None and optimizer_step == progress.step > 0,
        }
        existing = [index_of(q.name) for q in ckpt_root.iterdir()] if ckpt_root.is_dir() else []
        accelerator.project_configuration.iteration = max(existing, default=-1) + 1

    losses: list[float] = []
    saves: list[dict[str, Any]] = []
    batches = iter(loader)
    for _ in range(progress.step % len(loader)):  # after a resume, continue where the data left off
        next(batches)
    t0 = time.time()
    for _ in range(a.saves):
        for _ in range(a.steps_per_save):
            try:
                x, y = next(batches)
            except StopIteration:
                progress.epoch += 1
                batches = iter(loader)
                x, y = next(batches)
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            progress.step += 1
            losses.append(round(loss.item(), 6))
            if a.step_sleep > 0:
                time.sleep(a.step_sleep)
        scheduler.step()
        with contextlib.redirect_stdout(sys.stderr):
            path = accelerator.save_state()
        saves.append({"path": str(path), "step": progress.step, "time": time.time()})
        if a.hold_after_first_save is not None and len(saves) == 1:
            held = time.monotonic() + 120
            while not a.hold_after_first_save.exists() and time.monotonic() < held:
                time.sleep(0.05)

    checkpoints = sorted((str(q) for q in ckpt_root.iterdir()), key=lambda s: index_of(Path(s).name))
    report = {
        "trainer": "accelerate",
        "accelerate": accelerate.__version__,
        "torch": torch.__version__,
        "project_dir": str(a.project_dir),
        "checkpoints": checkpoints,
        "saves": saves,
        "step": progress.step,
        "epoch": progress.epoch,
        "final_optimizer_step": adam_step(optimizer),
        "next_iteration": accelerator.project_configuration.iteration,
        "resumed": resumed,
        "losses": losses,
        "seconds": round(time.time() - t0, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
