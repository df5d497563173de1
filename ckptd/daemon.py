"""The composition root: `ckptd run` builds the parts, runs the main loop, and stops cleanly.

discover -> wait until complete -> verify -> write sidecar -> catalog -> best/latest.

Threads only produce: watchdog observers put `Change`s on a queue, worker processes return verifications.
Everything that writes (sidecars, the catalog, the status file) happens on the main loop's thread, so
there is no locking to get wrong. Signals set flags that the loop reads: SIGTERM/SIGINT stop it (a hash
in flight is abandoned: workers write nothing), SIGHUP reloads the config (a bad one is logged and the
old one stays).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from ckptd import discover, log, sidecar
from ckptd import mirror as mirroring
from ckptd.catalog import Catalog
from ckptd.config import Config, WatchConfig, load_config
from ckptd.discover import Candidate
from ckptd.errors import ConfigError
from ckptd.lease import Lease, lease_path
from ckptd.metrics import TEXTFILE_EVERY, TEXTFILE_IDLE_EVERY, Metrics, delete_reason, run_label
from ckptd.mirrors import STALE_AFTER
from ckptd.model import CheckpointChanged, Entry, Identity, Status, Verification
from ckptd.prune import PruneReport, free_deficit, prune_watch
from ckptd.scan import RunChange, record, record_link, surveying, update_run
from ckptd.scheduler import Scheduler
from ckptd.settle import SettleTracker
from ckptd.state import StateLock, write_status
from ckptd.systemd import Notifier
from ckptd.watch import Change, FolderWatcher
from ckptd.workers import Result, VerifierPool

T = TypeVar("T")

WATCH_RETRY = 30.0  # seconds between tries to watch a folder whose observer could not start
DISK_CHECK_EVERY = 5.0  # seconds between looks at the free space of watches with min_free
DISK_RETRY = 10.0  # at most one retention run for min_free this often per watch
TICK = 0.1  # seconds between looks at the settle tracker and the workers
PASS_SLICE = 0.05  # seconds of a reconciliation pass between two looks at events, workers and the watchdog
SURVEYED = "surveyed"  # what a pass yields once its survey is done (start-up sends READY then)
RUNS_PER_STEP = 20  # runs refreshed between two yields of a pass
EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC messages while a start-up survey runs...
EXTEND_BY = 30.0  # ...each asking systemd for this much more time
STATUS_EVERY = 2.0  # the status file is rewritten at most this often, and only after a change...
STATUS_IDLE_EVERY = 60.0  # ...or this often when idle, so an idle daemon writes (and fsyncs) next to nothing
MAX_CRASHES = 3  # a checkpoint that kills the verifier this often is recorded as corrupt
HARD_GRACE = 5.0  # seconds past its verify_timeout before a verification that did not stop itself is killed
MIRROR_EVERY = 5.0  # seconds between looks at the mirror queue when nothing wakes the mirror thread
BACKLOG_EVERY = 60.0  # seconds between reads of the mirror backlog (for metrics) while no copy happens


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _complete(candidate: Candidate) -> bool:
    """Files found without an event count as closed (settling still applies); a folder checkpoint is complete
    when its layout says the trainer finished it (the tracker asks again until it is)."""
    return candidate.kind != "directory" or discover.directory_complete(candidate.path)


class MirrorService(threading.Thread):
    """Copies queued checkpoints to the mirror targets on its own thread and catalog connection.

    Copies can take minutes or fail for hours (the target down); none of that may delay verification.
    At its start (daemon start-up, SIGHUP) and after every reconciliation (request_recheck), it sweeps each
    target of what dead copies left and rechecks what the targets hold against the catalog (mirror.recheck): a
    target that forgot copies (a store emptied, a folder wiped) gets them again within one reconciliation.
    Every call to a target happens here, never on the main loop.
    """

    def __init__(self, config: Config, standby: Callable[[], set[str]] = set, metrics: Metrics | None = None) -> None:
        super().__init__(name="ckptd-mirror", daemon=True)
        self.config = config
        self.metrics = metrics or Metrics()
        self._backlog_at = -BACKLOG_EVERY  # when the backlog metric was last read from the catalog
        self.standby = standby  # the watches another daemon owns (Daemon.standby): never copied from here
        self.wake = threading.Event()
        self.recheck = threading.Event()
        self.recheck.set()  # at start-up: the targets may have changed while no daemon looked
        self._stop_event = threading.Event()
        self._log = log.get("ckptd.mirror")
        self.broken: dict[str, str] = {}  # targets that could not be built, with why (status shows them)
        self.unreachable: dict[str, str] = {}  # targets the last recheck could not reach, with why

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the copy in progress (not waited for beyond `timeout`: copies are atomic)."""
        self._stop_event.set()
        self.wake.set()
        self.join(timeout)

    def request_recheck(self) -> None:
        """Recheck what the targets hold before the next mirror pass (on this thread, soon)."""
        self.recheck.set()
        self.wake.set()

    def run(self) -> None:
        targets = mirroring.targets_of(self.config, self.broken)
        for name, error in sorted(self.broken.items()):  # shown in status; the other targets keep working
            self._log.error("mirror target unusable", target=name, error=error)
        with Catalog(self.config.daemon.state_dir) as catalog:
            while not self._stop_event.is_set():
                if self.recheck.is_set():
                    self.recheck.clear()
                    try:
                        found = mirroring.recheck(catalog, self.config, targets, sweep_idle=STALE_AFTER)
                        self.unreachable = dict(found.unreachable)  # until the next recheck: status shows it
                        if not found.unreachable:
                            self.metrics.succeeded("mirror_recheck", time.time())
                    except Exception:  # a bug here must not end mirroring for good
                        self._log.exception("mirror recheck failed")
                try:
                    report = mirroring.mirror_pass(self.config, catalog, targets, stop=self._stop_event.is_set,
                                                   standby=self.standby, on_copy=self._on_copy)  # fmt: skip
                    self._count(report, catalog)
                except Exception:  # a bug here must not end mirroring for good
                    self._log.exception("mirror pass failed")
                self.wake.wait(MIRROR_EVERY)
                self.wake.clear()

    def _on_copy(self, target: str, seconds: float, ok: bool) -> None:
        if ok:
            self.metrics.mirror_copied(target, seconds)
        else:
            self.metrics.mirror_failed(target)

    def _count(self, report: mirroring.MirrorReport, catalog: Catalog) -> None:
        """A pass's success, and the backlog: one query on this thread after a pass that did something, else every
        BACKLOG_EVERY s."""
        now = time.monotonic()
        if report.copied or report.failed or report.dropped or now - self._backlog_at >= BACKLOG_EVERY:
            self._backlog_at = now
            self.metrics.mirror_backlog(catalog.mirror_backlog())
        if not report.failed:
            self.metrics.succeeded("mirror_pass", time.time())


