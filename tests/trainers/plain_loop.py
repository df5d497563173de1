"""A plain PyTorch training loop, checkpointing the way most training guides show, printing one JSON line.

Every epoch it rewrites `latest_checkpoint.pt` with the full state (epoch, model, optimizer, scheduler, a
`history` of losses and `val_dice`, `best_map`; no global_step), every `--milestone-every` epochs it writes
`epoch_NNN_checkpoint.pt` with the same state, and when validation improves it writes `best_model.pt` with the
weights alone (`model.state_dict()`). CPU only, a fixed seed, a small MLP on random data; a batch depends only on
the seed and the epoch, so a resumed run repeats the losses of an uninterrupted one.

`--crash-in-save EPOCH` dies in that epoch's save of `latest_checkpoint.pt` the way a killed `torch.save` leaves
it: the file truncated to half its bytes, then `os._exit(17)`. `--resume PATH` loads a checkpoint (model,
optimizer, scheduler, history) and goes on from the epoch after it.

Examples:
    python tests/trainers/plain_loop.py --out run --epochs 6
    python tests/trainers/plain_loop.py --out run --epochs 8 --resume run/latest_checkpoint.pt
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def batches(seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's data: 64 fixed random samples of 8 features, a noisy linear target."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    x = torch.randn(64, 8, generator=gen)
    return x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=gen)


def save_atomically_or_crash(state: dict[str, Any], path: Path, crash: bool) -> None:
    """torch.save into `path` in place, as most loops do; with `crash`, leave half the bytes and die."""
    if not crash:
        torch.save(state, path)
        return
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os._exit(17)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    p.add_argument("--epochs", type=int, default=6, help="train until this epoch (1-based, inclusive)")
    p.add_argument("--milestone-every", type=int, default=2, help="write epoch_NNN_checkpoint.pt this often")
    p.add_argument("--epoch-sleep", type=float, default=0.0, help="seconds to sleep after each epoch's saves")
    p.add_argument("--crash-in-save", type=int, default=None, metavar="EPOCH", help="die in this epoch's save")
    p.add_argument("--resume", type=Path, default=None, help="a checkpoint to go on from")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    torch.manual_seed(a.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    history: dict[str, list[float]] = {"train_loss": [], "val_dice": []}
    best_map, start, resumed = 0.0, 1, None
    if a.resume is not None:
        state = torch.load(a.resume, weights_only=True)
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["scheduler_state_dict"])
        history, best_map, start = state["history"], state["best_map"], state["epoch"] + 1
        steps = [s["step"] for s in optimizer.state_dict()["state"].values()]
        resumed = {"path": str(a.resume), "epoch": state["epoch"], "optimizer_step": float(steps[0]) if steps else None,
                   "optimizer_state_restored": bool(steps) and float(steps[0]) == 4 * state["epoch"]}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    saves = []
    for epoch in range(start, a.epochs + 1):
        x, y = batches(a.seed, epoch)
        losses = []
        for i in range(0, 64, 16):  # four optimizer steps an epoch
            loss = torch.nn.functional.mse_loss(model(x[i : i + 16]), y[i : i + 16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        with torch.no_grad():
            vx, vy = batches(a.seed + 1, 0)
            val = torch.nn.functional.mse_loss(model(vx), vy).item()
        dice = 1.0 / (1.0 + val)  # a score that rises as the model improves
        history["train_loss"].append(sum(losses) / len(losses))
        history["val_dice"].append(dice)
        improved = dice > best_map
        best_map = max(best_map, dice)
        state = {"epoch": epoch, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                 "scheduler_state_dict": scheduler.state_dict(), "history": history, "best_map": best_map}  # fmt: skip
        save_atomically_or_crash(state, a.out / "latest_checkpoint.pt", crash=epoch == a.crash_in_save)
        written = ["latest_checkpoint.pt"]
        if epoch % a.milestone_every == 0:
            torch.save(state, a.out / f"epoch_{epoch:03d}_checkpoint.pt")
            written.append(f"epoch_{epoch:03d}_checkpoint.pt")
        if improved:
            torch.save(model.state_dict(), a.out / "best_model.pt")
            written.append("best_model.pt")
        saves.append({"epoch": epoch, "files": written, "val_dice": dice, "time": time.time()})
        time.sleep(a.epoch_sleep)
    print(json.dumps({"out": str(a.out), "saves": saves, "history": history, "best_map": best_map,
                      "resumed": resumed, "files": sorted(p.name for p in a.out.iterdir())}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
