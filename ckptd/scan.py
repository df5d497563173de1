"""One reconciliation pass over a watched folder: the daemon's work, done once.

Given a folder, its patterns and a catalog: verify every checkpoint that is new or changed (an unchanged
size, mtime and inode is never hashed again), write its sidecar, record it in the catalog with its run's
latest and best (`record`, the one record step), record links,
mark vanished checkpoints gone and remove their sidecars. `ckptd scan` calls this; so does the daemon at
start-up, on a schedule and after an observer error.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from ckptd import __version__, discover, fsutil, selection, sidecar
from ckptd.catalog import Catalog
from ckptd.config import MetricConfig
from ckptd.discover import Candidate
from ckptd.model import CheckpointChanged, Entry, Verification

if TYPE_CHECKING:
    from ckptd.progress import Bytes, Tracker

_BESIDE = sidecar.Store()  # no state folder: every sidecar beside its checkpoint

STEP = 2000  # entries of the walk between two yields of `surveying`: some 5 ms of work
R = TypeVar("R")


class Verifier(Protocol):
    """Verifies one checkpoint (ckptd.verify.verify, its options bound); may raise CheckpointChanged. `progress` is
    told of the bytes it reads."""

    def __call__(self, path: Path, *, progress: Bytes | None = None) -> Verification: ...


@dataclass
class ScanReport:
    """What one pass did."""

    verified: list[Verification] = field(default_factory=list)
    unchanged: int = 0
    links: int = 0
    busy: list[str] = field(default_factory=list)  # changed while read: still being written, retried later
    gone: list[str] = field(default_factory=list)
    removed_sidecars: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # could not be read at all (permissions, I/O errors)

    def by_status(self) -> Counter[str]:
        """How many checkpoints verified in this pass ended in each status."""
        return Counter(v.status for v in self.verified)


def sidecar_bytes(verification: Verification, engine: dict[str, str], now: float, pinned: bool = False) -> bytes:
    """Render the sidecar of a fresh verification on this host."""
    return sidecar.render(
        verification,
        verified_at=datetime.fromtimestamp(now, UTC),
        host=socket.gethostname(),
        ckptd_version=__version__,
        engine=engine,
        pinned=pinned,
    )


@dataclass
class Survey:
    """How the disk differs from the catalog under one folder; nothing hashed yet."""

    to_verify: list[Candidate] = field(default_factory=list)
    incomplete: list[Candidate] = field(default_factory=list)  # folder checkpoints the trainer has not finished
    unchanged: int = 0
    links: int = 0
    gone: list[str] = field(default_factory=list)
    gone_runs: set[str] = field(default_factory=set)  # the runs of the checkpoints in `gone`
    rotating: set[str] = field(default_factory=set)  # runs just seen deleting checkpoints of their own
    removed_sidecars: list[str] = field(default_factory=list)
    removed_temps: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # could not be looked at (permissions, I/O errors)


def _fingerprint(watch: str, size: int, mtime_ns: int, inode: int) -> int:
    """One int for a checkpoint's identity in its watch: what `survey` keeps per cataloged checkpoint.

    A million checkpoints held as {path: (size, mtime, inode)} plus a set of the paths seen took a gigabyte of
    the daemon's memory at start-up (benchmarks/scale.py); {hash(path): fingerprint}, crossed off as the walk
    finds each, takes a tenth. Two different identities (or paths) sharing a 64-bit hash within one pass is
    beyond any real tree; its only effect would be one checkpoint looked at again, or marked gone a pass late.
    """
    return hash((watch, size, mtime_ns, inode))


def _changed(found: discover.Found, recorded: int | None, watch: str, store: sidecar.Store,
             read_sidecars: bool) -> bool:  # fmt: skip
    """True unless the catalog has this exact checkpoint (`recorded`, the fingerprint of its row, matches the
    size, mtime and inode the walk's one `lstat` found) and its sidecar is there: parsed only when
    `read_sidecars`, else its presence looked at (in the walk's listing; in the state folder only when it is
    not beside the checkpoint)."""
    path = found.candidate.path
    if found.identity is None or recorded != _fingerprint(watch, *found.identity[:3]):
        return True
    if read_sidecars:
        return store.read(path) is None
    return not found.sidecar_beside and store.path_of(path) is None


def record_link(candidate: Candidate, *, watch: str, catalog: Catalog, now: float) -> None:
    """Record a symbolic link as a pointer to its target; links are never hashed."""
    assert candidate.link_target is not None
    found = discover.identity(candidate.path)
    catalog.record_link(
        watch=watch, run=str(candidate.run), path=str(candidate.path), target=str(candidate.link_target),
        size=found.size, mtime_ns=found.mtime_ns, inode=found.inode, now=now,
    )  # fmt: skip


def surveying(
    root: Path,
    *,
    watch: str,
    patterns: Sequence[str],
    catalog: Catalog,
    now: Callable[[], float] = time.time,
    boundaries: Sequence[Path] = (),
    store: sidecar.Store = _BESIDE,
    read_sidecars: bool = True,
) -> Generator[None, None, Survey]:
    """Compare `root` with the catalog: list what needs verifying, record links, mark vanished checkpoints
    gone, remove sidecars without a checkpoint and temp files left by a killed process. Hashes nothing.

    A checkpoint whose size, mtime and inode are the catalog's is unchanged: one stat, and the catalog's
    identities come in one query. With `read_sidecars` its sidecar is parsed too (a damaged one is written
    again: `ckptd scan`); without, only its presence is looked at (the daemon's rescans, which must stay
    close to the cost of a walk at 100,000 checkpoints).

    `boundaries` are every watched folder: a link into any of them is recorded (it protects its target).
    `store` says where sidecars are (beside checkpoints, or some in the state folder).

    A generator: it yields after every `STEP` entries of the walk and returns the survey, so that the daemon can
    verify, answer events and ping its watchdog between steps of a pass over a million checkpoints (`survey`
    runs it through at once). Whatever the daemon records meanwhile is at worst looked at once more.
    """
    result = Survey()
    # Every cataloged checkpoint below root, crossed off as the walk finds it: what is left has vanished.
    known = {
        hash(path): _fingerprint(owner, size, mtime_ns, inode) if verified else 0
        for path, owner, verified, size, mtime_ns, inode in catalog.present_identities(under=str(root))
    }
    for count, item in enumerate(discover.sweep(root, patterns, boundary=list(boundaries) or root), 1):
        if count % STEP == 0:
            yield
        if isinstance(item, discover.Leftover):
            _remove_leftover(item, root, result, now)
            continue
        candidate = item.candidate
        key = hash(str(candidate.path))
        recorded = known.pop(key, None)
        try:
            if candidate.kind == "link":
                record_link(candidate, watch=watch, catalog=catalog, now=now())
                result.links += 1
            elif not item.complete:
                result.incomplete.append(candidate)  # never verified half-written: it would pass for `latest`
            elif _changed(item, recorded, watch, store, read_sidecars):
                result.to_verify.append(candidate)
            else:
                result.unchanged += 1
        except FileNotFoundError:  # gone meanwhile: left for the vanished ones below
            if recorded is not None:
                known[key] = recorded
        except OSError as exc:  # one unreadable checkpoint never stops the survey of the others
            result.failed.append(f"{candidate.path}: {exc}")
    missing = [path for path in catalog.present_paths(under=str(root)) if hash(path) in known] if known else []
    yield
    for path in missing:  # few: what a trainer rotated or a user removed since the last pass
        row = catalog.get(path)
        how = discover.vanishing(Path(path))
        if row is None or how == "present":
            continue
        if catalog.vanished(row, now(), deleted=how == "deleted"):
            result.rotating.add(row.run)
        result.gone.append(row.path)
        result.gone_runs.add(row.run)
    watched = next((r for name, r in store.watches if name == watch), None)
    for orphan in store.orphans(watch, watched) if watched is not None and watched == root else ():
        orphan.unlink(missing_ok=True)
        result.removed_sidecars.append(str(orphan))
    return result


def survey(
    root: Path,
    *,
    watch: str,
    patterns: Sequence[str],
    catalog: Catalog,
    now: Callable[[], float] = time.time,
    boundaries: Sequence[Path] = (),
    store: sidecar.Store = _BESIDE,
    read_sidecars: bool = True,
) -> Survey:
    """`surveying` run through at once."""
    return run_through(surveying(root, watch=watch, patterns=patterns, catalog=catalog, now=now,
                                 boundaries=boundaries, store=store, read_sidecars=read_sidecars))  # fmt: skip


def run_through(steps: Generator[object, None, R]) -> R:
    """Run a stepwise pass (a generator) to its end and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(R, done.value)


def _remove_leftover(item: discover.Leftover, root: Path, result: Survey, now: Callable[[], float]) -> None:
    """Remove a sidecar whose checkpoint is gone, or a temp file older than a minute (a killed process's)."""
    if item.kind == "temp":
        if discover.remove_stale(root, item.path, older_than=60.0, now=now()):
            result.removed_temps.append(str(item.path))
        return
    try:
        if fsutil.unlink_confined(root, item.path):
            result.removed_sidecars.append(str(item.path))
    except (OSError, ValueError):  # its folder became a link meanwhile: never followed
        return


@dataclass(frozen=True)
class RunChange:
    """A run's latest and best after a record step, and whether they changed."""

    run: str
    latest: Entry | None
    best: Entry | None
    metric: str | None  # the metric `best` was ranked by (None: the trainer's own best slot, or none)
    value: float | None
    latest_changed: bool
    best_changed: bool
    metrics_held: list[str]
    metric_missing: bool  # the watch names a metric that none of the run's ok checkpoints holds
    entries: list[Entry]  # the run's checkpoints as the catalog holds them now (links left out)


def update_run(catalog: Catalog, *, watch: str, run: str, metric: MetricConfig | None, now: float) -> RunChange:
    """Store a run's latest and best as its catalog rows say now; return them and what changed."""
    entries = [r.entry() for r in catalog.in_run(run) if r.kind != "link"]
    newest = selection.latest(entries)
    name = metric.name if metric else None
    top = selection.best(entries, name, metric.mode if metric else "min")
    value = selection.metric_value(top, name) if top and name else None
    before_latest, before_best = catalog.set_run(
        run=run, watch=watch, latest=newest.path if newest else None, best=top.path if top else None,
        metric=name if value is not None else None, value=value, now=now,
    )  # fmt: skip
    held = selection.metric_names(entries)
    return RunChange(
        run=run, latest=newest, best=top, metric=name if value is not None else None, value=value,
        latest_changed=newest is not None and newest.path != before_latest,
        best_changed=top is not None and top.path != before_best, metrics_held=held,
        metric_missing=name is not None and name not in held and bool(selection.usable(entries)),
        entries=entries,
    )  # fmt: skip


def record(
    candidate: Candidate,
    verification: Verification,
    *,
    watch: str,
    catalog: Catalog,
    engine: dict[str, str],
    now: float,
    root: Path,
    store: sidecar.Store = _BESIDE,
    placement: sidecar.Placement = "auto",
    metric: MetricConfig | None = None,
) -> RunChange:
    """The one record step, for the daemon and `ckptd scan` alike: write the sidecar of a fresh verification
    (beside it below `root`, through no link, or in the state folder, as `placement` and its layout say),
    then its catalog row (a pin is kept), then its run's latest and best; return what changed in the run."""
    _write_record(candidate, verification, watch=watch, catalog=catalog, engine=engine, now=now, root=root,
                  store=store, placement=placement)  # fmt: skip
    return update_run(catalog, watch=watch, run=str(candidate.run), metric=metric, now=now)


def _write_record(
    candidate: Candidate, verification: Verification, *, watch: str, catalog: Catalog, engine: dict[str, str],
    now: float, root: Path, store: sidecar.Store, placement: sidecar.Placement,
) -> None:  # fmt: skip
    """`record` without the run update: a pass over many checkpoints updates each run once, at its end."""
    row = catalog.get(str(candidate.path))
    state = sidecar.placed_in_state(placement, candidate.path, verification.layout)
    if not _says_the_same(store.read(candidate.path), verification, row.pinned if row else False):
        data = sidecar_bytes(verification, engine, now, row.pinned if row else False)
        store.write(candidate.path, data, root=root, state=state)
    catalog.record_verified(
        watch=watch, run=str(candidate.run), verification=verification,
        mtime_ns=verification.mtime_ns, now=now,
    )  # fmt: skip


def _says_the_same(found: sidecar.Sidecar | None, verification: Verification, pinned: bool) -> bool:
    """Whether a sidecar already records this verification's result for these very bytes (its hash, status,
    size and mtime, and the pin): then it is read, not rewritten. Another daemon that took over a shared
    folder (ckptd.lease) verifies each checkpoint once for its own catalog (a sidecar is never trusted without
    the hash: anyone who can write the folder can write one) and leaves the owner's sidecars as they are."""
    if found is None:
        return False
    recorded = found.verification
    return (recorded.sha256, recorded.status, recorded.size_bytes, recorded.mtime_ns, found.pinned) == (
        verification.sha256,
        verification.status,
        verification.size_bytes,
        verification.mtime_ns,
        pinned,
    ) and verification.sha256 is not None


def reconcile(
    root: Path,
    *,
    watch: str,
    patterns: Sequence[str],
    catalog: Catalog,
    verifier: Verifier,
    engine: Callable[[], dict[str, str]],
    now: Callable[[], float] = time.time,
    boundaries: Sequence[Path] = (),
    store: sidecar.Store = _BESIDE,
    placement: sidecar.Placement = "auto",
    metric: MetricConfig | None = None,
    progress: Tracker | None = None,
) -> ScanReport:
    """Survey `root`, then verify and record every new or changed checkpoint in this process; the runs of
    checkpoints gone meanwhile get their latest and best again too. `progress` (a terminal's) is told of each
    checkpoint verified and the bytes read."""
    found = survey(root, watch=watch, patterns=patterns, catalog=catalog, now=now, boundaries=boundaries, store=store)
    report = ScanReport(
        unchanged=found.unchanged, links=found.links, gone=found.gone, removed_sidecars=found.removed_sidecars,
        failed=list(found.failed),
        busy=[str(c.path) for c in found.incomplete],  # a save the trainer has not finished: left for later
    )  # fmt: skip
    touched: set[str] = set()
    if progress is not None:
        from ckptd.progress import size_of

        sizes = {c.path: size_of(c.path) for c in found.to_verify}
        progress.plan(len(sizes), sum(sizes.values()))
    for candidate in found.to_verify:
        try:
            path = candidate.path
            read = progress.start(path.name, sizes[path], "verify") if progress is not None else None
            verification = verifier(candidate.path, progress=read)
        except CheckpointChanged:
            report.busy.append(str(candidate.path))
            continue
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.failed.append(f"{candidate.path}: {exc}")
            continue
        try:
            _write_record(candidate, verification, watch=watch, catalog=catalog, engine=engine(), now=now(),
                          root=root, store=store, placement=placement)  # fmt: skip
        except Exception as exc:  # a folder not writable (read-only, full), a catalog error: said, others go on
            report.failed.append(f"{candidate.path}: cannot record: {exc}")
            continue
        report.verified.append(verification)
        touched.add(str(candidate.run))
    for run in sorted(touched | found.gone_runs):  # each run once: a first scan of a big run stays linear
        try:
            update_run(catalog, watch=watch, run=run, metric=metric, now=now())
        except Exception as exc:
            report.failed.append(f"{run}: cannot update its latest and best: {exc}")
    return report
