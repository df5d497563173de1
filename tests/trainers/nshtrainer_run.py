"""Train a tiny MLP with a real nshtrainer Trainer and print one JSON line describing its checkpoint/ folder.

CPU only, deterministic, no network: an nshtrainer LightningModuleBase MLP (8 -> 16 -> 1) is fit to 32 fixed random
samples (4 steps per epoch) and validated every epoch on 16 more, logging `val_loss`. The TrainerConfig sets
`primary_metric=val_loss/min`, so nshtrainer's default checkpoint callbacks (best, last, on-exception) write
`<root>/nshtrainer_logs/<run id>/checkpoint/`. Only the CSV logger is on (<run>/log/csv/). Everything the
libraries print goes to stderr; stdout gets exactly one JSON line at the end.

Examples:
    python tests/trainers/nshtrainer_run.py --root out --epochs 3
    python tests/trainers/nshtrainer_run.py --root out --epochs 5 --resume out/nshtrainer_logs/<id>/checkpoint/last.ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning
import nshconfig as C
import nshtrainer as nt
import torch
from lightning.pytorch.callbacks import Callback
from nshtrainer.loggers import CSVLoggerConfig
from torch.utils.data import DataLoader, TensorDataset

IN_DIM = 8


class MLPConfig(C.Config):
    hidden: int = 16
    lr: float = 1e-2


class TinyMLP(nt.LightningModuleBase[MLPConfig]):
    @classmethod
    def hparams_cls(cls) -> type[MLPConfig]:
        return MLPConfig

    def __init__(self, hparams: MLPConfig | dict[str, Any], step_sleep: float = 0.0) -> None:
        super().__init__(hparams)
        self.step_sleep = step_sleep
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN_DIM, self.hparams.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hparams.hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        if self.step_sleep > 0:
            time.sleep(self.step_sleep)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def loader(n: int, seed: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    """n fixed random (x, y) pairs, unshuffled: a batch depends only on the seed and the step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False, num_workers=0)


class Recorder(Callback):
    """What checkpoint fit loaded, where training really started, and the val_loss of every epoch."""

    def __init__(self) -> None:
        self.loaded: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.first_epoch: int | None = None
        self.val_losses: list[dict[str, Any]] = []

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.loaded = {"epoch": checkpoint["epoch"], "global_step": checkpoint["global_step"]}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            loss = float(trainer.callback_metrics["val_loss"])
            self.val_losses.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "val_loss": loss})


def tree(root: Path, rel: Path = Path()) -> list[dict[str, Any]]:
    """Every entry under root (not following symlinks), relative, with symlink targets as readlink gives them."""
    out: list[dict[str, Any]] = []
    for p in sorted((root / rel).iterdir()):
        r = p.relative_to(root)
        if p.is_symlink():
            out.append({"path": str(r), "kind": "symlink", "target": str(p.readlink())})
        elif p.is_dir():
            out.append({"path": str(r), "kind": "dir"})
            out.extend(tree(root, r))
        else:
            out.append({"path": str(r), "kind": "file", "size": p.stat().st_size})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, type=Path, help="project root; runs go to ROOT/nshtrainer_logs/<id>/")
    p.add_argument("--epochs", type=int, default=3, help="max_epochs (total, counting the epochs of a resumed run)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep in every training step")
    p.add_argument("--resume", type=Path, default=None, help="a .ckpt to resume fit from (TrainerConfig.ckpt_path)")
    p.add_argument("--run-id", help="TrainerConfig.id (default: random; with --resume, the id in the checkpoint)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW lr (0.3, 3 epochs: best is epoch 1, last epoch 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    root = a.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_id = a.run_id
    if run_id is None and a.resume is not None:
        run_id = nt.Trainer.hparams_from_checkpoint(a.resume).id
    if run_id is None:
        # Always pass id: with pydantic>=2.12 `from pydantic import *` rebinds nshconfig.MISSING, so the
        # TrainerConfig.id default no longer validates and TrainerConfig() without an id raises.
        run_id = nt.TrainerConfig.generate_id()
    cfg = nt.TrainerConfig(
        id=run_id,
        max_epochs=a.epochs,
        accelerator="cpu",
        primary_metric=nt.MetricConfig(monitor="val_loss", mode="min"),
        # The default is wandb + csv + tensorboard. Keep csv: with no logger at all, nshtrainer's
        # LightningModuleBase.log() is a no-op, val_loss never reaches callback_metrics and best_* breaks.
        loggers=[CSVLoggerConfig()],
        lr_monitor=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        # TrainerConfig.devices takes index lists (CPUAccelerator rejects them), 'auto' or 'all': pass 1 here.
        lightning_kwargs={"devices": 1, "enable_progress_bar": False, "enable_model_summary": False},
    ).with_project_root(root)
    if a.resume is not None:
        cfg = cfg.with_ckpt_path(a.resume)
    torch.manual_seed(a.seed)
    model = TinyMLP(MLPConfig(lr=a.lr), step_sleep=a.step_sleep)
    recorder = Recorder()
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        trainer = nt.Trainer(cfg, callbacks=[recorder])
        trainer.fit(model, train_dataloaders=loader(32, a.seed + 1), val_dataloaders=loader(16, a.seed + 2))
    seconds = round(time.time() - t0, 3)
    ckpt_dir = Path(trainer.default_root_dir, "checkpoint").resolve()  # <root>/nshtrainer_logs/<id>/checkpoint
    links = {e.name: e for e in os.scandir(ckpt_dir) if e.is_symlink() and e.name.endswith(".ckpt")}
    best = next((os.path.realpath(e.path) for n, e in links.items() if n.startswith("best_")), None)
    last = os.path.realpath(links["last.ckpt"].path) if "last.ckpt" in links else None
    report = {
        "trainer": "nshtrainer",
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "nshtrainer": nt.__version__,
        "run_id": trainer.hparams.id,
        "checkpoint_dir": str(ckpt_dir),
        "files": tree(ckpt_dir),
        "best": best,
        "last": last,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "val_losses": recorder.val_losses,
        "resumed": None
        if a.resume is None
        else {
            "path": str(a.resume),
            "ckpt_epoch": recorder.loaded.get("epoch"),  # from Callback.on_load_checkpoint, i.e. fit loaded it
            "ckpt_global_step": recorder.loaded.get("global_step"),
            "start_epoch": recorder.start.get("epoch"),  # at on_train_start; null when max_epochs was already reached
            "start_global_step": recorder.start.get("global_step"),
            "first_epoch_trained": recorder.first_epoch,
        },
        "seconds": seconds,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
