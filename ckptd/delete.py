"""The one deletion executor: delete or quarantine exactly the checkpoint that was planned, journaled.

Retention (`prune`), scrub's quarantine and `migrate --delete-old` all remove checkpoints through `execute`.
Other users may write the watched folders while ckptd (root) deletes, so nothing here acts by path twice:

1. The run folder is opened from the watched folder down, one component at a time, never through a link
   (`fsutil.open_folder`); a folder swapped for a link fails here. Every later step is relative to it.
2. The checkpoint's identity (device, inode, size, mtime_ns; a folder's summed over its files) must equal
   the identity it had when the plan was made, not when it was last seen: a file rewritten since, even if
   re-verified meanwhile, is another checkpoint and is refused.
3. A journal intent naming that identity and a trash name is written, durably, before anything moves.
4. The checkpoint is renamed to a hidden trash name in its run folder (atomic; the same folder for most
   trainers, the project folder above accelerate's `checkpoints/`, which accelerate counts entry by entry),
   and the identity of what was moved is checked again. Anything else (swapped in the instant between 2 and
   4) is put back, never deleted. The trash name holds nothing a trainer's discovery could match (no step
   number, no prefix), and it is never in a folder whose every entry a trainer counts.
5. Only then is it deleted or moved to `<state_dir>/quarantine/<watch>/<relative path>`, its sidecar with
   it, and the journal entry closed (marking the catalog row gone) in one transaction.

A process killed at any point leaves a pending journal entry; `finish_pending` completes it from the trash
name, or closes it as skipped when nothing was moved. `dry_run` goes through every check and stops before 3.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ckptd import layouts, sidecar
from ckptd.catalog import Catalog
from ckptd.discover import identity_at
from ckptd.fsutil import (
    TRASH_PREFIX,
    NotRegularFile,
    atomic_write_bytes,
    fsync_dir,
    open_folder,
    open_regular,
    temp_name,
)
from ckptd.model import Identity
from ckptd.retention import Decision
from ckptd.untrusted import UntrustedInput, component

Action = Literal["delete", "quarantine"]
_COPY_PIECE = 16 << 20
_RENAME_NOREPLACE = 1


@dataclass(frozen=True)
class Removal:
    """One checkpoint to delete or quarantine, as it was planned."""

    action: Action
    watch: str
    root: Path  # the watched folder (trusted: from the config)
    path: str  # the checkpoint, inside root
    run: str
    identity: Identity  # what was planned; nothing else is removed
    sha256: str | None
    reasons: tuple[str, ...]

    @classmethod
    def planned(cls, decision: Decision, watch: str, root: Path) -> Removal:
        """The removal of a planned decision (delete or quarantine), in the watch `watch` rooted at `root`.

        Raises Refused for a decision without the identity its checkpoint was planned with.
        """
        if decision.action == "keep" or decision.identity is None:
            raise Refused("planned without the identity of its checkpoint; nothing to remove")
        return cls(
            action=decision.action, watch=watch, root=root, path=decision.path, run=decision.run,
            identity=decision.identity, sha256=decision.sha256, reasons=decision.reasons,
        )  # fmt: skip


class Refused(Exception):
    """The executor will not remove this checkpoint; the message says why. Nothing was removed."""


def same(planned: Identity, found: Identity) -> bool:
    """True when `found` is the checkpoint that was planned. A planned device of 0 (a row recorded before
    ckptd stored devices) is not compared."""
    if planned.device and planned.device != found.device:
        return False
    return (planned.inode, planned.size, planned.mtime_ns) == (found.inode, found.size, found.mtime_ns)


def _parts(root: Path, path: str) -> tuple[str, ...]:
    """The components of `path` below `root`; Refused when it is not strictly inside."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        raise Refused(f"lies outside the watched folder {root}") from None
    if not rel.parts or ".." in rel.parts:
        raise Refused(f"lies outside the watched folder {root}")
    try:
        return tuple(component(part) for part in rel.parts)
    except UntrustedInput as exc:
        raise Refused(str(exc)) from None


def _open_parent(root: Path, parts: tuple[str, ...]) -> int:
    try:
        return open_folder(root, parts[:-1])
    except FileNotFoundError:
        raise Refused("already gone (its folder no longer exists)") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused("a folder on its path is now a symbolic link or no folder; not followed") from None
        raise


def _trash_parts(root: Path, parts: tuple[str, ...], run: str) -> tuple[str, ...]:
    """Where the trash goes, below `root`: the run folder when it holds the checkpoint's folder (accelerate's
    project folder above `checkpoints/`), else the checkpoint's own folder."""
    try:
        above = Path(run).relative_to(root).parts
    except ValueError:
        return parts[:-1]
    return above if parts[: len(above)] == above and len(above) < len(parts) else parts[:-1]


