"""Benchmark: many writers. N trainers save large checkpoints at once; does the daemon keep up?

Run as `.venv/bin/python benchmarks/writers.py [--writers 8] [--size-mb 100] [--seconds 120]
[--interval 1.5 3.0] [--workers 2] [--settle S] [--atomic]`.

Issue 13 ("Many writers") wants, at 8 writers: 0 skipped saves, save-to-sidecar lag under settle + 1 s, a backlog
that does not grow, flat verifier memory, and the number of verifier processes following the load within
`[daemon] workers`. This script measures each of those, once, over one run.

Set-up. Everything lives under /tmp/ckptd-bench-writers (wiped at the start). The config watches `runs/` (inotify,
`poll = false`) with `settle_seconds` = `--settle` (default: the project's default, read from
`ckptd.config.WatchConfig`, 2 s) and `[daemon] workers` = `--workers` (default 2, the core count of the machine the
figures are for: the project's own default is 1), `log_format = "json"`, state in `state/`, defaults for everything
else (no retention, no mirror, worker_idle_timeout 30 min). The daemon is a real `.venv/bin/ckptd run --config FILE`
subprocess whose stdout (its log, one JSON object a line) goes to `daemon.log`; `$NOTIFY_SOCKET` names an AF_UNIX
datagram socket bound here and read for the daemon's whole life, as systemd does; the writers start after READY=1.

Writers. N subprocesses of this venv's Python with torch, one thread each. Each builds a state dict of float32
tensors totalling `--size-mb` MB (10^6 bytes; 16 MiB tensors and a remainder) once, says "ready", and all start
together when the script says "go". Each then saves `runs/w<i>/step_<n>.pt` on a schedule: the first save after
uniform(0, hi) seconds (so the writers do not move in lockstep), then every uniform(lo, hi) seconds, from the start
of one save to the start of the next (the next starts at once when a save overran), until `--seconds` have passed.
A save is `torch.save` straight to the final name, as most trainers do; with `--atomic`, to `step_<n>.pt.tmp` and
then `os.replace` onto the final name. One element changes before each save, so no two saves hold the same bytes.
After each save a writer deletes its saves older than the newest 3 itself, as a trainer's rotation does (no
retention is configured, so only the writer deletes checkpoints). Each writer appends one JSON line per save (step,
path, CLOCK_MONOTONIC and wall time when torch.save, or the rename, returned, size) and per deletion (when) to
`writer-<i>.jsonl`. CLOCK_MONOTONIC (Python's time.monotonic on Linux) is one clock for every process, so the
writers' times and this process's inotify times compare directly.

What is measured, for every save:
- verified: a "checkpoint verified" line in the daemon's log naming the save's path with the save's size in
  `bytes`. Paths are never reused (the step only grows and the folder is wiped at the start), so path and size
  identify one save. "checkpoint not ok" lines for a save are counted apart (a daemon that verified a half-written
  file would show here), and so are the daemon's other per-checkpoint lines about these saves.
- lag: from the moment the save returned to the moment its sidecar `<path>.ckptd.json` was renamed into place,
  timed by this process's own inotify watch on every run folder (IN_MOVED_TO | IN_CREATE), read by a thread as
  the events come. Shown as "settle + X s". As a cross-check the lag is also taken from the timestamp of the
  "checkpoint verified" line (written just after the sidecar, wall clock, microseconds) minus the save's wall time.
- skipped: a save with no "checkpoint verified" line. Each save's lifetime runs from the save's return to its
  deletion by the writer (or to the end of the measurement for a save still on disk). A skipped save that lived at
  least settle + 1 s could have been verified by a daemon that kept up, so it is "skipped (lived long enough)":
  the figure the issue wants at 0. One that lived less was rotated away before any daemon that honours
  settle_seconds could take it: "skipped (rotated away too soon)". After the writers stop, the script waits up to
  20 s for every save still on disk to get its sidecar, so the last saves are not counted skipped for want of
  time.
- backlog, every second: `queue` + `in_flight` from the daemon's `state/status.json` (exactly what
  `ckptd status --json` prints as "queue"; the daemon rewrites the file at most every 2 s, and only after a change),
  which counts checkpoints still inside their settle_seconds; and, computed afterwards from the saves' times,
  "overdue": saves on disk, saved more than settle_seconds ago, with no sidecar yet (the backlog the daemon is
  actually behind by). For each: min, median, max over the writing window, and the least-squares slope (per
  minute) over it after a warm-up of settle + HI seconds (the ramp from an empty queue up to its steady level,
  while the first saves settle, is no growth); the backlog "grows" when the fitted line rises by 2 or more
  checkpoints over the window.
- the daemon, every second, from /proc: its process tree (through /proc/<pid>/task/*/children; a verifier worker
  is a child whose command line holds `spawn_main`, multiprocessing's spawn entry); CPU time of the main process
  (utime + stime) and of the tree (plus cutime + cstime, so reaped workers count), as % of one core over the
  writing window and per 10-s window; VmHWM (the kernel's peak RSS, file pages of the mapped checkpoint included)
  of every worker and of the main process, and RssAnon of every worker as sampled (the memory figure of the
  verify benchmark); the number of worker processes alive. Whether verifier memory is flat: the largest worker
  RssAnon in the first half of the writing window against the second half.
- the writers' own CPU (utime + stime, sampled), the median torch.save time, and the load average, for context.

Printed: a summary with those figures. The raw figures go to /tmp/ckptd-bench-writers/result.json. The script
stops the writers and the daemon (SIGTERM, then SIGKILL after 30 s) in every case (on SIGTERM and SIGHUP too; and
each is started with PR_SET_PDEATHSIG, so that the kernel stops it should the script itself be killed), and exits 0
once it has
measured, whatever the figures; it exits non-zero only when it could not measure (no READY, a writer that died).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import resource
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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from common import process_tree

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CKPTD = str(VENV_BIN / "ckptd")
PYTHON = str(VENV_BIN / "python")
BENCH = Path("/tmp/ckptd-bench-writers")

DEFAULT_WORKERS = 2  # the figures are for a 2-vCPU machine: one verifier per core
KEEP = 3  # saves each writer keeps, as a trainer's rotation (save_total_limit, save_top_k) does
MARGIN = 1.0  # s beyond settle_seconds: the lag target, and the age a save must reach to count as verifiable
DRAIN = 20.0  # s to wait after the writers stop for the saves still on disk to be verified
SAMPLE_EVERY = 1.0  # s between samples of /proc and status.json
WINDOW = 10.0  # s per line of the timelines
GROWTH = 2.0  # checkpoints the fitted backlog line may rise over the window before it "grows"
READY_TIMEOUT = 180.0  # s for the daemon's READY=1 and for the writers to import torch and build their tensors
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIDECAR = ".ckptd.json"
IN_MOVED_TO, IN_CREATE = 0x80, 0x100

# Runs argv[2:] in place of itself (same pid) once the kernel is told to SIGTERM it when this script dies, so that even
# a script killed with SIGKILL leaves neither a daemon nor a writer behind (the daemon's workers die with the daemon).
EXEC_WITH_PDEATHSIG = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; it survives execve
if os.getppid() != int(sys.argv[1]):  # the script died before prctl took effect
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def tied(argv: list[str]) -> list[str]:
    """`argv`, started through EXEC_WITH_PDEATHSIG."""
    return [PYTHON, "-c", EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]


# One writer (argv: folder size_mb seconds lo hi seed atomic keep out). It imports torch and builds its tensors,
# says "ready", waits for a line on stdin, then saves until `seconds` have passed (see the module docstring).
WRITER_CODE = r"""
import json, os, random, sys, time
import torch

