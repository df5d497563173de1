"""Which checkpoint is a run's latest, and which its best. Pure functions over entries.

Latest: the newest `ok` checkpoint that holds training state to resume from (`resumable`; a weights-only
file such as `best_model.pt` is never what a resume script should get), by step, then epoch, then mtime. A
checkpoint with a step is newer than one without; so is one with an epoch, at the same step.

Best: the `ok` checkpoint with the best finite value of a metric (ties go to the newer one); checkpoints
without the metric, or with NaN, never count. A metric named `best...` (`best_metric`, `best_map`) holds the
best value so far, so every checkpoint after the best one repeats it: ties then go to the older one, which is
where it was reached. With no metric to rank by, the trainer's own best slot (`best.pt`, `best_model.pt`,
`best_<metric>.ckpt`, what nshtrainer keeps in `best_<metric>/`) is the best.

Slots: names a trainer writes again and again (`latest_checkpoint.pt`, `last.ckpt`, `best_model.pt`): no
digits, and a word saying latest, last or best. They are the trainer's, not part of a series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Literal

from ckptd.model import Entry

Mode = Literal["min", "max"]

_SLOT = re.compile(r"(?:^|[_\-.])(latest|last|best)(?:$|[_\-.])", re.IGNORECASE)
_DIGIT = re.compile(r"\d")
_BEST_SLOT = re.compile(r"(?:^|[_\-.])best(?:$|[_\-.])", re.IGNORECASE)
_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".tar")


def _stem(path: str) -> str:
    name = path.rstrip("/").rpartition("/")[2]
    while name.lower().endswith(_SUFFIXES):
        name = name[: name.rfind(".")]
    return name


def is_slot(path: str) -> bool:
    """True for a name the trainer rewrites in place (`latest_checkpoint.pt`, `last.ckpt`, `best_model.pt`,
    `model_best.pth.tar`, `best_val_loss.ckpt`): no digit, and latest, last or best as a word."""
    stem = _stem(path)
    return _DIGIT.search(stem) is None and _SLOT.search(stem) is not None


def is_best_slot(path: str) -> bool:
    """True for a slot that holds the trainer's own best (`best.pt`, `best_model.pt`, `best_<metric>.ckpt`), or a
    checkpoint in a folder that holds only the trainer's best (nshtrainer's `checkpoint/best_<metric>/`)."""
    folder = path.rstrip("/").rpartition("/")[0].rpartition("/")[2]
    return (is_slot(path) and _BEST_SLOT.search(_stem(path)) is not None) or folder.lower().startswith("best_")


def recency(entry: Entry) -> tuple[int, int, float, str]:
    """Sort key, oldest first: step (missing counts as -1), then epoch (likewise), then mtime, then path."""
    return (
        entry.step if entry.step is not None else -1,
        entry.epoch if entry.epoch is not None else -1,
        entry.mtime,
        entry.path,
    )


def usable(entries: Iterable[Entry]) -> list[Entry]:
    """The entries that can be used: verified, unchanged since, status ok."""
    return [e for e in entries if e.status == "ok" and e.verified]


def resumable(entry: Entry) -> bool:
    """True unless the checkpoint is known to hold weights only (older sidecars do not say: they count)."""
    return entry.resumable is not False


def latest(entries: Iterable[Entry], *, weights: bool = False) -> Entry | None:
    """The newest ok checkpoint that training can resume from (any newest ok one with `weights`), or None."""
    candidates = [e for e in usable(entries) if weights or resumable(e)]
    return max(candidates, key=recency) if candidates else None


def metric_value(entry: Entry, metric: str) -> float | None:
    """The entry's finite value of `metric`, or None."""
    value = entry.metrics.get(metric)
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def holds_best_so_far(metric: str) -> bool:
    """True for a metric that records the best value so far (`best_metric`, `best_map`), not the checkpoint's."""
    return metric.lower().startswith("best")


def ranked(entries: Iterable[Entry], metric: str, mode: Mode) -> list[Entry]:
    """The ok checkpoints that have `metric`, best first; among equal values the newer first (the older first
    for a best-so-far metric, see holds_best_so_far)."""
    scored = [(v, e) for e in usable(entries) if (v := metric_value(e, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    by_recency = sorted(scored, key=lambda pair: recency(pair[1]), reverse=not holds_best_so_far(metric))
    return [e for _v, e in sorted(by_recency, key=lambda pair: sign * pair[0])]


def best(entries: Iterable[Entry], metric: str | None, mode: Mode) -> Entry | None:
    """The best ok checkpoint by `metric` and `mode`; without a metric, or when none has it, the trainer's own
    best slot (the newest one); None when there is neither."""
    ok = usable(entries)
    order = ranked(ok, metric, mode) if metric else []
    if order:
        return order[0]
    slots = [e for e in ok if is_best_slot(e.path)]
    return max(slots, key=recency) if slots else None


def metric_names(entries: Iterable[Entry]) -> list[str]:
    """The metric names the ok checkpoints hold, sorted (to say what there is when a metric is missing)."""
    return sorted({name for e in usable(entries) for name in e.metrics})
