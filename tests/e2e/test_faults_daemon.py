"""Faults through the real daemon: one bad folder, one bad target or one failing step never stops the others,
and `ckptd status` tells what needs a person (`--check` exits 1 for a monitoring probe).

The read-only run folder is a real read-only bind mount (EROFS, what a folder missing from the unit's
ReadWritePaths= gives); CI runs as root, which may mount. The unusable target is a real boto3 refusal (a
region it rejects), built beside a good local target.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_daemon import (  # noqa: E402
    Big,
    Daemon,
    big,  # noqa: F401 - the session's 300 MB checkpoint fixture
    ckptd,
    mapped_by_child,
    sha256_of,
    small_checkpoint,
    torch_bytes,
    wait_until,
    write_config,
)

from ckptd.config import default_node  # noqa: E402

pytestmark = pytest.mark.e2e

DEADLINE = 60.0


def _config(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    runs.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("\n".join([
        "[daemon]", f'state_dir = "{tmp_path / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"', "",
        "[[watch]]", 'name = "runs"', f'path = "{runs}"', "settle_seconds = 0.3",
        "[watch.metric]", 'name = "val_loss"', *extra,
    ]) + "\n")  # fmt: skip
    return config, runs


def status(config: Path, *args: str) -> tuple[int, dict[str, object]]:
    done = ckptd("status", "--config", str(config), "--json", *args)
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[list[Path]]:
    """Folders bind-mounted read-only on themselves for the test; unmounted after it."""
    mounted: list[Path] = []
    yield mounted
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def _mount_read_only(folder: Path, mounted: list[Path]) -> None:
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    mounted.append(folder)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)


def test_an_unwritable_run_folder_never_stops_the_others(
    tmp_path: Path, daemons: list[Daemon], read_only: list[Path]
) -> None:
    """A run folder the daemon cannot write its sidecar into (EROFS): the daemon stays up, the other runs are
    verified, `status` names the checkpoint and why, `--check` exits 1; once the folder is writable again a
    reconciliation (here SIGHUP's) records it and the trouble is gone from status."""
    config, runs = _config(tmp_path)
    stuck = small_checkpoint(runs / "frozen" / "a.pt")
    _mount_read_only(stuck.parent, read_only)
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    daemon.wait_event("recording a verification failed", path=str(stuck))
    good = small_checkpoint(runs / "fine" / "b.pt")
    daemon.wait_verified(good)
    assert daemon.proc.poll() is None

    def failing() -> dict[str, object] | None:
        code, found = status(config, "--check")
        listed = found["failing_checkpoints"]
        return found if code == 1 and isinstance(listed, dict) and str(stuck) in listed else None

    found = wait_until(failing, "status to name the unwritable checkpoint", DEADLINE, on_fail=daemon.tail())
    assert "Read-only file system" in json.dumps(found["failing_checkpoints"])
    assert any(str(stuck) in line for line in found["attention"])  # type: ignore[attr-defined]

    subprocess.run(["mount", "-o", "remount,rw,bind", str(stuck.parent)], check=True)
    daemon.send(signal.SIGHUP)
    daemon.wait_verified(stuck)
    wait_until(lambda: status(config, "--check")[0] == 0, "status --check to pass again", DEADLINE,
               on_fail=daemon.tail())  # fmt: skip


def test_an_unusable_target_never_stops_the_good_one(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 target that cannot be built (boto3 missing: a package that fails to import stands in for an install
    without the `s3` extra) sits beside a good local folder: the good one gets its copy, status names the
    broken one and `--check` fails; `ckptd mirror` copies to the good one and exits 1 naming it."""
    missing = tmp_path / "no-boto3"
    (missing / "boto3").mkdir(parents=True)
    (missing / "boto3" / "__init__.py").write_text("raise ImportError(\"No module named 'boto3'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(missing))
    backup = tmp_path / "backup"
    config, runs = _config(
        tmp_path, "[watch.mirror]", 'to = ["cloud", "backup"]', "",
        "[mirror.cloud]", 'url = "s3://bucket/ckpt"', "",
        "[mirror.backup]", f'url = "{backup}"',
    )  # fmt: skip
    assert ckptd("check-config", str(config)).returncode == 0  # nothing in the file is wrong
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    checkpoint = small_checkpoint(runs / "exp" / "a.pt", metrics={"val_loss": 0.5})
    daemon.wait_event("mirror target unusable", target="cloud")
    daemon.wait_event("checkpoint mirrored", target="backup", path=str(checkpoint))
    wait_until(lambda: status(config, "--check")[0] == 1, "status --check to fail", DEADLINE, on_fail=daemon.tail())
    _code, found = status(config, "--check")
    assert "boto3" in found["broken_targets"]["cloud"]  # type: ignore[index]
    assert daemon.proc.poll() is None
    daemon.close()
    done = ckptd("mirror", "--config", str(config))
    assert done.returncode == 1 and "target cloud cannot be used" in done.stderr, done.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, mounted for the test (CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _place(path: Path, step: int, loss: float) -> Path:
    """A ~600 KB torch.save checkpoint, written outside and renamed in (one event, whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.incoming")
    temp.write_bytes(torch_bytes(size_floats=50_000, step=step, metrics={"val_loss": loss}))
    temp.rename(path)
    return path


def _fill(path: Path) -> None:
    """Write zeros into `path` until its file system is full to the last byte."""
    with open(path, "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass


def _free(folder: Path) -> int:
    found = os.statvfs(folder)
    return found.f_bavail * found.f_frsize


def test_a_full_disk_is_a_state_and_min_free_frees_what_no_invariant_keeps(
    tmp_path: Path, daemons: list[Daemon], small_disk: Path
) -> None:
    """On a 4 MiB watched disk with min_free = 1.5MB: retention runs at once when free space falls below it and
    deletes the oldest checkpoints only keep_last keeps, never the latest or the best. Filled to the last byte,
    a checkpoint whose sidecar cannot be written is a state (status names it, ENOSPC, `--check` fails, the
    daemon stays up); once space returns a reconciliation records it and status is clean."""
    runs = small_disk / "runs"
    runs.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("\n".join([
        "[daemon]", f'state_dir = "{tmp_path / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"', "",
        "[[watch]]", 'name = "disk"', f'path = "{runs}"', "settle_seconds = 0.3",
        "[watch.metric]", 'name = "val_loss"',
        "[watch.retention]", 'interval = "1h"', "keep_last = 10", "keep_best = 1", 'min_free = "1.5MB"',
    ]) + "\n")  # fmt: skip
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    run = runs / "exp"
    saves = [_place(run / f"step_{step}.pt", step, loss) for step, loss in ((1, 0.1), (2, 0.5), (3, 0.4),
                                                                             (4, 0.3), (5, 0.2))]  # fmt: skip
    daemon.wait_event("disk below min_free, retention now", watch="disk")
    wait_until(lambda: _free(runs) >= 1_500_000, "min_free met again", DEADLINE, on_fail=daemon.tail())
    assert saves[0].exists() and saves[-1].exists()  # the best and the latest: invariants
    deleted = daemon.events("checkpoint deleted")
    assert deleted and all("disk below min_free" in e["reasons"][0] for e in deleted)

    # Filled to the last byte right after a save: its sidecar cannot be written.
    newest = _place(run / "step_6.pt", 6, 0.6)
    _fill(small_disk / "filler")
    daemon.wait_event("recording a verification failed", path=str(newest))

    def says_full() -> dict[str, object] | None:
        code, found = status(config, "--check")
        return found if code == 1 and str(newest) in json.dumps(found["failing_checkpoints"]) else None

    found = wait_until(says_full, "status to name the sidecar that cannot be written", DEADLINE, on_fail=daemon.tail())
    assert "No space left on device" in json.dumps(found["failing_checkpoints"])
    assert daemon.proc.poll() is None and saves[0].exists() and saves[-1].exists()

    (small_disk / "filler").unlink()
    daemon.send(signal.SIGHUP)  # a reconciliation, as the hourly one would
    daemon.wait_verified(newest)
    wait_until(lambda: status(config, "--check")[0] == 0, "status --check to pass again", DEADLINE,
               on_fail=daemon.tail())  # fmt: skip


@pytest.fixture
def silent_store() -> Iterator[str]:
    """An endpoint that accepts connections and never answers (a store hung behind a load balancer)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_sigterm_ends_the_daemon_within_15_s_while_a_store_never_answers(
    tmp_path: Path, daemons: list[Daemon], silent_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy waits on a store that accepted the connection and never answers: SIGTERM still ends the daemon
    within 15 s (its 20 s timeout is not waited out), and `ckptd ls` fails within attempts x timeout with one
    line naming the target, exit 1."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-only")  # the store is fake: it never reads a request
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-only")
    target = ["[mirror.cloud]", 'url = "s3://bucket/ckpt"', f'endpoint_url = "{silent_store}"', 'region = "us-east-1"']
    config, runs = _config(tmp_path, "[watch.mirror]", 'to = ["cloud"]', "", *target)
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    daemon.wait_verified(small_checkpoint(runs / "exp" / "a.pt", metrics={"val_loss": 0.5}))
    time.sleep(2)  # the copy is under way, waiting for an answer
    code, seconds = daemon.stop(signal.SIGTERM, timeout=30)
    assert seconds < 15, daemon.tail()
    assert code == 0

    quick = tmp_path / "quick.toml"
    quick.write_text(config.read_text().replace('region = "us-east-1"', 'region = "us-east-1"\ntimeout = "2s"'))
    started = time.monotonic()
    done = ckptd("ls", "cloud", "--config", str(quick), timeout=60)
    assert time.monotonic() - started < 15
    assert done.returncode == 1 and done.stderr.startswith("ckptd: ") and "Traceback" not in done.stderr


def test_a_worker_killed_with_checkpoints_due_takes_nothing_down(
    tmp_path: Path,
    daemons: list[Daemon],
    big: Big,  # noqa: F811 - the fixture imported above
) -> None:
    """Two workers; one is SIGKILLed while it hashes 300 MB and the other hashes a second one, with a third
    checkpoint due: the broken pool is replaced (a submit meeting it retries on a fresh one), every checkpoint
    ends verified ok, and the daemon stays up."""
    runs = tmp_path / "runs"
    runs.mkdir()
    config = write_config(tmp_path / "config.toml", state_dir=tmp_path / "state", workers=2,
                          watches=[{"name": "runs", "path": runs}])  # fmt: skip
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    (runs / "exp").mkdir()
    first, second = runs / "exp" / "first.pt", runs / "exp" / "second.pt"
    big.place(first, tmp_path)
    big.place(second, tmp_path)
    victim = wait_until(lambda: mapped_by_child(daemon.pid, first), "a verifier hashing the first", DEADLINE,
                        on_fail=daemon.tail())  # fmt: skip
    due = small_checkpoint(runs / "exp" / "due.pt")
    os.kill(victim, signal.SIGKILL)
    for checkpoint in (first, second, due):
        daemon.wait_verified(checkpoint, timeout=120)
    assert daemon.proc.poll() is None
    assert daemon.events("verifier process died, retrying")


def test_a_quarantine_into_a_full_state_folder_moves_nothing(tmp_path: Path, small_disk: Path) -> None:
    """The state folder on a 4 MiB tmpfs, a corrupt 600 KB checkpoint to quarantine there: the room is checked
    before anything moves, so the checkpoint and its sidecar stay where they are, no note and no partial copy
    is left in the quarantine folder, the journal says it was skipped, and prune exits 1 saying why."""
    import checkpoints

    from ckptd import sidecar

    runs = tmp_path / "runs"
    state = small_disk / "state"
    config = tmp_path / "config.toml"
    config.write_text("\n".join([
        "[daemon]", f'state_dir = "{state}"', "",
        "[[watch]]", 'name = "runs"', f'path = "{runs}"',
        "[watch.retention]", "keep_last = 1", 'on_corrupt = "quarantine"',
    ]) + "\n")  # fmt: skip
    broken = _place(runs / "exp" / "broken.pt", 1, 0.5)
    _place(runs / "exp" / "good.pt", 2, 0.4)
    checkpoints.flip_tensor_byte(broken)
    assert ckptd("scan", "--config", str(config)).returncode == 1  # one is corrupt
    before = broken.read_bytes()
    done = ckptd("prune", "--config", str(config))
    assert done.returncode == 1 and "no room" in done.stdout + done.stderr, done.stdout + done.stderr
    assert broken.read_bytes() == before and sidecar.sidecar_path(broken).is_file()
    assert [p for p in state.rglob("*") if "quarantine" in p.parts and p.is_file()] == []


@pytest.mark.parametrize(
    ("line", "named"),
    [('to = ["bakup"]', "did you mean 'backup'"), ('url = "gs://bucket/x"', "unknown scheme 'gs'"),
     ('cron = "99 * * * *"', "watch[0].retention.cron")],
)  # fmt: skip
def test_a_config_the_runtime_would_reject_fails_at_start_and_a_reload_keeps_the_old(
    tmp_path: Path, daemons: list[Daemon], line: str, named: str
) -> None:
    """A typo in `to`, a scheme no target implements, a cron APScheduler refuses: `check-config` and `ckptd run`
    exit 78 naming the key; sent to a running daemon by SIGHUP, the old config stays, the log says why,
    `status` shows the rejection and `--check` fails; the daemon goes on verifying."""
    backup = tmp_path / "backup"
    good = ["[watch.retention]", 'interval = "1h"', "[watch.mirror]", 'to = ["backup"]', "",
            "[mirror.backup]", f'url = "{backup}"']  # fmt: skip
    config, runs = _config(tmp_path, *good)
    text = config.read_text()
    key = line.split(" = ")[0]
    bad_text = "\n".join(
        line if ln.startswith(f"{key} = ") or (key == "cron" and ln.startswith("interval = ")) else ln
        for ln in text.splitlines()
    ) + "\n"  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text(bad_text)
    for args in (["check-config", str(bad)], ["run", "--config", str(bad)]):
        done = ckptd(*args)
        assert done.returncode == 78 and named in done.stderr and str(bad) in done.stderr, done.stderr

    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    config.write_text(bad_text)
    daemon.send(signal.SIGHUP)
    daemon.wait_event("config reload rejected, keeping the old config")

    assert ckptd("status", "--config", str(config)).returncode == 78  # a shell's status names the bad file too
    running = tmp_path / "running.toml"  # what the daemon still runs on
    running.write_text(text)

    def rejected() -> dict[str, object] | None:
        code, found = status(running, "--check")
        return found if code == 1 and found["config_rejected"] else None

    found = wait_until(rejected, "status to show the rejected reload", DEADLINE, on_fail=daemon.tail())
    assert named in json.dumps(found["config_rejected"])
    daemon.wait_verified(small_checkpoint(runs / "exp" / "a.pt", metrics={"val_loss": 0.5}))
    assert daemon.proc.poll() is None


def test_a_full_local_target_is_a_failing_copy_that_completes_when_space_returns(
    tmp_path: Path, daemons: list[Daemon], small_disk: Path
) -> None:
    """The mirror's folder on a 4 MiB tmpfs, filled: the copy fails with ENOSPC, no partial file is left on the
    target, status shows the error, the daemon goes on; once space returns the copy completes."""
    backup = small_disk / "backup"
    config, runs = _config(tmp_path, "[watch.mirror]", 'to = ["backup"]', "", "[mirror.backup]", f'url = "{backup}"')
    _fill(small_disk / "filler")
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    checkpoint = _place(runs / "exp" / "a.pt", 1, 0.5)
    daemon.wait_verified(checkpoint)
    daemon.wait_event("mirror copy failed, will retry", target="backup")

    def failing() -> dict[str, object] | None:
        _code, found = status(config)
        backlog = found["mirrors"]["backup"]  # type: ignore[index]
        return backlog if backlog["failed"] and "No space left" in str(backlog["last_error"]) else None

    wait_until(failing, "status to show the full target", DEADLINE, on_fail=daemon.tail())
    assert [p.name for p in backup.rglob("*") if p.is_file() and p.name.startswith("a.pt")] == []
    assert daemon.proc.poll() is None
    (small_disk / "filler").unlink()
    daemon.wait_event("checkpoint mirrored", target="backup", path=str(checkpoint), timeout=90)
    assert sha256_of(checkpoint) == sha256_of(backup / default_node() / "runs" / "exp" / "a.pt")


def test_a_reload_that_moves_the_state_folder_is_refused_and_status_says_so(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """state_dir cannot change under a running daemon: the reload keeps the old config and status shows why."""
    config, runs = _config(tmp_path)
    running = tmp_path / "running.toml"
    running.write_text(config.read_text())
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    config.write_text(config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "elsewhere")))
    daemon.send(signal.SIGHUP)
    daemon.wait_event("config reload rejected, keeping the old config")

    def rejected() -> dict[str, object] | None:
        code, found = status(running, "--check")
        return found if code == 1 and found["config_rejected"] else None

    found = wait_until(rejected, "status to show the refused reload", DEADLINE, on_fail=daemon.tail())
    assert "daemon.state_dir" in json.dumps(found["config_rejected"])
    daemon.wait_verified(small_checkpoint(runs / "exp" / "a.pt", metrics={"val_loss": 0.5}))
