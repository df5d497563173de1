"""Sidecars: `<checkpoint>.ckptd.json` beside each verified checkpoint.

`render` and `parse` are pure; `write` puts a sidecar in place atomically; `read` and `is_current` let the
read-only commands (`latest`, `best`, `list`, `show`) answer from sidecars without torch. The schema is in
docs/sidecar.md and ckptd/schemas/sidecar.schema.json.

A checkpoint whose name is too long for the suffix (NAME_MAX is 255 bytes) gets a shortened sidecar name,
`<start of the name>~<16 hex digits of its SHA-256>.ckptd.json` (see untrusted.fit_name); `checkpoint_of`
finds its checkpoint again through the path stored inside. Sidecars are read without following links, and
parsed within size and depth limits, since anyone who can write the run folder can write them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckptd.fsutil import atomic_write_bytes, opened, unlink_confined
from ckptd.model import Verification
from ckptd.untrusted import UntrustedInput, fit_name, load_json

SIDECAR_SUFFIX = ".ckptd.json"
SCHEMA_VERSION = 1
MAX_SIDECAR_BYTES = 64 << 20  # a directory checkpoint of 100,000 files has a sidecar of about 10 MB
_SHORTENED = re.compile(r"~[0-9a-f]{16}" + re.escape(SIDECAR_SUFFIX) + "$")

# JSON has no NaN or Infinity: a non-finite metric (a diverged val_loss) is stored as one of these strings.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class SidecarError(ValueError):
    """A sidecar file is not valid JSON or lacks required fields."""


@dataclass(frozen=True)
class Sidecar:
    """A parsed sidecar: the verification record plus when, where and by what it was verified."""

    verification: Verification
    verified_at: str
    host: str
    ckptd_version: str
    engine: dict[str, str]
    pinned: bool = False

    @property
    def checkpoint(self) -> Path:
        """The checkpoint this sidecar describes."""
        return Path(self.verification.path)


def sidecar_name(checkpoint_name: str) -> str:
    """The file name of a checkpoint's sidecar: `<name>.ckptd.json`, shortened to fit NAME_MAX if need be."""
    return fit_name(checkpoint_name, SIDECAR_SUFFIX)


def sidecar_path(checkpoint: Path) -> Path:
    """Where the sidecar of `checkpoint` lives: beside it (beside the folder, for directory checkpoints)."""
    return checkpoint.with_name(sidecar_name(checkpoint.name))


def checkpoint_of(sidecar: Path) -> Path | None:
    """The checkpoint a sidecar file belongs to, or None when a shortened sidecar's own record is unreadable."""
    plain = sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX))
    if not _SHORTENED.search(sidecar.name) or plain.exists() or plain.is_symlink():
        return plain
    try:
        name = Path(_parse_body(_read_bounded(sidecar)).get("path", "")).name
    except (OSError, SidecarError):
        return None
    return sidecar.with_name(name) if name and sidecar_name(name) == sidecar.name else None


