"""One owner per shared folder: two daemons (two "boxes": their own state folders and node names) watch one
folder, as nodes of a cluster watching one NFS or Lustre run folder would. One holds the lease and does the
work; the other stands by and says so; after kill -9 of the owner the standby takes over within the lease's
term, verifies for its own catalog and leaves the owner's sidecars as they are.

Both daemons run on this machine (a shared file system between hosts cannot exist here); the lease logic does
not care which host a daemon runs on, only the node name, pid and token it writes.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_daemon import Daemon, ckptd, small_checkpoint, wait_until  # noqa: E402

from ckptd import sidecar  # noqa: E402
from ckptd.lease import lease_path  # noqa: E402

pytestmark = pytest.mark.e2e

DEADLINE = 60.0


def _config(tmp_path: Path, node: str, runs: Path) -> Path:
    box = tmp_path / node
    box.mkdir()
    config = box / "config.toml"
    config.write_text("\n".join([
        "[daemon]", f'state_dir = "{box / "state"}"', f'node = "{node}"', 'log_format = "json"',
        'rescan_interval = "1h"', 'lease_term = "3s"', "",
        "[[watch]]", 'name = "runs"', f'path = "{runs}"', "settle_seconds = 0.3",
        "[watch.metric]", 'name = "val_loss"',
        "[watch.retention]", 'interval = "1s"', "keep_last = 1", "keep_best = 1",
    ]) + "\n")  # fmt: skip
    return config


def test_two_daemons_on_one_folder_have_one_owner_and_the_standby_takes_over_after_kill_9(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    runs = tmp_path / "shared" / "runs"
    runs.mkdir(parents=True)
    config_a, config_b = _config(tmp_path, "box-a", runs), _config(tmp_path, "box-b", runs)
    a = Daemon(config_a, tmp_path / "a.log")
    daemons.append(a)
    b = Daemon(config_b, tmp_path / "b.log")
    daemons.append(b)
    b.wait_event("another daemon owns the folder, standing by", owner="box-a")
    assert json.loads(lease_path(runs).read_text())["node"] == "box-a"

    first = small_checkpoint(runs / "exp" / "epoch_1.pt", step=100, metrics={"val_loss": 0.5})
    a.wait_verified(first)
    written = sidecar.sidecar_path(first).stat().st_mtime_ns
    time.sleep(2)  # B had every chance to look at it
    assert b.catalog.row(first) is None and not b.events("checkpoint verified")
    status = json.loads(ckptd("status", "--config", str(config_b), "--json").stdout)
    assert status["standing_by"]["runs"]["node"] == "box-a"

    a.proc.send_signal(signal.SIGKILL)  # the owner dies without giving the lease up
    a.proc.wait(10)
    b.wait_event("took over the folder", previous_owner="box-a", timeout=DEADLINE)
    second = small_checkpoint(runs / "exp" / "epoch_2.pt", step=200, metrics={"val_loss": 0.4})
    b.wait_verified(second)
    wait_until(lambda: (row := b.catalog.row(first)) and row["status"] == "ok", "B to catalog A's checkpoint",
               DEADLINE, on_fail=b.tail())  # fmt: skip
    assert sidecar.sidecar_path(first).stat().st_mtime_ns == written  # read, not rewritten
    assert json.loads(lease_path(runs).read_text())["node"] == "box-b"
    wait_until(lambda: not first.exists(), "B's retention (keep_last 1) to take over too", DEADLINE,
               on_fail=b.tail())  # fmt: skip


def test_a_clean_stop_hands_the_folder_over_at_once(tmp_path: Path, daemons: list[Daemon]) -> None:
    """SIGTERM gives the lease up: the standby takes over at its next look, not a whole term later."""
    runs = tmp_path / "shared" / "runs"
    runs.mkdir(parents=True)
    a = Daemon(_config(tmp_path, "box-a", runs), tmp_path / "a.log")
    daemons.append(a)
    b = Daemon(_config(tmp_path, "box-b", runs), tmp_path / "b.log")
    daemons.append(b)
    b.wait_event("another daemon owns the folder, standing by")
    assert a.stop(signal.SIGTERM)[0] == 0
    assert not lease_path(runs).exists() or json.loads(lease_path(runs).read_text())["node"] == "box-b"
    b.wait_event("took over the folder", timeout=10)
