"""The real daemon against hostile input and a changing disk: files built to hang or exhaust a verifier, names
that are not UTF-8 or 255 bytes long, a trainer rewriting a planned name, and a run folder swapped for a link
while retention runs.

The deterministic versions of these races are in tests/test_delete.py; here they run as they happen, through
inotify, worker processes and the scheduler.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import checkpoints  # noqa: E402
from test_daemon import CKPTD, STARTUP, Daemon, read_sidecar, small_checkpoint, wait_until  # noqa: E402

pytestmark = pytest.mark.e2e


def write_config(base: Path, *, retention: str = "", timeout: str = "auto") -> Path:
    """One watch `runs` (settle 0.3 s, JSON logs, one worker) with an optional [watch.retention] body."""
    (base / "runs").mkdir(exist_ok=True)
    lines = [
        "[daemon]", f'state_dir = "{base / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"',
        'worker_idle_timeout = "10m"', "workers = 1", f'verify_timeout = "{timeout}"', "",
        "[[watch]]", 'name = "runs"', f'path = "{base / "runs"}"', "settle_seconds = 0.3",
    ]  # fmt: skip
    if retention:
        lines += ["[watch.retention]", retention]
    path = base / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[Path], Daemon]]:
    """Start the test's daemon on a config; stopped at the end."""
    started: list[Daemon] = []

    def run(config: Path) -> Daemon:
        daemon = Daemon(config, tmp_path / f"daemon{len(started)}.log")
        started.append(daemon)
        daemon.wait_event("daemon ready", timeout=STARTUP)
        return daemon

    yield run
    for daemon in started:
        daemon.close()


def _status(path: Path) -> str | None:
    found = read_sidecar(path)
    return None if found is None else str(found["status"])


def test_hostile_checkpoints_end_within_their_budget_and_the_next_one_is_verified(
    tmp_path: Path, start: Callable[[Path], Daemon]
) -> None:
    """Shared nested lists, a zip bomb, a 200,000-deep safetensors header, 100,000 metrics, a legacy pickle that
    takes longer to scan than verify_timeout (killed by the daemon), a FIFO in a DCP folder: each ends with a
    clear status, with one worker, and a good checkpoint written after them all is verified."""
    daemon = start(write_config(tmp_path, timeout="2s"))
    staging, run = tmp_path / "staging", tmp_path / "runs" / "hostile"
    run.mkdir()
    slow = staging / "slow.pt"
    slow.parent.mkdir()
    torch.save({"history": list(range(12_000_000))}, slow, _use_new_zipfile_serialization=False)
    built = {
        "nested.pt": checkpoints.shared_nested_lists(staging / "nested.pt"),
        "bomb.pt": checkpoints.zip_bomb(staging / "bomb.pt", inflated=128 << 20),
        "deep.safetensors": checkpoints.deep_safetensors_header(staging / "deep.safetensors"),
        "metrics.pt": checkpoints.giant_metrics(staging / "metrics.pt", count=100_000),
        "slow.pt": slow,
    }
    dcp = checkpoints.dcp_checkpoint(staging / "dcp")
    os.mkfifo(dcp / "pipe.distcp")
    for name, path in built.items():
        path.rename(run / name)
    dcp.rename(run / "dcp")
    good = small_checkpoint(staging / "good.pt").rename(run / "good.pt")
    daemon.wait_verified(good, timeout=90)
    expected = {"nested.pt": "ok", "bomb.pt": "unsupported", "deep.safetensors": "corrupt", "metrics.pt": "ok",
                "slow.pt": "unsupported", "dcp": "unsupported"}  # fmt: skip
    wait_until(lambda: {n: _status(run / n) for n in expected} == expected, "every hostile checkpoint recorded",
               60, on_fail=daemon.tail())  # fmt: skip
    assert "verification did not finish within 2 s" in read_sidecar(run / "slow.pt")["problems"][0]  # type: ignore[index]
    assert daemon.events("verification timed out", path=str(run / "slow.pt"))
    assert read_sidecar(run / "metrics.pt")["warnings"] == ["100000 metrics found; the first 256 were kept"]  # type: ignore[index]
    assert "holds pipe.distcp (a FIFO)" in read_sidecar(run / "dcp")["problems"][0]  # type: ignore[index]
    assert daemon.proc.poll() is None