@dataclass
class _InFlight:
    watch: str
    candidate: Candidate
    future: Future[Result]
    started: float
    timeout: float


@dataclass
class _Stats:
    started_at: float = field(default_factory=time.time)
    verified: Counter[str] = field(default_factory=Counter)
    last_reconciliation: dict[str, str] = field(default_factory=dict)


class Daemon:
    """`ckptd run`: watches, verifies, records; runs until a signal stops it."""

    def __init__(self, config_path: Path, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.notifier = notifier or Notifier.from_env()
        self.log = log.get("ckptd")
        self.changes: queue.Queue[Change] = queue.Queue()
        self.tracker = SettleTracker()
        self.watchers: dict[str, FolderWatcher] = {}
        self.in_flight: dict[str, _InFlight] = {}
        self.crashes: Counter[str] = Counter()
        self.stats = _Stats()
        self._stop = False
        self._reload = False
        self._dirty = False
        self._step_errors: dict[str, str] = {}  # main-loop steps failing now, with their error (status shows)
        self.failing: dict[str, dict[str, str]] = {}  # checkpoints that could not be recorded, with why
        self.disk_short: dict[str, int] = {}  # bytes each watch's disk is below its min_free
        self._disk_retention_at: dict[str, float] = {}
        self._metric_missing_told: set[str] = set()  # runs already warned of a metric none of their checkpoints has
        self._published_queue = (0, 0)
        self._config_rejected: dict[str, Any] | None = None  # the last SIGHUP's config, refused: status says
        self.leases: dict[str, Lease] = {}  # one claim per watched folder (ckptd.lease)
        self.standby: set[str] = set()  # watches whose folder another daemon owns: watched by it, not by us
        self._watch_retry_at: dict[str, float] = {}  # watches whose observer could not start: when to try again
        self._retiring: MirrorService | None = None  # the mirror thread of the config before a reload, finishing
        self._lock = StateLock(self.config.daemon.state_dir)
        self.catalog: Catalog | None = None
        self.pool: VerifierPool | None = None
        self.scheduler = Scheduler()
        self.mirror: MirrorService | None = None
        self.metrics = Metrics()  # ckptd.metrics: served and written only when the config asks for it
        self._metrics_written = (-1, 0.0)  # the update count and monotonic time of the last textfile write
        self._passes: dict[str, Generator[str | None, None, None]] = {}  # reconciliations under way, by watch

    # -------------------------------------------------------------------------------------------- life cycle

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status. Raises AlreadyRunning (75)."""
        self._lock.acquire()
        try:
            # Fix: a daemon killed (SIGKILL, power cut) while writing status.json leaves its temp file here,
            # where no reconciliation looks (only watched folders are swept). Holding the lock, we are the
            # only writer of the state folder, so every temp file in it is stale.
            discover.stale_temps(self.config.daemon.state_dir, older_than=0.0, now=time.time())
            self._install_signals()
            self.catalog = Catalog(self.config.daemon.state_dir)
            self.pool = self._make_pool()
            self.log.info(
                "daemon starting", config=str(self.config_path), state_dir=str(self.config.daemon.state_dir),
                watches=[w.name for w in self.config.watch], workers=self.config.daemon.workers,
            )  # fmt: skip
            self._guarded("metrics listen", self._start_metrics)
            self._guarded("lease", self._look_leases)
            self._start_watchers()
            self._start_up_passes()
            self._schedule_jobs()
            self.scheduler.start()
            self._start_mirror()
            # Start a verifier now: importing torch takes 1-2 s, which the first checkpoint would otherwise wait
            # for. The worker stops again after worker_idle_timeout without work.
            if self.pool is not None:
                self.pool.warm()
            self.notifier.ready()
            self._guarded("status", self._publish)
            self.log.info("daemon ready", queued=len(self.tracker))
            self._loop()
        finally:
            self._shutdown()
        return 0

    def request_stop(self) -> None:
        """Ask the main loop to stop (what SIGTERM does)."""
        self._stop = True

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self._stop = True

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self._reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _make_pool(self) -> VerifierPool:
        d = self.config.daemon
        return VerifierPool(d.workers, d.trusted_globals, idle_timeout=d.worker_idle_timeout,
                            logs=(d.log_format, d.log_level))  # fmt: skip

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self.log.info("daemon stopping", abandoned=sorted(self.in_flight))
        self.scheduler.shutdown()
        if self.mirror is not None:
            self.mirror.stop()
        for watcher in self.watchers.values():
            watcher.stop()
        for name, lease in self.leases.items():
            if name not in self.standby:
                with contextlib.suppress(OSError):
                    lease.release()  # a standby takes over at its next look, not a whole term later
        if self.pool is not None:
            self.pool.kill()
        self.in_flight.clear()
        if self.catalog is not None:
            self._guarded("status", self._publish, False)
            self.catalog.close()
        self._guarded("metrics textfile", self.metrics.stop, self.config.daemon.metrics_textfile)
        self._lock.release()
        self.log.info("daemon stopped")

    # ------------------------------------------------------------------------------------------- main loop

    def _loop(self) -> None:
        ping_every = self.notifier.watchdog_interval()
        last_ping = last_status = 0.0
        next_rescan = time.monotonic() + self.config.daemon.rescan_interval
        next_disk_check = 0.0
        next_lease_look = time.monotonic() + self.config.daemon.lease_term / 3
        while not self._stop:
            # Each step is guarded on its own: a bug or an OSError in one (a full disk under status.json, an
            # observer that cannot restart) is logged and the loop goes on; the steps guard each checkpoint,
            # watch and target inside them too, so one of those never stops the others.
            self._drain_changes(timeout=0.0 if self._passes else TICK)
            now = time.monotonic()
            self._guarded("reconcile", self._advance_passes, PASS_SLICE)
            self._guarded("dispatch", self._dispatch, now)
            self._guarded("collect", self._collect)
            self._guarded("expire", self._expire, now)
            if self._reload:
                self._reload = False
                self._guarded("reload", self._reload_config)
                next_rescan = now + self.config.daemon.rescan_interval
            if self._retiring is not None and not self._retiring.is_alive():
                self._guarded("mirror", self._start_mirror)
            unhealthy = [name for name, w in self.watchers.items() if not w.healthy()]
            unhealthy += [
                w.name
                for w in self.config.watch  # could not start: tried again every WATCH_RETRY s
                if w.name not in self.watchers
                and w.name not in self.standby
                and now >= self._watch_retry_at.get(w.name, 0.0)
            ]
            if unhealthy:
                self._guarded("restart watchers", self._restart_watchers, unhealthy)
            if now >= next_rescan:
                self._guarded("reconcile", self._reconcile_all, "schedule")
                next_rescan = now + self.config.daemon.rescan_interval
            if now >= next_lease_look:
                self._guarded("lease", self._look_leases)
                next_lease_look = now + self.config.daemon.lease_term / 3
            if now >= next_disk_check:
                self._guarded("disk check", self._check_free_space, now)
                next_disk_check = now + DISK_CHECK_EVERY
            if ping_every and now - last_ping >= ping_every and self._healthy():
                self.notifier.watchdog()
                last_ping = now
            queue_size = (len(self.tracker), len(self.in_flight))
            self.metrics.queue(sum(queue_size))
            self._guarded("metrics textfile", self._write_metrics, now)
            if queue_size != self._published_queue:
                self._dirty = True
            since = now - last_status
            if (self._dirty and since >= STATUS_EVERY) or since >= STATUS_IDLE_EVERY:
                self._guarded("status", self._publish)
                last_status, self._dirty, self._published_queue = now, False, queue_size
            if self.pool is not None and self._guarded("reap", self.pool.reap_idle, len(self.in_flight)):
                self.log.debug("verifier workers stopped while idle")

    def _guarded(self, step: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Run one step of the main loop; log what it raised (once until it works again) and go on."""
        try:
            result = fn(*args)
        except Exception as exc:
            if self._step_errors.get(step) != repr(exc):  # a disk that stays full must not flood the journal
                self.log.exception("daemon step failed, going on", step=step, error=repr(exc))
            self._step_errors[step] = repr(exc)
            self._dirty = True
            return None
        if self._step_errors.pop(step, None) is not None:
            self.log.info("daemon step works again", step=step)
        return result

    def _roots(self) -> list[Path]:
        """Every watched folder: a link into any of them is recorded, and protects its target from retention."""
        return [w.path for w in self.config.watch]

    def _healthy(self) -> bool:
        return all(w.healthy() for w in self.watchers.values())

    # ----------------------------------------------------------------------------------------------- watching

    def _start_watchers(self, names: list[str] | None = None) -> None:
        """Start an observer for every watch (or for the watches in `names`)."""
        for watch in self.config.watch:
            if (names is not None and watch.name not in names) or watch.name in self.standby:
                continue
            watcher = FolderWatcher(
                watch.name, watch.path, poll=watch.poll, poll_interval=watch.poll_interval, sink=self.changes
            )
            try:
                watcher.start()
            except Exception as exc:  # its folder gone or unreadable: the others are watched; retried each tick
                self.log.error("cannot watch folder", watch=watch.name, folder=str(watch.path), error=repr(exc))
                self._step_errors[f"watch {watch.name}"] = repr(exc)
                self._watch_retry_at[watch.name] = time.monotonic() + WATCH_RETRY
                continue
            self._step_errors.pop(f"watch {watch.name}", None)
            self.watchers[watch.name] = watcher
            self.log.info("watching", watch=watch.name, folder=str(watch.path), polling=watcher.polling)

    def _restart_watchers(self, names: list[str]) -> None:
        for name in names:
            self.log.error("observer stopped, restarting it and rescanning", watch=name)
            stopped = self.watchers.pop(name, None)
            if stopped is not None:
                stopped.stop()
        self._start_watchers(names)
        for name in names:
            watch = self.config.watch_named(name)
            if watch is not None:
                self._reconcile(watch, "observer error")

    def _drain_changes(self, timeout: float) -> None:
        try:
            change = self.changes.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            try:
                self._on_change(change)
            except Exception:  # one bad event must never stop the daemon
                self.log.exception("event handling failed", path=str(change.path), kind=change.kind)
            try:
                change = self.changes.get_nowait()
            except queue.Empty:
                return

    def _on_change(self, change: Change) -> None:
        watch = self.config.watch_named(change.watch)
        if watch is None:
            return
        if change.kind == "deleted":
            self._on_deleted(watch, change.path)
        elif change.kind == "new_folder":
            for found in discover.discover(change.path, watch.patterns, boundary=self._roots()):
                self._track(watch, found, closed=_complete(found))
        else:
            candidate = discover.candidate_for(change.path, watch.path, watch.patterns, self._roots())
            if candidate is not None:
                if change.kind == "created" and candidate.kind == "file" and str(candidate.path) in self.tracker:
                    # Fix: a file in a new folder, written before the folder's watch was added, is found by
                    # the new_folder scan (counted closed) and then reported again by watchdog as created,
                    # with no close to follow. Treated as a write, that made it wait UNCLOSED_GRACE (30 s).
                    # A real creation is followed by write and close events, which still apply.
                    return
                closed = change.kind == "complete" or watch.poll
                self._track(watch, candidate, closed=_complete(candidate) if candidate.kind == "directory" else closed)

    def _track(self, watch: WatchConfig, candidate: Candidate, *, closed: bool) -> None:
        if candidate.kind == "link":
            assert self.catalog is not None
            record_link(candidate, watch=watch.name, catalog=self.catalog, now=time.time())
            self.log.info(  # run added: every checkpoint event names its run
                "link recorded", path=str(candidate.path), run=str(candidate.run), target=str(candidate.link_target)
            )
            return
        self.tracker.touch(
            candidate, watch=watch.name, settle=watch.settle_seconds, closed=closed, now=time.monotonic()
        )
        if self.pool is not None:
            self.pool.warm()

    def _on_deleted(self, watch: WatchConfig, path: Path) -> None:
        assert self.catalog is not None
        self.tracker.forget(str(path))
        for key in [k for k in self.failing if k == str(path) or k.startswith(f"{path}/")]:
            del self.failing[key]  # nothing left to record
        rows = list(self.catalog.present(under=str(path)))
        runs = set()
        for row in rows:
            how = discover.vanishing(Path(row.path))
            if how == "present":
                continue
            if self.catalog.vanished(row, time.time(), deleted=how == "deleted"):
                self.log.info("trainer rotates its checkpoints", run=row.run, path=row.path,
                              retention="left to the trainer")  # fmt: skip
            try:
                removed = sidecar.store_of(self.config).remove(Path(row.path), watch.path)
            except (OSError, ValueError):  # its folder is a link now, or gone: nothing of ours to remove there
                removed = False
            runs.add(row.run)
            self.log.info("checkpoint gone from disk", path=row.path, run=row.run, sidecar_removed=removed)
        for run in runs:
            self._update_run(watch, run)
        self._dirty = self._dirty or bool(runs)
        if not rows:  # a file inside a directory checkpoint: the directory must be checked again
            candidate = discover.candidate_for(path, watch.path, watch.patterns)
            if candidate is not None and candidate.kind == "directory":
                self._track(watch, candidate, closed=_complete(candidate))

    # ------------------------------------------------------------------------------------------- verifying

    def _dispatch(self, now: float) -> None:
        def identity_of(candidate: Candidate) -> Identity | None:
            try:
                return discover.identity(candidate.path)
            except OSError:
                return None

        assert self.pool is not None
        # No more in flight than there are workers: a verification's clock starts when it is handed over,
        # so its verify_timeout is measured from when it runs, not from when it was queued behind others.
        free = self.config.daemon.workers - len(self.in_flight)
        if free <= 0:
            return
        for watch_name, candidate in self.tracker.due(now, identity_of, limit=free, complete=_complete):
            key = str(candidate.path)
            watch = self.config.watch_named(watch_name)
            if watch is None:
                continue
            if key in self.in_flight:  # changed again while being verified: look again once it is done
                self.tracker.touch(candidate, watch=watch_name, settle=watch.settle_seconds, closed=True, now=now)
                continue
            size = (identity_of(candidate) or Identity(0, 0, 0)).size
            timeout = self.config.daemon.timeout_for(size)
            keys = watch.metric.keys() if watch.metric else {}
            try:
                try:
                    future = self.pool.submit(candidate.path, timeout, watch.path, keys)
                except BrokenProcessPool:  # a worker died since the last collect: start a fresh pool
                    self.pool.broken()
                    future = self.pool.submit(candidate.path, timeout, watch.path, keys)
            except Exception as exc:  # the pool cannot start now (out of memory, no processes): try next tick
                self.log.error("verifier unavailable, retrying", path=key, run=str(candidate.run), error=repr(exc))
                self.pool.broken()
                self.tracker.touch(candidate, watch=watch_name, settle=watch.settle_seconds, closed=True, now=now)
                return
            self.in_flight[key] = _InFlight(watch_name, candidate, future, now, timeout)

    def _expire(self, now: float) -> None:
        """Kill a verification that outlived its verify_timeout without stopping itself (a load stuck inside
        torch, a read that never returns); record it unsupported and requeue the others the kill took down."""
        overdue = [job for job in self.in_flight.values()
                   if not job.future.done() and now - job.started > job.timeout + HARD_GRACE]  # fmt: skip
        if not overdue:
            return
        assert self.pool is not None
        self.pool.kill()
        for key, job in list(self.in_flight.items()):
            del self.in_flight[key]
            watch = self.config.watch_named(job.watch)
            if watch is None:
                continue
            if job in overdue:
                problem = (
                    f"{job.candidate.path.name}: verification did not finish within {job.timeout:.0f} s"
                    " (verify_timeout); its verifier was stopped and it is not verified"
                )
                self.log.warning("verification timed out", path=key, run=str(job.candidate.run),
                                 seconds=round(job.timeout))  # fmt: skip
                self._record_failure(watch, job.candidate, "unsupported", problem)
            else:
                self._track(watch, job.candidate, closed=True)

    def _collect(self) -> None:
        if self._stop:
            # Fix: SIGTERM arriving while the loop drained events must not let this record (write the sidecar
            # of) a verification that finished after the signal: a hash in flight at SIGTERM is abandoned.
            return
        for key, job in list(self.in_flight.items()):
            if not job.future.done():
                continue
            del self.in_flight[key]
            watch = self.config.watch_named(job.watch)
            if watch is None:
                continue
            try:
                verification, engine = job.future.result()
            except CheckpointChanged:
                self.log.info("checkpoint still being written, waiting", path=key, run=str(job.candidate.run))
                # Looked at again: it may have become a link, or be gone.
                again = discover.candidate_for(job.candidate.path, watch.path, watch.patterns, self._roots())
                if again is not None:
                    self._track(watch, again, closed=True)
                continue
            except FileNotFoundError:
                self._on_deleted(watch, job.candidate.path)
                continue
            except BrokenProcessPool:
                self._on_crash(watch, job)
                continue
            except Exception as exc:  # the verifier itself failed (a trusted global that will not import...)
                self._failing(job.candidate, "verify failed", repr(exc), shown=f"verify failed: {exc!r}")
                continue
            self.crashes.pop(key, None)
            if not job.candidate.path.exists():
                # Fix: deleted after the worker finished but before this result was collected (Lightning's
                # save_top_k removing it). Its "deleted" event may already have been handled, so recording
                # now would write a sidecar beside nothing and bring the catalog row back to present.
                self.log.info("checkpoint deleted before it was recorded", path=key, run=str(job.candidate.run))
                continue
            try:
                self._record(watch, job.candidate, verification, engine, time.monotonic() - job.started)
            except Exception as exc:  # one checkpoint that cannot be recorded must never stop the others
                self._failed_to_record(job.candidate, exc)

    def _on_crash(self, watch: WatchConfig, job: _InFlight) -> None:
        """A worker died (SIGBUS from a file truncated under it, or a loader crash)."""
        assert self.pool is not None
        self.pool.broken()
        key = str(job.candidate.path)
        for other_key, other in list(self.in_flight.items()):  # the whole pool went down with it
            del self.in_flight[other_key]
            other_watch = self.config.watch_named(other.watch)
            if other_watch is not None:
                self._track(other_watch, other.candidate, closed=True)
        self.crashes[key] += 1
        if self.crashes[key] < MAX_CRASHES:
            self.log.warning(  # run added: every checkpoint event names its run
                "verifier process died, retrying", path=key, run=str(job.candidate.run), attempt=self.crashes[key]
            )
            self._track(watch, job.candidate, closed=True)
            return
        self.log.error(  # run added: every checkpoint event names its run
            "checkpoint keeps killing the verifier, recording it corrupt", path=key, run=str(job.candidate.run)
        )
        self.crashes.pop(key, None)
        self._record_failure(
            watch, job.candidate, "corrupt", f"verifying it killed the verifier process {MAX_CRASHES} times"
        )

    def _record_failure(self, watch: WatchConfig, candidate: Candidate, status: Status, problem: str) -> None:
        """Record a checkpoint the verifier could not finish, with why; nothing was hashed."""
        try:
            found = discover.identity(candidate.path)
            verification = Verification(
                path=str(candidate.path), status=status, format=None, size_bytes=found.size, sha256=None,
                mtime=found.mtime, mtime_ns=found.mtime_ns, inode=found.inode, device=found.device,
                problems=[problem],
            )  # fmt: skip
            self._record(watch, candidate, verification, {}, 0.0)
        except Exception as exc:  # gone meanwhile, or its folder unwritable: logged, the others go on
            self._failed_to_record(candidate, exc)

    def _failed_to_record(self, candidate: Candidate, exc: Exception) -> None:
        """A verification whose sidecar or row could not be written (a read-only or full folder)."""
        error = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else repr(exc)
        self._failing(candidate, "recording a verification failed", error)

    def _failing(self, candidate: Candidate, event: str, error: str, shown: str | None = None) -> None:
        """A checkpoint that could not be verified or recorded: logged with its folder, shown in status (as
        `shown`, else the error) until it works, verified again at the next reconciliation."""
        key = str(candidate.path)
        self.log.error(event, path=key, run=str(candidate.run), error=error)
        self.failing[key] = {"run": str(candidate.run), "error": shown or error, "since": _iso(time.time())}
        self._dirty = True

    def _record(
        self, watch: WatchConfig, candidate: Candidate, verification: Verification, engine: dict[str, str],
        seconds: float,
    ) -> None:  # fmt: skip
        assert self.catalog is not None
        change = record(candidate, verification, watch=watch.name, catalog=self.catalog, engine=engine,
                        now=time.time(), root=watch.path, store=sidecar.store_of(self.config),
                        placement=watch.sidecars, metric=watch.metric)  # fmt: skip
        self.stats.verified[verification.status] += 1
        hashed = verification.size_bytes if verification.sha256 is not None else 0
        self.metrics.verified(watch.name, verification.status, seconds, hashed)
        self.failing.pop(str(candidate.path), None)
        self._dirty = True
        fields: dict[str, Any] = {
            "path": verification.path, "run": str(candidate.run), "status": verification.status,
            "bytes": verification.size_bytes, "seconds": round(seconds, 3), "step": verification.global_step,
        }  # fmt: skip
        if verification.status == "ok":
            self.log.info("checkpoint verified", **fields, warnings=verification.warnings or None)
        else:
            self.log.warning(
                "checkpoint not ok", **fields, problems=verification.problems,
                unsafe_globals=verification.unsafe_globals or None,
            )  # fmt: skip
        self._run_changed(watch, change)

    def _update_run(self, watch: WatchConfig, run: str) -> None:
        assert self.catalog is not None
        self._run_changed(watch, update_run(self.catalog, watch=watch.name, run=run, metric=watch.metric,
                                            now=time.time()))  # fmt: skip

    def _run_changed(self, watch: WatchConfig, change: RunChange) -> None:
        """Say what a record step changed in a run, and queue its copies."""
        run, newest, top = change.run, change.latest, change.best
        if newest is None and top is None:
            self.metrics.run_gone(watch.name, run_label(run, watch.path))
        elif newest is not None:
            self.metrics.run(watch.name, run_label(run, watch.path), activity=newest.mtime, step=newest.step,
                             metric=change.metric, value=change.value)  # fmt: skip
        if newest and change.latest_changed:
            self.log.info("run latest changed", run=run, path=newest.path, step=newest.step, epoch=newest.epoch)
        if top and change.best_changed:
            self.log.info("run best changed", run=run, path=top.path, metric=change.metric, value=change.value)
        if change.metric_missing and watch.metric and run not in self._metric_missing_told:
            self._metric_missing_told.add(run)  # once a run: a run that never logs it would say so at every save
            self.log.warning("metric missing", run=run, metric=watch.metric.name,
                             metrics_held=change.metrics_held[:20],
                             hint="set [watch.metric] name (or key) to one the checkpoints hold")  # fmt: skip
        self._enqueue_mirror(watch, run, change.entries)

    # -------------------------------------------------------------------------------------- reconciliation

    def _reconcile_all(self, reason: str) -> None:
        for watch in self.config.watch:
            if watch.name not in self.standby:
                self._reconcile(watch, reason)
        if self.mirror is not None:  # the wanted copies against what the targets hold, on the mirror thread
            self.mirror.request_recheck()

    def _reconcile(self, watch: WatchConfig, reason: str) -> None:
        """Start a pass comparing disk with the catalog (the safety net for dropped events). It runs a step at a
        time between the main loop's other work (`_advance_passes`): a pass over a million checkpoints never
        holds up verification, events or watchdog pings. A pass already under way for the watch is replaced."""
        self._passes[watch.name] = self._pass(watch, reason)

    def _start_up_passes(self) -> None:
        """At start-up, survey every watch before READY (so `ready` means the catalog matches the disk), telling
        systemd to extend its start timeout while a long survey runs; the runs' refresh that follows a survey
        goes on after READY, in the loop."""
        self._reconcile_all("start-up")
        extended = time.monotonic()
        for name, steps in list(self._passes.items()):
            for step in steps:
                if step == SURVEYED or self._stop:
                    break
                if time.monotonic() - extended >= EXTEND_EVERY:
                    self.notifier.extend_timeout(EXTEND_BY)
                    extended = time.monotonic()
            else:
                self._passes.pop(name, None)

    def _advance_passes(self, budget: float) -> None:
        """Run the passes under way for about `budget` seconds, one step at a time."""
        until = time.monotonic() + budget
        for name, steps in list(self._passes.items()):
            while True:  # at least one step of each pass per call, whatever the budget
                try:
                    next(steps)
                except StopIteration:
                    if self._passes.get(name) is steps:
                        del self._passes[name]
                    break
                except Exception:  # a pass that fails is dropped (the next rescan tries again); the loop goes on
                    self._passes.pop(name, None)
                    raise
                if time.monotonic() >= until:
                    break

    def _pass(self, watch: WatchConfig, reason: str) -> Generator[str | None, None, None]:
        """One reconciliation of a watch, stepwise: the survey (yielding None between steps, then SURVEYED),
        queueing what changed, then every run's latest, best and wanted copies again."""
        assert self.catalog is not None
        started = time.monotonic()
        try:
            found = yield from surveying(
                watch.path, watch=watch.name, patterns=watch.patterns, catalog=self.catalog, boundaries=self._roots(),
                store=sidecar.store_of(self.config), read_sidecars=False,
            )  # fmt: skip
        except Exception as exc:  # one watch that cannot be surveyed never stops the others
            self.log.error("reconciliation failed", watch=watch.name, folder=str(watch.path), error=repr(exc))
            self._step_errors[f"reconcile {watch.name}"] = repr(exc)
            return
        self._step_errors.pop(f"reconcile {watch.name}", None)
        for failure in found.failed:
            self.log.warning("checkpoint unreadable", watch=watch.name, error=failure)
        for candidate in [*found.to_verify, *found.incomplete]:
            key = str(candidate.path)
            if key in self.in_flight or key in self.tracker:
                # Fix: already on its way. Tracked again, a checkpoint being hashed when a rescan came was
                # hashed a second time once that finished (a change meanwhile still raises CheckpointChanged).
                continue
            self._track(watch, candidate, closed=_complete(candidate))
        for run in found.rotating:
            self.log.info("trainer rotates its checkpoints", run=run, retention="left to the trainer")
        self.stats.last_reconciliation[watch.name] = _iso(time.time())
        self.metrics.succeeded(f"reconcile:{watch.name}", time.time())
        self._dirty = True
        self.log.info(
            "reconciled", watch=watch.name, reason=reason, queued=len(found.to_verify), unchanged=found.unchanged,
            links=found.links, gone=len(found.gone), stale_sidecars=len(found.removed_sidecars),
            temps_removed=len(found.removed_temps), seconds=round(time.monotonic() - started, 3),
        )  # fmt: skip
        yield SURVEYED
        # Every run's latest, best and wanted copies again, not only those of checkpoints seen now: a run
        # recorded by `ckptd scan`, by a daemon killed before it queued the copies, or before [watch.mirror]
        # was added, would otherwise never be mirrored.
        for count, run in enumerate(sorted(set(self.catalog.run_names(watch.name)) | found.gone_runs), 1):
            if count % RUNS_PER_STEP == 0:
                yield None
            try:
                self._update_run(watch, run)
            except Exception as exc:  # one run that cannot be updated never stops the others
                self.log.error("run update failed", watch=watch.name, run=run, error=repr(exc))

    def _reload_config(self) -> None:
        self.notifier.reloading()
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            self.log.error("config reload rejected, keeping the old config", problems=exc.problems)
            self._config_rejected = {"at": _iso(time.time()), "problems": exc.problems}
            self._dirty = True
            self.notifier.ready()
            return
        if fresh.daemon.state_dir != self.config.daemon.state_dir:
            problem = "at 'daemon.state_dir': cannot change while the daemon runs; restart it instead"
            self.log.error("config reload rejected, keeping the old config", problems=[problem])
            self._config_rejected = {"at": _iso(time.time()), "problems": [problem]}
            self._dirty = True
            self.notifier.ready()
            return
        old_daemon = self.config.daemon
        for watcher in self.watchers.values():
            watcher.stop()
        self.watchers.clear()
        self.config = fresh
        self.failing.clear()  # verified again by the reconciliation below, or no longer watched
        if self.pool is not None:
            self.pool.trusted = list(fresh.daemon.trusted_globals)
            if (fresh.daemon.workers, fresh.daemon.worker_idle_timeout) != (
                old_daemon.workers,
                old_daemon.worker_idle_timeout,
            ):
                # A pool of the new size: what was in flight is verified again there (a kill is no crash of it).
                for key, job in list(self.in_flight.items()):
                    del self.in_flight[key]
                    watch = self.config.watch_named(job.watch)
                    if watch is not None:
                        self._track(watch, job.candidate, closed=True)
                self.pool.kill()
                self.pool = self._make_pool()
        self._start_watchers()
        if fresh.daemon.metrics_listen != old_daemon.metrics_listen:
            self.log.warning("metrics_listen changes at the next restart", serving=old_daemon.metrics_listen)
        self.metrics.watches(w.name for w in fresh.watch)
        self.metrics.targets(fresh.mirror)
        self.scheduler.clear()
        self._schedule_jobs()
        if self.mirror is not None:
            self.mirror.stop()
            if self.mirror.is_alive():  # a copy still under way: the new thread starts once it has ended
                self._retiring = self.mirror
        self._start_mirror()
        self._config_rejected = None
        self._passes.clear()  # passes of the old config (a watch removed, moved) end here; new ones start
        self._reconcile_all("reload")
        self.log.info("config reloaded", config=str(self.config_path), watches=[w.name for w in fresh.watch])
        self.notifier.ready()

    # ---------------------------------------------------------------------------------------------- mirror

    def _start_mirror(self) -> None:
        """Start the mirror thread of the config in force; not while the previous one still finishes a copy
        (two threads would race on a run's index.json): the main loop starts it once that one has ended."""
        self.mirror = None
        if self._retiring is not None and self._retiring.is_alive():
            return
        self._retiring = None
        if any(w.mirror for w in self.config.watch):
            self.mirror = MirrorService(self.config, standby=lambda: set(self.standby), metrics=self.metrics)
            self.mirror.start()

    def _enqueue_mirror(self, watch: WatchConfig, run: str, entries: list[Entry]) -> None:
        assert self.catalog is not None
        if watch.mirror is None or watch.name in self.standby:
            return
        if (
            mirroring.enqueue_run(self.catalog, self.config, watch, run, now=time.time(), entries=entries)
            and self.mirror
        ):
            self.mirror.wake.set()

    # ------------------------------------------------------------------------------------------- retention

    def _schedule_jobs(self) -> None:
        """Register retention and scrub jobs; a job opens its own catalog connection on its own thread."""
        if self.config.daemon.scrub_interval:
            self.scheduler.add("scrub", self.scrub_job, every=self.config.daemon.scrub_interval)
        for watch in self.config.watch:
            if watch.retention is not None:
                self.scheduler.add(
                    f"retention:{watch.name}", functools.partial(self.prune_job, watch.name),
                    every=watch.retention.every, cron=watch.retention.cron,
                )  # fmt: skip

    def _look_leases(self) -> None:
        """Renew or take each watched folder's lease (ckptd.lease); stand by where another daemon owns it: no
        watcher, no verification, no retention, no copies for that folder until its lease expires."""
        for watch in self.config.watch:
            lease = self.leases.get(watch.name)
            if lease is None or lease.path != lease_path(watch.path):
                lease = Lease(watch.path, self.config.daemon.node, self.config.daemon.lease_term)
                self.leases[watch.name] = lease
            try:
                owned = lease.look()
            except OSError as exc:  # a folder we cannot write: no other daemon can lease it either
                self._step_errors[f"lease {watch.name}"] = repr(exc)
                owned = True
            else:
                self._step_errors.pop(f"lease {watch.name}", None)
            if owned and watch.name in self.standby:
                self.standby.discard(watch.name)
                before = lease.previous
                self.log.warning("took over the folder", watch=watch.name, folder=str(watch.path),
                                 previous_owner=before.node if before else None)  # fmt: skip
                self._start_watchers([watch.name])
                self._reconcile(watch, "lease taken over")
                self._dirty = True
            elif not owned and watch.name not in self.standby:
                self.standby.add(watch.name)
                self._passes.pop(watch.name, None)
                holder = lease.holder
                self.log.warning("another daemon owns the folder, standing by", watch=watch.name,
                                 folder=str(watch.path), owner=holder.node if holder else None,
                                 owner_host=holder.host if holder else None)  # fmt: skip
                stopped = self.watchers.pop(watch.name, None)
                if stopped is not None:
                    stopped.stop()
                self.tracker.forget_watch(watch.name)
                self._dirty = True

    def _check_free_space(self, now: float) -> None:
        """Below a watch's min_free, run its retention at once (at most every DISK_RETRY seconds): it deletes the
        oldest checkpoints only soft rules keep until the space is back, never an invariant."""
        for watch in self.config.watch:
            if watch.retention is None or watch.retention.min_free is None:
                continue
            short = free_deficit(watch, watch.retention)
            was = self.disk_short.get(watch.name, 0)
            self.disk_short[watch.name] = short
            if short and now - self._disk_retention_at.get(watch.name, -DISK_RETRY) >= DISK_RETRY:
                self._disk_retention_at[watch.name] = now
                self.log.warning("disk below min_free, retention now", watch=watch.name, folder=str(watch.path),
                                 min_free=watch.retention.min_free, short_bytes=short)  # fmt: skip
                self.scheduler.run_now(f"retention:{watch.name}")
            elif was and not short:
                self.log.info("disk above min_free again", watch=watch.name, folder=str(watch.path))
            if bool(was) != bool(short):
                self._dirty = True

    def scrub_job(self) -> None:
        """One scheduled scrub of every checkpoint and mirror copy, at the configured rate."""
        from ckptd import scrub as scrubbing

        broken: dict[str, str] = {}
        targets = mirroring.targets_of(self.config, broken)
        with Catalog(self.config.daemon.state_dir) as catalog:
            report = scrubbing.scrub(self.config, catalog, targets, stop=lambda: self._stop)
        self.metrics.quarantined("scrub", len(report.quarantined))
        self.metrics.succeeded("scrub", time.time())
        self.log.info("scrub done", checked=report.checked, ok=report.ok, repaired=len(report.repaired),
                      quarantined=len(report.quarantined), bad=len(report.mismatched),
                      unreachable=[*report.unreachable, *sorted(broken)] or None)  # fmt: skip

    def prune_job(self, watch_name: str) -> PruneReport | None:
        """One scheduled retention pass over a watch, with the config in force when it runs."""
        watch = self.config.watch_named(watch_name)
        if watch is None or watch.retention is None or watch_name in self.standby:
            return None  # another daemon owns the folder: its retention is that daemon's
        with Catalog(self.config.daemon.state_dir) as catalog:
            report = prune_watch(
                watch, watch.retention, catalog=catalog, state_dir=self.config.daemon.state_dir, dry_run=False,
                awaiting_mirror=functools.partial(catalog.awaiting_mirror, watch.name),
                finish_before=self.stats.started_at,  # later intents are this process's own, perhaps in flight
            )  # fmt: skip
        for decision in report.done:
            if decision.action == "quarantine":
                self.metrics.quarantined("retention")
            else:
                self.metrics.deleted(watch.name, delete_reason(decision.reasons), decision.size)
        self.metrics.succeeded(f"retention:{watch.name}", time.time())
        self.log.info(
            "retention done", watch=watch.name, deleted=len(report.done), skipped=len(report.skipped),
            dry_run=report.dry_run, bytes_freed=sum(d.size for d in report.done),
        )  # fmt: skip
        return report

    # --------------------------------------------------------------------------------------------- metrics

    def _start_metrics(self) -> None:
        """Series for the configured watches and targets, and the HTTP endpoint when metrics_listen asks for one
        (a port taken is logged and shown in status; the daemon goes on without it)."""
        self.metrics.watches(w.name for w in self.config.watch)
        self.metrics.targets(self.config.mirror)
        address = self.config.daemon.metrics_address
        if address is not None:
            self.metrics.serve(*address)
            self.log.info("serving metrics", listen=self.config.daemon.metrics_listen)

    def _write_metrics(self, now: float) -> None:
        """Rewrite metrics_textfile at most every TEXTFILE_EVERY s after a change, and every TEXTFILE_IDLE_EVERY s
        anyway (node_exporter's node_textfile_mtime_seconds then says the daemon is alive)."""
        path = self.config.daemon.metrics_textfile
        written, at = self._metrics_written
        if path is None or now - at < (TEXTFILE_EVERY if self.metrics.changes != written else TEXTFILE_IDLE_EVERY):
            return
        self._metrics_written = (self.metrics.changes, now)
        self.metrics.write_textfile(path)

    # ---------------------------------------------------------------------------------------------- status

    def _publish(self, running: bool = True) -> None:
        assert self.catalog is not None
        queued, busy = len(self.tracker), len(self.in_flight)
        counts = {w.name: self.catalog.counts(w.name) for w in self.config.watch}
        self.metrics.checkpoints(counts)
        self.metrics.watch_health({w.name: w.name in self.standby or (w.name in self.watchers
                                   and self.watchers[w.name].healthy()) for w in self.config.watch})  # fmt: skip
        total = Counter[str]()
        for per_watch in counts.values():
            total.update(per_watch)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(total.items())) or "no checkpoints yet"
        self.notifier.status(f"{len(self.config.watch)} folder(s): {summary}; queue {queued + busy}")
        write_status(
            self.config.daemon.state_dir,
            {
                "running": running, "pid": os.getpid(), "started_at": _iso(self.stats.started_at),
                "updated_at": _iso(time.time()), "queue": queued, "in_flight": sorted(self.in_flight),
                "verified_since_start": dict(self.stats.verified),
                "last_reconciliation": self.stats.last_reconciliation,
                "watches": {
                    name: {"polling": w.polling, "healthy": w.healthy()} for name, w in self.watchers.items()
                },
                "standing_by": {
                    name: asdict(lease.holder) if lease.holder else None
                    for name, lease in self.leases.items()
                    if name in self.standby
                },
                "failing_steps": dict(self._step_errors),
                "failing_checkpoints": dict(sorted(self.failing.items())[:100]),
                "broken_targets": dict(self.mirror.broken) if self.mirror is not None else {},
                "unreachable_targets": dict(self.mirror.unreachable) if self.mirror is not None else {},
                "below_min_free": {name: short for name, short in self.disk_short.items() if short},
                "config_rejected": self._config_rejected,
            },
        )  # fmt: skip


def run(config_path: Path) -> int:
    """Entry point of `ckptd run`: configure logging from the config, then run the daemon."""
    config = load_config(config_path)
    log.configure(config.daemon.log_format, config.daemon.log_level, stream=sys.stdout)
    code = Daemon(config_path).run()
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]
    if stuck:
        # A copy to a store that stopped answering leaves the mirror thread and its transfer threads waiting out
        # their timeouts, and the interpreter joins transfer threads at exit (concurrent.futures' atexit hook),
        # past systemd's TimeoutStopSec. Every write of ours is atomic and journaled, so leaving now loses
        # nothing; the copy is redone at the next start.
        log.get("ckptd").warning("exiting without waiting for stuck transfers", threads=stuck[:8])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
