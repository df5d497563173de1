"""`ckptd export`: an inference-only file from a training checkpoint.

Keeps the model's weights and drops optimizer and scheduler state. The weights are found under
`model_state_dict`, `state_dict` (Lightning), `model`, or a key the user names. Nested dicts are flattened
with dots. Tied weights (two names sharing one storage) are copied apart, so safetensors accepts them and
both names load. The source's sha256, epoch, step and metrics go into the file's metadata, and the result
is verified like any checkpoint. torch is reached only through the verify engine. Neither file is left in the
page cache (fsutil.drop_cache): the source once its weights are written, the result by its verification.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd import __version__
from ckptd import verify as engine
from ckptd.fsutil import drop_cache, fsync_dir, opened, temp_path_for
from ckptd.model import Verification

if TYPE_CHECKING:
    from ckptd.progress import Tracker

STATE_KEYS = ("model_state_dict", "state_dict", "model", "module", "weights")


class ExportError(ValueError):
    """The checkpoint cannot be exported: not ok, or no weights found."""


@dataclass(frozen=True)
class ExportResult:
    """The exported file, its verification, and the sizes before and after."""

    path: Path
    verification: Verification
    source_bytes: int
    tensors: int


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "untyped_storage") and hasattr(value, "dtype")


def find_weights(obj: Any, key: str | None = None) -> dict[str, Any]:
    """The flat {name: tensor} state dict inside a loaded checkpoint.

    Raises ExportError naming the keys it has when none holds tensors.
    """
    if not isinstance(obj, Mapping):
        raise ExportError("the checkpoint is not a dict of weights")
    if key is not None:
        if key not in obj:
            raise ExportError(f"no key {key!r}; the checkpoint has: {', '.join(map(str, obj))}")
        found = flatten(obj[key])
    else:
        found = next((flatten(obj[k]) for k in STATE_KEYS if k in obj and flatten(obj[k])), {})
        if not found and all(_is_tensor(v) for v in obj.values()):
            found = flatten(obj)
    if not found:
        raise ExportError(
            f"no weights found under {', '.join(STATE_KEYS)}; pass --key (keys: {', '.join(map(str, obj))})"
        )
    return found


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.name: tensor} of every tensor in nested dicts; other values are dropped."""
    if _is_tensor(value):
        return {prefix: value} if prefix else {}
    if not isinstance(value, Mapping):
        return {}
    found: dict[str, Any] = {}
    for name, inner in value.items():
        found.update(flatten(inner, f"{prefix}.{name}" if prefix else str(name)))
    return found


def untie(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Give every tensor a storage of its own (a contiguous copy of shared or strided ones)."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        identity = (storage.data_ptr(), storage.nbytes())
        own = identity not in seen and tensor.is_contiguous() and tensor.numel() * tensor.element_size() == identity[1]
        seen.add(identity)
        result[name] = tensor if own else tensor.contiguous().clone()
    return result


def export(source: Path, destination: Path, *, fmt: str = "safetensors", key: str | None = None,
           trusted: list[str] | None = None, progress: Tracker | None = None) -> ExportResult:  # fmt: skip
    """Verify `source`, write its weights to `destination` atomically, verify the result. `progress` (a
    terminal's) is told of both reads.

    Raises ExportError when the source is not ok or holds no weights, or the result does not verify.
    """
    read = progress.start(source.name, source.stat().st_size, "verify") if progress is not None else None
    checked = engine.verify(source, trusted=trusted or [], progress=read)
    if checked.status != "ok":
        raise ExportError(f"{source} is {checked.status}: {'; '.join(checked.problems or checked.unsafe_globals)}")
    weights = find_weights(engine.load_checkpoint(source, trusted or []), key)
    if fmt == "safetensors":
        weights = untie(weights)  # safetensors refuses shared storage; torch.save keeps ties as they are
    metadata = {
        "ckptd_source_sha256": str(checked.sha256), "ckptd_source": source.name, "ckptd_version": __version__,
        "epoch": "" if checked.epoch is None else str(checked.epoch),
        "step": "" if checked.global_step is None else str(checked.global_step),
        "metrics": json.dumps(checked.metrics), "format": "pt",
    }  # fmt: skip
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(destination)
    try:
        engine.save_weights(weights, temp, fmt, metadata)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        temp.replace(destination)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(destination.parent)
    count = len(weights)
    del weights  # its tensors map the source's pages: unmapped, they can leave the page cache
    with opened(source, follow=True) as fd:
        drop_cache(fd)
    read = progress.start(destination.name, destination.stat().st_size, "verify") if progress is not None else None
    result = engine.verify(destination, trusted=trusted or [], progress=read)
    if result.status != "ok":
        raise ExportError(f"the exported file {destination} does not verify: {'; '.join(result.problems)}")
    return ExportResult(destination, result, checked.size_bytes, count)
