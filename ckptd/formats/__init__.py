"""Checkpoint formats, recognised by content rather than by name.

Each module here knows one format's structure (stdlib only, no torch): `torch_zip` the zip archives that
`torch.save` writes, `torch_legacy` torch's older pickle stream, `safetensors` single files and sharded
Hugging Face folders, `dcp` torch.distributed.checkpoint folders, `pickles` the static scan and restricted
unpickler that keep checkpoint code from ever running. The verify engine (`ckptd.verify`) drives them.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptd.model import Format

# Names that only a checkpoint would have: a file with one of these that no format parses is corrupt,
# not merely unsupported.
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar", ".pkl"})

DCP_MARKER = ".metadata"
HF_INDEX_SUFFIX = ".safetensors.index.json"
HF_INDEX = "model.safetensors.index.json"
ORBAX_MARKER = "commit_success.txt"

ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1).
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when the first bytes are a safetensors header: a little-endian u64 length, then '{'."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def detect_file(head: bytes, size: int) -> Format | None:
    """Return the format of a file from its first bytes (at least 16 of them), or None if unknown."""
    if head.startswith(ZIP_MAGIC):
        return "torch_zip"
    if head.startswith(LEGACY_MAGIC):
        return "torch_legacy"
    if looks_like_safetensors(head, size):
        return "safetensors"
    return None


def hf_index_in(folder: Path) -> Path | None:
    """Return the sharded-safetensors index file of `folder`, if it has one."""
    preferred = folder / HF_INDEX
    if preferred.is_file():
        return preferred
    try:
        entries = sorted(os.listdir(folder))
    except OSError:  # gone, or not a folder
        return None
    for entry in entries:
        if entry.endswith(HF_INDEX_SUFFIX) and (folder / entry).is_file():
            return folder / entry
    return None


def detect_directory(folder: Path) -> Format | None:
    """Return the format of a directory checkpoint from its marker files, or None if it is none."""
    if (folder / DCP_MARKER).is_file():
        return "dcp"
    if hf_index_in(folder) is not None:
        return "safetensors_sharded"
    if (folder / ORBAX_MARKER).is_file():
        return "orbax"
    return None


def is_checkpoint_name(name: str) -> bool:
    """True when a file name has one of the suffixes that only checkpoints use."""
    return Path(name).suffix.lower() in CHECKPOINT_SUFFIXES
