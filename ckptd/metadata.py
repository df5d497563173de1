"""Training metadata from a loaded checkpoint object and its file name. Pure: no I/O, no torch import.

Given whatever a checkpoint unpickles to (usually a dict holding tensors) and its file name, `extract`
returns the epoch, the global step, the metrics, the producer and the top-level keys. Tensors are handled
by duck typing (`numel()` and `item()`), so this module works without torch.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# `name=value` parts of a file name, as Lightning's ModelCheckpoint writes them: epoch=3-step=400-val_loss=0.8193.
_NAME_VALUE = re.compile(
    r"(?<![A-Za-z0-9_./])(?P<name>[A-Za-z][A-Za-z0-9_./]*)=(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
)
_MAX_KEYS = 200
MAX_METRICS = 256  # a sidecar is read by every `latest` and `list`: a million metrics would make it 24 MB
MAX_METRIC_NAME = 200


@dataclass(frozen=True)
class Extracted:
    """What a checkpoint says about the training that produced it."""

    epoch: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    producer: str | None = None
    keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was cut to stay small, for the record's warnings
    # Checkpoints beside this one that the trainer's records say it still needs (the Trainer's
    # best_model_checkpoint, ModelCheckpoint's best_model_path): bare names, never paths.
    needs: list[str] = field(default_factory=list)


def scalar(value: Any) -> float | None:
    """Return `value` as a float if it is a single number (int, float, numpy or one-element tensor)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range, such as 10**400
            return None
    numel = getattr(value, "numel", None)
    item = getattr(value, "item", None)
    if callable(item) and (numel is None or (callable(numel) and numel() == 1)):
        try:
            result = item()
        except (ValueError, RuntimeError, TypeError):
            return None
        if isinstance(result, int | float) and not isinstance(result, bool):
            return float(result)
    return None


def _integer(value: Any) -> int | None:
    number = scalar(value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def name_values(filename: str) -> dict[str, float]:
    """Return the `name=value` pairs of a file name (without its extension)."""
    stem = filename
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return {m["name"]: float(m["value"]) for m in _NAME_VALUE.finditer(stem)}


def sibling_name(value: Any) -> str | None:
    """The bare name of a path a trainer recorded (`out/checkpoint-40` -> `checkpoint-40`), or None when it is no
    usable name. Only the last part is kept: a record never points ckptd anywhere but beside the checkpoint."""
    if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
        return None
    name = value.rstrip("/").rsplit("/", 1)[-1]
    return name if name not in ("", ".", "..") and len(name.encode("utf-8", "surrogateescape")) <= 255 else None


def _lightning_best(callbacks: Any) -> list[str]:
    """The names of ModelCheckpoint's best_model_path: `trainer.test(ckpt_path="best")` loads it."""
    found: list[str] = []
    if isinstance(callbacks, Mapping):
        for key, state in itertools.islice(callbacks.items(), 64):
            if str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping):
                name = sibling_name(state.get("best_model_path"))
                if name is not None and name not in found:
                    found.append(name)
    return found


def _lightning_scores(callbacks: Any) -> dict[str, float]:
    """Return {monitor: current_score} from Lightning's ModelCheckpoint callback states."""
    scores: dict[str, float] = {}
    if not isinstance(callbacks, Mapping):
        return scores
    for key, state in callbacks.items():
        if not (str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping)):
            continue
        monitor, score = state.get("monitor"), scalar(state.get("current_score"))
        if isinstance(monitor, str) and score is not None:
            scores[monitor] = score
    return scores


def extract(obj: Any, filename: str, producer: str | None = None) -> Extracted:
    """Read epoch, step, metrics, producer and keys out of a loaded checkpoint object.

    Given the unpickled object, the checkpoint's file name, and a producer already known from the format
    (`"dcp"`, `"huggingface"`), if any. Sources of metrics, later ones winning: the file name's
    `name=value` parts, `best_metric`, Lightning's ModelCheckpoint `current_score` under its monitor's
    name, and a `metrics` mapping. Never raises on odd objects: it just finds less.
    """
    from_name = name_values(filename)
    metrics = {k: v for k, v in from_name.items() if k not in ("epoch", "step", "global_step")}
    epoch = _integer(from_name.get("epoch"))
    step = _integer(from_name.get("step", from_name.get("global_step")))
    keys: list[str] = []
    found = 0  # how many metrics the checkpoint declares, when more than were read
    needs: list[str] = []
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj.keys())[:_MAX_KEYS]]
        best = scalar(obj.get("best_metric"))
        if best is not None:
            metrics["best_metric"] = best
        metrics.update(_lightning_scores(obj.get("callbacks")))
        needs = [name for name in _lightning_best(obj.get("callbacks")) if name != filename]
        declared = obj.get("metrics")
        if isinstance(declared, Mapping):
            # Read no more than can be kept: a hostile mapping may hold millions.
            for name, value in itertools.islice(declared.items(), MAX_METRICS + 1):
                number = scalar(value)
                if number is not None:
                    metrics[str(name)] = number
            found = max(found, len(declared))
        epoch = _first_int(obj, ("epoch",), epoch)
        step = _first_int(obj, ("global_step", "step"), step)
        if producer is None:
            lightning = any(k in obj for k in ("pytorch-lightning_version", "lightning_version"))
            producer = "lightning" if lightning else "torch"
    metrics, notes = capped_metrics(metrics, found)
    return Extracted(
        epoch=epoch, global_step=step, metrics=metrics, producer=producer or "torch", keys=keys, notes=notes,
        needs=needs,
    )  # fmt: skip


def capped_metrics(metrics: Mapping[str, float], found: int = 0) -> tuple[dict[str, float], list[str]]:
    """At most MAX_METRICS metrics with names of at most MAX_METRIC_NAME characters, and a note when cut.

    `found`: how many the source declared, when it held more than were read.
    """
    kept = {name: value for name, value in metrics.items() if len(name) <= MAX_METRIC_NAME}
    notes = []
    if len(kept) > MAX_METRICS or found > MAX_METRICS:
        notes.append(f"{max(found, len(kept))} metrics found; the first {MAX_METRICS} were kept")
        kept = dict(list(kept.items())[:MAX_METRICS])
    if len(kept) < len(metrics) and not notes:
        notes.append(f"{len(metrics) - len(kept)} metric(s) with names over {MAX_METRIC_NAME} characters were left out")
    return kept, notes


def _first_int(obj: Mapping[Any, Any], names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        value = _integer(obj.get(name))
        if value is not None:
            return value
    return default
