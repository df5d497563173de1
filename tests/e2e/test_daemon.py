"""`ckptd run` end to end: the real daemon as a subprocess, real inotify and polling, real checkpoints written by
torch, Lightning and torch.distributed.checkpoint, a real AF_UNIX datagram socket as systemd's NOTIFY_SOCKET.

Most tests share one daemon (a module fixture watching two folders, one with inotify and one polled), each test
in its own run folder: starting a daemon costs a torch import in its worker. Tests that signal, kill or
reconfigure the daemon start their own. Every wait polls with a deadline; none sleeps for a fixed long time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # `import checkpoints` whether or not pytest put tests/ on the path
    sys.path.insert(0, str(TESTS))

import checkpoints  # noqa: E402

from ckptd import sidecar  # noqa: E402
from ckptd.catalog import decode, encode  # noqa: E402

pytestmark = pytest.mark.e2e

CKPTD = Path(sys.executable).parent / "ckptd"
SETTLE = 0.5  # settle_seconds of every watch here
STARTUP = 60.0  # deadline for READY and for a first verification (a cold worker imports torch)
DEADLINE = 30.0  # deadline for anything else the daemon should do
TEMP_MARK = ".ckptd-tmp"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------- helpers


def wait_until(check: Callable[[], T | None], what: str, timeout: float = DEADLINE, on_fail: str = "") -> T:
    """Poll `check` every 50 ms until it returns something truthy; return it, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_fail}")
        time.sleep(0.05)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_of(checkpoint: Path) -> Path:
    """Where ckptd puts the sidecar of `checkpoint` (`<name>.ckptd.json`, shortened for names near NAME_MAX)."""
    return sidecar.sidecar_path(checkpoint)


def read_sidecar(checkpoint: Path) -> dict[str, Any] | None:
    """The parsed sidecar of `checkpoint`, or None while there is none (or it is being replaced)."""
    try:
        found: dict[str, Any] = json.loads(sidecar_of(checkpoint).read_bytes())
    except (OSError, ValueError):
        return None
    return found


def temp_files(*roots: Path) -> list[Path]:
    """Every ckptd temp file under `roots`, hidden folders included."""
    return [p for root in roots for p in root.rglob(f"*{TEMP_MARK}*")]


def torch_bytes(*, size_floats: int, step: int, metrics: dict[str, float] | None = None) -> bytes:
    """The bytes torch.save writes for a training checkpoint (about 12 * size_floats bytes)."""
    target = io.BytesIO()
    state = {
        "epoch": step // 100,
        "global_step": step,
        "model_state_dict": {"w": torch.randn(size_floats, generator=torch.Generator().manual_seed(step))},
        "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(size_floats)}}, "param_groups": []},
        "metrics": {"val_loss": 0.5} if metrics is None else metrics,
    }
    state["optimizer_state_dict"]["state"][0]["exp_avg_sq"] = torch.zeros(size_floats)
    torch.save(state, target)
    return target.getvalue()