@contextlib.contextmanager
def _folders(root: Path, parts: tuple[str, ...], trash_parts: tuple[str, ...]) -> Iterator[tuple[int, int]]:
    """The open folder of the checkpoint and the one its trash goes to (the same descriptor when they are)."""
    dir_fd = _open_parent(root, parts)
    try:
        if trash_parts == parts[:-1]:
            yield dir_fd, dir_fd
            return
        trash_fd = _open_parent(root, (*trash_parts, parts[-1]))
        try:
            yield dir_fd, trash_fd
        finally:
            os.close(trash_fd)
    finally:
        os.close(dir_fd)


def _check(dir_fd: int, name: str, planned: Identity) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise Refused("is a symbolic link")
        found = identity_at(dir_fd, name)
    except FileNotFoundError:
        raise Refused("already gone") from None
    if not same(planned, found):
        raise Refused("changed since it was planned (new bytes or another file under its name); planned again later")


def execute(removal: Removal, catalog: Catalog, state_dir: Path, *, now: float, dry_run: bool = False) -> str | None:
    """Delete or quarantine `removal`'s checkpoint if it is still exactly what was planned.

    Returns where a quarantined checkpoint went (None for a deletion or a dry run). Raises Refused when it
    is gone, changed, behind a link or outside the watched folder (nothing removed, the journal says so),
    and OSError when the file system fails (the checkpoint is left in place or put back).
    """
    parts = _parts(removal.root, removal.path)
    name = parts[-1]
    trash_parts = _trash_parts(removal.root, parts, removal.run)
    with _folders(removal.root, parts, trash_parts) as (dir_fd, trash_fd):
        _check(dir_fd, name, removal.identity)
        if sidecar.pinned_at(dir_fd, name):  # pinned through another box's catalog (a shared folder)
            if not dry_run:
                catalog.set_pinned(removal.path, True)  # the next plans keep it as pinned
            raise Refused("pinned in its sidecar (a `ckptd pin`, perhaps on another box sharing the folder)")
        if dry_run:
            return None
        trash = f"{TRASH_PREFIX}{secrets.token_hex(8)}"
        trash_folder = str(removal.root.joinpath(*trash_parts))
        entry = catalog.journal_intent(
            action=removal.action, watch=removal.watch, run=removal.run, path=removal.path,
            sha256=removal.sha256, size=removal.identity.size, reasons=list(removal.reasons), now=now,
            identity=removal.identity, folder=str(Path(removal.path).parent), trash=trash,
            trash_folder=trash_folder if trash_fd != dir_fd else None,
        )  # fmt: skip
        try:
            os.rename(name, trash, src_dir_fd=dir_fd, dst_dir_fd=trash_fd)
        except FileNotFoundError:
            catalog.journal_finish(entry, state="skipped", now=now, detail="gone before it was moved")
            raise Refused("already gone") from None
        at = _Trash(trash_fd, trash)
        moved = identity_at(trash_fd, trash)
        if not same(removal.identity, moved):
            why = "another file took its name in the instant before the move; " + _put_back(at, dir_fd, name)
            catalog.journal_finish(entry, state="skipped", now=now, detail=why)
            raise Refused(why)
        try:
            where = _finish(removal, dir_fd, at, name, state_dir, now)
        except OSError:
            _put_back(at, dir_fd, name)
            catalog.journal_finish(entry, state="skipped", now=now, detail="failed; put back")
            raise
        catalog.journal_finish(entry, state="done", now=now, detail=where)
        return where


@dataclass(frozen=True)
class _Trash:
    """Where a checkpoint being removed lies: its trash name in an open folder."""

    folder: int
    name: str


def _finish(removal: Removal, dir_fd: int, trash: _Trash, name: str, state_dir: Path, now: float) -> str | None:
    """Delete or quarantine the moved checkpoint and its sidecar (beside it, or in the state folder); fsync the
    folders."""
    side = sidecar.sidecar_name(name)
    detail = None
    if removal.action == "quarantine":
        detail = str(_quarantine(removal, dir_fd, trash, side, state_dir, now))
    else:
        remove_at(trash.folder, trash.name)
    _remove_sidecar(removal, dir_fd, name, state_dir)
    for companion in layouts.companions(Path(removal.path)):  # a producer's record of it (nshtrainer)
        with contextlib.suppress(FileNotFoundError, NotRegularFile):
            os.close(open_regular(companion, dir_fd=dir_fd))  # a regular file, never a link someone put there
            os.unlink(companion, dir_fd=dir_fd)
    fsync_dir(dir_fd)
    if trash.folder != dir_fd:
        fsync_dir(trash.folder)
    return detail


def _state_sidecar(removal: Removal, state_dir: Path) -> Path | None:
    """Where the checkpoint's sidecar is when it lives in the state folder (sidecar.Store.in_state)."""
    return sidecar.Store(state_dir, ((removal.watch, removal.root),)).in_state(Path(removal.path))


