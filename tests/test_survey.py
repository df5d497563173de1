"""The rescan's one walk (`ckptd.scan.survey` over `ckptd.discover.sweep`): what it finds, what it leaves alone,
and the daemon's passes that run it a step at a time.

Real checkpoints (torch.save, a DCP step folder), real sidecars written by a real verification, a real SQLite
catalog. The rescan must stay one walk (benchmarks/rescan.py measures that); these tests hold what it decides.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import checkpoints
import pytest

from ckptd import daemon as daemon_module
from ckptd import discover, scan, sidecar
from ckptd.catalog import Catalog
from ckptd.config import DEFAULT_PATTERNS
from ckptd.daemon import Daemon
from ckptd.fsutil import TEMP_MARK
from ckptd.scan import Survey, reconcile, survey
from ckptd.systemd import Notifier
from ckptd.verify import verify


def _reconciled(tmp_path: Path) -> tuple[Path, Catalog]:
    runs = tmp_path / "runs"
    for step in (1, 2, 3):
        checkpoints.torch_zip(runs / "exp1" / f"epoch_{step}.pt")
    checkpoints.dcp_checkpoint(runs / "exp2" / "step-40")
    catalog = Catalog(tmp_path / "state")
    report = reconcile(runs, watch="runs", patterns=DEFAULT_PATTERNS, catalog=catalog, verifier=verify,
                       engine=dict)  # fmt: skip
    assert len(report.verified) == 4 and not report.failed
    return runs, catalog


def _survey(runs: Path, catalog: Catalog, now: float | None = None) -> Survey:
    return survey(runs, watch="runs", patterns=DEFAULT_PATTERNS, catalog=catalog, read_sidecars=False,
                  now=(lambda: now) if now is not None else time.time)  # fmt: skip


def test_an_unchanged_tree_reads_as_unchanged_with_nothing_removed(tmp_path: Path) -> None:
    runs, catalog = _reconciled(tmp_path)
    found = _survey(runs, catalog)
    assert (found.unchanged, found.to_verify, found.gone, found.removed_sidecars, found.removed_temps) == (
        4, [], [], [], []
    )  # fmt: skip


def test_one_walk_finds_changes_leftovers_and_vanished_checkpoints(tmp_path: Path) -> None:
    """A rewritten file, a missing sidecar, an orphan sidecar, an old and a fresh temp file, a vanished checkpoint
    and a save the trainer has not finished: each is told apart in the same pass, and nothing in a hidden folder
    is touched."""
    runs, catalog = _reconciled(tmp_path)
    exp1 = runs / "exp1"
    checkpoints.torch_zip(exp1 / "epoch_1.pt", size_floats=128)  # rewritten: a new identity
    sidecar.sidecar_path(exp1 / "epoch_2.pt").unlink()  # unchanged, but its sidecar is gone
    (exp1 / "epoch_3.pt").unlink()  # rotated away by the trainer: its sidecar is now an orphan
    old, fresh = exp1 / f".a.1{TEMP_MARK}", exp1 / f".b.2{TEMP_MARK}"
    for temp in (old, fresh):
        temp.write_bytes(b"half")
    os.utime(old, (time.time() - 120, time.time() - 120))
    hidden = runs / ".cache"
    hidden.mkdir()
    (hidden / f"x{TEMP_MARK}").write_bytes(b"not ours to judge")
    (hidden / "gone.pt.ckptd.json").write_bytes(b"{}")
    unfinished = runs / "exp2" / "step-80"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"shard being written")  # no .metadata yet

    found = _survey(runs, catalog)

    assert sorted(c.path.name for c in found.to_verify) == ["epoch_1.pt", "epoch_2.pt"]
    assert [c.path for c in found.incomplete] == [unfinished]
    assert found.unchanged == 1  # step-40
    assert found.gone == [str(exp1 / "epoch_3.pt")] and found.gone_runs == {str(exp1)}
    assert found.rotating == {str(exp1)}  # deleted from a folder that stays, not by ckptd
    assert found.removed_sidecars == [str(sidecar.sidecar_path(exp1 / "epoch_3.pt"))]
    assert found.removed_temps == [str(old)] and fresh.exists()
    assert sorted(p.name for p in hidden.iterdir()) == ["gone.pt.ckptd.json", f"x{TEMP_MARK}"]
    assert catalog.get(str(exp1 / "epoch_3.pt")).gone_at is not None  # type: ignore[union-attr]


def test_a_link_out_of_the_watch_is_never_followed_and_a_link_inside_is_recorded(tmp_path: Path) -> None:
    runs, catalog = _reconciled(tmp_path)
    outside = checkpoints.torch_zip(tmp_path / "elsewhere" / "secret.pt")
    (runs / "exp1" / "escape.pt").symlink_to(outside)
    (runs / "exp1" / "last.pt").symlink_to(runs / "exp1" / "epoch_3.pt")
    (runs / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    found = _survey(runs, catalog)
    assert found.links == 1 and found.unchanged == 4 and not found.to_verify
    assert catalog.get(str(runs / "exp1" / "last.pt")) is not None
    assert catalog.get(str(runs / "exp1" / "escape.pt")) is None
    assert all(not str(c).startswith(str(runs / "linked")) for c in discover.discover(runs, DEFAULT_PATTERNS))


# ------------------------------------------------------------------------------------ the daemon's passes


def _daemon(tmp_path: Path, runs: Path, notifier: Notifier | None = None) -> Daemon:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nworkers = 1\n\n'
                      f'[[watch]]\nname = "runs"\npath = "{runs}"\n')  # fmt: skip
    daemon = Daemon(config, notifier)
    daemon.catalog = Catalog(tmp_path / "state")
    return daemon


def test_a_rescan_runs_a_step_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's pass yields between steps: one call of `_advance_passes` with no time to spend does one
    step and leaves the pass under way (events, results and watchdog pings come next), and the pass ends with
    every new checkpoint queued and every run refreshed."""
    monkeypatch.setattr(scan, "STEP", 2)
    runs = tmp_path / "runs"
    made = [checkpoints.torch_zip(runs / f"exp{i % 3}" / f"epoch_{i}.pt", size_floats=64) for i in range(12)]
    daemon = _daemon(tmp_path, runs)
    daemon._reconcile(daemon.config.watch[0], "schedule")
    daemon._advance_passes(0.0)
    assert "runs" in daemon._passes and len(daemon.tracker) == 0  # one step done, the survey not yet
    steps = 1
    while "runs" in daemon._passes:
        daemon._advance_passes(0.0)
        steps += 1
    assert steps >= len(made) // 2
    assert sorted(str(p) for p in made) == sorted(daemon.tracker._waiting)


