"""sd_notify(3) without libsystemd: readiness, status, watchdog and reload messages to the service manager.

systemd passes the address of its notification socket in $NOTIFY_SOCKET to services with Type=notify
(or NotifyAccess= set). A message is a single datagram of newline-separated ``KEY=VALUE`` assignments
sent to that AF_UNIX SOCK_DGRAM socket. The protocol is simple and stable, so speaking it directly
keeps ckptd free of a compiled dependency (python-systemd) that pip cannot always build on GPU boxes.

Outside systemd (a terminal, a container, the tests) $NOTIFY_SOCKET is unset and every method is a
no-op, so callers never have to ask whether they run under systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

# A datagram to a local socket either goes through at once or the receiver's queue is full. A full
# queue means PID 1 is stuck; blocking on it would stall the daemon (and its watchdog thread) with it,
# so sends give up after this many seconds and report failure instead.


def _socket_address(value: str) -> str | None:
    """Turn a $NOTIFY_SOCKET value into an address that ``socket.sendto`` takes for AF_UNIX.

    Given the raw environment value. Returns a filesystem path unchanged, an abstract address
    (``@name``) with the ``@`` replaced by the NUL byte the kernel expects, or None for an empty value
    or a form this module doesn't speak (newer systemd also accepts ``vsock:`` addresses, which only
    matter inside VMs). Raises nothing.
    """
    if value.startswith("/"):
        return value
    # "@" is how systemd writes an abstract socket in text; in the sockaddr it is a leading NUL.
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _parse_int(value: str | None) -> int | None:
    """Parse an optional decimal environment value.

    Given the raw value or None. Returns the integer, or None when the value is missing or not a
    decimal integer. Raises nothing: a garbled variable must disable the feature, not crash start-up.
    """
    if value is None:
        return None
    try:
        return int(value.strip(), 10)
    except ValueError:
        return None


class Notifier:
    """Sends sd_notify messages to the socket systemd named in $NOTIFY_SOCKET, if any.

    Build it with :meth:`from_env`. Each send opens a fresh socket, as libsystemd does: it costs
    microseconds, keeps no state that a fork or a broken socket could spoil, and lets the watchdog
    thread and the main thread send concurrently without a lock.

    Every sending method returns True when the datagram was handed to the kernel and False when
    nothing was sent (no $NOTIFY_SOCKET) or sending failed. None of them raises and none logs: a
    notification that cannot be delivered must never take the daemon down.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        """Given the socket address as ``sendto`` takes it (path, or NUL-prefixed abstract name; None
        disables sending), $WATCHDOG_USEC and $WATCHDOG_PID already parsed (None when unset).
        Returns nothing. Raises nothing."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build a notifier from the environment systemd gave the service.

        Given a mapping of environment variables (``os.environ`` when None); reads NOTIFY_SOCKET,
        WATCHDOG_USEC and WATCHDOG_PID. Returns a Notifier, disabled (all sends are no-ops) when
        NOTIFY_SOCKET is unset, empty or of an unsupported form. Raises nothing.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        watchdog_usec = _parse_int(env.get("WATCHDOG_USEC"))
        watchdog_pid = _parse_int(env.get("WATCHDOG_PID"))
        if "WATCHDOG_PID" in env and watchdog_pid is None:
            # sd_watchdog_enabled(3) treats an unparsable WATCHDOG_PID as "not for us", not as unset.
            watchdog_usec = None
        return cls(
            address=_socket_address(raw) if raw else None,
            watchdog_usec=watchdog_usec,
            watchdog_pid=watchdog_pid,
        )

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to. Given nothing; raises nothing."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram carrying the given ``KEY=VALUE`` assignments, one per line.

        Given the assignments; they must not contain newlines (the public helpers make sure of it).
        Returns True when the datagram was sent, False when disabled or when the socket is missing,
        refuses the message or its queue is full. Raises nothing.
        """
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", errors="replace")
        try:
            # SOCK_CLOEXEC: a checkpoint loader subprocess forked mid-send must not inherit the fd.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking: with a full receive queue an unconnected datagram socket polls as writable, so
                # a timeout would spin a core for its whole length; a message systemd is not reading is dropped.
                sock.setblocking(False)
                sent = sock.sendto(payload, self._address)
        except (OSError, ValueError):
            # OSError: no such socket, permission denied, queue full (EAGAIN), address too long.
            # ValueError: an address Python rejects outright (e.g. an embedded NUL in a path).
            return False
        # A datagram goes whole or not at all; anything shorter would be a kernel oddity, not success.
        return sent == len(payload)

    def ready(self) -> bool:
        """Tell systemd start-up (or a reload) has finished: READY=1.

        Given nothing. Returns True when sent (see :meth:`notify`). Raises nothing.
        """
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """Set the free-form status line ``systemctl status`` shows: STATUS=<text>.

        Given the text; newlines are replaced by spaces, since a newline would start a new assignment
        and let text such as a checkpoint path inject e.g. ``READY=1``. Returns True when sent.
        Raises nothing.
        """
        one_line = " ".join(text.splitlines())
        return self.notify(f"STATUS={one_line}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to finish starting (or reloading, or stopping): EXTEND_TIMEOUT_USEC.

        Given how long from now the next message (or READY) may take. systemd never shortens a timeout for it;
        without it a start-up pass over a million checkpoints would outlast TimeoutStartSec (90 s by default).
        Returns True when sent. Raises nothing.
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> bool:
        """Ping the service watchdog (WatchdogSec=): WATCHDOG=1.

        Given nothing. Returns True when sent. Raises nothing.
        """
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd the daemon is shutting down: STOPPING=1.

        Given nothing. Returns True when sent. Raises nothing.
        """
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """Tell systemd a configuration reload has begun: RELOADING=1 with MONOTONIC_USEC.

        systemd 253+ (Type=notify-reload) requires MONOTONIC_USEC, the CLOCK_MONOTONIC time in
        microseconds, to match the message to the reload it asked for; older versions ignore the extra
        field. Send :meth:`ready` once the new configuration is in effect. Given nothing. Returns True
        when sent. Raises nothing.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """How often to call :meth:`watchdog`, in seconds.

        Given nothing. Returns half of $WATCHDOG_USEC (the margin sd_watchdog_enabled(3) recommends),
        or None when there is nothing to ping: no notification socket, WATCHDOG_USEC unset or not a
        positive integer, or WATCHDOG_PID set to another process. The PID is compared at call time, so
        a forked child that inherited the environment gets None and does not ping on the parent's
        behalf. Raises nothing.
        """
        if self._address is None or self._watchdog_usec is None or self._watchdog_usec <= 0:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000
