"""Training metadata from a loaded checkpoint object and its file name. Pure: no I/O, no torch import.

Given whatever a checkpoint unpickles to (usually a dict holding tensors) and its file name, `extract`
returns the epoch, the global step, the metrics, the producer, the top-level keys and whether it holds
training state to resume from. Tensors are handled by duck typing (`numel()` and `item()`), so this module
works without torch.

Metrics are read where trainers keep them (see `extract`). A name starting with `best` (`best_metric`,
`best_map`) holds the best value so far, not this checkpoint's own: it is recorded like any other, and
selection ranks it so that the checkpoint where it was first reached wins (see ckptd.selection).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# `name=value` parts of a file name, as Lightning's ModelCheckpoint writes them: epoch=3-step=400-val_loss=0.8193.
_NAME_VALUE = re.compile(
    r"(?<![A-Za-z0-9_./])(?P<name>[A-Za-z][A-Za-z0-9_./]*)=(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
)
# `nameVALUE` parts, as nshtrainer names its files: epoch2-step12-val_loss0.1297. Read only when every
# '-'-separated part of the name is a word followed by a number (so `model_v2` or `epoch_010_checkpoint` is not).
_NAME_NUMBER = re.compile(r"^(?P<name>[A-Za-z][A-Za-z_]*?)(?P<value>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?P<unit>[a-z]*)$")
# Top-level mappings and lists that hold a series of values per metric (a loop's `history`, HF's `log_history`).
_HISTORY = re.compile(r"(?:^|_)(?:history|logs?)$", re.IGNORECASE)
_STEP_NAMES = ("epoch", "step", "global_step", "current_epoch")
# Keys under which a checkpoint holds an optimizer's state: what makes it resumable, not weights only.
TRAINING_STATE_KEYS = frozenset({
    "optimizer_state_dict", "optimizer", "optimizers", "optimizer_states", "optimizer_state", "optim",
    "optim_state", "optim_state_dict", "opt_state", "opt",
})  # fmt: skip
_MAX_KEYS = 200
_MAX_SCANNED = 4096  # entries of a mapping looked at for metrics: a state dict may hold millions
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
    resumable: bool = False  # holds an optimizer's state (training can go on from it), not weights only


def holds_training_state(keys: Iterable[str]) -> bool:
    """True when one of these top-level keys (or DCP item prefixes) names an optimizer's state."""
    return any(str(key).split(".", 1)[0] in TRAINING_STATE_KEYS for key in keys)


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
    """Return the `name=value` pairs of a file name (without its extension), or its `nameVALUE` parts when every
    '-'-separated part is one (nshtrainer: `epoch2-step12-val_loss0.1297`; a part with a unit such as
    `duration3s` is skipped)."""
    stem = filename
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    found = {m["name"]: float(m["value"]) for m in _NAME_VALUE.finditer(stem)}
    if found:
        return found
    parts = [_NAME_NUMBER.match(part) for part in stem.split("-")]
    if len(parts) < 2 or not all(parts):
        return {}
    # `epoch_001-step_1000` spells the same as `epoch1-step1000`: the separator is no part of the name.
    return {m["name"].rstrip("_"): float(m["value"]) for m in parts if m is not None and not m["unit"]}


def value_at(obj: Any, path: str) -> float | None:
    """The number at a dotted path with list indices (`history.val_dice[-1]`, `metrics.map50`), or None. A
    mapping whose keys hold dots themselves (a DCP state's flattened names) is matched on the longest key."""
    tokens: list[str | int] = []
    for part in path.split("."):
        name, *indices = re.split(r"\[", part)
        if name:
            tokens.append(name)
        for index in indices:
            try:
                tokens.append(int(index.rstrip("]")))
            except ValueError:
                return None
    current, i = obj, 0
    while i < len(tokens):
        token = tokens[i]
        if isinstance(token, int):
            if not isinstance(current, list | tuple) or not -len(current) <= token < len(current):
                return None
            current, i = current[token], i + 1
            continue
        if not isinstance(current, Mapping):
            return None
        for j in range(len(tokens), i, -1):  # the longest dotted name the mapping holds
            names = tokens[i:j]
            if all(isinstance(t, str) for t in names) and ".".join(map(str, names)) in current:
                current, i = current[".".join(map(str, names))], j
                break
        else:
            return None
    return scalar(current)


