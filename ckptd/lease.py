"""One owner per shared folder: a lease file that several daemons (nodes of a cluster seeing one NFS or Lustre
folder) agree on, so that only one of them verifies, deletes and mirrors what the folder holds.

The lease is a small JSON file: owner node, host, pid, a random token and an expiry. The owner renews it every
third of its term; another daemon takes it over only once it has expired, by writing its own (atomically:
temp file and rename) and reading it back after a pause: of two daemons that took it in the same instant, the
one whose token is there after the pause owns the folder, and the other stands by. A daemon killed with -9
stops renewing; the lease expires and a standby takes over within one term and one look.

Where it lies: `<folder>/.ckptd-owner.json`, except in a folder named `checkpoints` (accelerate's, whose
`total_limit` counts every entry): there `<parent>/.checkpoints.ckptd-owner.json`.

NFS caveats, documented in the README: the hosts' clocks must agree within a small part of the term (NTP), and
attribute caching (`actimeo`) must be well below it; rename is atomic on NFS, flock is not used (it is not
reliable across NFS versions and mounts). The file is read as untrusted input: anything malformed counts as no
lease, never as a reason to stop.

`decide` is pure; `Lease` does the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ckptd.fsutil import atomic_write_bytes

LEASE_NAME = ".ckptd-owner.json"
_MAX_BYTES = 4096

State = Literal["mine", "free", "held"]


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, until when."""

    node: str
    host: str
    pid: int
    token: str
    expires_at: float


def lease_path(folder: Path) -> Path:
    """Where the lease of a watched folder lies (see the module)."""
    if folder.name == "checkpoints":
        return folder.parent / f".{folder.name}.ckptd-owner.json"
    return folder / LEASE_NAME


def parse(data: bytes) -> Holder | None:
    """The holder a lease file names, or None when it is missing, malformed or hostile."""
    if len(data) > _MAX_BYTES:
        return None
    try:
        raw = json.loads(data)
        holder = Holder(str(raw["node"]), str(raw["host"]), int(raw["pid"]), str(raw["token"]),
                        float(raw["expires_at"]))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None
    return holder if holder.expires_at == holder.expires_at else None  # not NaN


def decide(current: Holder | None, token: str, now: float) -> State:
    """Whether the lease is ours, free to take (none, or expired), or held by another daemon."""
    if current is None or current.expires_at <= now:
        return "mine" if current is not None and current.token == token else "free"
    return "mine" if current.token == token else "held"


def _dead_here(holder: Holder) -> bool:
    """Whether the holder ran on this host and its process is gone."""
    if holder.host != socket.gethostname() or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


class Lease:
    """This daemon's claim on one folder."""

    def __init__(self, folder: Path, node: str, term: float, settle: float = 1.0) -> None:
        self.path = lease_path(folder)
        self.node, self.term, self.settle = node, term, settle
        self.token = secrets.token_hex(16)
        self.holder: Holder | None = None  # who held it at the last look
        self.previous: Holder | None = None  # who held it before this daemon took it over

    def read(self) -> Holder | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return parse(os.read(fd, _MAX_BYTES + 1))
        finally:
            os.close(fd)

    def _write(self, now: float) -> Holder:
        mine = Holder(self.node, socket.gethostname(), os.getpid(), self.token, now + self.term)
        atomic_write_bytes(self.path, json.dumps(asdict(mine)).encode())
        return mine

    def look(self, now: float | None = None) -> bool:
        """Renew the lease if it is ours, take it if it is free, stand by if another daemon holds it; return
        whether this daemon owns the folder now. Raises OSError when the folder cannot be written."""
        now = time.time() if now is None else now
        current = self.read()
        state = decide(current, self.token, now)
        if state == "held" and current is not None and _dead_here(current):
            state = "free"  # this host's daemon that held it is gone (killed, then restarted): no need to wait
        if state == "held":
            self.holder = current
            return False
        if state == "free":
            self.previous = current
            self._write(now)
            # Another daemon may have taken it in the same instant: the last rename wins. A takeover (standbys
            # racing for an expired lease) waits the full settle; a first claim (no lease yet: two daemons
            # started together on a new folder) a quarter, so a start-up is not held up.
            time.sleep(self.settle if current is not None else self.settle / 4)
            found = self.read()
            self.holder = found
            return found is not None and found.token == self.token
        self.holder = self._write(now)  # a renewal: no one else may take an unexpired lease of ours
        return True

    def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes over at its next look, not after the term."""
        current = self.read()
        if current is not None and current.token == self.token:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
