"""Mirror targets: where best and latest checkpoints are copied. One small protocol, one module per backend.

`local` (a folder or NFS mount) and `s3` (S3 and S3-compatible stores; the only boto3 import) implement
`Target`; `make_target` picks one by URL scheme. tests/test_mirror_targets.py runs one contract suite
against every backend.

A target is storage other people may write: every key and every byte read from it is untrusted. Backends
keep keys inside the target (the local one refuses `..` and never follows a link), bound what they read
into memory, and prove what they store; the callers validate the names they read in indexes and listings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ckptd.errors import ConfigError

Progress = Callable[[int], None]
SMALL_OBJECT_MAX = 64 << 20  # index.json and sidecars; anything larger on a target is not ckptd's


class MirrorError(Exception):
    """A target could not be reached or refused an operation; worth retrying later."""


class IntegrityError(MirrorError):
    """A copy on the target does not match the SHA-256 it must have; the bad copy was not kept."""


class NotFound(MirrorError):
    """The key does not exist on the target."""


@dataclass(frozen=True)
class RemoteObject:
    """What a target says about one stored object."""

    key: str
    size: int


@runtime_checkable
class Target(Protocol):
    """A place checkpoints are mirrored to. Keys are '/'-separated paths relative to the target's root."""

    name: str
    url: str

    def put_file(self, key: str, source: Path, *, sha256: str, progress: Progress | None = None) -> None:
        """Copy `source` to `key` and prove the copy's SHA-256 is `sha256`.

        Atomic: until it returns, readers see the old object or none, never part of the new one.
        Idempotent: putting the same bytes again is harmless. Raises IntegrityError when the stored copy
        does not match (the bad copy is removed), MirrorError when the target fails.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store small `data` (a sidecar, an index.json) at `key`, atomically. Raises MirrorError."""
        ...

    def read_into(self, key: str, out: int, progress: Progress | None = None) -> None:
        """Write the bytes of `key` into the open file descriptor `out`, from its start. The caller owns the
        file: it made it (a temp file it renames once the bytes are proved) and closes it. Raises NotFound,
        MirrorError."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The content of a small object (an index, a sidecar). Raises NotFound, and MirrorError for one over
        SMALL_OBJECT_MAX bytes: a hostile target must not make ckptd read gigabytes into memory."""
        ...

    def sha256(self, key: str) -> str:
        """Read the whole object back and return its SHA-256 hex. Raises NotFound, MirrorError."""
        ...

    def stat(self, key: str) -> RemoteObject | None:
        """The object's size, or None when it does not exist. Raises MirrorError."""
        ...

    def delete(self, key: str) -> None:
        """Delete `key`; a missing key is not an error. Raises MirrorError."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under `prefix`, sorted. Raises MirrorError."""
        ...


def make_target(name: str, settings: object, config_dir: Path) -> Target:
    """Build the target named `name` from its `[mirror.NAME]` settings, by the URL's scheme.

    A URL without a scheme (or `file://`) is a local folder, relative to the config file's folder;
    `s3://bucket/prefix` is S3. Raises ConfigError for any other scheme.
    """
    url = str(getattr(settings, "url", ""))
    if url.startswith("s3://"):
        from ckptd.mirrors.s3 import S3Target

        return S3Target(name, settings)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise ConfigError(
            "config", [f"at 'mirror.{name}.url': unknown scheme {scheme!r}; use a folder path or s3://bucket/prefix"]
        )
    from ckptd.mirrors.local import LocalTarget

    folder = Path(url.removeprefix("file://"))
    return LocalTarget(name, folder if folder.is_absolute() else config_dir / folder, settings)