def _top_level_numbers(obj: Mapping[Any, Any]) -> dict[str, float]:
    """Every plain number at the top level (`best_map`, `val_acc`, `loss`), not epoch or step, not a state dict's
    buffers (`bn.num_batches_tracked`)."""
    found = {}
    for key, value in itertools.islice(obj.items(), _MAX_SCANNED):
        if isinstance(key, str) and "." not in key and key not in _STEP_NAMES:
            number = scalar(value)
            if number is not None:
                found[key] = number
    return found


def _history_metrics(obj: Mapping[Any, Any]) -> dict[str, float]:
    """The last value of each series in a top-level history: `{"val_dice": [..]}` or a list of records
    (`[{"step": 10, "eval_loss": 0.3}, ...]`, as HF's log_history)."""
    found: dict[str, float] = {}
    for key, value in itertools.islice(obj.items(), _MAX_SCANNED):
        if not (isinstance(key, str) and _HISTORY.search(key)):
            continue
        if isinstance(value, Mapping):
            for name, series in itertools.islice(value.items(), MAX_METRICS + 1):
                last = series[-1] if isinstance(series, list | tuple) and series else series
                number = scalar(last)
                if number is not None and str(name) not in _STEP_NAMES:
                    found[str(name)] = number
        elif isinstance(value, list | tuple):
            for record in value[-1000:]:
                if isinstance(record, Mapping):
                    for name, item in itertools.islice(record.items(), 64):
                        number = scalar(item)
                        if number is not None and str(name) not in _STEP_NAMES:
                            found[str(name)] = number
    return found


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


def extract(
    obj: Any, filename: str, producer: str | None = None, keys_of: Mapping[str, str] | None = None
) -> Extracted:
    """Read epoch, step, metrics, producer, keys and resumability out of a loaded checkpoint object.

    Given the unpickled object, the checkpoint's file name, a producer already known from the format
    (`"dcp"`, `"huggingface"`), if any, and `keys_of`: {metric: dotted path} for metrics kept elsewhere (a
    watch's `[watch.metric] key`). Sources of metrics, later ones winning: the file name's `name=value` (or
    `nameVALUE`) parts, every number at the top level (`best_map`, `val_acc`), the last value of each series in
    a `history`/`log_history`, Lightning's ModelCheckpoint `current_score` under its monitor's name, a `metrics`
    mapping, and `keys_of`. Never raises on odd objects: it just finds less.
    """
    from_name = name_values(filename)
    metrics = {k: v for k, v in from_name.items() if k not in ("epoch", "step", "global_step")}
    epoch = _integer(from_name.get("epoch"))
    step = _integer(from_name.get("step", from_name.get("global_step")))
    keys: list[str] = []
    found = 0  # how many metrics the checkpoint declares, when more than were read
    needs: list[str] = []
    resumable = False
    if isinstance(obj, Mapping):
        keys = [str(k) for k in itertools.islice(obj.keys(), _MAX_KEYS)]
        resumable = holds_training_state(itertools.islice(obj.keys(), _MAX_SCANNED))
        metrics.update(_top_level_numbers(obj))
        metrics.update(_history_metrics(obj))
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
        for name, path in (keys_of or {}).items():
            number = value_at(obj, path)
            if number is not None:
                metrics[name] = number
        epoch = _first_int(obj, ("epoch",), epoch)
        step = _first_int(obj, ("global_step", "step"), step)
        if producer is None:
            lightning = any(k in obj for k in ("pytorch-lightning_version", "lightning_version"))
            producer = "lightning" if lightning else "torch"
    metrics, notes = capped_metrics(metrics, found)
    return Extracted(
        epoch=epoch, global_step=step, metrics=metrics, producer=producer or "torch", keys=keys, notes=notes,
        needs=needs, resumable=resumable,
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
