"""The daemon's Prometheus metrics: counters, gauges and histograms, served over HTTP and/or written for
node_exporter's textfile collector. The only prometheus_client import.

Every metric lives in a registry of the `Metrics` object's own (never the library's global one), so two daemons in
one process, or tests, never see each other's series. The daemon calls one small method per event
(`verified`, `deleted`, `mirror_copied`...): each is an increment or a set under a lock, never a catalog query, so
metrics add nothing measurable to verification. Counters and gauges are thread-safe: the mirror thread and the
scheduler's jobs update them directly.

Labels stay bounded: watches and targets come from the config, statuses, jobs and deletion reasons from fixed
sets, and runs are capped: only the MAX_RUNS runs whose latest checkpoint is newest have `ckptd_run_*` series,
labelled by watch and by the run folder relative to the watch (`.` for the watch itself), never an absolute path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from ckptd import __version__
from ckptd.fsutil import atomic_write_bytes
from ckptd.model import Status
from ckptd.retention import NO_RULE

MAX_RUNS = 100  # runs with ckptd_run_* series: those whose latest checkpoint is newest; the others have none
TEXTFILE_EVERY = 5.0  # seconds between two writes of the textfile, and only after a change...
TEXTFILE_IDLE_EVERY = 60.0  # ...or this often when idle, so that its mtime says the daemon is alive
VERIFY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
COPY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
STATUSES: tuple[str, ...] = get_args(Status)
# What made retention delete a checkpoint: the planner's reasons are sentences for people, these are labels.
DELETE_REASONS = ("no_keep_rule", "max_size", "min_free", "corrupt", "other")
QUARANTINED_BY = ("retention", "scrub")


def delete_reason(reasons: Sequence[str]) -> str:
    """The label of a retention deletion, from its decision's reasons (ckptd.retention): its first reason says what
    made it go (max_size and min_free put theirs first, on_corrupt its only one)."""
    first = reasons[0] if reasons else ""
    if tuple(reasons) == NO_RULE:
        return "no_keep_rule"
    if first.startswith("over max_size"):
        return "max_size"
    if first.startswith("disk below min_free"):
        return "min_free"
    if first.startswith("corrupt"):
        return "corrupt"
    return "other"


def run_label(run: str, watch_path: Path) -> str:
    """A run's label: its folder relative to its watch (`.` for the watch itself)."""
    try:
        return Path(run).relative_to(watch_path).as_posix()
    except ValueError:
        return run


