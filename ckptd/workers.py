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
import time
from concurrent.futures import Future, ProcessPoolExecutor
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


def _warm() -> None:
    """Worker start-up: die with the daemon, import torch once, and keep it to one thread so training keeps
    the cores."""
    _die_with_daemon()
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


class VerifierPool:
    """Worker processes that verify checkpoints; started on demand and stopped after `idle_timeout` idle."""

    def __init__(self, workers: int, trusted: list[str], idle_timeout: float = 1800.0) -> None:
        self.workers, self.trusted, self.idle_timeout = workers, list(trusted), idle_timeout
        self._pool: ProcessPoolExecutor | None = None
        self._idle_since = time.monotonic()

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_warm)
        return self._pool

    def warm(self) -> None:
        """Start a worker now (torch takes seconds to import), so it is ready when the checkpoint settles."""
        if self._pool is None:
            self._ensure().submit(_noop).add_done_callback(self._done)

    def submit(
        self, path: Path, timeout: float, root: Path, metric_keys: dict[str, str] | None = None
    ) -> Future[Result]:
        """Queue one verification with its time budget (the engine stops itself past it; the daemon kills
        the workers if it does not), reading nothing below the watched folder `root` through a link; the
        future raises CheckpointChanged, OSError, or BrokenProcessPool."""
        future = self._ensure().submit(_verify, str(path), self.trusted, timeout, str(root), metric_keys or {})
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any]) -> None:
        self._idle_since = time.monotonic()  # runs on the pool's thread: a plain assignment only

    @property
    def running(self) -> bool:
        """True while worker processes exist."""
        return self._pool is not None

    def reap_idle(self, in_flight: int) -> bool:
        """Stop the worker processes if nothing is in flight and they idled `idle_timeout`; True if it did."""
        if self._pool is not None and in_flight == 0 and time.monotonic() - self._idle_since >= self.idle_timeout:
            self._pool.shutdown(wait=True)
            self._pool = None
            return True
        return False

    def broken(self) -> None:
        """Forget a pool whose worker died; the next submit starts a fresh one."""
        self.kill()

    def kill(self) -> None:
        """Kill the workers now: a hash in flight is abandoned (workers write nothing, so nothing is left)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())  # no public API to kill a pool's workers
        for process in processes:
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(2.0)
