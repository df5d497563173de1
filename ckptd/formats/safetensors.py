"""The safetensors format: an 8-byte little-endian header length, a JSON header, then the tensor bytes.

`parse_header` checks what the format promises: every tensor's offsets match its dtype and shape, and the
tensors cover the data section exactly, with no gap, overlap or trailing bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.formats.buffers import Buffer
from ckptd.untrusted import UntrustedInput, load_json

# Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 << 20
MAX_DEPTH = 8  # a header is {name: {dtype, shape: [...], data_offsets: [...]}, __metadata__: {...}}


class SafetensorsError(Exception):
    """The file breaks the safetensors format; the message says where."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, with absolute offsets into the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header."""

    tensors: list[TensorEntry]
    metadata: dict[str, str]
    data_start: int


def parse_header(buffer: Buffer) -> Header:
    """Parse and check the header of the safetensors file held in `buffer`.

    Returns the tensors in file order. Raises SafetensorsError naming the first broken rule: a header
    longer than the file, invalid JSON, an unknown dtype, offsets that disagree with dtype and shape, or
    tensors that do not cover the data section exactly.
    """
    view = memoryview(buffer)
    size = len(view)
    if size < 8:
        raise SafetensorsError(f"file is {size} bytes, too short for a safetensors header")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > MAX_HEADER or 8 + header_len > size:
        raise SafetensorsError(f"header claims {header_len} bytes but the file is {size} bytes")
    try:
        raw = load_json(bytes(view[8 : 8 + header_len]), what="header", max_depth=MAX_DEPTH, max_bytes=MAX_HEADER)
    except UntrustedInput as exc:
        raise SafetensorsError(str(exc)) from exc
    if not isinstance(raw, dict):
        raise SafetensorsError("header is not a JSON object")
    data_start = 8 + header_len
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError("__metadata__ is not an object")
    tensors = [_entry(name, spec, data_start) for name, spec in raw.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    expected = data_start
    for tensor in tensors:
        if tensor.start != expected:
            what = "overlaps the previous tensor" if tensor.start < expected else "leaves a gap"
            raise SafetensorsError(
                f"tensor {tensor.name!r} starts at byte {tensor.start}, expected {expected}: it {what}"
            )
        expected = tensor.end
    if expected != size:
        raise SafetensorsError(
            f"tensors end at byte {expected} but the file is {size} bytes"
            + (" (truncated)" if expected > size else " (trailing bytes)")
        )
    return Header(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()}, data_start=data_start)


def _entry(name: str, spec: Any, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise SafetensorsError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    expected = math.ceil(math.prod(shape) * DTYPE_SIZES[str(dtype)])
    if begin < 0 or end - begin != expected:
        raise SafetensorsError(
            f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, but {dtype}{shape} needs {expected}"
        )
    return TensorEntry(name, str(dtype), tuple(shape), data_start + begin, data_start + end)


def parse_index(path: Path) -> dict[str, str]:
    """Read a sharded checkpoint's `*.safetensors.index.json`; return its weight map (tensor -> shard file).

    Raises SafetensorsError when the file is not JSON or has no weight map of strings.
    """
    try:
        raw = load_json(path.read_bytes(), what=path.name)
    except (UntrustedInput, OSError) as exc:
        raise SafetensorsError(str(exc)) from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{path.name} has no weight_map of tensor names to shard files")
    return {str(k): v for k, v in weight_map.items()}
