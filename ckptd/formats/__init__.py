"""Checkpoint formats, recognised by content rather than by name.

Each module here knows one format's structure (stdlib only, no torch): `torch_zip` the zip archives that
`torch.save` writes, `safetensors` single files and the index of sharded ones, `pickles` the static scan and
the allow-list unpicklers that keep checkpoint code from ever running. Which files form one checkpoint folder
is ckptd.layouts' business. The verify engine (`ckptd.verify`) drives them.
"""

from __future__ import annotations

from pathlib import Path

from ckptd.model import Format

# Names that only a checkpoint would have: inside a folder checkpoint, a file with one of these that no format
# parses is checked as damage, where any other file of the trainer's is only hashed.
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar", ".pkl"})

DCP_MARKER = ".metadata"
HF_INDEX_SUFFIX = ".safetensors.index.json"

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


def is_checkpoint_name(name: str) -> bool:
    """True when a file name has one of the suffixes that only checkpoints use."""
    return Path(name).suffix.lower() in CHECKPOINT_SUFFIXES
