"""The verify engine behind a process boundary, for the daemon.

Verifying in worker processes keeps torch out of the daemon's own memory, lets an idle daemon give that
memory back, and contains the one failure a thread could not survive: a checkpoint truncated by its
writer while mapped raises SIGBUS, which kills only the worker. The pool is bounded (`workers`), its
processes run torch with one thread, and they are killed, not waited for, on shutdown.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.model import Verification

Result = tuple[Verification, dict[str, str]]


PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_daemon() -> None:
    """Have the kernel SIGKILL this worker when the daemon dies.

    Fix: a daemon killed with SIGKILL (or by the OOM killer) outside systemd's cgroup clean-up left its
    workers behind for good: each blocks on the call queue, whose write end it holds itself, so it never
    sees EOF, and keeps torch and any mapped checkpoint in memory. Every restart added more.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: no prctl
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the daemon died before prctl took effect
        os._exit(1)


def _warm(log_format: str, log_level: str) -> None:
    """Worker start-up: die with the daemon, log as it does (a warning torch or a loader raises here reaches
    the journal as one line with its priority, not as plain text among the JSON lines), import torch once,
    and keep it to one thread so training keeps the cores."""
    _die_with_daemon()
    from ckptd import log

    log.configure(log_format, log_level, stream=sys.stdout)
    # Ctrl-C on a terminal reaches the whole process group; the daemon decides when workers stop (it kills
    # them on shutdown), so a worker must not die first with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ckptd.verify import prepare_process

    prepare_process(threads=1)


def _noop() -> None:
    """A job that only makes a worker start (and import torch)."""


def _verify(path: str, trusted: list[str], timeout: float, root: str, metric_keys: dict[str, str]) -> Result:
    from ckptd.verify import engine_versions, verify

    found = verify(Path(path), trusted=trusted, timeout=timeout, root=Path(root), metric_keys=metric_keys)
    return found, engine_versions()


@dataclass
class _Slot:
    """One worker process (a one-process executor), and whether it is busy."""

    executor: ProcessPoolExecutor
    busy: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class VerifierPool:
    """Up to `workers` worker processes that verify checkpoints. A worker starts when a checkpoint finds every
    running one busy, and stops after `idle_timeout` without work, each on its own: the count follows the load
    (8 trainers saving at once get every worker; a quiet spell gives each one's memory back).

    One executor per worker, not one executor of `workers`: ProcessPoolExecutor starts processes on demand but
    never stops one until the whole pool goes. Work goes to the idle worker used last, so the others stay idle
    and are the ones that stop.
    """

    def __init__(
        self, workers: int, trusted: list[str], idle_timeout: float = 1800.0, logs: tuple[str, str] = ("json", "info")
    ) -> None:
        self.workers, self.trusted, self.idle_timeout = workers, list(trusted), idle_timeout
        self.logs = logs  # the daemon's log_format and log_level, for the workers' own warnings
        self._slots: list[_Slot] = []  # most recently used last
        self._lock = threading.Lock()  # futures finish on the executors' own threads

    def _slot(self) -> _Slot:
        """The idle worker used last, or a new one while there are fewer than `workers`, or the least busy."""
        with self._lock:
            idle = [slot for slot in self._slots if slot.busy == 0]
            if idle:
                chosen = idle[-1]
            elif len(self._slots) < self.workers:
                context = multiprocessing.get_context("spawn")
                chosen = _Slot(ProcessPoolExecutor(1, mp_context=context, initializer=_warm, initargs=self.logs))
            else:  # the daemon keeps no more in flight than `workers`: only after a reload shrank the pool
                chosen = min(self._slots, key=lambda slot: slot.busy)
            if chosen in self._slots:
                self._slots.remove(chosen)
            self._slots.append(chosen)
            chosen.busy += 1
            return chosen

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.busy -= 1
            slot.idle_since = time.monotonic()

    def _done(self, slot: _Slot) -> Callable[[Future[Any]], None]:
        return lambda _future: self._release(slot)

    def warm(self) -> None:
        """Start a worker now (torch takes seconds to import), so it is ready when the checkpoint settles."""
        if not self._slots:
            slot = self._slot()
            slot.executor.submit(_noop).add_done_callback(self._done(slot))

    def submit(
        self, path: Path, timeout: float, root: Path, metric_keys: dict[str, str] | None = None
    ) -> Future[Result]:
        """Queue one verification with its time budget (the engine stops itself past it; the daemon kills
        the workers if it does not), reading nothing below the watched folder `root` through a link; the
        future raises CheckpointChanged, OSError, or BrokenProcessPool."""
        slot = self._slot()
        try:
            future = slot.executor.submit(_verify, str(path), self.trusted, timeout, str(root), metric_keys or {})
        except BaseException:
            self._release(slot)
            raise
        future.add_done_callback(self._done(slot))
        return future

    @property
    def running(self) -> bool:
        """True while worker processes exist."""
        return bool(self._slots)

    @property
    def size(self) -> int:
        """How many workers exist now."""
        return len(self._slots)

    def reap_idle(self, in_flight: int) -> bool:
        """Stop each worker that idled `idle_timeout`; True if one stopped. (`in_flight`: kept for the caller's
        sake; a busy worker is never stopped whatever it says.)"""
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._slots if s.busy == 0 and now - s.idle_since >= self.idle_timeout]
            self._slots = [s for s in self._slots if s not in idle]
        for slot in idle:
            slot.executor.shutdown(wait=True)
        return bool(idle)

    def broken(self) -> None:
        """Forget the workers after one died; the next submit starts fresh ones."""
        self.kill()

    def kill(self) -> None:
        """Kill every worker now: a hash in flight is abandoned (workers write nothing, so nothing is left)."""
        with self._lock:
            slots, self._slots = self._slots, []
        processes = [p for slot in slots for p in getattr(slot.executor, "_processes", {}).values()]
        for process in processes:  # no public API to kill a pool's workers
            if process.is_alive():
                process.kill()
        for slot in slots:
            slot.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(2.0)
