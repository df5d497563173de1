"""Mirror targets: where best and latest checkpoints are copied. One small protocol, one module per backend.

`local` (a folder or NFS mount) and `s3` (S3 and S3-compatible stores; the only boto3 import) implement
`Target`; `make_target` picks one by URL scheme. tests/test_mirror_targets.py runs one contract suite
against every backend. `sweep` bounds what interrupted copies leave: temp files, incomplete multipart uploads.

A target is storage other people may write: every key and every byte read from it is untrusted. Backends
keep keys inside the target (the local one refuses `..` and never follows a link), bound what they read
into memory, and prove what they store; the callers validate the names they read in indexes and listings.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ckptd.errors import CkptdError, ConfigError

Progress = Callable[[int], None]
SMALL_OBJECT_MAX = 64 << 20  # index.json and sidecars; anything larger on a target is not ckptd's
STALE_AFTER = 3600.0  # a temp file or multipart upload idle this long is a dead copy's (Target.sweep)


class MirrorError(CkptdError):
    """A target could not be reached or refused an operation; worth retrying later. A command that meets one
    exits 1 (a check failed) with its message, never a traceback."""


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

    def sweep(self, idle_for: float = STALE_AFTER) -> builtins.list[str]:
        """Remove what interrupted copies left behind, never an object: a local folder's temp files (a copy or
        index write killed half-way), S3's incomplete multipart uploads (an upload killed, or one whose own
        abort failed with the store down). Only what has been idle for `idle_for` seconds or more goes (a temp
        file not written to, an upload no part was added to): a copy still running elsewhere (`ckptd mirror`
        beside the daemon, another machine mirroring into the same target) is left alone. Returns what it
        removed, for the log. Raises MirrorError when the target fails."""
        ...


def _local(name: str, settings: object, config_dir: Path, node: str) -> Target:
    from ckptd.mirrors.local import LocalTarget

    folder = Path(str(getattr(settings, "url", "")).removeprefix("file://"))
    root = folder if folder.is_absolute() else config_dir / folder
    return LocalTarget(name, root / node if node else root, settings)


def _s3(name: str, settings: object, config_dir: Path, node: str) -> Target:
    from ckptd.mirrors.s3 import S3Target  # the only boto3 import, and only when an s3:// target is built

    return S3Target(name, settings, node=node)


def _s3_problem(url: str) -> str | None:
    bucket = url.removeprefix("s3://").partition("/")[0]
    return None if bucket else "an s3:// URL needs a bucket: s3://bucket or s3://bucket/prefix"


def _local_problem(url: str) -> str | None:
    return None if url.removeprefix("file://") else "a file:// URL needs a folder: file:///srv/backup"


@dataclass(frozen=True)
class Scheme:
    """One kind of target: what it is, what else its URLs need, and how one is built."""

    what: str  # for messages: what the target is and what its URLs look like
    build: Callable[[str, object, Path, str], Target]  # (name, settings, the config file's folder, node)
    problem: Callable[[str], str | None]  # why a URL of this scheme cannot be used, or None


# The one table of URL schemes. Config validation (ckptd.config) refuses any URL that scheme_problem faults, at
# load time, and make_target builds by the same table, so the two never disagree: a new backend is one row here.
# A URL without "://" is a local folder ("file").
SCHEMES: dict[str, Scheme] = {
    "file": Scheme("a local folder or NFS mount: a plain path, or file:///srv/backup", _local, _local_problem),
    "s3": Scheme("S3 and S3-compatible stores: s3://bucket/prefix", _s3, _s3_problem),
}
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # "s3:bucket", "s3:/bucket"; two letters at least: not "C:"


def scheme_of(url: str) -> str:
    """The scheme of a mirror URL: the text before "://", or "file" for a folder path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def scheme_problem(url: str) -> str | None:
    """Why no target can be built for `url`, or None. Pure; never repeats the URL, which may hold a secret."""
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        supported = " and ".join(f"{name}:// ({s.what})" for name, s in SCHEMES.items())
        return f"unknown scheme {scheme!r}; ckptd implements {supported}"
    if "://" not in url and _URL_LIKE.match(url):
        written = url.split(":", 1)[0]
        return (f"{written!r} followed by ':' looks like a URL without '//' (such as s3://bucket/prefix); for a"
                " folder whose name holds a colon, write ./ before it")  # fmt: skip
    return SCHEMES[scheme].problem(url)


def make_target(name: str, settings: object, config_dir: Path, *, node: str = "", source: str = "config") -> Target:
    """Build the target named `name` from its `[mirror.NAME]` settings, by the URL's scheme (SCHEMES).

    A URL without a scheme (or `file://`) is a local folder, relative to `config_dir` (the config file's
    folder); `s3://bucket/prefix` is S3. With `node` (the box's `[daemon] node`), the target is that box's
    namespace in the store: `<folder>/<node>` or `s3://bucket/prefix/<node>`. Every key a target reads, writes
    or deletes lies below its root, so a box never touches another's copies (many boxes, one bucket); "" is
    the store's top, for a fleet listing (`ckptd ls s3://...`). Raises ConfigError naming `source` (the config
    file, where the caller knows it) for a URL that scheme_problem faults; load_config refuses those first,
    so a loaded config never meets it.
    """
    url = str(getattr(settings, "url", ""))
    problem = scheme_problem(url)
    if problem:
        raise ConfigError(source, [f"at 'mirror.{name}.url': {problem}"])
    return SCHEMES[scheme_of(url)].build(name, settings, config_dir, node)
