"""Benchmark: the daemon — checkpoint-to-sidecar latency, idle CPU, restart time and resident memory.

Run as `.venv/bin/python benchmarks/daemon.py [--repeats 5] [--idle-seconds 60] [--parts 1,2,3,4,5]
[--stuck-notify]`.

Everything happens under /tmp/ckptd-bench-daemon (wiped at the start). Every daemon is a real
`.venv/bin/ckptd run --config FILE` subprocess with `log_format = "json"` (its log is parsed) and a real AF_UNIX
datagram socket in $NOTIFY_SOCKET, on which the benchmark waits for `READY=1`; a thread keeps reading that socket
afterwards, as systemd does (`--stuck-notify` stops reading after READY=1: the daemon's STATUS= sends then find a
full queue, see docs/benchmarks.md). CPU time and memory come from /proc (the daemon's process and every
descendant, found through /proc/<pid>/task/*/children).

1. Latency (settle_seconds = 0.5, inotify). The benchmark process writes a 64 MiB torch checkpoint
   (`torch.save` of one 16 Mi-element float32 tensor, a small one and a global_step) into a watched run folder,
   takes the time as soon as `torch.save` returns (the file is closed), and waits, with its own inotify watch on
   the folder, for the sidecar `<ckpt>.ckptd.json` to be renamed into place. Cold: the first checkpoint after a
   start (no worker process exists; the daemon starts one on the first write event), one per daemon start,
   `--repeats` starts. Warm: `--repeats` further checkpoints in the last daemon, 1 s apart plus the baselines.
   Baselines, measured right after every sample on the same file (in the page cache): the SHA-256 of the file in
   this process (8 MiB reads), and `ckptd verify FILE --json` as a subprocess (which includes `import torch`).
   The daemon's own "checkpoint verified" log line gives `seconds`, from submitting the job to collecting it.
2. Idle CPU. 10,000 tiny torch checkpoints (one `torch.save` file, its bytes copied under 10,000 names) in 100
   run folders of 100, verified and cataloged by one `ckptd scan` before the daemon starts. The daemon starts,
   sends READY, is left alone for 5 s, then its CPU time (utime + stime of every live process in its tree, plus
   cutime + cstime of reaped children) is read every 10 s for `--idle-seconds`. Baseline in the same run: the same
   daemon over an empty watched folder, measured the same way.
3. Restart. `--repeats` times, alternating with the empty-folder baseline: start the daemon over the 10,000
   unchanged checkpoints, time Popen -> READY=1, read its CPU time at READY, wait 1.5 s, stop it (SIGTERM), and
   check its log: the "reconciled" line must say queued=0, unchanged=10000, and no "checkpoint verified" line.
4. Memory, with worker_idle_timeout = "10s", on the same 10,000 checkpoints, `--repeats` times: VmRSS/RssAnon of
   the main process and VmRSS/Pss of its whole tree 2 s after READY; right after a 64 MiB checkpoint's sidecar
   appears (the worker is alive); and once the idle worker has been stopped.
5. Diagnostic, in this process: one `survey` pass (the start-up reconciliation's work) over the 10,000
   checkpoints with no observer, with an inotify observer scheduled as ckptd.watch schedules it, and with one
   given an `event_filter` without open / close-nowrite events; wall and CPU seconds, and events dispatched.

Medians are printed as Markdown tables, with the load average before and after each part.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import process_tree

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CKPTD = str(VENV_BIN / "ckptd")
BENCH = Path("/tmp/ckptd-bench-daemon")

SETTLE = 0.5
BIG_ELEMENTS = 16 << 20  # float32: 64 MiB
RUNS, PER_RUN = 100, 100  # 10,000 small checkpoints
WINDOW = 10.0  # seconds per idle CPU sample
IDLE_GRACE = 5.0  # seconds left alone after READY before idle CPU is measured
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_LATENCY_EXTRA = 1.0  # s beyond the hash time
TARGET_IDLE_PERCENT = 1.0  # % of one core
TARGET_RESTART = 5.0  # s to READY

IN_MOVED_TO, IN_CREATE = 0x80, 0x100


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return []
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid`'s tree: utime + stime of every live process, plus cutime + cstime (reaped children)."""
    ticks = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if fields:
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


