"""The state folder's lock across real processes, and the status file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd import state
from ckptd.errors import AlreadyRunning, ExitCode
from ckptd.state import LOCK_NAME, STATUS_NAME, StateLock

# Takes the lock in a separate interpreter, says so on stdout, then holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ckptd.state import StateLock

    lock = StateLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
    """
)


@pytest.fixture
def holder_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on tmp_path/state; released when the fixture ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "state")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_second_process_gets_exit_75(tmp_path: Path, holder_process: subprocess.Popen[str]) -> None:
    """While another process holds the lock, acquire() raises AlreadyRunning (exit 75) naming its pid."""
    lock = StateLock(tmp_path / "state")
    with pytest.raises(AlreadyRunning) as raised:
        lock.acquire()
    assert raised.value.exit_code == ExitCode.ALREADY_RUNNING == 75
    message = str(raised.value)
    assert f"pid {holder_process.pid}" in message
    assert str(tmp_path / "state") in message


def test_holder_reports_the_pid_of_the_other_process(tmp_path: Path, holder_process: subprocess.Popen[str]) -> None:
    """holder() names the pid of the process that holds the lock, without taking it."""
    assert state.holder(tmp_path / "state") == holder_process.pid
    assert state.holder(tmp_path / "state") == holder_process.pid  # asking does not disturb the lock


def test_lock_is_free_once_the_holder_dies(tmp_path: Path, holder_process: subprocess.Popen[str]) -> None:
    """A holder killed with SIGKILL leaves no lock behind: holder() is None and acquire() succeeds."""
    holder_process.kill()
    holder_process.wait(10)
    assert state.holder(tmp_path / "state") is None
    lock = StateLock(tmp_path / "state")
    lock.acquire()
    try:
        assert state.holder(tmp_path / "state") is not None
        assert (tmp_path / "state" / LOCK_NAME).read_text().strip().isdigit()
    finally:
        lock.release()


def test_lock_released_cleanly_can_be_taken_by_another_process(tmp_path: Path) -> None:
    """After release() another process can take the lock; while this one holds it, that process cannot."""
    lock = StateLock(tmp_path / "state")
    lock.acquire()
    probe = (
        "import sys; from pathlib import Path; from ckptd.state import StateLock;"
        " StateLock(Path(sys.argv[1])).acquire()"
    )
    busy = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "state")], capture_output=True, text=True)
    assert busy.returncode != 0
    assert "AlreadyRunning" in busy.stderr
    lock.release()
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "state")], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


def test_holder_is_none_without_a_lock_file(tmp_path: Path) -> None:
    """holder() on a state folder that no daemon ever used is None (and creates nothing)."""
    assert state.holder(tmp_path / "never-used") is None
    assert not (tmp_path / "never-used").exists()


def test_acquire_creates_the_state_folder_and_writes_the_pid(tmp_path: Path) -> None:
    """acquire() creates a missing state folder and writes this process's pid into the lock file."""
    lock = StateLock(tmp_path / "a" / "b")
    lock.acquire()
    try:
        assert (tmp_path / "a" / "b" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    lock.release()  # a second release is harmless


def test_status_file_round_trip(tmp_path: Path) -> None:
    """write_status then read_status returns the same mapping; a rewrite replaces it whole."""
    status = {
        "running": True,
        "pid": 1234,
        "queue": 3,
        "in_flight": ["/runs/a/x.pt"],
        "verified_since_start": {"ok": 5, "corrupt": 1},
        "last_reconciliation": {"runs": "2025-01-01T00:00:00Z"},
        "watches": {"runs": {"polling": False, "healthy": True}},
    }
    state.write_status(tmp_path, status)
    assert state.read_status(tmp_path) == status
    state.write_status(tmp_path, {"running": False})
    assert state.read_status(tmp_path) == {"running": False}
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_NAME]  # no temp file left beside it


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2, 3]", b"\xff\xfe"])
def test_unreadable_status_file_reads_as_none(tmp_path: Path, content: bytes) -> None:
    """A status file that is empty, not JSON, not an object or not UTF-8 reads as None, never raises."""
    (tmp_path / STATUS_NAME).write_bytes(content)
    assert state.read_status(tmp_path) is None


def test_missing_status_file_reads_as_none(tmp_path: Path) -> None:
    """No status file (the daemon never ran) reads as None."""
    assert state.read_status(tmp_path) is None


def test_lock_file_survives_for_the_next_holder(tmp_path: Path) -> None:
    """The lock file stays after release; the next holder truncates and rewrites it with its own pid."""
    first = StateLock(tmp_path)
    first.acquire()
    first.release()
    (tmp_path / LOCK_NAME).write_text("999999999999\n")
    second = StateLock(tmp_path)
    started = time.monotonic()
    second.acquire()
    try:
        assert time.monotonic() - started < 1.0  # non-blocking
        assert (tmp_path / LOCK_NAME).read_text().strip().isdigit()
        assert (tmp_path / LOCK_NAME).read_text() != "999999999999\n"
    finally:
        second.release()