def _remove_sidecar(removal: Removal, dir_fd: int, name: str, state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sidecar.sidecar_name(name), dir_fd=dir_fd)
    in_state = _state_sidecar(removal, state_dir)
    if in_state is not None:
        in_state.unlink(missing_ok=True)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove a file or a whole folder relative to an open folder, never following a link inside it.

    Raises FileNotFoundError when it is not there, OSError when it cannot be removed.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based rmtree: links inside are removed, not followed
    else:
        os.unlink(name, dir_fd=dir_fd)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): fails with EEXIST instead of replacing `dst`. Raises OSError; EINVAL or
    ENOSYS where the file system or libc lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    if renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), ctypes.c_uint(_RENAME_NOREPLACE)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def _put_back(trash: _Trash, dir_fd: int, name: str) -> str:
    """Move what was taken back under its name, without replacing anything there now; say what happened."""
    kept = f"what was moved is kept as {trash.name} (its name was taken again meanwhile)"
    try:
        _rename_noreplace(trash.folder, trash.name, dir_fd, name)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return kept
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        if _exists_at(dir_fd, name):  # no RENAME_NOREPLACE here: check, then rename
            return kept
        os.rename(trash.name, name, src_dir_fd=trash.folder, dst_dir_fd=dir_fd)
    return "put back"


def _quarantine_target(removal: Removal, state_dir: Path, now: float) -> Path:
    target = state_dir / "quarantine" / removal.watch / Path(removal.path).relative_to(removal.root)
    if target.exists() or target.is_symlink():
        target = target.with_name(f"{target.name}.{int(now)}")
    return target


def _quarantine(removal: Removal, dir_fd: int, trash: _Trash, side: str, state_dir: Path, now: float) -> Path:
    """Move the checkpoint (at `trash`) and its sidecar into the quarantine folder, with a note; return where."""
    target = _quarantine_target(removal, state_dir, now)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Before anything moves: a quarantine that ran out of room half-way would leave the sidecar in one place
    # and the checkpoint in another, or a truncated copy beside a note that claims the full size.
    _check_room(trash.folder, target.parent, removal.identity.size)
    note: dict[str, object] = {
        "original_path": removal.path, "quarantined_at": datetime.fromtimestamp(now, UTC).isoformat(),
        "reasons": list(removal.reasons), "sha256": removal.sha256, "size_bytes": removal.identity.size,
    }  # fmt: skip
    in_state = _state_sidecar(removal, state_dir)
    with contextlib.suppress(OSError, ValueError):
        fd = open_regular(side, dir_fd=dir_fd) if in_state is None or not in_state.exists() else open_regular(in_state)
        with os.fdopen(fd, "rb") as handle:
            found = sidecar.parse(handle.read(sidecar.MAX_SIDECAR_BYTES))
        note["problems"] = found.verification.problems
    note_path = target.with_name(target.name + ".quarantine.json")
    atomic_write_bytes(note_path, json.dumps(note, indent=2).encode())
    target_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            _move(dir_fd, side, target_fd, sidecar.sidecar_name(target.name))
        if in_state is not None and in_state.exists():  # both in the state folder: a rename
            in_state.replace(sidecar.sidecar_path(target))
        try:
            _move(trash.folder, trash.name, target_fd, target.name, size=removal.identity.size)
        except BaseException:
            note_path.unlink(missing_ok=True)
            raise
        fsync_dir(target_fd)
    finally:
        os.close(target_fd)
    return target


_ROOM_MARGIN = 64 << 20  # left free beside a quarantined copy, for the catalog and status.json in the state folder


def _check_room(src_fd: int, dst: Path, size: int) -> None:
    """Raise ENOSPC when `size` bytes moved from the folder `src_fd` into `dst` would be copied (another file
    system) and do not fit with _ROOM_MARGIN to spare. A rename within one file system needs no room."""
    if os.fstat(src_fd).st_dev == dst.stat().st_dev:
        return
    free = os.statvfs(dst)
    if free.f_bavail * free.f_frsize < size + _ROOM_MARGIN:
        raise OSError(errno.ENOSPC, f"the quarantine folder has no room for {size} bytes; nothing was moved", str(dst))