class Metrics:
    """The daemon's metrics in a registry of their own; one small method per event."""

    def __init__(self, *, max_runs: int = MAX_RUNS) -> None:
        self.registry = CollectorRegistry()
        self.max_runs = max_runs
        self.changes = 0  # bumped by every update: the textfile is rewritten only when it moved
        self._lock = threading.Lock()  # the run table, and gauges set from several threads
        self._runs: dict[tuple[str, str], tuple[float, str | None]] = {}  # (watch, run): (activity, its metric)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._queue = -1
        self._gauged: dict[str, set[str]] = {}  # watch: the statuses ckptd_checkpoints has a series of
        r = self.registry
        self._build = Gauge("ckptd_build_info", "Always 1; the ckptd version as a label.", ["version"], registry=r)
        self._build.labels(__version__).set(1)
        self._up = Gauge("ckptd_up", "1 while the daemon runs; 0 in the textfile a clean stop leaves.", registry=r)
        self._up.set(1)
        Gauge("ckptd_start_time_seconds", "When the daemon started, as a Unix time.", registry=r).set_to_current_time()
        self._verified = Counter("ckptd_checkpoints_verified", "Checkpoints verified and recorded, by result.",
                                 ["watch", "status"], registry=r)  # fmt: skip
        self._verify_seconds = Histogram("ckptd_verify_seconds", "Seconds one verification took (hash, CRCs, load).",
                                         buckets=VERIFY_BUCKETS, registry=r)  # fmt: skip
        self._hashed = Counter("ckptd_bytes_hashed", "Bytes of checkpoints hashed.", ["watch"], registry=r)
        self._checkpoints = Gauge("ckptd_checkpoints", "Checkpoints on disk in the catalog, by status.",
                                  ["watch", "status"], registry=r)  # fmt: skip
        self._queued = Gauge("ckptd_verify_queue", "Checkpoints waiting to be verified or being verified.", registry=r)
        self._healthy = Gauge("ckptd_watch_healthy", "1 while a watch's observer runs (or another daemon owns the"
                              " folder), 0 when it failed.", ["watch"], registry=r)  # fmt: skip
        self._deleted = Counter("ckptd_retention_deleted", "Checkpoints retention deleted, by what made it.",
                                ["watch", "reason"], registry=r)  # fmt: skip
        self._freed = Counter("ckptd_retention_freed_bytes", "Bytes retention freed.", ["watch"], registry=r)
        self._quarantined = Counter("ckptd_quarantined", "Checkpoints moved to quarantine, by retention's on_corrupt"
                                    " or by a scrub that found rot.", ["by"], registry=r)  # fmt: skip
        self._backlog = Gauge("ckptd_mirror_backlog", "Copies waiting or failing, per target.", ["target"], registry=r)
        self._failing_since = Gauge("ckptd_mirror_failing_since_timestamp_seconds", "Since when a target has failed"
                                    " (its first failed copy since the last good one), as a Unix time; 0 when it"
                                    " works.", ["target"], registry=r)  # fmt: skip
        self._copy_seconds = Histogram("ckptd_mirror_copy_seconds", "Seconds one copy to a target took, proof"
                                       " included.", ["target"], buckets=COPY_BUCKETS, registry=r)  # fmt: skip
        self._copies = Counter("ckptd_mirror_copies", "Copies made and proved, per target.", ["target"], registry=r)
        self._failures = Counter("ckptd_mirror_failures", "Copies that failed (retried later), per target.",
                                 ["target"], registry=r)  # fmt: skip
        self._latest_step = Gauge("ckptd_run_latest_step", f"The step of a run's latest checkpoint (the {max_runs}"
                                  " most recently active runs).", ["watch", "run"], registry=r)  # fmt: skip
        self._best_value = Gauge("ckptd_run_best_value", f"The metric value of a run's best checkpoint (the {max_runs}"
                                 " most recently active runs).", ["watch", "run", "metric"], registry=r)  # fmt: skip
        self._success = Gauge("ckptd_last_success_timestamp_seconds", "When a job last ended without error, as a"
                              " Unix time.", ["job"], registry=r)  # fmt: skip
        for by in QUARANTINED_BY:
            self._quarantined.labels(by)

    # ------------------------------------------------------------------------------------------------ events

    def watches(self, names: Iterable[str]) -> None:
        """The configured watches (at start and after a reload): their series start at 0, so that increase() and
        rate() see the first event; the run series of a watch no longer configured are removed."""
        wanted = set(names)
        for name in wanted:
            for status in STATUSES:
                self._verified.labels(name, status)
            self._hashed.labels(name)
            for reason in DELETE_REASONS:
                self._deleted.labels(name, reason)
            self._freed.labels(name)
        with self._lock:
            for watch, run in [key for key in self._runs if key[0] not in wanted]:
                self._drop_run(watch, run)
            for watch in [w for w in self._gauged if w not in wanted]:
                for status in self._gauged.pop(watch):
                    self._remove(self._checkpoints, watch, status)
                self._remove(self._healthy, watch)
        self.changes += 1

    def targets(self, names: Iterable[str]) -> None:
        """The configured mirror targets: their series start at 0."""
        for name in names:
            self._copies.labels(name)
            self._failures.labels(name)
            self._backlog.labels(name)
            self._failing_since.labels(name)
        self.changes += 1

    def verified(self, watch: str, status: str, seconds: float, hashed: int) -> None:
        """A verification recorded: its result, how long it took (0: none ran, such as a timeout recorded), and the
        bytes it hashed (0 when it hashed none)."""
        self._verified.labels(watch, status).inc()
        if seconds > 0:
            self._verify_seconds.observe(seconds)
        if hashed:
            self._hashed.labels(watch).inc(hashed)
        self.changes += 1

    def queue(self, size: int) -> None:
        """Checkpoints tracked and in flight now (called every turn of the main loop: cheap when unchanged)."""
        if size != self._queue:
            self._queue = size
            self._queued.set(size)
            self.changes += 1

    def checkpoints(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """{watch: {status: count}} as the status file has just read them from the catalog."""
        with self._lock:
            for watch, per_status in counts.items():
                statuses = self._gauged.setdefault(watch, set())
                statuses.update(STATUSES, per_status)
                for status in statuses:
                    self._checkpoints.labels(watch, status).set(per_status.get(status, 0))
        self.changes += 1

    def watch_health(self, healthy: Mapping[str, bool]) -> None:
        """{watch: whether its observer runs}."""
        with self._lock:
            for watch, ok in healthy.items():
                self._gauged.setdefault(watch, set())
                self._healthy.labels(watch).set(1 if ok else 0)
        self.changes += 1

    def run(self, watch: str, run: str, *, activity: float, step: int | None, metric: str | None,
            value: float | None) -> None:  # fmt: skip
        """A run's latest and best now (`activity`: its latest checkpoint's mtime). Only the `max_runs` runs with the
        newest activity have series: a run older than all of them when the table is full gets none, a newer one
        takes the place of the oldest."""
        key = (watch, run)
        with self._lock:
            if key not in self._runs and len(self._runs) >= self.max_runs:
                oldest = min(self._runs, key=lambda k: self._runs[k][0])
                if self._runs[oldest][0] > activity:
                    return
                self._drop_run(*oldest)
            held = self._runs.get(key)
            if held is not None and held[1] is not None and held[1] != metric:
                self._remove(self._best_value, watch, run, held[1])
            if step is None:
                self._remove(self._latest_step, watch, run)
            else:
                self._latest_step.labels(watch, run).set(step)
            if metric is None or value is None:
                metric = None
                if held is not None and held[1] is not None:
                    self._remove(self._best_value, watch, run, held[1])
            else:
                self._best_value.labels(watch, run, metric).set(value)
            self._runs[key] = (activity, metric)
        self.changes += 1

    def run_gone(self, watch: str, run: str) -> None:
        """A run without checkpoints any more: its series are removed."""
        with self._lock:
            if (watch, run) in self._runs:
                self._drop_run(watch, run)
                self.changes += 1

    def deleted(self, watch: str, reason: str, size: int) -> None:
        """Retention deleted a checkpoint of `size` bytes; `reason` is one of DELETE_REASONS (see delete_reason)."""
        self._deleted.labels(watch, reason if reason in DELETE_REASONS else "other").inc()
        self._freed.labels(watch).inc(size)
        self.changes += 1

    def quarantined(self, by: str, count: int = 1) -> None:
        """Checkpoints moved to quarantine by "retention" or "scrub"."""
        if count:
            self._quarantined.labels(by).inc(count)
            self.changes += 1

    def mirror_copied(self, target: str, seconds: float | None = None) -> None:
        """A copy made and proved on `target`, in `seconds` when known."""
        self._copies.labels(target).inc()
        if seconds is not None:
            self._copy_seconds.labels(target).observe(seconds)
        self.changes += 1

    def mirror_failed(self, target: str, count: int = 1) -> None:
        """Copies to `target` that failed (each is retried later)."""
        if count:
            self._failures.labels(target).inc(count)
            self.changes += 1

    def mirror_backlog(self, backlog: Mapping[str, Mapping[str, Any]]) -> None:
        """The catalog's mirror_backlog(): copies pending or failing, and since when, per target."""
        for target, state in backlog.items():
            self._backlog.labels(target).set(int(state.get("pending") or 0) + int(state.get("failed") or 0))
            self._failing_since.labels(target).set(float(state.get("failing_since") or 0))
        self.changes += 1

    def succeeded(self, job: str, now: float) -> None:
        """A job ended without error: "reconcile:<watch>", "retention:<watch>", "scrub", "mirror_pass",
        "mirror_recheck"."""
        self._success.labels(job).set(now)
        self.changes += 1

    # -------------------------------------------------------------------------------------------- exposition

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics over HTTP at host:port on a thread of its own. Raises OSError (the port is taken)."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)

    def write_textfile(self, path: Path) -> None:
        """Write the exposition to `path` atomically (a reader sees the old file or the new one). Raises OSError."""
        atomic_write_bytes(path, self.render())

    def stop(self, textfile: Path | None = None) -> None:
        """At a clean stop: ckptd_up is 0, the textfile (if any) says so, and the HTTP server stops."""
        self._up.set(0)
        try:
            if textfile is not None:
                self.write_textfile(textfile)
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
            if self._thread is not None:
                self._thread.join(2.0)
                self._thread = None

    # --------------------------------------------------------------------------------------------- internals

    def _drop_run(self, watch: str, run: str) -> None:
        _activity, metric = self._runs.pop((watch, run))
        self._remove(self._latest_step, watch, run)
        if metric is not None:
            self._remove(self._best_value, watch, run, metric)

    @staticmethod
    def _remove(metric: Gauge, *labels: str) -> None:
        with contextlib.suppress(KeyError):  # never set
            metric.remove(*labels)
