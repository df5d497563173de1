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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ckptd.fsutil import atomic_write_bytes, open_regular, opened, unlink_confined
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


def pinned_at(dir_fd: int, checkpoint_name: str) -> bool:
    """Whether the sidecar beside a checkpoint, in an open folder, says `pinned` (its last component not
    followed). The sidecar is what every box sharing a folder reads: a `ckptd pin` made on one box reaches the
    others only through it. False when there is none or it cannot be read."""
    try:
        fd = open_regular(sidecar_name(checkpoint_name), dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return _parse_body(os.read(fd, MAX_SIDECAR_BYTES + 1)).get("pinned") is True
    except (OSError, SidecarError):
        return False
    finally:
        os.close(fd)


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
    """Return the sidecar beside `checkpoint`, or None when it has none or it is unreadable (see Store.read for
    sidecars that may be in the state folder)."""
    return Store().read(checkpoint)


def remove(checkpoint: Path, root: Path) -> bool:
    """Delete the sidecar of `checkpoint`, below the watched folder `root` and reached without following a
    link (fsutil.unlink_confined); True if there was one. Raises OSError when a folder on the way is a link."""
    return unlink_confined(root, sidecar_path(checkpoint))


def find(folder: Path) -> Iterator[tuple[Sidecar, bool]]:
    """Every sidecar under `folder` (hidden folders skipped), each with whether it is still current, one at a
    time in the order of a sorted walk (a whole tree of 1,000,000 is never held in memory).

    A sidecar whose checkpoint is gone is left out; one whose checkpoint changed since is kept, marked
    not current.
    """
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
                yield parsed, is_current(parsed, checkpoint, stat)


def is_current(found: Sidecar, checkpoint: Path, stat: os.stat_result | None = None) -> bool:
    """True when the checkpoint still has the size and mtime it had when verified: a sidecar of a checkpoint
    rewritten since describes other bytes. Raises OSError when the checkpoint cannot be stat'ed."""
    if not found.verification.is_directory:
        stat = stat or checkpoint.stat()
        return stat.st_size == found.verification.size_bytes and stat.st_mtime_ns / 1e9 == found.verification.mtime
    from ckptd.discover import identity  # a directory's identity spans the files inside it

    now = identity(checkpoint)
    return now.size == found.verification.size_bytes and now.mtime == found.verification.mtime


# ------------------------------------------------------------------------------------------ where they live

Placement = Literal["auto", "beside", "state"]
STATE_FOLDER = "sidecars"


@dataclass(frozen=True)
class Store:
    """Where the sidecars of the watched folders live: beside each checkpoint (`<checkpoint>.ckptd.json`), or,
    for a checkpoint whose trainer would trip over a file beside it (see ckptd.layouts) or whose watch says
    `sidecars = "state"`, at `<state_dir>/sidecars/<watch>/<path relative to the watched folder>.ckptd.json`.

    Readers look in both places, so `ckptd latest`, `list` and `show` find a sidecar wherever it is, given the
    config; without one (`Store()`) only sidecars beside checkpoints are found.
    """

    state_dir: Path | None = None
    watches: tuple[tuple[str, Path], ...] = ()

    def in_state(self, checkpoint: Path) -> Path | None:
        """Where the sidecar of `checkpoint` goes in the state folder, or None when it is in no watched folder."""
        if self.state_dir is None:
            return None
        for name, root in self.watches:
            if checkpoint != root and checkpoint.is_relative_to(root):
                rel = checkpoint.relative_to(root)
                return self.state_dir / STATE_FOLDER / name / rel.parent / sidecar_name(rel.name)
        return None

    def _places(self, checkpoint: Path) -> list[Path]:
        state = self.in_state(checkpoint)
        return [sidecar_path(checkpoint), *([state] if state is not None else [])]

    def read(self, checkpoint: Path) -> Sidecar | None:
        """The sidecar of `checkpoint` from wherever it is, or None (see the module's `read`)."""
        for place in self._places(checkpoint):
            try:
                found = parse(_read_bounded(place))
            except (OSError, SidecarError):
                continue
            # The folder may have moved since: the sidecar's location, not its stored path, names the checkpoint.
            moved = dataclasses.replace(found.verification, path=str(checkpoint))
            return dataclasses.replace(found, verification=moved)
        return None

    def path_of(self, checkpoint: Path) -> Path | None:
        """The file holding the sidecar of `checkpoint` now, or None."""
        return next((p for p in self._places(checkpoint) if p.is_file() and not p.is_symlink()), None)

    def write(self, checkpoint: Path, data: bytes, *, root: Path, state: bool) -> Path:
        """Write a sidecar atomically, in the state folder when `state` (and the checkpoint is watched), else
        beside it (through no link below `root`); the copy in the other place, if any, is removed."""
        target = self.in_state(checkpoint) if state else None
        if target is None:
            written = sidecar_path(checkpoint)
            atomic_write_bytes(written, data, root=root)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
            written = target
        for other in self._places(checkpoint):
            if other != written:
                self._unlink(other, root)
        return written

    def remove(self, checkpoint: Path, root: Path) -> bool:
        """Delete the sidecar of `checkpoint` wherever it is; True if there was one."""
        return any([self._unlink(place, root) for place in self._places(checkpoint)])

    def _unlink(self, place: Path, root: Path) -> bool:
        if self.state_dir is not None and place.is_relative_to(self.state_dir):
            try:
                place.unlink()
            except FileNotFoundError:
                return False
            return True
        return unlink_confined(root, place)

    def set_pinned(self, checkpoint: Path, pinned: bool) -> None:
        """Rewrite a sidecar (atomically, where it is) with its `pinned` flag set; nothing else changes."""
        target = self.path_of(checkpoint)
        if target is None:
            raise FileNotFoundError(f"{checkpoint} has no sidecar")
        body = _parse_body(_read_bounded(target))
        body["pinned"] = pinned
        atomic_write_bytes(target, (json.dumps(body, indent=2, allow_nan=False) + "\n").encode())

    def find(self, folder: Path) -> Iterator[tuple[Sidecar, bool]]:
        """Every sidecar of a checkpoint under `folder`, beside it or in the state folder, each with whether it
        is still current (see the module's `find`); one per checkpoint, one at a time: those beside their
        checkpoints in walk order, then those in the state folder (a checkpoint with both is found beside)."""
        yield from find(folder)
        for checkpoint in self._state_checkpoints(folder):
            if read(checkpoint) is not None:
                continue  # found beside it already (a sidecar being moved between the two places)
            parsed = self.read(checkpoint)
            try:
                if parsed is not None:
                    yield parsed, is_current(parsed, checkpoint)
            except OSError:
                continue

    def _state_checkpoints(self, folder: Path) -> Iterator[Path]:
        """The checkpoints under `folder` (that still exist) whose sidecars are in the state folder."""
        if self.state_dir is None:
            return
        for name, root in self.watches:
            if not (folder.is_relative_to(root) or root.is_relative_to(folder)):
                continue
            base = self.state_dir / STATE_FOLDER / name
            start = base / folder.relative_to(root) if folder.is_relative_to(root) else base
            for sidecar in sorted(start.rglob(f"*{SIDECAR_SUFFIX}")) if start.is_dir() else []:
                checkpoint = _state_checkpoint(sidecar, base, root)
                if checkpoint is not None and checkpoint.is_relative_to(folder) and checkpoint.exists():
                    yield checkpoint

    def orphans(self, watch: str, root: Path) -> Iterator[Path]:
        """Sidecars of one watch in the state folder whose checkpoint is gone."""
        if self.state_dir is None:
            return
        base = self.state_dir / STATE_FOLDER / watch
        for sidecar in sorted(base.rglob(f"*{SIDECAR_SUFFIX}")) if base.is_dir() else []:
            checkpoint = _state_checkpoint(sidecar, base, root)
            if checkpoint is None or not (checkpoint.exists() or checkpoint.is_symlink()):
                yield sidecar


def _state_checkpoint(sidecar: Path, base: Path, root: Path) -> Path | None:
    """The checkpoint a sidecar in the state folder belongs to (mirroring its place below the watched folder)."""
    inside = checkpoint_of(sidecar)
    return root / inside.relative_to(base) if inside is not None else None


def placed_in_state(placement: Placement, checkpoint: Path, layout: str | None) -> bool:
    """Whether a checkpoint's sidecar goes to the state folder: by the watch's `sidecars` setting, or for "auto"
    by its layout (only where a sidecar beside it would trip its trainer)."""
    if placement != "auto":
        return placement == "state"
    if layout is None:
        return False
    from ckptd import layouts

    return any(each.name == layout and each.sidecar_in_state(checkpoint) for each in layouts.layouts())


def store_of(config: Any) -> Store:
    """The sidecar store of a config (its state folder and watched folders)."""
    return Store(config.daemon.state_dir, tuple((w.name, w.path) for w in config.watch))
