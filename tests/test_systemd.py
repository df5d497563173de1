"""ckptd.systemd.Notifier against real AF_UNIX datagram sockets, as systemd's notify socket is."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.systemd import Notifier


def _receive(sock: socket.socket) -> dict[str, str]:
    """Read one datagram and split its KEY=VALUE lines, as PID 1 does."""
    data = sock.recv(4096).decode("utf-8")
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, and the NOTIFY_SOCKET value that names it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a unique abstract name, and the '@name' NOTIFY_SOCKET value."""
    name = f"ckptd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


def test_ready_sends_ready_1(notify_socket: tuple[socket.socket, str]) -> None:
    """ready() sends exactly READY=1 to a filesystem socket."""
    sock, address = notify_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_ready_reaches_abstract_socket(abstract_socket: tuple[socket.socket, str]) -> None:
    """An '@name' NOTIFY_SOCKET reaches the abstract socket named by that name."""
    sock, address = abstract_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_status_sends_text(notify_socket: tuple[socket.socket, str]) -> None:
    """status(text) sends STATUS=<text>, unicode included."""
    sock, address = notify_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).status("watching 3 folders · 12 ok") is True
    assert _receive(sock) == {"STATUS": "watching 3 folders · 12 ok"}


def test_status_newlines_cannot_inject_assignments(notify_socket: tuple[socket.socket, str]) -> None:
    """Newlines in status text become spaces, so the text cannot add assignments such as READY=1."""
    sock, address = notify_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).status("bad\nREADY=1\r\nx") is True
    assert _receive(sock) == {"STATUS": "bad READY=1 x"}


def test_watchdog_sends_watchdog_1(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog() sends exactly WATCHDOG=1."""
    sock, address = notify_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).watchdog() is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_stopping_sends_stopping_1(notify_socket: tuple[socket.socket, str]) -> None:
    """stopping() sends exactly STOPPING=1."""
    sock, address = notify_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).stopping() is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_reloading_sends_monotonic_usec(notify_socket: tuple[socket.socket, str]) -> None:
    """reloading() sends RELOADING=1 and MONOTONIC_USEC, the current CLOCK_MONOTONIC in microseconds."""
    sock, address = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier.from_env({"NOTIFY_SOCKET": address}).reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _receive(sock)
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_without_notify_socket_everything_is_a_noop() -> None:
    """Without NOTIFY_SOCKET the notifier is disabled: every send returns False and none raises."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "60000000"})
    assert notifier.enabled is False
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.watchdog_interval() is None


def test_empty_notify_socket_is_a_noop() -> None:
    """An empty or unsupported NOTIFY_SOCKET disables the notifier instead of failing at send time."""
    for value in ("", "@", "relative/path", "vsock:2:1234"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
        assert notifier.enabled is False, value
        assert notifier.ready() is False


def test_from_env_defaults_to_os_environ(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """from_env() with no argument reads os.environ."""
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier.from_env().ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_missing_socket_path_returns_false(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET path with nothing bound there makes sends return False without raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "absent" / "notify")})
    assert notifier.enabled is True
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False


def test_unbound_abstract_socket_returns_false() -> None:
    """An abstract NOTIFY_SOCKET name nobody listens on makes sends return False without raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": f"@ckptd-absent-{uuid.uuid4().hex}"})
    assert notifier.ready() is False


def test_too_long_socket_path_returns_false(tmp_path: Path) -> None:
    """A socket path longer than sockaddr_un allows makes sends return False without raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / ("x" * 200))})
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog_interval() is half of WATCHDOG_USEC in seconds when WATCHDOG_PID is unset."""
    _, address = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "60000000"})
    assert notifier.watchdog_interval() == 30.0


def test_watchdog_interval_for_own_pid(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog_interval() is set when WATCHDOG_PID names this process."""
    _, address = notify_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval() == 2.5


def test_watchdog_interval_none_for_other_pid(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog_interval() is None when WATCHDOG_PID names another process."""
    _, address = notify_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(env).watchdog_interval() is None


def test_watchdog_interval_none_without_usable_watchdog_usec(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """watchdog_interval() is None when WATCHDOG_USEC is unset, zero, negative or not a number."""
    _, address = notify_socket
    for env in (
        {"NOTIFY_SOCKET": address},
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "0"},
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "-5"},
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "sixty"},
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not-a-pid"},
    ):
        assert Notifier.from_env(env).watchdog_interval() is None, env


def test_notify_drops_messages_when_the_receiver_queue_is_full_instead_of_spinning(tmp_path: Path) -> None:
    """A receiver that stops reading makes sends fail at once (EAGAIN), never block or spin the daemon's loop."""
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
        started = time.monotonic()
        results = [notifier.status(f"message {i}") for i in range(200)]
        elapsed = time.monotonic() - started
    assert results[0] is True
    assert results[-1] is False  # the queue (net.unix.max_dgram_qlen, 10 by default) filled up
    # A blocking send with a timeout waited 2 s per dropped message (over 6 minutes here); dropping is instant.
    assert elapsed < 30
