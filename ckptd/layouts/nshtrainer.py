"""nshtrainer (a Lightning wrapper): single `.ckpt` files in the subfolders of a run's `checkpoint/` folder.

What it writes (nshtrainer 1.5): `<checkpoint>/best_<metric>/epoch<E>-step<S>-<metric><value>.ckpt`,
`<checkpoint>/last/epoch<E>-step<S>-duration<T>s.ckpt` and, after a crash, `<checkpoint>/on_exception/...ckpt`;
beside each `.ckpt` its `<stem>.metadata.json` (epoch, global_step, metrics, a SHA-256 of the checkpoint...);
and relative links `best_<metric>.ckpt`, `last.ckpt` (and their `.metadata.json`) in `<checkpoint>/`. Each
save moves the `.ckpt` into place from a temp file, then writes its metadata; old ones are unlinked, then the
links replaced. Its top-k globs `*.metadata.json` in each subfolder: a ckptd sidecar
(`<name>.ckpt.ckptd.json`) does not match.

The run is the `checkpoint/` folder, not each subfolder: `latest` and retention see best and last together.
`TrainerConfig.ckpt_path=<checkpoint>/last.ckpt` (Lightning's `fit(ckpt_path=...)`) resumes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.metadata import Extracted, capped_metrics, scalar

SUBFOLDER = re.compile(r"^(last|on_exception|best_.+)$")
METADATA_SUFFIX = ".metadata.json"
CHECKPOINT_FOLDER = "checkpoint"  # nshtrainer's default `dirpath` under its run folder


def run_of_file(path: Path) -> Path | None:
    """The `checkpoint/` folder, for a `.ckpt` in one of nshtrainer's subfolders of it; else None."""
    folder = path.parent
    if path.suffix != ".ckpt" or not SUBFOLDER.match(folder.name):
        return None
    top = folder.parent
    if top.name == CHECKPOINT_FOLDER or (top / f"{folder.name}.ckpt").is_symlink():
        return top
    return None


def metadata_of(path: Path) -> Path:
    """The `.metadata.json` nshtrainer writes beside the checkpoint `path`."""
    return path.with_name(path.name.removesuffix(".ckpt") + METADATA_SUFFIX)


def checkpoint_of(metadata: Path) -> Path | None:
    """The checkpoint a `.metadata.json` describes, when it lies where nshtrainer puts one; else None."""
    if not metadata.name.endswith(METADATA_SUFFIX) or not SUBFOLDER.match(metadata.parent.name):
        return None
    return metadata.with_name(metadata.name.removesuffix(METADATA_SUFFIX) + ".ckpt")


def recorded_checksum(record: Any) -> str | None:
    """The SHA-256 nshtrainer recorded for the checkpoint (`checkpoint_checksum`, bare hex), or None."""
    value = record.get("checkpoint_checksum") if isinstance(record, Mapping) else None
    return value.lower() if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value) else None


def companions(checkpoint: Path) -> list[str]:
    """The names of nshtrainer's own files that belong to `checkpoint` (its `.metadata.json`), when it lies where
    nshtrainer puts checkpoints: they are deleted, renamed and mirrored with it."""
    return [metadata_of(checkpoint).name] if run_of_file(checkpoint) is not None else []


def extracted(record: Any) -> Extracted:
    """Epoch, step and metrics from a `.metadata.json` (already parsed, untrusted)."""
    if not isinstance(record, Mapping):
        return Extracted()
    metrics: dict[str, float] = {}
    found = record.get("metrics")
    if isinstance(found, Mapping):
        for name, value in list(found.items())[:1024]:
            number = scalar(value)
            if number is not None and name != "computed_epoch":
                metrics[str(name)] = number
    kept, notes = capped_metrics(metrics)
    return Extracted(epoch=_count(record.get("epoch")), global_step=_count(record.get("global_step")),
                     metrics=kept, producer="nshtrainer", notes=notes)  # fmt: skip


def _count(value: object) -> int | None:
    number = scalar(value)
    return int(number) if number is not None and math.isfinite(number) and number == int(number) else None