def test_names_that_are_not_utf8_or_255_bytes_long_are_verified_and_printed_exactly(
    tmp_path: Path, start: Callable[[Path], Daemon]
) -> None:
    """A name with bytes that are not UTF-8 and one of 255 bytes are verified, cataloged and given sidecars; the
    daemon survives a restart with them (no crash loop); `ckptd latest` prints the raw bytes of the name."""
    config = write_config(tmp_path)
    daemon = start(config)
    run = tmp_path / "runs" / "names"
    run.mkdir()
    weird = Path(os.fsdecode(os.fsencode(run) + b"/epoch-\xff\xfe-step=100.pt"))
    long = run / ("e" * (255 - len("-step=200.pt")) + "-step=200.pt")
    small_checkpoint(tmp_path / "a.pt", step=100).rename(weird)
    small_checkpoint(tmp_path / "b.pt", step=200).rename(long)
    daemon.wait_verified(weird)
    assert daemon.wait_verified(long)["global_step"] == 200
    shortened = [p.name for p in run.iterdir() if p.name.endswith(".ckptd.json") and "~" in p.name]
    assert [len(os.fsencode(name)) for name in shortened] == [255]
    code, _wall = daemon.stop()
    assert code == 0
    again = start(config)
    again.wait_event("reconciled", reason="start-up", unchanged=2)
    latest = subprocess.run([CKPTD, "latest", str(run)], capture_output=True, timeout=60)
    assert latest.returncode == 0 and latest.stdout == os.fsencode(long) + b"\n"
    listed = subprocess.run([CKPTD, "list", str(run)], capture_output=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert not [e for e in again.events() if e.get("level") in ("error", "critical")]


def test_a_name_rewritten_and_reverified_during_a_prune_pass_is_not_deleted(
    tmp_path: Path, start: Callable[[Path], Daemon]
) -> None:
    """`ckptd prune` plans to delete `c1` (a large folder) and then `zz.pt`, both older than `c3.pt`. It is paused
    (SIGSTOP) while it deletes `c1`; meanwhile the trainer rewrites `zz.pt` in place as its newest checkpoint and the
    daemon verifies it again, so the catalog row agrees with the disk once more. Resumed, the executor compares
    `zz.pt` with what was planned, not with the fresh row, and keeps it."""
    run = tmp_path / "runs" / "exp"
    folder = checkpoints.dcp_checkpoint(run / "c1", step=1)
    (folder / "pad").mkdir()
    for i in range(20_000):  # a folder whose removal takes a moment: the window in which the prune is paused
        (folder / "pad" / f"{i}").write_bytes(b"x")
    checkpoints.torch_zip(run / "zz.pt", epoch=2, global_step=2, size_floats=8)
    checkpoints.torch_zip(run / "c3.pt", epoch=3, global_step=3, size_floats=8)
    config = write_config(tmp_path, retention='interval = "1h"\nkeep_last = 1\nkeep_best = 0')
    daemon = start(config)
    for path in (folder, run / "zz.pt", run / "c3.pt"):
        daemon.wait_verified(path, timeout=120)
    pruning = subprocess.Popen([CKPTD, "prune", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not daemon.catalog.query("SELECT 1 FROM journal WHERE path = ?", str(folder)):
        assert time.monotonic() < deadline and pruning.poll() is None, "the prune never started deleting c1"
        time.sleep(0.002)
    pruning.send_signal(signal.SIGSTOP)  # between the plan and the deletion of zz.pt
    try:
        checkpoints.torch_zip(run / "zz.pt", epoch=999, global_step=999, size_floats=8)  # in place: same inode
        newest = daemon.wait_verified(run / "zz.pt")
        assert newest["global_step"] == 999
    finally:
        pruning.send_signal(signal.SIGCONT)
    out, err = pruning.communicate(timeout=120)
    assert (run / "zz.pt").exists(), f"the newest checkpoint was deleted\n{out}\n{err}"
    assert hashlib.sha256((run / "zz.pt").read_bytes()).hexdigest() == newest["sha256"]
    assert "changed since it was planned" in out + err
    assert [r["state"] for r in daemon.catalog.query("SELECT state FROM journal WHERE path = ?", str(folder))] == [
        "done"
    ]


def test_a_run_folder_swapped_for_a_link_during_retention_deletes_nothing_outside(
    tmp_path: Path, start: Callable[[Path], Daemon]
) -> None:
    """A local user swaps a watched run folder for a link to a folder elsewhere, over and over, while retention
    runs every second: nothing outside the watched folder is deleted, and the daemon neither crashes nor stops."""
    run = tmp_path / "runs" / "exp1"
    outside = tmp_path / "precious"
    steps = range(1, 201)  # many deletions per pass: many chances for the swap to land between check and unlink
    for step in steps:
        checkpoints.torch_zip(run / f"step={step:03d}.pt", epoch=step, global_step=step, size_floats=8)
        checkpoints.torch_zip(outside / f"step={step:03d}.pt", epoch=step, global_step=step, size_floats=8)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in outside.iterdir()}
    daemon = start(write_config(tmp_path, retention='interval = "1s"\nkeep_last = 1\nkeep_best = 0'))
    wait_until(lambda: daemon.catalog.query("SELECT 1 FROM journal LIMIT 1") or None, "retention to start", 90,
               on_fail=daemon.tail())  # fmt: skip
    hidden = tmp_path / "runs" / ".exp1-real"
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            run.rename(hidden)
            run.symlink_to(outside, target_is_directory=True)
            time.sleep(0.01)
            run.unlink()
            hidden.rename(run)
            time.sleep(0.01)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        daemon.wait_event("retention done", count=len(daemon.events("retention done")) + 6, timeout=60)
    finally:
        stop.set()
        swapper.join()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in outside.iterdir()} == before
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.stderr.read_text()
    wait_until(lambda: sorted(p.name for p in run.glob("*.pt")) == ["step=200.pt"] or None,
               "retention to finish once the swapping stops", 60, on_fail=daemon.tail())  # fmt: skip