def render(
    verification: Verification,
    *,
    verified_at: datetime,
    host: str,
    ckptd_version: str,
    engine: dict[str, str],
    pinned: bool = False,
) -> bytes:
    """Return the sidecar's JSON bytes (stable key order, UTF-8, trailing newline)."""
    body: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **jsonable(verification)}
    body.update(
        verified_at=verified_at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        host=host,
        ckptd_version=ckptd_version,
        engine=engine,
        pinned=pinned,
    )
    return (json.dumps(body, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def jsonable(verification: Verification) -> dict[str, Any]:
    """`verification.to_dict()` with non-finite metrics as "NaN", "Infinity" or "-Infinity": strict JSON."""
    body = verification.to_dict()
    body["metrics"] = {name: _metric_out(value) for name, value in verification.metrics.items()}
    return body


def _metric_out(value: float) -> float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _parse_body(data: bytes) -> dict[str, Any]:
    try:
        body = load_json(data, what="sidecar", max_bytes=MAX_SIDECAR_BYTES)
    except UntrustedInput as exc:
        raise SidecarError(str(exc)) from exc
    if not isinstance(body, dict) or body.get("schema_version") != SCHEMA_VERSION:
        raise SidecarError(f"not a ckptd sidecar of schema version {SCHEMA_VERSION}")
    return body


def _read_bounded(path: Path) -> bytes:
    """A sidecar's bytes: a regular file, its last component not followed, at most MAX_SIDECAR_BYTES + 1."""
    with opened(path) as fd:
        return os.read(fd, MAX_SIDECAR_BYTES + 1)


def parse(data: bytes) -> Sidecar:
    """Parse sidecar bytes. Raises SidecarError when they are not a sidecar of a known schema version."""
    body = _parse_body(data)
    metrics = body.get("metrics")
    if isinstance(metrics, dict):
        body["metrics"] = {k: NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in metrics.items()}
    try:
        return Sidecar(
            verification=Verification.from_dict(body),
            verified_at=str(body["verified_at"]),
            host=str(body["host"]),
            ckptd_version=str(body["ckptd_version"]),
            engine=dict(body.get("engine", {})),
            pinned=bool(body.get("pinned", False)),
        )
    except (KeyError, TypeError) as exc:
        raise SidecarError(f"missing or malformed field: {exc}") from exc


def write(checkpoint: Path, data: bytes, root: Path | None = None) -> Path:
    """Write rendered sidecar bytes beside `checkpoint`, atomically; return the sidecar's path.

    `root`, the watched folder, makes the write go through no link below it (fsutil.atomic_write_bytes).
    """
    target = sidecar_path(checkpoint)
    atomic_write_bytes(target, data, root=root)
    return target


def set_pinned(checkpoint: Path, pinned: bool) -> None:
    """Rewrite a sidecar (atomically) with its `pinned` flag set; nothing else changes."""
    target = sidecar_path(checkpoint)
    body = _parse_body(_read_bounded(target))
    body["pinned"] = pinned
    atomic_write_bytes(target, (json.dumps(body, indent=2, allow_nan=False) + "\n").encode())


def read(checkpoint: Path) -> Sidecar | None:
    """Return the sidecar of `checkpoint`, or None when it has none or it is unreadable."""
    try:
        found = parse(_read_bounded(sidecar_path(checkpoint)))
    except (OSError, SidecarError):
        return None
    # The folder may have moved since: the sidecar's location, not its stored path, names the checkpoint.
    return dataclasses.replace(found, verification=dataclasses.replace(found.verification, path=str(checkpoint)))


def remove(checkpoint: Path, root: Path) -> bool:
    """Delete the sidecar of `checkpoint`, below the watched folder `root` and reached without following a
    link (fsutil.unlink_confined); True if there was one. Raises OSError when a folder on the way is a link."""
    return unlink_confined(root, sidecar_path(checkpoint))


def find(folder: Path) -> list[tuple[Sidecar, bool]]:
    """Every sidecar under `folder` (hidden folders skipped), each with whether it is still current.

    A sidecar whose checkpoint is gone is left out; one whose checkpoint changed since is kept, marked
    not current.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(SIDECAR_SUFFIX):
                continue
            checkpoint = checkpoint_of(Path(dirpath) / name)
            if checkpoint is None:
                continue
            try:
                stat = checkpoint.stat()
            except OSError:
                continue
            parsed = read(checkpoint)
            if parsed is not None:
                found.append((parsed, is_current(parsed, checkpoint, stat)))
    return found


def is_current(found: Sidecar, checkpoint: Path, stat: os.stat_result | None = None) -> bool:
    """True when the checkpoint still has the size and mtime it had when verified: a sidecar of a checkpoint
    rewritten since describes other bytes. Raises OSError when the checkpoint cannot be stat'ed."""
    if not found.verification.is_directory:
        stat = stat or checkpoint.stat()
        return stat.st_size == found.verification.size_bytes and stat.st_mtime_ns / 1e9 == found.verification.mtime
    from ckptd.discover import identity  # a directory's identity spans the files inside it

    now = identity(checkpoint)
    return now.size == found.verification.size_bytes and now.mtime == found.verification.mtime