def _kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    found = dict.fromkeys(keys, 0)
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    return found


def role(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
    except OSError:
        return "gone"
    if b"resource_tracker" in cmdline:
        return "tracker"
    if b"spawn_main" in cmdline:
        return "worker"
    return "other"


@dataclass
class Memory:
    """One snapshot of the daemon's memory, in MB (10^6 bytes)."""

    main_rss: float
    main_anon: float
    tree_rss: float
    tree_pss: float
    roles: list[str]
    worker_rss: float

    @property
    def workers(self) -> int:
        return self.roles.count("worker")


def memory(pid: int) -> Memory:
    main_rss = main_anon = tree_rss = tree_pss = worker_rss = 0.0
    roles = []
    for p in process_tree(pid):
        status = _kib(f"/proc/{p}/status", ("VmRSS", "RssAnon"))
        pss = _kib(f"/proc/{p}/smaps_rollup", ("Pss",))["Pss"]
        kind = role(p, pid)
        roles.append(kind)
        tree_rss += status["VmRSS"]
        tree_pss += pss
        if kind == "main":
            main_rss, main_anon = status["VmRSS"], status["RssAnon"]
        elif kind == "worker":
            worker_rss += status["VmRSS"]
    mb = 1024 / 1e6
    return Memory(main_rss * mb, main_anon * mb, tree_rss * mb, tree_pss * mb, roles, worker_rss * mb)


# ---------------------------------------------------------------------------------------------- inotify


class FolderEvents:
    """This process's own inotify watch on one folder: when did a given name get created or renamed in?"""

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_MOVED_TO | IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self.seen: dict[str, float] = {}

    def wait(self, name: str, timeout: float) -> float | None:
        """The time.monotonic() at which `name` appeared (events are read as they come), or None."""
        deadline = time.monotonic() + timeout
        while name not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            now = time.monotonic()
            offset = 0
            while offset < len(buf):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                raw = buf[offset + 16 : offset + 16 + length].split(b"\0", 1)[0]
                offset += 16 + length
                self.seen.setdefault(os.fsdecode(raw), now)
        return self.seen[name]

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------- the daemon


def write_config(folder: Path, name: str = "config.toml", *, idle_timeout: str = "5m") -> Path:
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(
        "[daemon]\n"
        'state_dir = "state"\n'
        'log_format = "json"\n'
        'log_level = "info"\n'
        "workers = 1\n"
        f'worker_idle_timeout = "{idle_timeout}"\n'
        "\n[[watch]]\n"
        'name = "bench"\n'
        'path = "runs"\n'
        f"settle_seconds = {SETTLE}\n"
        "poll = false\n"
    )
    return path


class Daemon:
    """One `ckptd run` subprocess with a NOTIFY_SOCKET of our own, and its JSON log in a file.

    A thread reads the socket all along, as systemd does. With `drain = False` (--stuck-notify) it stops reading
    after READY=1, like a supervisor that only waits for readiness: the socket's queue (net.unix.max_dgram_qlen)
    then fills up with STATUS= messages.
    """

    count = 0
    drain = True

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        Daemon.count += 1
        self.sock_path = BENCH / f"notify-{Daemon.count}.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = self.ready_at = 0.0
        self.messages: list[tuple[float, bytes]] = []
        self._ready = threading.Event()
        self._closing = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.sock_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self._reader = threading.Thread(target=self._read_notifications, daemon=True)
        self._reader.start()
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY")}
        env["NOTIFY_SOCKET"] = str(self.sock_path)
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [CKPTD, "run", "--config", str(self.config)], stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    def _read_notifications(self) -> None:
        while not self._closing.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            data = self.sock.recv(1 << 16)
            now = time.monotonic()
            self.messages.append((now, data))
            if b"READY=1" in data.split(b"\n") and not self._ready.is_set():
                self.ready_at = now
                self._ready.set()
                if not Daemon.drain:
                    return

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from Popen to the READY=1 datagram."""
        assert self.proc is not None
        deadline = self.started + timeout
        while not self._ready.wait(0.2):
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"no READY=1 within {timeout} s; log:\n{self.tail()}")
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode} before READY; log:\n{self.tail()}")
        return self.ready_at - self.started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._closing.set()
        self._reader.join()
        self.sock.close()
        self.sock_path.unlink(missing_ok=True)
        self._out.close()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


# ---------------------------------------------------------------------------------------------- 1. latency


def sha256_seconds(path: Path) -> float:
    started = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return time.perf_counter() - started


def cli_verify_seconds(path: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([CKPTD, "verify", str(path), "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or [r["status"] for r in json.loads(done.stdout)] != ["ok"]:
        raise SystemExit(f"ckptd verify {path} did not report ok:\n{done.stdout}\n{done.stderr}")
    return seconds


@dataclass
class Sample:
    path: Path
    save: float  # torch.save wall seconds
    latency: float  # file closed -> sidecar in place
    sha256: float
    cli_verify: float
    daemon_verify: float = float("nan")  # the daemon's "checkpoint verified" seconds (submit -> collected)


class Writer:
    """Writes 64 MiB torch checkpoints from this process (torch imported here, once, for part 1 and 4)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.torch = torch
        self.state: dict[str, Any] = {
            "epoch": 0,
            "global_step": 0,
            "state_dict": {"w": torch.randn(BIG_ELEMENTS).view(-1, 4096), "b": torch.randn(4096)},
        }
        self.step = 0

    def save(self, path: Path) -> tuple[float, float]:
        """Write one checkpoint; return (started, closed) in time.monotonic()."""
        self.step += 1
        self.state["global_step"] = self.step
        started = time.monotonic()
        self.torch.save(self.state, path)  # opens, writes and closes `path`
        return started, time.monotonic()

    def tiny_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.torch.save({"epoch": 1, "global_step": 100, "state_dict": {"w": self.torch.zeros(16)}}, buffer)
        return buffer.getvalue()


def one_checkpoint(writer: Writer, events: FolderEvents, path: Path) -> Sample:
    started, closed = writer.save(path)
    appeared = events.wait(path.name + ".ckptd.json", timeout=120.0)
    if appeared is None:
        raise SystemExit(f"no sidecar for {path} within 120 s")
    time.sleep(0.3)  # let the daemon finish recording before the baselines read the file
    return Sample(path, closed - started, appeared - closed, sha256_seconds(path), cli_verify_seconds(path))


def part_latency(writer: Writer, repeats: int) -> str:
    folder = BENCH / "latency"
    config = write_config(folder)
    run = folder / "runs" / "run-0"
    run.mkdir(parents=True)
    events = FolderEvents(run)
    cold: list[Sample] = []
    warm: list[Sample] = []
    load_before = loadavg()
    n = 0
    for i in range(repeats):
        daemon = Daemon(config, folder / f"daemon-{i}.log")
        daemon.start()
        daemon.wait_ready()
        # The daemon starts one verifier at READY (torch takes 1-2 s to import); a trainer's first checkpoint comes
        # later than 3 s after start in practice, so "first after start" is measured 3 s after READY.
        time.sleep(3.0)
        assert memory(daemon.pid).workers >= 1, "no verifier was started with the daemon"
        batch = [one_checkpoint(writer, events, run / f"ckpt-{n}.pt")]
        n += 1
        print(f"  cold [{i + 1}/{repeats}] latency {batch[0].latency:.3f} s", flush=True)
        if i == repeats - 1:
            for j in range(repeats):
                time.sleep(1.0)
                sample = one_checkpoint(writer, events, run / f"ckpt-{n}.pt")
                n += 1
                warm.append(sample)
                batch.append(sample)
                print(f"  warm [{j + 1}/{repeats}] latency {sample.latency:.3f} s", flush=True)
        daemon.stop()
        verified = {e["path"]: e for e in named(daemon.events(), "checkpoint verified")}
        for sample in batch:
            if str(sample.path) not in verified:
                raise SystemExit(f"no 'checkpoint verified' line for {sample.path}; log:\n{daemon.tail()}")
            sample.daemon_verify = float(verified[str(sample.path)]["seconds"])
        cold.append(batch[0])
        for sample in batch:  # keep the disk use down; the next start marks them gone
            sample.path.unlink()
            sample.path.with_name(sample.path.name + ".ckptd.json").unlink(missing_ok=True)
    events.close()
    load = f"{load_before} before, {loadavg()} after"

    lines = [
        f"### 1. Latency: 64 MiB torch checkpoint closed -> sidecar in place (settle_seconds = {SETTLE}, inotify)",
        "",
        f"{repeats} first-after-start (3 s after READY; the daemon starts a verifier at READY) and {repeats} warm"
        f" samples; load average {load}",
        "",
        "| worker | median latency s | min–max s | median SHA-256 s | **latency − SHA-256 s** | "
        "median daemon verify s | latency − daemon verify s | median `ckptd verify` s | median torch.save s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, samples in (("cold", cold), ("warm", warm)):
        lat = [s.latency for s in samples]
        lines.append(
            f"| {label} | {median(lat):.3f} | {min(lat):.3f}–{max(lat):.3f} | "
            f"{median([s.sha256 for s in samples]):.3f} | "
            f"**{median([s.latency - s.sha256 for s in samples]):.3f}** | "
            f"{median([s.daemon_verify for s in samples]):.3f} | "
            f"{median([s.latency - s.daemon_verify for s in samples]):.3f} | "
            f"{median([s.cli_verify for s in samples]):.3f} | {median([s.save for s in samples]):.3f} |"
        )
    lines.append("")
    for label, samples in (("cold", cold), ("warm", warm)):
        extra = median([s.latency - s.sha256 for s in samples])
        verdict = "met" if extra < TARGET_LATENCY_EXTRA else "MISSED"
        lines.append(f"Target latency − hash < {TARGET_LATENCY_EXTRA:.0f} s, {label}: {verdict} ({extra:.3f} s)  ")
    lines.append("")
    lines.append(
        "Per sample (latency / SHA-256 / daemon verify, s): "
        + "; ".join(
            f"{label} {s.latency:.2f}/{s.sha256:.2f}/{s.daemon_verify:.2f}"
            for label, samples in (("cold", cold), ("warm", warm))
            for s in samples
        )
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- 2-4. the catalog


@dataclass
class Tree:
    folder: Path
    config: Path
    empty_config: Path
    build_seconds: float = 0.0
    scan_seconds: float = 0.0


def build_tree(writer: Writer) -> Tree:
    """10,000 copies of one tiny torch checkpoint in 100 run folders, verified and cataloged by `ckptd scan`."""
    folder = BENCH / "catalog"
    tree_ = Tree(folder, write_config(folder), write_config(BENCH / "empty"))
    data = writer.tiny_bytes()
    started = time.perf_counter()
    for r in range(RUNS):
        run = folder / "runs" / f"run-{r:03d}"
        run.mkdir(parents=True)
        for c in range(PER_RUN):
            (run / f"step-{c * 100:06d}.pt").write_bytes(data)
    tree_.build_seconds = time.perf_counter() - started
    print(f"  wrote {RUNS * PER_RUN} checkpoints of {len(data)} bytes in {tree_.build_seconds:.1f} s", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [CKPTD, "scan", "--config", str(tree_.config), "--json"], capture_output=True, text=True, check=False
    )
    tree_.scan_seconds = time.perf_counter() - started
    try:
        summary = json.loads(done.stdout)
    except ValueError as exc:
        raise SystemExit(f"ckptd scan printed no JSON (rc={done.returncode}):\n{done.stdout}\n{done.stderr}") from exc
    verified = sum(report["verified"].get("ok", 0) for report in summary.values())
    if done.returncode != 0 or verified != RUNS * PER_RUN:
        raise SystemExit(f"ckptd scan verified {verified} ok (rc={done.returncode}):\n{done.stderr}")
    print(f"  ckptd scan verified {verified} in {tree_.scan_seconds:.1f} s", flush=True)
    return tree_


@dataclass
class Idle:
    ready: float
    windows: list[float] = field(default_factory=list)  # % of one core per WINDOW
    total: float = 0.0  # % of one core over the whole measurement
    seconds: float = 0.0
    roles: list[str] = field(default_factory=list)
    verified: int = 0
    reconciled: dict[str, Any] = field(default_factory=dict)


def idle_cpu(config: Path, log: Path, seconds: float) -> Idle:
    daemon = Daemon(config, log)
    daemon.start()
    result = Idle(daemon.wait_ready())
    time.sleep(IDLE_GRACE)
    t0 = prev_t = time.monotonic()
    c0 = prev_c = cpu_seconds(daemon.pid)
    while prev_t - t0 < seconds - 1e-6:
        time.sleep(min(WINDOW, seconds - (prev_t - t0)))
        now, cpu = time.monotonic(), cpu_seconds(daemon.pid)
        result.windows.append(100 * (cpu - prev_c) / (now - prev_t))
        prev_t, prev_c = now, cpu
    result.seconds = prev_t - t0
    result.total = 100 * (prev_c - c0) / result.seconds
    result.roles = memory(daemon.pid).roles
    daemon.stop()
    events = daemon.events()
    result.verified = len(named(events, "checkpoint verified"))
    result.reconciled = (named(events, "reconciled") or [{}])[0]
    return result


def part_idle(tree_: Tree, seconds: float) -> str:
    load_before = loadavg()
    print(f"  idle daemon over an empty folder, {seconds:.0f} s ...", flush=True)
    empty = idle_cpu(tree_.empty_config, BENCH / "empty" / "idle.log", seconds)
    print(f"  idle daemon over {RUNS * PER_RUN} checkpoints, {seconds:.0f} s ...", flush=True)
    full = idle_cpu(tree_.config, tree_.folder / "idle.log", seconds)
    load = f"{load_before} before, {loadavg()} after"
    lines = [
        f"### 2. Idle CPU with {RUNS * PER_RUN:,} cataloged checkpoints in {RUNS} runs",
        "",
        f"{full.seconds:.0f} s each, from {IDLE_GRACE:.0f} s after READY, in {WINDOW:.0f}-s windows; "
        f"load average {load}",
        "",
        "| daemon over | % of one core, whole window | median of windows % | min–max window % | "
        "processes in tree | checkpoint verified lines |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, r in (("empty folder (baseline)", empty), (f"{RUNS * PER_RUN:,} checkpoints", full)):
        lines.append(
            f"| {label} | {r.total:.3f} | {median(r.windows):.3f} | {min(r.windows):.3f}–{max(r.windows):.3f} | "
            f"{', '.join(r.roles)} | {r.verified} |"
        )
    verdict = "met" if full.total < TARGET_IDLE_PERCENT else "MISSED"
    lines += [
        "",
        f"Target < {TARGET_IDLE_PERCENT:.0f}% of one core: {verdict} ({full.total:.3f}%). Windows (%): "
        + ", ".join(f"{w:.2f}" for w in full.windows),
        f"Start-up reconciliation of this daemon: queued={full.reconciled.get('queued')}, "
        f"unchanged={full.reconciled.get('unchanged')}, {full.reconciled.get('seconds')} s (READY after "
        f"{full.ready:.2f} s). The windows hold no scheduled reconciliation (rescan_interval = 10 min): see part 3.",
    ]
    return "\n".join(lines)


@dataclass
class Restart:
    ready: float
    cpu_at_ready: float
    reconcile_seconds: float
    queued: int
    unchanged: int
    verified: int
    roles: list[str]


def restart_once(config: Path, log: Path) -> Restart:
    daemon = Daemon(config, log)
    daemon.start()
    ready = daemon.wait_ready()
    cpu = cpu_seconds(daemon.pid)
    time.sleep(1.5)
    roles = memory(daemon.pid).roles
    daemon.stop()
    events = daemon.events()
    reconciled = named(events, "reconciled")
    if len(reconciled) != 1:
        raise SystemExit(f"expected one 'reconciled' line, got {len(reconciled)}; log:\n{daemon.tail()}")
    r = reconciled[0]
    return Restart(
        ready, cpu, float(r["seconds"]), int(r["queued"]), int(r["unchanged"]),
        len(named(events, "checkpoint verified")), roles,
    )  # fmt: skip


def part_restart(tree_: Tree, repeats: int) -> str:
    load_before = loadavg()
    runs: dict[str, list[Restart]] = {"empty": [], "full": []}
    for i in range(repeats):
        order = ("empty", "full") if i % 2 == 0 else ("full", "empty")
        for which in order:
            config = tree_.empty_config if which == "empty" else tree_.config
            r = restart_once(config, config.parent / f"restart-{i}.log")
            runs[which].append(r)
            print(
                f"  [{i + 1}/{repeats}] {which:5s} READY {r.ready:.2f} s, cpu {r.cpu_at_ready:.2f} s, reconcile "
                f"{r.reconcile_seconds:.2f} s, queued={r.queued} unchanged={r.unchanged} verified={r.verified}",
                flush=True,
            )
    load = f"{load_before} before, {loadavg()} after"
    full = runs["full"]
    no_hashing = all(
        r.queued == 0 and r.unchanged == RUNS * PER_RUN and r.verified == 0 and "worker" not in r.roles for r in full
    )
    lines = [
        f"### 3. Restart with {RUNS * PER_RUN:,} unchanged checkpoints until READY=1",
        "",
        f"{repeats} starts each, alternating; load average {load}",
        "",
        "| daemon over | median Popen → READY s | min–max s | median CPU s at READY | median reconcile s | "
        "queued | unchanged | verified lines |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for label, rs in (("empty folder (baseline)", runs["empty"]), (f"{RUNS * PER_RUN:,} checkpoints", full)):
        ready = [r.ready for r in rs]
        lines.append(
            f"| {label} | {median(ready):.2f} | {min(ready):.2f}–{max(ready):.2f} | "
            f"{median([r.cpu_at_ready for r in rs]):.2f} | {median([r.reconcile_seconds for r in rs]):.2f} | "
            f"{sorted({r.queued for r in rs})} | {sorted({r.unchanged for r in rs})} | {sum(r.verified for r in rs)} |"
        )
    full_ready = median([r.ready for r in full])
    extra = full_ready - median([r.ready for r in runs["empty"]])
    reconcile_cpu = median([r.cpu_at_ready for r in full]) - median([r.cpu_at_ready for r in runs["empty"]])
    verdict = "met" if full_ready < TARGET_RESTART else "MISSED"
    lines += [
        "",
        f"Target READY < {TARGET_RESTART:.0f} s: {verdict} ({full_ready:.2f} s; {extra:.2f} s more than the "
        f"empty-folder start). No hashing on restart: {'confirmed' if no_hashing else 'NOT CONFIRMED'} "
        "(queued=0, unchanged=10000, no 'checkpoint verified' line, no worker process 1.5 s after READY).",
        f"The reconciliation costs ≈ {reconcile_cpu:.2f} CPU s (CPU at READY, minus the empty-folder start's); "
        f"repeated every rescan_interval (default 10 min) that is ≈ {100 * reconcile_cpu / 600:.2f}% of one core "
        "on top of the idle figure of part 2.",
    ]
    return "\n".join(lines)


def part_memory(tree_: Tree, writer: Writer, repeats: int) -> str:
    config = write_config(tree_.folder, "config-memory.toml", idle_timeout="10s")
    run = tree_.folder / "runs" / "run-memory"
    run.mkdir()
    events = FolderEvents(run)
    load_before = loadavg()
    snaps: dict[str, list[Memory]] = {"ready": [], "worker alive": [], "worker stopped": []}
    reaped_after: list[float] = []
    for i in range(repeats):
        daemon = Daemon(config, tree_.folder / f"memory-{i}.log")
        daemon.start()
        daemon.wait_ready()
        time.sleep(2.0)
        snaps["ready"].append(memory(daemon.pid))
        path = run / f"memory-{i}.pt"
        writer.save(path)
        appeared = events.wait(path.name + ".ckptd.json", timeout=120.0)
        if appeared is None:
            raise SystemExit(f"no sidecar for {path}; log:\n{daemon.tail()}")
        time.sleep(0.5)
        snaps["worker alive"].append(memory(daemon.pid))
        deadline = time.monotonic() + 60.0
        while memory(daemon.pid).workers and time.monotonic() < deadline:
            time.sleep(0.2)
        reaped_after.append(time.monotonic() - appeared)
        time.sleep(1.0)
        snaps["worker stopped"].append(memory(daemon.pid))
        print(
            "  [{}/{}] main VmRSS MB: ready {:.0f}, worker alive {:.0f} (tree {:.0f}), worker stopped {:.0f} "
            "(tree {:.0f}), worker gone {:.1f} s after the sidecar".format(
                i + 1, repeats, snaps["ready"][-1].main_rss, snaps["worker alive"][-1].main_rss,
                snaps["worker alive"][-1].tree_rss, snaps["worker stopped"][-1].main_rss,
                snaps["worker stopped"][-1].tree_rss, reaped_after[-1],
            ),
            flush=True,
        )  # fmt: skip
        daemon.stop()
        path.unlink()
        path.with_name(path.name + ".ckptd.json").unlink(missing_ok=True)
    events.close()
    shutil.rmtree(run)
    load = f"{load_before} before, {loadavg()} after"
    lines = [
        f"### 4. Resident memory, idle, {RUNS * PER_RUN:,} checkpoints cataloged (worker_idle_timeout = 10s)",
        "",
        f"{repeats} daemon starts, medians in MB (10^6 bytes); load average {load}",
        "",
        "| when | main VmRSS | main RssAnon | tree VmRSS | tree Pss | worker VmRSS | processes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, ms in snaps.items():
        roles = sorted({", ".join(m.roles) for m in ms})
        lines.append(
            f"| {label} | {median([m.main_rss for m in ms]):.0f} | {median([m.main_anon for m in ms]):.0f} | "
            f"{median([m.tree_rss for m in ms]):.0f} | {median([m.tree_pss for m in ms]):.0f} | "
            f"{median([m.worker_rss for m in ms]):.0f} | {' / '.join(roles)} |"
        )
    lines += [
        "",
        f"The worker was gone a median {median(reaped_after):.1f} s after the sidecar appeared "
        f"({min(reaped_after):.1f}–{max(reaped_after):.1f} s; timeout 10 s).",
    ]
    return "\n".join(lines)


def part_observer(tree_: Tree, repeats: int) -> str:
    """Why the start-up reconciliation takes what it takes: `survey` alone against `survey` with an inotify
    observer scheduled as ckptd.watch schedules it, and with one that does not ask for open/close-nowrite events."""
    import queue

    from watchdog import events as ev

    from ckptd.catalog import Catalog
    from ckptd.config import DEFAULT_PATTERNS
    from ckptd.scan import survey
    from ckptd.watch import _Handler, _native_observer

    root = tree_.folder / "runs"
    dispatched = [0]

    class Counting(_Handler):
        def dispatch(self, event: Any) -> None:
            dispatched[0] += 1
            super().dispatch(event)

    wanted = [
        ev.FileClosedEvent, ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileMovedEvent, ev.FileDeletedEvent,
        ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirMovedEvent, ev.DirModifiedEvent,
    ]  # fmt: skip
    modes: dict[str, list[type] | bool | None] = {
        "no observer": False,
        "observer as ckptd.watch schedules it": None,
        "observer with event_filter (no open / close-nowrite)": wanted,
    }
    load_before = loadavg()
    results: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in modes}
    with Catalog(tree_.folder / "state") as catalog:
        survey(root, watch="bench", patterns=DEFAULT_PATTERNS, catalog=catalog)  # untimed: settles leftovers
        for i in range(repeats):
            for mode, event_filter in modes.items():
                observer = None
                if event_filter is not False:
                    observer = _native_observer()
                    observer.schedule(
                        Counting("bench", queue.Queue()), str(root), recursive=True, event_filter=event_filter
                    )
                    observer.daemon = True
                    observer.start()
                    time.sleep(0.5)
                dispatched[0] = 0
                cpu, started = time.process_time(), time.perf_counter()
                found = survey(root, watch="bench", patterns=DEFAULT_PATTERNS, catalog=catalog)
                wall = time.perf_counter() - started
                time.sleep(1.5)  # the observer thread works through its backlog
                cpu = time.process_time() - cpu
                if observer is not None:
                    observer.stop()
                    observer.join()
                assert found.unchanged == RUNS * PER_RUN and not found.to_verify
                results[mode].append((wall, cpu, dispatched[0]))
                print(
                    f"  [{i + 1}/{repeats}] {mode}: {wall:.2f} s, cpu {cpu:.2f} s, {dispatched[0]} events", flush=True
                )
    load = f"{load_before} before, {loadavg()} after"
    lines = [
        f"### 5. Diagnostic: one reconciliation pass (`survey`) over {RUNS * PER_RUN:,} unchanged checkpoints",
        "",
        f"In the benchmark process, {repeats} passes per mode, alternating; CPU of the whole process (observer "
        f"thread included, 1.5 s after the pass); load average {load}",
        "",
        "| mode | median wall s | median CPU s | events dispatched |",
        "|---|---:|---:|---:|",
    ]
    for mode, rs in results.items():
        lines.append(
            f"| {mode} | {median([r[0] for r in rs]):.2f} | {median([r[1] for r in rs]):.2f} | "
            f"{median([float(r[2]) for r in rs]):.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    print(f"{label} ...", flush=True)
    started = time.monotonic()
    yield
    print(f"{label}: {time.monotonic() - started:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="samples per measurement (default 5)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU measurement (default 60)")
    parser.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (default 1,2,3,4,5)")
    parser.add_argument(
        "--stuck-notify",
        action="store_true",
        help="stop reading each daemon's NOTIFY_SOCKET after READY=1 (shows what a full socket queue does)",
    )
    args = parser.parse_args()
    Daemon.drain = not args.stuck_notify
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    if not Path(CKPTD).exists():
        raise SystemExit(f"{CKPTD} not found: install the package into .venv first")
    shutil.rmtree(BENCH, ignore_errors=True)
    BENCH.mkdir(parents=True)
    load_start = loadavg()
    writer = Writer()
    reports = []
    if 1 in parts:
        with timed("1. latency"):
            reports.append(part_latency(writer, args.repeats))
    tree_: Tree | None = None
    if parts & {2, 3, 4, 5}:
        with timed(f"building {RUNS * PER_RUN} checkpoints"):
            tree_ = build_tree(writer)
    if 2 in parts and tree_:
        with timed("2. idle CPU"):
            reports.append(part_idle(tree_, args.idle_seconds))
    if 3 in parts and tree_:
        with timed("3. restart"):
            reports.append(part_restart(tree_, args.repeats))
    if 4 in parts and tree_:
        with timed("4. memory"):
            reports.append(part_memory(tree_, writer, args.repeats))
    if 5 in parts and tree_:
        with timed("5. observer diagnostic"):
            reports.append(part_observer(tree_, args.repeats))

    print()
    print(f"Machine: {machine()}; load average at start {load_start}, at end {loadavg()}")
    print(f"Command: {Path(sys.executable).name} benchmarks/daemon.py " + " ".join(sys.argv[1:]))
    print(
        "NOTIFY_SOCKET: read only until READY=1 (--stuck-notify)"
        if args.stuck_notify
        else "NOTIFY_SOCKET: read throughout, as systemd does"
    )
    if tree_ is not None:
        print(
            f"Catalog set-up: {RUNS * PER_RUN:,} files written in {tree_.build_seconds:.1f} s; "
            f"`ckptd scan` verified them in {tree_.scan_seconds:.1f} s"
        )
    for report in reports:
        print()
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