folder, size_mb, seconds, lo, hi, seed, atomic, keep, out = sys.argv[1:10]
size_mb, seconds, lo, hi = float(size_mb), float(seconds), float(lo), float(hi)
seed, atomic, keep = int(seed), atomic == "1", int(keep)
torch.set_num_threads(1)
generator = torch.Generator().manual_seed(seed)
remaining = max(1, int(size_mb * 1e6) // 4)
weights = {}
while remaining:
    n = min(remaining, 4 << 20)
    weights[f"layers.{len(weights)}.weight"] = torch.randn(n, generator=generator)
    remaining -= n
first = next(iter(weights.values()))
state = {"epoch": 0, "global_step": 0, "state_dict": weights}
rng = random.Random(seed)
log = open(out, "a", buffering=1)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
due = t0 + rng.uniform(0.0, hi)
saved = []
step = 0
while True:
    now = time.monotonic()
    if due - t0 >= seconds:
        break
    if due > now:
        time.sleep(due - now)
    step += 1
    state["global_step"] = step
    first[0] = float(step)
    path = os.path.join(folder, f"step_{step}.pt")
    started = time.monotonic()
    if atomic:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    else:
        torch.save(state, path)
    end, wall = time.monotonic(), time.time()
    st = os.stat(path)
    log.write(json.dumps({"event": "saved", "step": step, "path": path, "start": started, "end": end,
                          "wall": wall, "bytes": st.st_size, "inode": st.st_ino}) + "\n")
    saved.append(path)
    while len(saved) > keep:
        old = saved.pop(0)
        os.unlink(old)
        log.write(json.dumps({"event": "deleted", "path": old, "mono": time.monotonic()}) + "\n")
    due = max(due + rng.uniform(lo, hi), time.monotonic())
log.write(json.dumps({"event": "done", "mono": time.monotonic()}) + "\n")
"""


# ---------------------------------------------------------------------------------------------- small helpers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (statistics.quantiles needs two points and excludes the ends)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 with fewer than two distinct x."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


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


def default_settle() -> float:
    """The project's own default settle_seconds, so the benchmark follows it when it changes."""
    from ckptd.config import WatchConfig

    return float(WatchConfig.model_fields["settle_seconds"].default)


# ---------------------------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return []
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def own_cpu(pid: int) -> float | None:
    """utime + stime of `pid` alone, in seconds; None once it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else None


def tree_cpu(pid: int) -> float:
    """CPU time of `pid`'s tree: utime + stime of every live process, plus cutime + cstime (reaped children)."""
    ticks = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if fields:
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


def status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    found = dict.fromkeys(keys, 0)
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    return found


def is_worker(pid: int) -> bool:
    """A verifier: the daemon's pool starts them with multiprocessing's spawn (`... spawn_main(...)`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"spawn_main" in cmdline and b"resource_tracker" not in cmdline


# ---------------------------------------------------------------------------------------------- inotify


class SidecarEvents:
    """This process's inotify watch on every run folder, read by a thread: when did each sidecar appear?

    The sidecar is written to a temp name and renamed into place, so IN_MOVED_TO is the moment it is complete;
    IN_CREATE covers a writer that creates it under its final name. Keyed by the checkpoint's path."""

    def __init__(self, folders: list[Path]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        for folder in folders:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_MOVED_TO | IN_CREATE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.folders[wd] = folder
        self.seen: dict[str, float] = {}  # checkpoint path -> time.monotonic() its sidecar appeared
        self.overflowed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            now = time.monotonic()
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                raw = buf[offset + 16 : offset + 16 + length].split(b"\0", 1)[0]
                offset += 16 + length
                if mask & 0x4000:  # IN_Q_OVERFLOW: events were lost; the log's timestamps still cover them
                    self.overflowed = True
                name = os.fsdecode(raw)
                if wd in self.folders and name.endswith(SIDECAR):
                    self.seen.setdefault(str(self.folders[wd] / name[: -len(SIDECAR)]), now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------- the daemon


def write_config(folder: Path, settle: float, workers: int) -> Path:
    path = folder / "config.toml"
    path.write_text(
        "[daemon]\n"
        'state_dir = "state"\n'
        'log_format = "json"\n'
        'log_level = "info"\n'
        f"workers = {workers}\n"
        "\n[[watch]]\n"
        'name = "writers"\n'
        'path = "runs"\n'
        f"settle_seconds = {settle}\n"
        "poll = false\n"
    )
    return path


class Daemon:
    """One `ckptd run` subprocess with a NOTIFY_SOCKET of our own (read throughout, as systemd does) and its JSON
    log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.sock_path = BENCH / "notify.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = self.ready_at = 0.0
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._out: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.sock: socket.socket | None = None

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
            tied([CKPTD, "run", "--config", str(self.config)]), stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    def _read_notifications(self) -> None:
        assert self.sock is not None
        while not self._closing.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            data = self.sock.recv(1 << 16)
            if b"READY=1" in data.split(b"\n") and not self._ready.is_set():
                self.ready_at = time.monotonic()
                self._ready.set()

    def wait_ready(self) -> float:
        """Seconds from Popen to the READY=1 datagram."""
        assert self.proc is not None
        while not self._ready.wait(0.2):
            if time.monotonic() - self.started > READY_TIMEOUT:
                raise SystemExit(f"no READY=1 within {READY_TIMEOUT:.0f} s; log:\n{self.tail()}")
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode} before READY; log:\n{self.tail()}")
        return self.ready_at - self.started

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 30 s); return the exit status. Safe to call twice."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        self._closing.set()
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.sock_path.unlink(missing_ok=True)
        if self._out is not None:
            self._out.close()
            self._out = None
        return code

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):  # a worker's stray stderr line is no JSON
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found


# ---------------------------------------------------------------------------------------------- the writers


class Writers:
    """The writer subprocesses; stop() ends whatever is left of them (SIGTERM, then SIGKILL)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._errs: list[IO[bytes]] = []
        self.cpu: dict[int, float] = {}  # pid -> last utime + stime seen (a finished writer keeps its last value)
        self.cpu_at_go: dict[int, float] = {}  # pid -> utime + stime at "go": importing torch is not the load

    def start(self) -> None:
        lo, hi = self.args.interval
        for i in range(self.args.writers):
            folder = BENCH / "runs" / f"w{i}"
            out = BENCH / f"writer-{i}.jsonl"
            err = open(BENCH / f"writer-{i}.stderr", "wb")  # noqa: SIM115 - closed in stop()
            self._errs.append(err)
            self.logs.append(out)
            argv = [str(folder), str(self.args.size_mb), str(self.args.seconds), str(lo), str(hi), str(i),
                    "1" if self.args.atomic else "0", str(KEEP), str(out)]  # fmt: skip
            self.procs.append(
                subprocess.Popen(
                    tied([PYTHON, "-c", WRITER_CODE, *argv]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
                )
            )

    def wait_ready(self) -> None:
        """Every writer has imported torch and built its tensors (that takes seconds, and must not be timed)."""
        deadline = time.monotonic() + READY_TIMEOUT
        for i, proc in enumerate(self.procs):
            assert proc.stdout is not None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SystemExit(f"writer {i} not ready within {READY_TIMEOUT:.0f} s")
                ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 1.0))
                if ready:
                    line = proc.stdout.readline()
                    if line.strip() == b"ready":
                        break
                    raise SystemExit(f"writer {i} failed to start:\n{self.stderr(i)}")

    def go(self) -> float:
        self.sample_cpu()
        self.cpu_at_go = dict(self.cpu)
        started = time.monotonic()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        return started

    def sample_cpu(self) -> None:
        for proc in self.procs:
            cpu = own_cpu(proc.pid)
            if cpu is not None and proc.returncode is None:
                self.cpu[proc.pid] = cpu

    def alive(self) -> int:
        return sum(proc.poll() is None for proc in self.procs)

    def check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0):
                raise SystemExit(f"writer {i} exited with {proc.returncode}:\n{self.stderr(i)}")

    def stderr(self, i: int) -> str:
        with contextlib.suppress(OSError):
            return (BENCH / f"writer-{i}.stderr").read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for err in self._errs:
            err.close()
        self._errs = []


@dataclass
class Save:
    writer: int
    step: int
    path: str
    end: float  # time.monotonic() when torch.save (or the rename) returned
    wall: float  # time.time() at the same moment
    bytes: int
    start: float
    deleted: float | None = None  # time.monotonic() of the writer's own deletion
    sidecar: float | None = None  # time.monotonic() the sidecar appeared (inotify)
    verified_wall: float | None = None  # timestamp of the "checkpoint verified" line (wall clock)
    verify_seconds: float | None = None  # the line's `seconds`: handed to a worker -> collected
    not_ok: str | None = None  # status of a "checkpoint not ok" line, if any

    @property
    def verified(self) -> bool:
        return self.verified_wall is not None


def read_saves(logs: list[Path]) -> list[Save]:
    saves: dict[str, Save] = {}
    for i, log in enumerate(logs):
        with contextlib.suppress(OSError), open(log) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a last line cut short by SIGTERM
                    continue
                if record.get("event") == "saved":
                    saves[record["path"]] = Save(
                        i, record["step"], record["path"], record["end"], record["wall"], record["bytes"],
                        record["start"],
                    )  # fmt: skip
                elif record.get("event") == "deleted" and record["path"] in saves:
                    saves[record["path"]].deleted = record["mono"]
    return list(saves.values())


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float  # time.monotonic()
    queue: int | None  # status.json queue + in_flight (what `ckptd status --json` prints), None if unreadable
    in_flight: int | None
    workers: int
    main_cpu: float
    tree_cpu: float
    worker_anon_kib: list[int]
    main_anon_kib: int


@dataclass
class Peaks:
    worker_hwm_kib: dict[int, int] = field(default_factory=dict)  # worker pid -> VmHWM last seen
    main_hwm_kib: int = 0
    worker_pids: set[int] = field(default_factory=set)


def read_queue(state_dir: Path) -> tuple[int | None, int | None]:
    try:
        status = json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None, None
    in_flight = len(status.get("in_flight", []))
    return int(status.get("queue", 0)) + in_flight, in_flight


def sample(daemon_pid: int, state_dir: Path, peaks: Peaks) -> Sample:
    now = time.monotonic()
    queue, in_flight = read_queue(state_dir)
    workers: list[int] = []
    for pid in process_tree(daemon_pid)[1:]:
        if is_worker(pid):
            workers.append(pid)
    anon = []
    for pid in workers:
        mem = status_kib(pid, ("RssAnon", "VmHWM"))
        anon.append(mem["RssAnon"])
        peaks.worker_hwm_kib[pid] = max(peaks.worker_hwm_kib.get(pid, 0), mem["VmHWM"])
        peaks.worker_pids.add(pid)
    main = status_kib(daemon_pid, ("RssAnon", "VmHWM"))
    peaks.main_hwm_kib = max(peaks.main_hwm_kib, main["VmHWM"])
    return Sample(
        now, queue, in_flight, len(workers), own_cpu(daemon_pid) or 0.0, tree_cpu(daemon_pid), anon, main["RssAnon"]
    )


def unverified_on_disk(saves: list[Save]) -> list[Save]:
    """Saves still on disk (as far as the writers' logs say) whose sidecar has not appeared."""
    return [s for s in saves if s.deleted is None and s.sidecar is None and Path(s.path).exists()]


# ---------------------------------------------------------------------------------------------- analysis


def match_log(saves: list[Save], events: list[dict[str, Any]]) -> dict[str, int]:
    """Fill in each save's "checkpoint verified" / "not ok" line; count the daemon's other lines about them."""
    by_path = {os.path.realpath(s.path): s for s in saves}
    other: dict[str, int] = {}
    for event in events:
        name = event.get("event")
        path = event.get("path")
        save = by_path.get(os.path.realpath(path)) if isinstance(path, str) else None
        if save is None:
            if event.get("level") in ("warning", "error"):
                other[f"{name} (level {event.get('level')})"] = other.get(f"{name} (level {event.get('level')})", 0) + 1
            continue
        if name == "checkpoint verified" and event.get("bytes") == save.bytes and save.verified_wall is None:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                save.verified_wall = datetime.fromisoformat(event["timestamp"]).timestamp()
                save.verify_seconds = float(event["seconds"])
            continue
        if name == "checkpoint not ok":
            save.not_ok = str(event.get("status"))
        other[str(name)] = other.get(str(name), 0) + 1
    return other


def fmt(values: list[float], prec: int = 2) -> str:
    if not values:
        return "n/a"
    return (
        f"median {median(values):.{prec}f}, p90 {quantile(values, 0.9):.{prec}f}, max {max(values):.{prec}f} "
        f"(min {min(values):.{prec}f}, n={len(values)})"
    )


def settle_plus(values: list[float], settle: float) -> str:
    if not values:
        return "n/a"
    extra = [v - settle for v in values]
    return (
        f"median settle + {median(extra):.2f} s, p90 settle + {quantile(extra, 0.9):.2f} s, "
        f"max settle + {max(extra):.2f} s (n={len(values)})"
    )


def series_summary(points: list[tuple[float, float]], span: float, warm_up: float) -> tuple[str, float, bool]:
    """min/median/max over all `points` (t from the start of writing, value); the least-squares slope over those
    after `warm_up` s, when every writer has saved and the settle pipeline is full (the ramp from an empty queue to
    its steady level is no growth); the backlog grows when that line rises by GROWTH or more over `span` s."""
    if not points:
        return "n/a", 0.0, False
    values = [v for _, v in points]
    steady = [(t, v) for t, v in points if t >= warm_up]
    if len(steady) < 2:  # a run too short to have a steady part: fit everything
        steady, warm_up = points, 0.0
    per_second = slope(steady)
    rise = per_second * span
    grows = rise >= GROWTH
    text = (
        f"min {min(values):.0f}, median {median(values):.1f}, max {max(values):.0f}; slope {per_second * 60:+.2f}/min "
        f"from {warm_up:.0f} s on (fitted rise {rise:+.1f} over {span:.0f} s): {'GROWS' if grows else 'flat'}"
    )
    return text, per_second * 60, grows


def timeline(samples: list[Sample], t0: float, t_end: float, saves: list[Save]) -> list[str]:
    """One line per WINDOW seconds: saves made, worker processes alive, verifier CPU, backlog."""
    lines = []
    start = t0
    while start < t_end - 1e-6:
        stop = min(start + WINDOW, t_end)
        inside = [s for s in samples if start <= s.t < stop]
        before = [s for s in samples if s.t < start]
        made = sum(start <= s.end < stop for s in saves)
        if inside:
            prev = before[-1] if before else inside[0]
            last = inside[-1]
            dt = last.t - prev.t
            workers_cpu = ((last.tree_cpu - last.main_cpu) - (prev.tree_cpu - prev.main_cpu)) / dt if dt > 0 else 0.0
            main_cpu = (last.main_cpu - prev.main_cpu) / dt if dt > 0 else 0.0
            counts = sorted({s.workers for s in inside})
            queues = [s.queue for s in inside if s.queue is not None]
            flights = [s.in_flight for s in inside if s.in_flight is not None]
            anon = max((max(s.worker_anon_kib, default=0) for s in inside), default=0)
            lines.append(
                f"| {start - t0:5.0f}–{stop - t0:.0f} s | {made} | {'/'.join(map(str, counts))} | "
                f"{max(flights, default=0)} | {100 * workers_cpu:.0f} | {100 * main_cpu:.0f} | "
                f"{max(queues, default=0)} | {anon / 1000:.0f} |"
            )
        start = stop
    return lines


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=8, help="writer processes (default 8)")
    parser.add_argument("--size-mb", type=float, default=100.0, help="MB (10^6 bytes) per checkpoint (default 100)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the writers save (default 120)")
    parser.add_argument(
        "--interval", type=float, nargs=2, default=[1.5, 3.0], metavar=("LO", "HI"),
        help="seconds between one writer's saves, uniform in [LO, HI] (default 1.5 3.0)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None, help=f"[daemon] workers (default {DEFAULT_WORKERS}: the cores of the "
        "2-vCPU machine the figures are for; the project's own default is 1)",
    )  # fmt: skip
    parser.add_argument("--settle", type=float, default=None, help="settle_seconds (default: the project's default)")
    parser.add_argument("--atomic", action="store_true", help="save to step_<n>.pt.tmp, then rename into place")
    args = parser.parse_args()
    if args.writers < 1 or args.seconds <= 0 or not 0 < args.interval[0] <= args.interval[1]:
        parser.error("need --writers >= 1, --seconds > 0 and 0 < LO <= HI")
    settle = default_settle() if args.settle is None else args.settle
    workers_note = " (script default)" if args.workers is None else ""
    args.workers = DEFAULT_WORKERS if args.workers is None else args.workers
    if not Path(CKPTD).exists():
        raise SystemExit(f"{CKPTD} not found: install the package into .venv first")

    # SIGTERM or SIGHUP (a closed terminal) must run the clean-up in `finally` too, as Ctrl-C (SIGINT) does.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: sys.exit(128 + signum))
    shutil.rmtree(BENCH, ignore_errors=True)
    folders = [BENCH / "runs" / f"w{i}" for i in range(args.writers)]
    for folder in folders:
        folder.mkdir(parents=True)
    config = write_config(BENCH, settle, args.workers)
    state_dir = BENCH / "state"
    load_start = loadavg()
    run_started = time.monotonic()

    sidecars = SidecarEvents(folders)
    daemon = Daemon(config, BENCH / "daemon.log")
    writers = Writers(args)
    samples: list[Sample] = []
    peaks = Peaks()
    saves: list[Save] = []
    t0 = t_writing_end = t_end = 0.0
    daemon_code: int | None = None
    drained = False
    try:
        daemon.start()
        ready = daemon.wait_ready()
        print(f"daemon READY after {ready:.2f} s (pid {daemon.pid}); starting {args.writers} writers ...", flush=True)
        writers.start()
        writers.wait_ready()
        t0 = writers.go()
        own_at_go = resource.getrusage(resource.RUSAGE_SELF)
        print(f"writers saving for {args.seconds:.0f} s ...", flush=True)
        next_sample = t0
        next_report = t0 + 30.0
        while writers.alive():
            writers.check()
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample(daemon.pid, state_dir, peaks))
                writers.sample_cpu()
                next_sample += SAMPLE_EVERY
            if now >= next_report:
                last = samples[-1]
                print(
                    f"  {now - t0:4.0f} s: queue {last.queue}, in flight {last.in_flight}, workers {last.workers}, "
                    f"sidecars {len(sidecars.seen)}, load {loadavg()}",
                    flush=True,
                )
                next_report += 30.0
            if now - t0 > args.seconds + 120.0:  # a save that never returns: stop rather than hang
                raise SystemExit("writers still running 120 s after --seconds; stopping")
            time.sleep(max(0.0, min(next_sample, next_report) - time.monotonic()))
        writers.check()
        t_writing_end = time.monotonic()
        own_at_end = resource.getrusage(resource.RUSAGE_SELF)
        print(f"writers done after {t_writing_end - t0:.1f} s; waiting up to {DRAIN:.0f} s for the last sidecars")
        # Drain: the last saves get the time they need (up to DRAIN), so they are not counted skipped for want of it.
        while time.monotonic() - t_writing_end < DRAIN:
            saves = read_saves(writers.logs)
            for s in saves:
                s.sidecar = sidecars.seen.get(s.path)
            if not unverified_on_disk(saves):
                drained = True
                break
            samples.append(sample(daemon.pid, state_dir, peaks))
            time.sleep(SAMPLE_EVERY)
        time.sleep(0.5)  # the "checkpoint verified" line follows the sidecar's rename
        samples.append(sample(daemon.pid, state_dir, peaks))
        t_end = time.monotonic()
    finally:
        writers.stop()
        daemon_code = daemon.stop()
        sidecars.close()

    # ---- analysis
    saves = read_saves(writers.logs)
    for s in saves:
        s.sidecar = sidecars.seen.get(s.path)
    other = match_log(saves, daemon.events())
    verified = [s for s in saves if s.verified]
    not_ok = [s for s in saves if s.not_ok]
    skipped = [s for s in saves if not s.verified]
    life = {s.path: (s.deleted if s.deleted is not None else t_end) - s.end for s in saves}
    skipped_long = [s for s in skipped if life[s.path] >= settle + MARGIN]
    skipped_short = [s for s in skipped if life[s.path] < settle + MARGIN]
    lags = [s.sidecar - s.end for s in verified if s.sidecar is not None]
    log_lags = [s.verified_wall - s.wall for s in verified if s.verified_wall is not None]
    no_sidecar_seen = [s for s in verified if s.sidecar is None]
    verify_secs = [s.verify_seconds for s in verified if s.verify_seconds is not None]
    save_secs = [s.end - s.start for s in saves]
    lifetimes = [life[s.path] for s in saves]

    span = t_writing_end - t0
    writing = [s for s in samples if t0 <= s.t <= t_writing_end]
    queue_points = [(s.t - t0, float(s.queue)) for s in writing if s.queue is not None]
    # "Overdue": on disk, older than settle_seconds, no sidecar yet; computed at each sample time from the saves.
    overdue_points = []
    for smp in writing:
        overdue = sum(
            1
            for s in saves
            if s.end + settle <= smp.t
            and (s.sidecar is None or s.sidecar > smp.t)
            and (s.deleted is None or s.deleted > smp.t)
        )
        overdue_points.append((smp.t - t0, float(overdue)))
    warm_up = settle + args.interval[1]  # by then every writer has saved once and the first saves have settled
    queue_text, _, _ = series_summary(queue_points, span, warm_up)
    overdue_text, _, _ = series_summary(overdue_points, span, warm_up)

    def cpu_between(a: Sample, b: Sample) -> tuple[float, float]:
        dt = b.t - a.t
        return 100 * (b.main_cpu - a.main_cpu) / dt, 100 * ((b.tree_cpu - b.main_cpu) - (a.tree_cpu - a.main_cpu)) / dt

    main_pct, worker_pct = cpu_between(writing[0], writing[-1]) if len(writing) >= 2 else (0.0, 0.0)
    writer_cpu = sum(cpu - writers.cpu_at_go.get(pid, 0.0) for pid, cpu in writers.cpu.items())
    writer_pct = 100 * writer_cpu / span if span > 0 else 0.0
    half = t0 + span / 2
    first_half = max((max(s.worker_anon_kib, default=0) for s in writing if s.t < half), default=0)
    second_half = max((max(s.worker_anon_kib, default=0) for s in writing if s.t >= half), default=0)
    main_anon = [s.main_anon_kib for s in writing]
    counts = [s.workers for s in writing]
    first_at: dict[int, float] = {}
    for smp in writing:
        first_at.setdefault(smp.workers, smp.t - t0)
    own_cpu_s = own_at_end.ru_utime + own_at_end.ru_stime - own_at_go.ru_utime - own_at_go.ru_stime
    own_pct = 100 * own_cpu_s / span if span > 0 else 0.0

    mode = "tmp + rename (--atomic)" if args.atomic else "torch.save straight to the final name"
    size = median([float(s.bytes) for s in saves]) if saves else 0.0
    lines = [
        f"## Many writers: {args.writers} writers × {args.size_mb:g} MB every {args.interval[0]:g}–"
        f"{args.interval[1]:g} s for {args.seconds:g} s",
        "",
        f"Machine: {machine()}; load average at start {load_start}, at end {loadavg()}",
        f"Command: {Path(sys.executable).name} benchmarks/writers.py " + " ".join(sys.argv[1:]),
        f"Config: settle_seconds = {settle:g}{' (project default)' if args.settle is None else ''}, "
        f"[daemon] workers = {args.workers}{workers_note}, "
        f"inotify, worker_idle_timeout default; saves: {mode}, each writer keeps its newest {KEEP}; "
        f"median checkpoint {size / 1e6:.1f} MB",
        f"Daemon READY after {ready:.2f} s; writing window {span:.1f} s; "
        f"{'every save on disk had its sidecar' if drained else f'NOT DRAINED within {DRAIN:.0f} s'} "
        f"{t_end - t_writing_end:.1f} s after the writers stopped; daemon exit status {daemon_code}; "
        f"whole benchmark {time.monotonic() - run_started:.0f} s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| saves | {len(saves)} |",
        f"| verified (`checkpoint verified`, same path and bytes) | {len(verified)} |",
        f"| **skipped, lived ≥ settle + {MARGIN:g} s** | **{len(skipped_long)}** |",
        f"| skipped, rotated away sooner (< settle + {MARGIN:g} s) | {len(skipped_short)} |",
        f"| not ok (`checkpoint not ok`) | {len(not_ok)} |",
        f"| **lag, save returned → sidecar in place (inotify)** | **{settle_plus(lags, settle)}** |",
        f"| lag from the log line's timestamp (cross-check) | {settle_plus(log_lags, settle)} |",
        f"| daemon's verify `seconds` (handed to worker → collected) | {fmt(verify_secs)} |",
        f"| torch.save s | {fmt(save_secs)} |",
        f"| save lifetime s (return → the writer's own deletion, or end) | {fmt(lifetimes, 1)} |",
        f"| backlog: status.json queue + in_flight (includes saves still settling) | {queue_text} |",
        f"| **backlog: overdue (on disk, older than settle, no sidecar)** | **{overdue_text}** |",
        f"| verifier processes alive | min {min(counts, default=0)}, max {max(counts, default=0)}; first reached "
        + ", ".join(f"{n} at {t:.0f} s" for n, t in sorted(first_at.items()))
        + f"; {len(peaks.worker_pids)} distinct worker pids |",
        f"| CPU, % of one core over the window | daemon main {main_pct:.0f}, verifier workers {worker_pct:.0f}, "
        f"writers {writer_pct:.0f}, this script {own_pct:.1f} |",
        "| peak RSS (VmHWM), each verifier worker MB | "
        + (", ".join(f"{kib / 1000:.0f}" for kib in sorted(peaks.worker_hwm_kib.values())) or "n/a")
        + " (file pages of the mapped checkpoint included) |",
        f"| verifier RssAnon max MB, first half / second half | {first_half / 1000:.0f} / {second_half / 1000:.0f}"
        f" ({'flat' if second_half <= first_half * 1.1 + 10_000 else 'GROWS'}) |",
        f"| daemon main: VmHWM MB, RssAnon MB first / last sample | {peaks.main_hwm_kib / 1000:.0f}, "
        f"{(main_anon[0] if main_anon else 0) / 1000:.0f} / {(main_anon[-1] if main_anon else 0) / 1000:.0f} |",
        "",
        f"Per {WINDOW:.0f}-s window of the writing window (CPU as % of one core):",
        "",
        "| window | saves made | workers alive | max in flight | workers CPU % | main CPU % | max queue | "
        "max worker RssAnon MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        *timeline(samples, t0, t_writing_end, saves),
    ]
    if skipped:
        lines += ["", "Skipped saves (path, lifetime s, sidecar seen):"]
        lines += [f"  {s.path}  {life[s.path]:.2f}  {s.sidecar is not None}" for s in skipped[:20]]
    if other:
        lines += ["", "Other daemon lines about these saves, and warnings/errors: "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(other.items()))]  # fmt: skip
    if no_sidecar_seen:
        lines.append(f"{len(no_sidecar_seen)} verified saves whose sidecar this script's inotify did not see.")
    if sidecars.overflowed:
        lines.append("This script's inotify queue overflowed: some sidecar times are missing (see the log lag).")
    print()
    print("\n".join(lines))

    result = {
        "args": vars(args), "settle": settle, "span": span, "drained": drained, "daemon_exit": daemon_code,
        "saves": [asdict(s) | {"lifetime": life[s.path]} for s in saves],
        "samples": [asdict(s) for s in samples], "t0": t0,
        "worker_hwm_kib": peaks.worker_hwm_kib, "main_hwm_kib": peaks.main_hwm_kib, "other_lines": other,
    }  # fmt: skip
    (BENCH / "result.json").write_text(json.dumps(result, default=str))
    print(f"\nRaw figures: {BENCH / 'result.json'}; daemon log: {BENCH / 'daemon.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