def test_a_long_start_up_survey_asks_systemd_for_more_time_before_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before READY only TimeoutStartSec applies (90 s by default), which a survey of a million checkpoints
    outlasts: while it runs, the daemon sends EXTEND_TIMEOUT_USEC; the runs' refresh waits for the loop."""
    monkeypatch.setattr(scan, "STEP", 1)
    monkeypatch.setattr(daemon_module, "EXTEND_EVERY", 0.0)
    runs, catalog = _reconciled(tmp_path)
    catalog.close()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    receiver.settimeout(1.0)
    try:
        daemon = _daemon(tmp_path, runs, Notifier(str(tmp_path / "notify")))
        daemon._start_up_passes()
        messages = []
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(receiver.recv(4096).decode())
    finally:
        receiver.close()
    assert messages and all(m == f"EXTEND_TIMEOUT_USEC={int(daemon_module.EXTEND_BY * 1e6)}" for m in messages)
    assert daemon.stats.last_reconciliation["runs"]  # surveyed before READY...
    assert "runs" in daemon._passes  # ...and the runs' refresh left to the loop


def test_a_tree_deeper_than_pythons_recursion_limit_is_walked(tmp_path: Path) -> None:
    """A hostile tree 1,100 folders deep (beyond the recursion limit of 1,000) neither stops nor crashes the
    walk: the checkpoint at its bottom is found like any other."""
    deep = tmp_path / "runs"
    deep.mkdir()
    for _ in range(1100):
        deep = deep / "a"
        deep.mkdir()
    bottom = checkpoints.torch_zip(deep / "epoch_1.pt", size_floats=16)
    try:
        found = [c.path for c in discover.discover(tmp_path / "runs", DEFAULT_PATTERNS)]
        assert found == [bottom]
    finally:  # shutil.rmtree (pytest's clean-up of old temp folders) recurses, and would fail on this tree
        bottom.unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent
