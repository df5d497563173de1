"""Sidecars: `<checkpoint>.ckptd.json` beside each verified checkpoint.

`render` and `parse` are pure; `write` puts a sidecar in place atomically; `read` and `is_current` let the
read-only commands (`latest`, `best`, `list`, `show`) answer from sidecars without torch. The schema is in
docs/sidecar.md and ckptd/schemas/sidecar.schema.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckptd.fsutil import atomic_write_bytes
from ckptd.model import Verification

SIDECAR_SUFFIX = ".ckptd.json"
SCHEMA_VERSION = 1

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


def sidecar_path(checkpoint: Path) -> Path:
    """Where the sidecar of `checkpoint` lives: beside it (beside the folder, for directory checkpoints)."""
    return checkpoint.with_name(checkpoint.name + SIDECAR_SUFFIX)


def checkpoint_of(sidecar: Path) -> Path:
    """The checkpoint a sidecar file belongs to."""
    return sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX))


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


def parse(data: bytes) -> Sidecar:
    """Parse sidecar bytes. Raises SidecarError when they are not a sidecar of a known schema version."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(f"not valid JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("schema_version") != SCHEMA_VERSION:
        raise SidecarError(f"not a ckptd sidecar of schema version {SCHEMA_VERSION}")
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


def write(checkpoint: Path, data: bytes) -> Path:
    """Write rendered sidecar bytes beside `checkpoint`, atomically; return the sidecar's path."""
    target = sidecar_path(checkpoint)
    atomic_write_bytes(target, data)
    return target


def set_pinned(checkpoint: Path, pinned: bool) -> None:
    """Rewrite a sidecar (atomically) with its `pinned` flag set; nothing else changes."""
    target = sidecar_path(checkpoint)
    body = json.loads(target.read_bytes())
    body["pinned"] = pinned
    atomic_write_bytes(target, (json.dumps(body, indent=2, allow_nan=False) + "\n").encode())


def read(checkpoint: Path) -> Sidecar | None:
    """Return the sidecar of `checkpoint`, or None when it has none or it is unreadable."""
    try:
        found = parse(sidecar_path(checkpoint).read_bytes())
    except (OSError, SidecarError):
        return None
    # The folder may have moved since: the sidecar's location, not its stored path, names the checkpoint.
    return dataclasses.replace(found, verification=dataclasses.replace(found.verification, path=str(checkpoint)))


def remove(checkpoint: Path) -> bool:
    """Delete the sidecar of `checkpoint`; True if there was one."""
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(checkpoint).unlink()
        return True
    return False


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
