"""`ckptd scrub` and `[daemon] scrub_interval`: find bit rot, locally and on every mirror target.

Each stored checkpoint is read again at a limited rate (`scrub_bandwidth`) and compared with the SHA-256 in
its sidecar. A local mismatch is repaired from a good mirror copy when there is one (proved, then put in
place with the checkpoint's recorded mtime), else quarantined. A mismatch on a target is repaired from the
local checkpoint when that still matches. Progress is recorded per location in the catalog and the
least recently scrubbed go first, so a scrub stopped by a restart resumes where it stopped. What a scrub reads
leaves the page cache behind it (fsutil.drop_cache; a repair's temp file once fsynced): re-reading every
checkpoint must not evict the training job's dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd import delete, discover, log
from ckptd import mirror as mirroring
from ckptd.catalog import Catalog, Row
from ckptd.config import Config, WatchConfig
from ckptd.discover import identity_at
from ckptd.fsutil import drop_cache, fsync_dir, open_confined, open_folder, sha256_fd, temp_name
from ckptd.mirrors import MirrorError, Target
from ckptd.model import Identity
from ckptd.throttle import Throttle

if TYPE_CHECKING:
    from ckptd.progress import Bytes, Tracker

_PIECE = 4 << 20


@dataclass
class ScrubReport:
    """What one scrub found."""

    checked: int = 0
    ok: int = 0
    repaired: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # found bad and not repaired (mirror copies)
    skipped: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # targets whose copies could not be listed


def hash_throttled(path: Path, throttle: Throttle, root: Path, progress: Bytes | None = None) -> str:
    """SHA-256 of a file, or of a directory checkpoint (its digest), read at the throttle's rate, every file
    opened from the watched folder `root` down without following a link (fsutil.open_confined); `progress` is
    told of each piece read."""
    if path.is_dir():
        files = {rel: hash_throttled(path / rel, throttle, root, progress) for rel in discover.directory_files(path)}
        return discover.directory_digest(files)
    digest = hashlib.sha256()
    fd = open_confined(root, path)
    try:
        at = 0
        while piece := os.pread(fd, _PIECE, at):
            drop_cache(fd, at, len(piece))
            digest.update(piece)
            at += len(piece)
            throttle(len(piece))
            if progress is not None:
                progress(len(piece))
    finally:
        os.close(fd)
    return digest.hexdigest()


def scrub(config: Config, catalog: Catalog, targets: Mapping[str, Target], *, now: Callable[[], float] = time.time,
          stop: Callable[[], bool] = lambda: False, progress: Tracker | None = None) -> ScrubReport:  # fmt: skip
    """One full scrub: every ok checkpoint of every watch, then every copy on every target. `progress` (a
    terminal's) is told of each checkpoint and copy, and of the bytes read locally."""
    throttle = Throttle(config.daemon.scrub_bandwidth)
    report = ScrubReport()
    for watch in config.watch:
        rows = catalog.scrub_order(watch.name)
        if progress is not None:
            progress.plan(len(rows), sum(row.size for row in rows))
        for row in rows:
            if stop():
                return report
            read = progress.start(Path(row.path).name, row.size, "scrub") if progress is not None else None
            _scrub_local(row, watch, config, catalog, targets, throttle, report, now(), read)
    for target in targets.values():
        try:
            indexes = mirroring.indexes(target)
        except MirrorError as exc:  # a target down: its copies are checked next time, the others now
            log.get("ckptd.scrub").warning("target unreachable, its copies not scrubbed", target=target.name,
                                           error=str(exc))  # fmt: skip
            report.unreachable.append(target.name)
            continue
        copies = [(prefix, name, copy) for prefix, index in indexes.items()
                  for name, copy in index.get("copies", {}).items()]  # fmt: skip
        copies.sort(key=lambda c: catalog.last_scrubbed(f"{target.name}:{c[0]}/{c[1]}"))  # resume: oldest first
        if progress is not None:
            progress.plan(len(copies), sum(_size(copy) for _p, _n, copy in copies))
        for prefix, name, copy in copies:
            if stop():
                return report
            read = progress.start(name, _size(copy), f"scrub {target.name}:") if progress is not None else None
            _scrub_copy(target, prefix, name, copy, config, catalog, report, now(), throttle, read)
    return report


def _size(copy: Mapping[str, object]) -> int:
    size = copy.get("size_bytes")
    return size if isinstance(size, int) else 0


def _scrub_local(row: Row, watch: WatchConfig, config: Config, catalog: Catalog, targets: Mapping[str, Target],
                 throttle: Throttle, report: ScrubReport, now: float, progress: Bytes | None) -> None:  # fmt: skip
    logger = log.get("ckptd.scrub")
    path = Path(row.path)
    location = f"local:{row.path}"
    try:
        found = discover.identity(path)
    except FileNotFoundError:
        return
    except OSError:  # unreadable now (permissions, a stale NFS handle): not rot; the next scrub looks again
        report.skipped.append(row.path)
        return
    if (found.size, found.mtime_ns, found.inode) != (row.size, row.mtime_ns, row.inode):
        report.skipped.append(row.path)  # rewritten since verified: the daemon verifies it again, not rot
        return
    report.checked += 1
    try:
        actual = hash_throttled(path, throttle, watch.path, progress)
    except (OSError, ValueError):  # gone, or its folder is a link now: not rot, and never read through it
        report.skipped.append(row.path)
        return
    try:
        changed = discover.identity(path) != found
    except OSError:  # deleted while it was read: not rot
        changed = True
    if changed:
        report.skipped.append(row.path)
        return
    if actual == row.sha256:
        report.ok += 1
        catalog.record_scrub(location, sha256=actual, result="ok", now=now)
        return
    logger.error("checkpoint rotted on disk", path=row.path, run=row.run, expected=row.sha256, actual=actual)
    source = _repair_from_mirror(path, row, watch, targets)
    if source is not None:
        repaired = discover.identity(path)
        catalog.update_identity(row.path, mtime_ns=repaired.mtime_ns, inode=repaired.inode)
        catalog.record_scrub(location, sha256=row.sha256, result="repaired", now=now, detail=f"from {source}")
        report.repaired.append(row.path)
        logger.info("checkpoint repaired from a mirror copy", path=row.path, run=row.run, target=source)
        return
    problem = f"bit rot: sha256 is {actual}, the sidecar says {row.sha256}"
    catalog.mark_corrupt(row.path, problem)
    removal = delete.Removal(action="quarantine", watch=watch.name, root=watch.path, path=row.path, run=row.run,
                             identity=found, sha256=row.sha256, reasons=(problem,))  # fmt: skip
    try:
        moved = delete.execute(removal, catalog, config.daemon.state_dir, now=now)
    except (delete.Refused, OSError) as exc:
        catalog.record_scrub(location, sha256=actual, result="mismatch", now=now, detail=f"not quarantined: {exc}")
        report.mismatched.append(row.path)
        logger.error("rotted checkpoint could not be quarantined", path=row.path, run=row.run, error=str(exc))
        return
    catalog.record_scrub(location, sha256=actual, result="quarantined", now=now, detail=str(moved))
    report.quarantined.append(row.path)
    logger.error("rotted checkpoint quarantined, no good mirror copy", path=row.path, run=row.run, to=str(moved))


def _repair_from_mirror(path: Path, row: Row, watch: WatchConfig, targets: Mapping[str, Target]) -> str | None:
    """Replace a rotted file with a mirror copy proved to have the right SHA-256; return the target's name.

    The copy goes to a temp file in the run folder (opened from the watched folder without following links),
    gets the recorded mtime, and replaces the rotted file only if that is still the file the scrub read.
    """
    if path.is_dir():
        return None  # directory checkpoints are quarantined whole; their copies stay restorable
    prefix = mirroring.run_key(watch, row.run)
    rel = path.relative_to(watch.path)
    for target in targets.values():
        try:
            index = mirroring.read_index(target, prefix)
            if index is None or index["copies"].get(path.name, {}).get("sha256") != row.sha256:
                continue
            folder = open_folder(watch.path, rel.parts[:-1])
        except (MirrorError, OSError):
            continue
        temp = temp_name(path.name)
        try:
            out = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder)
            try:
                target.read_into(f"{prefix}/{path.name}", out)
                os.fsync(out)
                if sha256_fd(out) != row.sha256:
                    continue
                os.utime(out, ns=(row.mtime_ns, row.mtime_ns))  # the same bytes, the same recorded mtime
            finally:
                os.close(out)
            if not delete.same(Identity(row.size, row.mtime_ns, row.inode, row.device), identity_at(folder, path.name)):
                continue  # rewritten meanwhile: the trainer's new bytes stay
            os.replace(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
            fsync_dir(folder)
        except (MirrorError, OSError):
            continue
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=folder)
            os.close(folder)
        return target.name
    return None


