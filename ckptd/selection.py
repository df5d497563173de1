"""Which checkpoint is a run's latest, and which its best. Pure functions over entries.

Latest: the newest `ok` checkpoint by step, then mtime. Best: the `ok` checkpoint with the best finite value
of a metric (ties go to the newer one); checkpoints without the metric, or with NaN, never count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from ckptd.model import Entry

Mode = Literal["min", "max"]


def recency(entry: Entry) -> tuple[int, float, str]:
    """Sort key, oldest first: step (missing counts as -1), then mtime, then path for a stable order."""
    return (entry.step if entry.step is not None else -1, entry.mtime, entry.path)


def usable(entries: Iterable[Entry]) -> list[Entry]:
    """The entries that can be resumed from: verified, unchanged since, status ok."""
    return [e for e in entries if e.status == "ok" and e.verified]


def latest(entries: Iterable[Entry]) -> Entry | None:
    """The newest ok checkpoint, or None."""
    candidates = usable(entries)
    return max(candidates, key=recency) if candidates else None


def metric_value(entry: Entry, metric: str) -> float | None:
    """The entry's finite value of `metric`, or None."""
    value = entry.metrics.get(metric)
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def ranked(entries: Iterable[Entry], metric: str, mode: Mode) -> list[Entry]:
    """The ok checkpoints that have `metric`, best first; among equal values the newer first."""
    scored = [(v, e) for e in usable(entries) if (v := metric_value(e, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    newest_first = sorted(scored, key=lambda pair: recency(pair[1]), reverse=True)
    return [e for _v, e in sorted(newest_first, key=lambda pair: sign * pair[0])]


def best(entries: Iterable[Entry], metric: str, mode: Mode) -> Entry | None:
    """The best ok checkpoint by `metric` and `mode`, or None when none has the metric."""
    order = ranked(entries, metric, mode)
    return order[0] if order else None
