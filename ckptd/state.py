"""The state folder's lock and the daemon's status file.

The lock (`daemon.lock`, an flock) keeps a second daemon off the same state; the kernel drops it when the
process dies, even by SIGKILL. The status file (`status.json`, written atomically) tells `ckptd status`
what only the running daemon knows: its queue, its observers, its last reconciliation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from ckptd.errors import AlreadyRunning
from ckptd.fsutil import atomic_write_bytes

LOCK_NAME = "daemon.lock"
STATUS_NAME = "status.json"


class StateLock:
    """An exclusive, non-blocking lock on a state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning naming the holder's pid (exit status 75)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another ckptd daemon (pid {holder}) is using the state folder {self.path.parent};"
                " stop it first, or give this one another state_dir"
            ) from None
        # The pid is for people (`status`, the AlreadyRunning message); the flock is the lock. A full disk must
        # not stop a restart, the one thing that lets retention free space again.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder(state_dir: Path) -> int | None:
    """The pid of the daemon holding the state folder's lock, or None when no daemon runs."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


def write_status(state_dir: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically."""
    atomic_write_bytes(state_dir / STATUS_NAME, json.dumps(status, indent=2).encode())


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The last status the daemon wrote, or None."""
    with contextlib.suppress(OSError, ValueError):
        found = json.loads((state_dir / STATUS_NAME).read_bytes())
        return found if isinstance(found, dict) else None
    return None


ACK_NAME = "acknowledged.json"


def acknowledge(state_dir: Path, now: float) -> None:
    """Record that the user has seen every quarantine up to `now` (`ckptd status --ack`)."""
    atomic_write_bytes(state_dir / ACK_NAME, json.dumps({"acknowledged_at": now}).encode())


def acknowledged_at(state_dir: Path) -> float:
    """When quarantines were last acknowledged (0 if never)."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        found = json.loads((state_dir / ACK_NAME).read_bytes())
        return float(found.get("acknowledged_at", 0.0))
    return 0.0
