"""Atomic file writes: a temp file in the same folder, fsync, rename, fsync the folder.

A reader, or a crash at any moment, sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

TEMP_MARK = ".ckptd-tmp"


def temp_path_for(path: Path) -> Path:
    """A hidden temp name beside `path`, marked so that scans skip it and start-up can sweep it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_MARK}")


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename inside it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically. Raises OSError; on error no temp file is left behind."""
    temp = temp_path_for(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The SHA-256 hex of a file, read in pieces (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(chunk):
            digest.update(piece)
    return digest.hexdigest()