def _move(src_fd: int, src: str, dst_fd: int, dst: str, *, size: int = 0) -> None:
    """Rename across folders; across file systems, check the room, copy, fsync, then remove the source."""
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    free = os.fstatvfs(dst_fd)
    if size and free.f_bavail * free.f_frsize < size + _ROOM_MARGIN:
        raise OSError(errno.ENOSPC, f"the quarantine folder has no room for {size} bytes; nothing was moved", dst)
    temp = temp_name(dst)
    try:
        _copy_at(src_fd, src, dst_fd, temp)
        os.rename(temp, dst, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_at(dst_fd, temp)
        raise
    remove_at(src_fd, src)


def _copy_at(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Copy a regular file or a folder tree between open folders, without following links."""
    st = os.stat(src, dir_fd=src_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700, dir_fd=dst_fd)
        inner_src = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        inner_dst = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_fd)
        try:
            for entry in os.listdir(inner_src):
                if not stat.S_ISLNK(os.stat(entry, dir_fd=inner_src, follow_symlinks=False).st_mode):
                    _copy_at(inner_src, entry, inner_dst, entry)
            os.fsync(inner_dst)
        finally:
            os.close(inner_src)
            os.close(inner_dst)
        return
    source = open_regular(src, dir_fd=src_fd)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
        try:
            at = 0
            while piece := os.pread(source, _COPY_PIECE, at):
                os.write(out, piece)
                at += len(piece)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(source)


def finish_pending(
    catalog: Catalog, roots: Mapping[str, Path], state_dir: Path, now: Callable[[], float] = time.time,
    *, before: float = math.inf,
) -> int:  # fmt: skip
    """Complete the journal intents a killed run left; return how many were completed.

    `roots` maps each watch name to its folder (`migrate_watch(root)` for a folder migrated outside any watch);
    intents of other watches are left for their own runs, and so are intents planned at or after `before` (the
    start of this process, or an hour ago while a daemon runs beside a command): an executor in another thread
    or process may be carrying them out right now. An intent whose checkpoint was moved to its trash name is
    completed when what is there still has the journaled identity (else it is put back); one whose
    checkpoint is still in place was never acted on and is closed as skipped: the next plan decides again.
    """
    finished = 0
    for entry in catalog.journal(state="pending"):
        root = roots.get(entry["watch"])
        if root is None:  # another watch's, or another migrate root's: finished by its own next run
            continue
        if entry["planned_at"] >= before:  # perhaps still being carried out by a process alive now
            continue
        try:
            state, detail = _finish_one(entry, root, state_dir, now())
        except (OSError, Refused) as exc:
            state, detail = "skipped", f"could not be completed: {exc}"
        catalog.journal_finish(entry["id"], state=state, now=now(), detail=detail)
        finished += state == "done"
    return finished


def migrate_watch(root: Path) -> str:
    """The journal's watch name for deletions by `ckptd migrate --delete-old` in a folder no watch holds: it
    names the folder, so that the next migrate of that folder finishes what a killed one started."""
    return f"migrate:{root}"


def _finish_one(entry: Mapping[str, Any], root: Path, state_dir: Path, now: float) -> tuple[str, str]:
    """(state, detail) for one pending journal entry, after completing or undoing what it started."""
    parts = _parts(root, entry["path"])
    name, trash = parts[-1], entry.get("trash")
    trash_parts = _parts(root, entry["trash_folder"] + "/-")[:-1] if entry.get("trash_folder") else parts[:-1]
    with _folders(root, parts, trash_parts) as (dir_fd, trash_fd):
        if trash and _exists_at(trash_fd, trash):
            planned = Identity(entry["size"], entry["mtime_ns"] or 0, entry["inode"] or 0, entry["device"] or 0)
            found = identity_at(trash_fd, trash)
            if stat.S_ISDIR(os.stat(trash, dir_fd=trash_fd, follow_symlinks=False).st_mode):
                # A folder half removed has lost files (and size) but is still the folder that was moved.
                found = found._replace(size=planned.size, mtime_ns=planned.mtime_ns)
            if not same(planned, found):
                kept = _put_back(_Trash(trash_fd, trash), dir_fd, name)
                return "skipped", f"interrupted; what was moved is not what was planned: {kept}"
            removal = Removal(
                action=entry["action"], watch=entry["watch"], root=root, path=entry["path"], run=entry["run"],
                identity=planned, sha256=entry["sha256"], reasons=tuple(entry["reasons"]),
            )  # fmt: skip
            at = _Trash(trash_fd, trash)
            try:
                done = _finish(removal, dir_fd, at, name, state_dir, now)
            except OSError as exc:  # no room to quarantine, a read-only folder: never left hidden under trash
                return "skipped", f"could not be completed ({exc}); {_put_back(at, dir_fd, name)}"
            return "done", done or "completed after an interruption"
        if _exists_at(dir_fd, name):
            return "skipped", "interrupted before acting"
        if entry["action"] == "delete":
            removal = Removal(
                action="delete", watch=entry["watch"], root=root, path=entry["path"], run=entry["run"],
                identity=Identity(entry["size"], 0, 0), sha256=entry["sha256"], reasons=(),
            )  # fmt: skip
            _remove_sidecar(removal, dir_fd, name, state_dir)
        return "done", "completed after an interruption"
