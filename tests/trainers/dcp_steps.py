"""A torchtitan-style training loop without torchtitan: torch.distributed.checkpoint saves to <folder>/step-<N>.

Every --save-every steps it runs dcp.save(state, checkpoint_id=<folder>/step-<N>), where state is
    {"model": model state_dict, "optim": optimizer state_dict (get_state_dict, FQN keys),
     "lr_scheduler": scheduler state_dict, "dataloader": {"dp_rank_0": pickled bytes, "world_size": 1},
     "train_state": {"step": int32 tensor, "losses": io.BytesIO of a torch.save'd list}, "step": int}
(torchtitan's own keys are model/optimizer/lr_scheduler/dataloader/train_state; "optim" and "step" follow the brief).
Each folder is written by DCP's FileSystemWriter: __0_0.distcp first, then .metadata.tmp renamed to .metadata.
After each save it purges with torchtitan's exact keep_latest_k code (dcp.py _purge_stale_checkpoints): listdir,
re.search(r"step-(\\d+)") anywhere in the name, sort, everything but the newest k goes to a background purge thread
that calls shutil.rmtree(path, ignore_errors=True). The thread is drained before the script exits.

--resume PATH loads a step-<N> folder with dcp.load into a fresh model and optimizer and checks the step and the
AdamW state. --resume auto picks the step as torchtitan's _find_load_step does: the highest step-<N> entry (same
unanchored regex) that holds .metadata or model.safetensors.index.json. Batches depend only on the step number,
so a resumed run repeats the losses of an uninterrupted one.

Examples:
    python tests/trainers/dcp_steps.py --folder out/checkpoint --steps 6 --save-every 2 --keep-latest-k 2
    python tests/trainers/dcp_steps.py --folder out/checkpoint --steps 10 --save-every 2 --resume auto
"""

# torchtitan's purge and find-step code is kept verbatim, with os.path on str paths:
# ruff: noqa: PTH112, PTH113, PTH118
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import queue
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CRASH_EXIT = 17


class CrashingWriter(dcp.FileSystemWriter):
    """A FileSystemWriter that dies after the data files are written and before .metadata (finish)."""

    def finish(self, metadata: Any, results: Any) -> None:
        sys.stderr.flush()
        os._exit(CRASH_EXIT)


def purge_thread(purge_queue: queue.Queue[str | None]) -> None:
    """torchtitan's purge thread (base.py): delete queued paths until the None sentinel; never die."""
    while True:
        path = purge_queue.get()
        if path is None:
            return
        try:
            shutil.rmtree(path, ignore_errors=True)  # torchtitan/tools/filesystem.py rmtree for local paths
        except Exception as error:
            print(f"failed to delete {path}: {error}", file=sys.stderr)


def purge_stale_checkpoints(folder: str, keep_latest_k: int, purge_queue: queue.Queue[str | None]) -> list[str]:
    """torchtitan dcp.py _purge_stale_checkpoints, verbatim apart from the storage wrapper."""
    if not (keep_latest_k > 0 and os.path.isdir(folder)):
        return []
    discovered_checkpoints = []
    for filename in os.listdir(folder):
        match = re.search(r"step-(\d+)", filename)
        if match:
            path = os.path.join(folder, filename)
            discovered_checkpoints.append((int(match.group(1)), path))

    discovered_checkpoints.sort()
    to_delete = discovered_checkpoints[: -1 * keep_latest_k]

    for _, path in to_delete:
        purge_queue.put(path)
    return [path for _, path in to_delete]


def find_load_step(folder: str) -> int:
    """torchtitan dcp.py _find_load_step: the highest step-N entry holding .metadata or an HF index, else -1."""
    if not os.path.isdir(folder):
        return -1
    valid_steps = []
    for filename in os.listdir(folder):
        match = re.search(r"step-(\d+)", filename)
        if not match:
            continue
        checkpoint_path = os.path.join(folder, filename)
        is_dcp = os.path.isfile(os.path.join(checkpoint_path, ".metadata"))
        is_hf = os.path.isfile(os.path.join(checkpoint_path, "model.safetensors.index.json"))
        if is_dcp or is_hf:
            valid_steps.append(int(match.group(1)))
    return max(valid_steps) if valid_steps else -1


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + 0.1 * s))
    return model, optim, sched


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randn(8, 8, generator=gen), torch.randn(8, 4, generator=gen)


