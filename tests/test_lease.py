"""The lease of a shared folder (ckptd.lease): pure decisions, hostile files, and two claimants at once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ckptd.lease import Holder, Lease, decide, lease_path, parse


def test_decide_renews_its_own_takes_a_free_or_expired_one_and_stands_by_for_a_held_one() -> None:
    ours, theirs = Holder("a", "h", 1, "t-ours", 100.0), Holder("b", "h", 2, "t-theirs", 100.0)
    assert decide(None, "t-ours", 50.0) == "free"
    assert decide(theirs, "t-ours", 50.0) == "held"
    assert decide(theirs, "t-ours", 100.0) == "free"  # expired: taken over
    assert decide(ours, "t-ours", 50.0) == decide(ours, "t-ours", 150.0) == "mine"


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"node": "a"}', b"x" * 5000,
                                  b'{"node":"a","host":"h","pid":1,"token":"t","expires_at":NaN}'])  # fmt: skip
def test_a_malformed_or_hostile_lease_file_counts_as_no_lease(data: bytes) -> None:
    assert parse(data) is None


def test_the_lease_of_accelerates_checkpoints_folder_lies_beside_it(tmp_path: Path) -> None:
    """accelerate's total_limit counts every entry of `checkpoints/`: the lease never goes in there."""
    assert lease_path(tmp_path / "runs") == tmp_path / "runs" / ".ckptd-owner.json"
    assert lease_path(tmp_path / "proj" / "checkpoints") == tmp_path / "proj" / ".checkpoints.ckptd-owner.json"


def test_two_daemons_claiming_a_free_folder_at_once_end_with_one_owner(tmp_path: Path) -> None:
    results: dict[str, bool] = {}
    claims = {node: Lease(tmp_path, node, term=30.0, settle=0.3) for node in ("a", "b")}
    go = threading.Barrier(2)

    def claim(node: str) -> None:
        go.wait()
        results[node] = claims[node].look()

    threads = [threading.Thread(target=claim, args=(n,)) for n in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == [False, True]
    owner = next(n for n, owned in results.items() if owned)
    assert json.loads(lease_path(tmp_path).read_text())["node"] == owner
    other = claims["b" if owner == "a" else "a"]
    assert other.look() is False and other.holder is not None and other.holder.node == owner
    claims[owner].release()
    assert other.look() is True  # a clean stop hands the folder over at once


def test_a_lease_of_a_dead_daemon_on_this_host_is_taken_at_once(tmp_path: Path) -> None:
    """Killed with -9 and restarted on the same host: the new daemon does not wait a whole term for its dead
    predecessor's lease; another host's lease it does wait for (its process cannot be seen from here)."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = {"node": "a", "host": socket.gethostname(), "pid": pid, "token": "t", "expires_at": 4e9}
    lease_path(tmp_path).write_text(json.dumps(stale))
    assert Lease(tmp_path, "a", term=30.0, settle=0.0).look() is True
    lease_path(tmp_path).write_text(json.dumps({**stale, "host": "another-host"}))
    assert Lease(tmp_path, "a", term=30.0, settle=0.0).look() is False