def small_checkpoint(path: Path, *, step: int = 100, metrics: dict[str, float] | None = None) -> Path:
    """A real, small (~20 KB) torch.save checkpoint at `path`."""
    return checkpoints.torch_zip(path, global_step=step, epoch=step // 100, metrics=metrics, size_floats=256)


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc/*/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def verifier_pids(pid: int) -> list[int]:
    """The pids of the verifier worker processes of the daemon `pid`."""
    found = []
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def mapped_by_child(pid: int, path: Path) -> int | None:
    """The pid of a child of `pid` that has `path` mapped (a verifier hashing it), or None."""
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            if str(path) in Path(f"/proc/{child}/maps").read_text():
                return child
    return None


def ckptd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ckptd CLI and capture its output."""
    return subprocess.run([str(CKPTD), *args], capture_output=True, text=True, timeout=timeout)


def write_config(
    path: Path, *, state_dir: Path, watches: list[dict[str, Any]], workers: int = 1, rescan: str = "1h"
) -> Path:
    """Write a daemon config: JSON logs, state in `state_dir`, a long rescan interval, the given watches."""
    lines = [
        "[daemon]",
        f'state_dir = "{state_dir}"',
        'log_format = "json"',
        'log_level = "info"',
        f"workers = {workers}",
        f'rescan_interval = "{rescan}"',
        'worker_idle_timeout = "10m"',
    ]
    for watch in watches:
        lines += [
            "",
            "[[watch]]",
            f'name = "{watch["name"]}"',
            f'path = "{watch["path"]}"',
            f"settle_seconds = {watch.get('settle', SETTLE)}",
            f"poll = {'true' if watch.get('poll') else 'false'}",
            f"poll_interval = {json.dumps(watch.get('poll_interval', 0.2))}",
            "[watch.metric]",
            'name = "val_loss"',
            'mode = "min"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's, read by a thread into `messages`."""

    def __init__(self) -> None:
        # A short folder: an AF_UNIX path must fit in 108 bytes, which pytest's tmp_path may not.
        self.folder = Path(tempfile.mkdtemp(prefix="ckptd-notify-"))
        self.address = str(self.folder / "notify")
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line))

    def count(self, key: str, value: str | None = None) -> int:
        """How many datagrams so far assigned `key` (the value `value`, when given)."""
        return sum(1 for m in list(self.messages) if key in m and (value is None or m[key] == value))

    def close(self) -> None:
        """Stop reading, close the socket and remove its folder."""
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Daemon:
    """One `ckptd run --config` subprocess: JSON log on stdout in a file, a real NOTIFY_SOCKET."""

    def __init__(self, config: Path, log: Path, *, watchdog_usec: int | None = None) -> None:
        self.config, self.log = config, log
        self.catalog = Catalog(Path(tomllib.loads(config.read_text())["daemon"]["state_dir"]))
        self.notify = NotifySocket()
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.address}
        env.pop("WATCHDOG_PID", None)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.stderr = log.with_suffix(".stderr")
        with open(log, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([str(CKPTD), "run", "--config", str(config)], stdout=out, stderr=err, env=env)
        self.pid = self.proc.pid
        wait_until(self._ready, "READY=1 on the notify socket", STARTUP, on_fail=self.tail())

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"ckptd run exited with {self.proc.returncode} before READY\n{self.tail()}")
        return self.notify.count("READY", "1") > 0

    def tail(self, lines: int = 30) -> str:
        """The end of the daemon's stdout and stderr, for failure messages."""
        text = []
        for path in (self.log, self.stderr):
            with contextlib.suppress(OSError):
                text.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(text)

    def events(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far, those of `event` with these field values when given."""
        found = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is not None and record.get("event") != event:
                continue
            if all(record.get(k) == v for k, v in fields.items()):
                found.append(record)
        return found

    def wait_event(self, event: str, timeout: float = DEADLINE, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        """Wait until the log holds at least `count` `event` lines with these field values; return them."""
        return wait_until(
            lambda: (found := self.events(event, **fields)) and len(found) >= count and found,
            f"{count} log event(s) {event!r} {fields}",
            timeout,
            on_fail=self.tail(),
        )

    def wait_verified(self, checkpoint: Path, timeout: float = DEADLINE, status: str = "ok") -> dict[str, Any]:
        """Wait until `checkpoint` has a sidecar of `status` describing its current bytes, and a catalog row
        that agrees (the sidecar is written just before the row); return the sidecar."""

        def current() -> dict[str, Any] | None:
            found = read_sidecar(checkpoint)
            if found is None or found["status"] != status:
                return None
            if checkpoint.is_file() and found["sha256"] != sha256_of(checkpoint):
                return None
            row = self.catalog.row(checkpoint)
            if row is None or row["sha256"] != found["sha256"] or row["gone_at"] is not None:
                return None
            return found

        return wait_until(current, f"a current {status} sidecar for {checkpoint}", timeout, on_fail=self.tail())

    def send(self, signum: int) -> None:
        """Send `signum` to the daemon."""
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Signal the daemon and wait for it to exit; return its exit status and how long it took."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def close(self) -> None:
        """Make sure the daemon is gone (SIGTERM, then SIGKILL) and close the notify socket."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.notify.close()


class Catalog:
    """Read-only questions to the daemon's SQLite catalog (a separate connection each time)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "catalog.sqlite3"

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows of `sql` as dicts (names that are not UTF-8 pass through the catalog's own text encoding)."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as db:
            db.row_factory = sqlite3.Row
            db.text_factory = lambda data: decode(data.decode("utf-8"))
            return [dict(r) for r in db.execute(sql, [encode(a) if isinstance(a, str) else a for a in args])]

    def row(self, path: Path) -> dict[str, Any] | None:
        """The checkpoint row of `path`, or None."""
        rows = self.query("SELECT * FROM checkpoints WHERE path = ?", str(path))
        return rows[0] if rows else None

    def run(self, run: Path) -> dict[str, Any] | None:
        """The runs row of `run`, or None."""
        rows = self.query("SELECT * FROM runs WHERE run = ?", str(run))
        return rows[0] if rows else None

    def in_run(self, run: Path) -> list[dict[str, Any]]:
        """Every checkpoint row of `run`, present or gone."""
        return self.query("SELECT * FROM checkpoints WHERE run = ?", str(run))


def assert_consistent(catalog: Catalog, root: Path) -> None:
    """Catalog and disk agree under `root`: present rows exist with matching sidecars, gone rows have none."""
    for row in catalog.query("SELECT * FROM checkpoints WHERE substr(path, 1, ?) = ?", len(str(root)) + 1, f"{root}/"):
        path = Path(row["path"])
        if row["gone_at"] is not None:
            assert not path.exists() and not path.is_symlink(), f"{path} is marked gone but exists"
            assert read_sidecar(path) is None, f"{path} is gone but its sidecar stayed"
            continue
        assert path.exists() or path.is_symlink(), f"{path} is in the catalog as present but not on disk"
        if row["kind"] == "link":
            assert read_sidecar(path) is None, f"link {path} has a sidecar of its own"
            continue
        found = read_sidecar(path)
        assert found is not None, f"{path} is in the catalog without a sidecar"
        assert found["sha256"] == row["sha256"], f"{path}: sidecar and catalog disagree on the hash"
        assert found["status"] == row["status"]


# ---------------------------------------------------------------------------------------- the shared daemon


class Shared:
    """The module's daemon: watch `runs` (inotify) at `runs_root`, watch `polled` (polling) at `polled_root`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runs_root, self.polled_root = base / "runs", base / "polled"
        self.runs_root.mkdir()
        self.polled_root.mkdir()
        self.state_dir = base / "state"
        self.config = write_config(
            base / "config.toml",
            state_dir=self.state_dir,
            workers=2,
            watches=[
                {"name": "runs", "path": self.runs_root},
                {"name": "polled", "path": self.polled_root, "poll": True, "poll_interval": 0.2},
            ],
        )
        self.daemon = Daemon(self.config, base / "daemon.log", watchdog_usec=400_000)
        self.catalog = Catalog(self.state_dir)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One daemon for the tests that only write checkpoints, its workers warmed by a first verification."""
    env = Shared(tmp_path_factory.mktemp("shared"))
    try:
        env.daemon.wait_verified(small_checkpoint(env.runs_root / "warmup" / "w.pt"), timeout=STARTUP)
        yield env
        errors = [e for e in env.daemon.events() if e.get("level") in ("error", "critical")]
        assert not errors, f"the shared daemon logged errors: {errors}"
        assert not env.daemon.events("checkpoint not ok"), "a checkpoint was reported not ok"
    finally:
        env.daemon.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start a daemon of this test's own; each is stopped at the end of the test."""
    started: list[Daemon] = []

    def start(config: Path, log_name: str = "daemon.log", **kwargs: Any) -> Daemon:
        daemon = Daemon(config, tmp_path / log_name, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


@dataclass(frozen=True)
class Big:
    """A real ~300 MB torch.save checkpoint kept on disk for the session, and its SHA-256."""

    path: Path
    sha256: str

    def place(self, destination: Path, staging: Path) -> None:
        """Copy it into `staging` (outside the watched folder), then rename it to `destination` at once."""
        temp = staging / f".{destination.name}.incoming"
        shutil.copyfile(self.path, temp)
        temp.rename(destination)


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """The session's ~300 MB checkpoint (built once, kept on disk rather than in this process's memory)."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    data = torch_bytes(size_floats=25_000_000, step=900)
    path.write_bytes(data)
    return Big(path, hashlib.sha256(data).hexdigest())


def wait_hashing(daemon: Daemon, path: Path) -> int:
    """Wait until one of the daemon's verifier processes has `path` mapped, i.e. is hashing it; its pid."""
    return wait_until(
        lambda: mapped_by_child(daemon.pid, path), f"a verifier hashing {path}", STARTUP, on_fail=daemon.tail()
    )


# ------------------------------------------------------------------------------------------ shared daemon


def test_startup_announces_ready_status_and_watchdog(shared: Shared) -> None:
    """READY=1 after the start-up scan, STATUS= lines and WATCHDOG=1 pings arrive on the notify socket."""
    daemon = shared.daemon
    assert daemon.notify.count("READY", "1") >= 1
    events = [e["event"] for e in daemon.events()]
    assert events.index("reconciled") < events.index("daemon ready")
    wait_until(lambda: daemon.notify.count("WATCHDOG", "1") >= 2, "two WATCHDOG=1 pings", 5)
    status = wait_until(lambda: [m["STATUS"] for m in daemon.notify.messages if "STATUS" in m], "a STATUS= line")
    assert "folder(s)" in status[-1]
    watching = {e["watch"]: e["polling"] for e in daemon.events("watching")}
    assert watching == {"runs": False, "polled": True}  # inotify by default, polling where poll = true


def test_lightning_run_is_tracked_while_it_trains(shared: Shared) -> None:
    """A real Lightning run (save_top_k=2, last.ckpt rewritten each epoch): sidecars match, deleted ones gone."""
    run = shared.runs_root / "lightning"
    train = [sys.executable, str(TESTS / "lightning_train.py"), "--dir", str(run)]
    trained = subprocess.run(
        [*train, "--epochs", "4", "--save-top-k", "2", "--epoch-sleep", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    survivors = sorted(run.glob("*.ckpt"))
    assert sorted(Path(p) for p in trained.stdout.split()) == survivors
    assert len(survivors) == 3  # two top-k checkpoints and last.ckpt
    daemon = shared.daemon
    for checkpoint in survivors:
        found = daemon.wait_verified(checkpoint)
        assert found["sha256"] == sha256_of(checkpoint)
        assert found["format"] == "torch_zip"
    last = run / "last.ckpt"
    sidecars: dict[Path, dict[str, Any]] = {p: read_sidecar(p) or {} for p in survivors}
    assert sidecars[last]["global_step"] == 16
    assert len(daemon.events("checkpoint verified", path=str(last), run=str(run))) > 1  # verified again each epoch

    rows = shared.catalog.in_run(run)
    gone = [Path(r["path"]) for r in rows if r["gone_at"] is not None]
    assert gone, "Lightning deleted checkpoints that the daemon had recorded"
    for path in gone:
        assert not path.exists()
        assert not sidecar_of(path).exists()
        daemon.wait_event("checkpoint gone from disk", path=str(path), run=str(run))
    assert {Path(r["path"]) for r in rows if r["gone_at"] is None} == set(survivors)
    assert_consistent(shared.catalog, run)

    latest = ckptd("latest", str(run))
    assert latest.returncode == 0, latest.stderr
    latest_path = Path(latest.stdout.strip())
    assert sidecars[latest_path]["global_step"] == 16
    best_value = min(s["metrics"]["val_loss"] for s in sidecars.values())
    record = wait_until(
        lambda: (r := shared.catalog.run(run)) and r["latest"] == str(latest_path) and r,
        f"the catalog's latest of {run} to be {latest_path}",
    )
    assert sidecars[Path(record["best"])]["metrics"]["val_loss"] == best_value
    assert record["best_value"] == pytest.approx(best_value)
    daemon.wait_event("run latest changed", run=str(run), path=record["latest"])
    daemon.wait_event("run best changed", run=str(run), path=record["best"])

    status = ckptd("status", "--config", str(shared.config), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["running"] is True and report["pid"] == daemon.pid
    runs_watch = report["watches"]["runs"]
    assert runs_watch["polling"] is False and report["watches"]["polled"]["polling"] is True
    assert runs_watch["last_reconciliation"]
    assert runs_watch["checkpoints"].get("ok", 0) >= len(survivors)
    assert isinstance(report["queue"], int)
    (listed,) = [r for r in runs_watch["runs"] if r["run"] == str(run)]
    assert (listed["latest"], listed["best"]) == (record["latest"], record["best"])
    assert listed["best_metric"] == "val_loss" and listed["best_value"] == pytest.approx(best_value)


@pytest.mark.parametrize("watch", ["runs", "polled"])
def test_slow_writer_is_never_reported_corrupt(shared: Shared, watch: str) -> None:
    """64 MB written over ~3 s with 0.2 s pauses (settle 0.5 s): no corrupt sidecar or log line, then ok."""
    root = shared.runs_root if watch == "runs" else shared.polled_root
    target = root / "slow" / "model.pt"
    target.parent.mkdir()
    data = torch_bytes(size_floats=64 * 2**20 // 12, step=500)
    chunk = len(data) // 16 + 1
    with open(target, "wb", buffering=0) as handle:
        for at in range(0, len(data), chunk):
            handle.write(data[at : at + chunk])
            assert not sidecar_of(target).exists(), "verified before the writer finished"
            time.sleep(0.2)
    found = shared.daemon.wait_verified(target)
    assert found["sha256"] == hashlib.sha256(data).hexdigest()
    assert not [e for e in shared.daemon.events(path=str(target)) if e.get("status", "ok") != "ok"]
    assert not shared.daemon.events("checkpoint not ok", path=str(target))
    row = shared.catalog.row(target)
    assert row is not None and row["status"] == "ok" and row["watch"] == watch


def test_checkpoint_changed_while_hashed_is_retried_not_corrupt(shared: Shared, big: Big, tmp_path: Path) -> None:
    """Rewritten while a verifier hashes it: `still being written` is logged, it is retried, and ends ok."""
    run = shared.runs_root / "changing"
    run.mkdir()
    target = run / "big.pt"
    big.place(target, tmp_path)
    wait_hashing(shared.daemon, target)
    middle = big.path.stat().st_size // 2
    with open(big.path, "rb") as source, open(target, "r+b", buffering=0) as handle:
        source.seek(middle)
        handle.seek(middle)
        handle.write(source.read(1 << 20))  # the writer goes over part of it again (same bytes)
    shared.daemon.wait_event("checkpoint still being written, waiting", path=str(target), run=str(run))
    found = shared.daemon.wait_verified(target, timeout=STARTUP)
    assert found["sha256"] == big.sha256
    assert len(shared.daemon.events("checkpoint verified", path=str(target))) == 1
    assert not shared.daemon.events("checkpoint not ok", path=str(target))


def test_rename_into_place_is_verified_once(shared: Shared) -> None:
    """x.pt.tmp written then renamed to x.pt: x.pt verified exactly once, ok; the .tmp never gets a sidecar."""
    run = shared.runs_root / "rename"
    temp, final = run / "x.pt.tmp", run / "x.pt"
    small_checkpoint(temp, step=200)
    temp.rename(final)
    shared.daemon.wait_verified(final)
    # A later checkpoint in the same run, verified: any second look at x.pt would have come before it.
    shared.daemon.wait_verified(small_checkpoint(run / "y.pt", step=300))
    assert len(shared.daemon.events("checkpoint verified", path=str(final))) == 1
    assert not sidecar_of(temp).exists()
    assert not shared.daemon.events(path=str(temp))
    assert shared.catalog.row(temp) is None


def test_burst_of_200_checkpoints_all_verified(shared: Shared) -> None:
    """200 small torch checkpoints written at once all get ok sidecars, with a bounded pool of 2 workers."""
    run = shared.runs_root / "burst"
    written = [small_checkpoint(run / f"step_{i:03d}.pt", step=i) for i in range(200)]
    most_workers = 0

    def verified_all() -> bool:
        nonlocal most_workers
        most_workers = max(most_workers, len(verifier_pids(shared.daemon.pid)))
        return all(read_sidecar(c) for c in written)

    wait_until(verified_all, "200 sidecars", 120, on_fail=shared.daemon.tail())
    assert 1 <= most_workers <= 2  # workers = 2: a bounded pool
    for checkpoint in written:
        shared.daemon.wait_verified(checkpoint)
    assert len({e["path"] for e in shared.daemon.events("checkpoint verified", run=str(run))}) == 200
    wait_until(
        lambda: (r := shared.catalog.run(run)) and r["latest"] == str(run / "step_199.pt"),
        "step_199.pt to be the run's latest",  # the sidecar is written just before the catalog row
    )
    assert_consistent(shared.catalog, run)


def test_dcp_directory_is_one_checkpoint_after_its_metadata(shared: Shared) -> None:
    """A torch.distributed.checkpoint save is verified once, as one directory checkpoint, with .metadata."""
    run = shared.runs_root / "dcp"
    run.mkdir()
    folder = checkpoints.dcp_checkpoint(run / "step_7", step=7)
    found = shared.daemon.wait_verified(folder)
    assert found["format"] == "dcp"
    assert ".metadata" in found["files"]
    assert any(name.endswith(".distcp") for name in found["files"])
    shared.daemon.wait_verified(small_checkpoint(run / "after.pt", step=800))  # anything pending came before
    assert len(shared.daemon.events("checkpoint verified", path=str(folder))) == 1
    assert not [e for e in shared.daemon.events(run=str(folder))]  # its files are no run of their own
    assert not list(folder.glob("*.ckptd.json"))
    row = shared.catalog.row(folder)
    assert row is not None and row["kind"] == "directory" and row["status"] == "ok"


def test_symlinks_are_recorded_as_links_and_never_followed_out(shared: Shared) -> None:
    """last.pt -> a checkpoint inside is a catalog link without a sidecar; a link to outside is ignored."""
    run = shared.runs_root / "links"
    target = small_checkpoint(run / "epoch1.pt", step=100)
    shared.daemon.wait_verified(target)
    outside = small_checkpoint(shared.base / "outside" / "secret.pt", step=999)
    (run / "last.pt").symlink_to(target)
    (run / "escape.pt").symlink_to(outside)
    shared.daemon.wait_event("link recorded", path=str(run / "last.pt"), run=str(run))
    shared.daemon.wait_verified(small_checkpoint(run / "epoch2.pt", step=200))  # anything pending came before
    link = shared.catalog.row(run / "last.pt")
    assert link is not None and link["kind"] == "link" and link["link_target"] == str(target)
    assert link["sha256"] is None and link["status"] is None
    assert not sidecar_of(run / "last.pt").exists()
    assert not shared.daemon.events("checkpoint verified", path=str(run / "last.pt"))
    assert shared.catalog.row(run / "escape.pt") is None
    assert not sidecar_of(run / "escape.pt").exists()
    assert not sidecar_of(outside).exists()
    assert not shared.daemon.events(path=str(run / "escape.pt"))
    assert shared.catalog.row(outside) is None


def test_files_in_a_new_deep_folder_written_before_its_watch(shared: Shared) -> None:
    """mkdir -p a/b/c and checkpoints written into it at once are all verified, well within UNCLOSED_GRACE."""
    data = torch_bytes(size_floats=256, step=100)  # serialised first, so the writes follow mkdir at once
    deep = shared.runs_root / "a" / "b" / "c"
    written = [deep / "c.pt", deep.parent / "b.pt", deep.parent.parent / "a.pt", deep / "d.pt"]
    deep.mkdir(parents=True)
    for checkpoint in written:
        checkpoint.write_bytes(data)
    for checkpoint in written:
        shared.daemon.wait_verified(checkpoint, timeout=15)  # less than the 30 s an unclosed file waits


def test_best_ignores_checkpoints_without_the_metric(shared: Shared) -> None:
    """A newer checkpoint without val_loss becomes latest but never best; both changes are logged."""
    run = shared.runs_root / "metric"
    scored = small_checkpoint(run / "scored.pt", step=100, metrics={"val_loss": 0.3})
    shared.daemon.wait_verified(scored)
    unscored = small_checkpoint(run / "unscored.pt", step=200, metrics={"train_loss": 0.1})
    shared.daemon.wait_verified(unscored)
    record = wait_until(
        lambda: (r := shared.catalog.run(run)) and r["latest"] == str(unscored) and r,
        "unscored.pt to become the run's latest",
    )
    assert record["best"] == str(scored) and record["best_value"] == pytest.approx(0.3)
    shared.daemon.wait_event("run latest changed", run=str(run), path=str(unscored))
    assert not shared.daemon.events("run best changed", run=str(run), path=str(unscored))


def test_rewritten_and_deleted_checkpoint(shared: Shared) -> None:
    """Rewritten in place: verified again, sidecar and catalog follow; deleted: catalog gone, sidecar removed."""
    run = shared.runs_root / "rewrite"
    checkpoint = small_checkpoint(run / "last.pt", step=100)
    first = shared.daemon.wait_verified(checkpoint)
    small_checkpoint(checkpoint, step=200)  # torch.save over the same file
    second = shared.daemon.wait_verified(checkpoint)
    assert second["sha256"] != first["sha256"] and second["global_step"] == 200
    row = shared.catalog.row(checkpoint)
    assert row is not None and row["sha256"] == second["sha256"] and row["step"] == 200
    checkpoint.unlink()
    wait_until(lambda: not sidecar_of(checkpoint).exists(), "the sidecar to be removed")
    wait_until(lambda: (r := shared.catalog.row(checkpoint)) and r["gone_at"] is not None, "the row marked gone")
    shared.daemon.wait_event("checkpoint gone from disk", path=str(checkpoint), run=str(run))


def test_second_daemon_on_the_same_state_exits_75(shared: Shared) -> None:
    """A second `ckptd run` on a state folder in use exits at once with status 75 and names the first pid."""
    started = time.monotonic()
    second = ckptd("run", "--config", str(shared.config), timeout=30)
    assert second.returncode == 75
    assert time.monotonic() - started < 10
    assert f"another ckptd daemon (pid {shared.daemon.pid})" in second.stderr
    assert shared.daemon.proc.poll() is None  # the first one is undisturbed


def test_every_checkpoint_event_names_its_run(shared: Shared) -> None:
    """Every log line about a checkpoint (it has a path) is a JSON object that names the run too."""
    lines = [line for line in shared.daemon.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    about_checkpoints = [r for r in records if "path" in r]
    assert about_checkpoints
    assert not [r for r in about_checkpoints if not r.get("run")]


# ------------------------------------------------------------------------------------- daemons of their own


def test_invalid_config_exits_78(tmp_path: Path) -> None:
    """`ckptd run` with an invalid config exits 78, naming every problem."""
    config = tmp_path / "bad.toml"
    config.write_text('[daemon]\nworkers = 0\nsurprise = 1\n\n[[watch]]\nname = "r"\npath = "missing"\n')
    result = ckptd("run", "--config", str(config))
    assert result.returncode == 78
    assert "workers" in result.stderr and "surprise" in result.stderr and "missing" in result.stderr
    assert not (tmp_path / ".ckptd").exists()


def _own_config(tmp_path: Path, *extra_watches: dict[str, Any], **runs_watch: Any) -> tuple[Path, Path, Path]:
    """A config for a daemon of the test's own: watch `runs` at tmp_path/runs, state in tmp_path/state."""
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    state = tmp_path / "state"
    rescan = runs_watch.pop("rescan", "1h")
    watches = [{"name": "runs", "path": runs, **runs_watch}, *extra_watches]
    config = write_config(tmp_path / "config.toml", state_dir=state, watches=watches, rescan=rescan)
    return config, runs, state


def test_scheduled_reconciliation_finds_what_no_event_reported(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """With no event to go by (a polled folder polled hourly), the rescan_interval reconciliation finds it."""
    config, runs, _state = _own_config(tmp_path, poll=True, poll_interval="1h", rescan="1s")
    daemon = start_daemon(config)
    checkpoint = small_checkpoint(runs / "exp" / "quiet.pt")
    daemon.wait_verified(checkpoint, timeout=STARTUP)
    scheduled = [e for e in daemon.events("reconciled", reason="schedule") if e["queued"] == 1]
    assert scheduled, "the checkpoint was found by a scheduled reconciliation"
    first_count = len(daemon.events("checkpoint verified", path=str(checkpoint)))
    daemon.wait_event("reconciled", reason="schedule", count=len(daemon.events("reconciled", reason="schedule")) + 2)
    assert len(daemon.events("checkpoint verified", path=str(checkpoint))) == first_count == 1  # never re-hashed
    assert daemon.events("reconciled", reason="schedule", unchanged=1)


def test_crashing_verifier_and_corrupt_checkpoint_do_not_stop_the_daemon(
    tmp_path: Path, start_daemon: Callable[..., Daemon], big: Big
) -> None:
    """A corrupt checkpoint is recorded corrupt and a verifier killed mid-hash is retried; the daemon goes on."""
    config, runs, _state = _own_config(tmp_path)
    daemon = start_daemon(config)
    run = runs / "exp"
    run.mkdir()
    broken = small_checkpoint(tmp_path / "broken.pt")
    checkpoints.flip_tensor_byte(broken)
    broken = broken.rename(run / "broken.pt")
    found = daemon.wait_verified(broken, timeout=STARTUP, status="corrupt")
    assert found["problems"]
    daemon.wait_event("checkpoint not ok", path=str(broken), run=str(run), status="corrupt")

    huge = run / "huge.pt"
    big.place(huge, tmp_path)
    os.kill(wait_hashing(daemon, huge), signal.SIGKILL)  # as SIGBUS or a loader crash would end it
    daemon.wait_event("verifier process died, retrying", path=str(huge), run=str(run))
    daemon.wait_verified(huge, timeout=STARTUP)
    daemon.wait_verified(small_checkpoint(run / "after.pt"))
    assert daemon.proc.poll() is None
    record = wait_until(lambda: (r := daemon.catalog.run(run)) and r["best"] and r, "the run's best")
    assert record["best"] != str(broken) and record["latest"] != str(broken)  # only ok checkpoints count


def test_sigterm_abandons_a_hash_in_flight(tmp_path: Path, start_daemon: Callable[..., Daemon], big: Big) -> None:
    """SIGTERM while a 300 MB checkpoint is hashed: exit 0 within 10 s, STOPPING=1, no sidecar, no temp."""
    config, runs, state = _own_config(tmp_path)
    daemon = start_daemon(config)
    (runs / "exp").mkdir()
    huge = runs / "exp" / "huge.pt"
    big.place(huge, tmp_path)
    wait_hashing(daemon, huge)
    code, seconds = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.tail()
    assert seconds < 10
    assert daemon.notify.count("STOPPING", "1") == 1
    (stopping,) = daemon.events("daemon stopping")
    assert stopping["abandoned"] == [str(huge)]
    assert daemon.events("daemon stopped")
    assert not sidecar_of(huge).exists()
    assert not temp_files(runs, state)
    assert Catalog(state).row(huge) is None
    assert json.loads((state / "status.json").read_text())["running"] is False
    assert json.loads(ckptd("status", "--config", str(config), "--json").stdout)["running"] is False


def test_sigint_stops_the_daemon(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """SIGINT stops an idle daemon cleanly: exit 0 within 10 s, STOPPING=1, the lock released."""
    config, _runs, state = _own_config(tmp_path)
    daemon = start_daemon(config)
    code, seconds = daemon.stop(signal.SIGINT)
    assert (code, seconds < 10) == (0, True)
    assert daemon.notify.count("STOPPING", "1") == 1
    status = json.loads(ckptd("status", "--config", str(config), "--json").stdout)
    assert status["running"] is False and status["pid"] is None
    assert not temp_files(state)


def test_sigkill_mid_hash_then_restart_ends_consistent(
    tmp_path: Path, start_daemon: Callable[..., Daemon], big: Big
) -> None:
    """SIGKILL while hashing 300 MB, restart: no temp file anywhere, catalog consistent, all verified ok."""
    config, runs, state = _own_config(tmp_path)
    first = start_daemon(config, "first.log")
    run = runs / "exp"
    small = [small_checkpoint(run / f"s{i}.pt", step=i) for i in range(3)]
    for checkpoint in small:
        first.wait_verified(checkpoint, timeout=STARTUP)
    huge = run / "huge.pt"
    big.place(huge, tmp_path)
    wait_hashing(first, huge)
    workers = children_of(first.pid)
    first.proc.kill()
    assert first.proc.wait(10) == -signal.SIGKILL
    # What a kill in the middle of a sidecar write leaves behind (atomic_write's temp), aged past the sweep age.
    stale = run / f".s0.pt.0badc0de{TEMP_MARK}"
    stale.write_bytes(b"{")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    stale_status = state / f".status.json.0badc0de{TEMP_MARK}"  # and in the state folder: any age
    stale_status.write_bytes(b"{")
    for pid in workers:  # the verifiers die with the daemon (nothing left hashing, or holding memory)
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), f"orphaned worker {pid} to exit", 10)
    assert not sidecar_of(huge).exists()

    second = start_daemon(config, "second.log")
    (reconciled,) = second.events("reconciled", reason="start-up")
    assert (reconciled["queued"], reconciled["unchanged"], reconciled["temps_removed"]) == (1, 3, 1)
    found = second.wait_verified(huge, timeout=STARTUP)
    assert found["sha256"] == big.sha256
    assert not second.events("checkpoint verified", path=str(small[0]))  # unchanged: not hashed again
    assert second.stop()[0] == 0  # settled state: no write in progress from here on
    assert not temp_files(runs, state)
    assert not stale_status.exists()
    catalog = Catalog(state)
    assert_consistent(catalog, runs)
    assert {r["status"] for r in catalog.in_run(run)} == {"ok"}
    assert len(catalog.in_run(run)) == 4
    record = catalog.run(run)
    assert record is not None and record["latest"] == str(huge)


def test_sighup_reload_rejects_a_bad_config_and_applies_a_good_one(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """SIGHUP: a broken config is rejected (logged, old one kept working); a valid new watch folder is applied."""
    config, runs, _state = _own_config(tmp_path)
    daemon = start_daemon(config)
    daemon.wait_verified(small_checkpoint(runs / "exp" / "a.pt", step=1), timeout=STARTUP)
    good = config.read_text()

    config.write_text(good.replace("settle_seconds = 0.5", 'settle_seconds = "soon"', 1))
    daemon.send(signal.SIGHUP)
    (rejected,) = daemon.wait_event("config reload rejected, keeping the old config")
    assert any("settle_seconds" in p for p in rejected["problems"])
    assert daemon.notify.count("RELOADING", "1") == 1
    wait_until(lambda: daemon.notify.count("READY", "1") == 2, "READY=1 after the rejected reload")
    daemon.wait_verified(small_checkpoint(runs / "exp" / "b.pt", step=2))  # still watching, old config
    assert not daemon.events("config reloaded")

    extra = tmp_path / "extra"
    extra.mkdir()
    _own_config(tmp_path, {"name": "extra", "path": extra})
    daemon.send(signal.SIGHUP)
    (reloaded,) = daemon.wait_event("config reloaded")
    assert reloaded["watches"] == ["runs", "extra"]
    wait_until(lambda: daemon.notify.count("READY", "1") == 3, "READY=1 after the reload")
    daemon.wait_verified(small_checkpoint(extra / "exp" / "c.pt", step=3))
    daemon.wait_verified(small_checkpoint(runs / "exp" / "d.pt", step=4))
    assert daemon.proc.poll() is None
    code, _ = daemon.stop()
    assert code == 0
