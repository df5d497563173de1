"""Retention in the running daemon: `ckptd run` prunes on its schedule while a real Lightning run trains.

The daemon helpers (`Daemon`, `wait_until`, ...) come from test_daemon.py, as the other end-to-end tests use them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_daemon import CKPTD, Daemon, assert_consistent, read_sidecar, sha256_of, wait_until  # noqa: E402

from ckptd.model import Entry, Verification  # noqa: E402
from ckptd.retention import Policy, plan  # noqa: E402

pytestmark = pytest.mark.e2e

EPOCHS = 8
POLICY = Policy(keep_last=2, keep_best=1, metric="val_loss", mode="min")
PRUNED = 90.0  # deadline for verification and two scheduled prunes to catch up once training ends


def write_config(base: Path) -> Path:
    """Watch base/runs (settle 0.3 s, JSON logs), metric val_loss (min), retention every 2 s: keep_last 2, best 1."""
    (base / "runs").mkdir()
    lines = [
        "[daemon]", f'state_dir = "{base / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"',
        'worker_idle_timeout = "10m"', "",
        "[[watch]]", 'name = "runs"', f'path = "{base / "runs"}"', "settle_seconds = 0.3",
        "[watch.metric]", 'name = "val_loss"', 'mode = "min"',
        "[watch.retention]", 'interval = "2s"', "keep_last = 2", "keep_best = 1", "",
    ]  # fmt: skip
    path = base / "config.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A `ckptd run` subprocess over tmp_path/runs, ready (READY=1, after "daemon ready"); stopped with SIGTERM."""
    started = Daemon(write_config(tmp_path), tmp_path / "daemon.log")
    try:
        started.wait_event("daemon ready")  # READY=1 on the notify socket comes just before this line
        yield started
    finally:
        started.close()


def _current(daemon: Daemon, checkpoint: Path) -> bool:
    """True when `checkpoint` has a sidecar of its current bytes and a catalog row that agrees."""
    found = read_sidecar(checkpoint)
    try:
        if found is None or found["sha256"] != sha256_of(checkpoint):
            return False
    except FileNotFoundError:  # deleted by retention while we looked
        return False
    row = daemon.catalog.row(checkpoint)
    return row is not None and row["sha256"] == found["sha256"] and row["gone_at"] is None


def _settled(daemon: Daemon, run: Path) -> bool:
    """Every checkpoint left is verified as it is now, and two retention passes ended after the last verification
    (so at least one started after it)."""
    if not all(_current(daemon, p) for p in run.glob("*.ckpt")):
        return False
    events = [e["event"] for e in daemon.events()]
    verified = max((i for i, e in enumerate(events) if e == "checkpoint verified"), default=-1)
    return sum(1 for e in events[verified + 1 :] if e == "retention done") >= 2


def _entry_of_row(row: dict[str, Any]) -> Entry:
    """The planner's view of a catalog row (for checkpoints already deleted, whose sidecars went with them)."""
    return Entry(
        path=row["path"], run=row["run"], status=row["status"], size=row["size"], mtime=row["mtime_ns"] / 1e9,
        sha256=row["sha256"], epoch=row["epoch"], step=row["step"], metrics=json.loads(row["metrics"]),
        pinned=bool(row["pinned"]), verified=row["status"] is not None,
    )  # fmt: skip


def test_scheduled_retention_keeps_exactly_what_the_policy_keeps_while_lightning_trains(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A Lightning run (save_top_k=-1, 8 epochs) under keep_last 2, keep_best 1: the daemon leaves exactly the kept."""
    run = tmp_path / "runs" / "lightning"
    trained = subprocess.run(
        [sys.executable, str(TESTS / "lightning_train.py"), "--dir", str(run), "--epochs", str(EPOCHS),
         "--save-top-k", "-1", "--epoch-sleep", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert daemon.events("retention done"), "the scheduled job ran while training"
    wait_until(lambda: _settled(daemon, run), "verification, then two retention passes", PRUNED, daemon.tail())

    present = sorted(run.glob("*.ckpt"))
    rows = daemon.catalog.query("SELECT * FROM checkpoints WHERE run = ? AND kind != 'link'", str(run))
    gone = {r["path"]: r for r in rows if r["gone_at"] is not None}
    assert {r["path"] for r in rows if r["gone_at"] is None} == {str(p) for p in present}
    sidecars = {p: read_sidecar(p) for p in present}
    final = [Entry.of(Verification.from_dict(s), run=str(run)) for s in sidecars.values() if s is not None]
    expected = plan(final + [_entry_of_row(r) for r in gone.values()], POLICY, time.time())
    kept = {d.path for d in expected.decisions if d.action == "keep"}
    assert kept == {str(p) for p in present}, "exactly the checkpoints the policy keeps remain"
    assert {d.path for d in expected.decisions if d.action == "delete"} == set(gone)
    epochs = {s["epoch"] for s in sidecars.values() if s} | {r["epoch"] for r in gone.values()}
    assert epochs == set(range(EPOCHS)), "every epoch's checkpoint was seen, kept or deleted"
    assert (run / "last.ckpt") in present and len(gone) >= EPOCHS - 3

    for path in present:  # each with its sidecar, catalog and disk agree
        assert sidecars[path] is not None and sidecars[path]["status"] == "ok"  # type: ignore[index]
    assert_consistent(daemon.catalog, run)

    journal = {j["path"]: j for j in daemon.catalog.query("SELECT * FROM journal WHERE watch = 'runs'")}
    assert set(journal) == set(gone), "the journal explains every deletion, and only those"
    logged = {e["path"]: e for e in daemon.events("checkpoint deleted") if "reasons" in e}
    reasons = {d.path: list(d.reasons) for d in expected.decisions}
    for path, row in gone.items():
        entry = journal[path]
        assert (entry["state"], entry["action"], entry["run"]) == ("done", "delete", str(run))
        assert (entry["sha256"], entry["size"]) == (row["sha256"], row["size"])
        assert json.loads(entry["reasons"]) == reasons[path] == ["no keep rule applies"]
        assert logged[path]["reasons"] == reasons[path] and logged[path]["bytes"] == row["size"]
        assert not Path(path).exists() and read_sidecar(Path(path)) is None

    again = subprocess.run(
        [str(CKPTD), "prune", "--config", str(daemon.config), "--dry-run", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert {r["path"]: r["action"] for r in json.loads(again.stdout)} == {str(p): "keep" for p in present}
    assert not [e for e in daemon.events() if e.get("level") in ("error", "critical")], daemon.tail()