def _scrub_copy(target: Target, prefix: str, name: str, copy: Mapping[str, object], config: Config,
                catalog: Catalog, report: ScrubReport, now: float, throttle: Throttle,
                progress: Bytes | None) -> None:  # fmt: skip
    """Read one copy back against this machine's record of it (else its sidecar); repair it from the local
    checkpoint that holds the right bytes."""
    logger = log.get("ckptd.scrub")
    location = f"{target.name}:{prefix}/{name}"
    known = mirroring.recorded_sha(config, catalog, target.name, prefix, name)
    try:
        found = mirroring.check_copy(
            target, prefix, name, known, lambda key: _read_back(target, key, throttle, progress)
        )
    except MirrorError as exc:
        catalog.record_scrub(location, sha256=None, result="unreadable", now=now, detail=str(exc))
        report.mismatched.append(location)
        logger.error("mirror copy unreadable", target=target.name, key=f"{prefix}/{name}", error=str(exc))
        return
    report.checked += 1
    expected = known or (found.stored.verification.sha256 if found.stored else copy.get("sha256"))
    if not found.bad:
        report.ok += 1
        catalog.record_scrub(location, sha256=str(expected), result="ok", now=now)
        return
    logger.error("mirror copy rotted", target=target.name, key=f"{prefix}/{name}", expected=expected, why=found.why)
    # Fix: only a local checkpoint of the copy's own name repairs it: copy_checkpoint writes under the local
    # name, so one renamed since (ckptd migrate) left the bad copy in place and was reported "repaired".
    source = mirroring.repair_copy(config, catalog, target, prefix, name, expected)
    if source is not None:
        catalog.record_scrub(location, sha256=str(expected), result="repaired", now=now, detail=source)
        report.repaired.append(location)
        return
    catalog.record_scrub(location, sha256=None, result="mismatch", now=now,
                         detail=f"{found.why}; no good copy to repair from")  # fmt: skip
    report.mismatched.append(location)


def _read_back(target: Target, key: str, throttle: Throttle, progress: Bytes | None) -> str:
    """The SHA-256 of a copy on a target, its bytes counted against `scrub_bandwidth` (and told to `progress`
    once read: Target.sha256 reads it whole).

    Fix: mirror copies were read at full speed (only the target's own max_bandwidth applied); the bytes are
    charged to the scrub's throttle after each read, so the average rate stays within scrub_bandwidth.
    """
    digest = target.sha256(key)
    found = target.stat(key)
    throttle(found.size if found is not None else 0)
    if progress is not None and found is not None:
        progress(found.size)
    return digest