def adam_step(optim: torch.optim.Optimizer) -> int | None:
    for state in optim.state.values():
        if "step" in state:
            return int(state["step"])
    return None


def state_for(
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    losses: list[float],
    model_only: bool = False,
) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optim)
    if model_only:
        return {"model": model_sd}
    losses_io = io.BytesIO()
    torch.save(losses, losses_io)
    losses_io.seek(0)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "lr_scheduler": sched.state_dict(),
        "dataloader": {"dp_rank_0": pickle.dumps({"consumed_batches": step}), "world_size": 1},
        "train_state": {"step": torch.tensor(step, dtype=torch.int32), "losses": losses_io},
        "step": step,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True, type=Path, help="checkpoint folder; saves go to <folder>/step-<N>")
    p.add_argument("--steps", type=int, default=6, help="train until this global step")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--keep-latest-k", type=int, default=0, help="torchtitan keep_latest_k (0 keeps all)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    p.add_argument("--resume", default=None, help='a step-<N> folder to dcp.load, or "auto" (torchtitan rule)')
    p.add_argument(
        "--last-model-only", action="store_true", help="torchtitan last_save_model_only: final save holds model only"
    )
    p.add_argument(
        "--crash-in-save",
        type=int,
        default=None,
        metavar="STEP",
        help=f"os._exit({CRASH_EXIT}) in step-STEP's save after __0_0.distcp, before .metadata",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    folder = str(a.folder)

    model, optim, sched = build(a.seed)
    step = 0
    losses: list[float] = []
    resumed: dict[str, Any] | None = None
    if a.resume is not None:
        if a.resume == "auto":
            load_step = find_load_step(folder)
            path = os.path.join(folder, f"step-{load_step}") if load_step >= 0 else None
        else:
            path = a.resume
        if path is not None:
            state = state_for(model, optim, sched, -1, [])  # the shapes to load into (optimizer state initialised)
            state["dataloader"]["dp_rank_0"] = b""
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
            sched.load_state_dict(state["lr_scheduler"])
            step = int(state["step"])
            losses_io = state["train_state"]["losses"]
            losses_io.seek(0)
            losses = list(torch.load(losses_io))
            optimizer_step = adam_step(optim)
            resumed = {
                "path": path,
                "step": step,
                "train_state_step": int(state["train_state"]["step"]),
                "dataloader": pickle.loads(state["dataloader"]["dp_rank_0"]),
                "optimizer_step": optimizer_step,
                "scheduler_last_epoch": sched.last_epoch,
                "optimizer_state_restored": optimizer_step == step > 0,
            }
        else:
            resumed = {"path": None}

    purge_queue: queue.Queue[str | None] = queue.Queue()
    purger = threading.Thread(target=purge_thread, args=(purge_queue,), daemon=True)
    purger.start()
    saves: list[dict[str, Any]] = []
    purged: list[str] = []
    t0 = time.time()
    while step < a.steps:
        x, y = batch(a.seed, step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad()
        sched.step()
        step += 1
        losses.append(round(loss.item(), 6))
        if a.step_sleep > 0:
            time.sleep(a.step_sleep)
        if step % a.save_every == 0 or step == a.steps:
            checkpoint_id = os.path.join(folder, f"step-{step}")
            model_only = a.last_model_only and step == a.steps
            state = state_for(model, optim, sched, step, losses, model_only=model_only)
            if a.crash_in_save == step:
                dcp.save(state, storage_writer=CrashingWriter(checkpoint_id))
            else:
                dcp.save(state, checkpoint_id=checkpoint_id)
            saves.append({"step": step, "path": checkpoint_id, "model_only": model_only, "time": time.time()})
            purged += purge_stale_checkpoints(folder, a.keep_latest_k, purge_queue)
    purge_queue.put(None)
    purger.join()

    entries = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    report = {
        "trainer": "dcp",
        "torch": torch.__version__,
        "folder": folder,
        "checkpoints": [
            os.path.join(folder, e)
            for e in sorted(entries, key=lambda e: int(e[5:]) if re.fullmatch(r"step-\d+", e) else -1)
            if re.fullmatch(r"step-\d+", e) and os.path.isdir(os.path.join(folder, e))
        ],
        "entries": entries,
        "saves": saves,
        "purged": purged,
        "step": step,
        "final_optimizer_step": adam_step(optim),
        "resumed": resumed,
        "losses": losses,
        "seconds": round(time.time() - t0, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
