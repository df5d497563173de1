"""Benchmark: what the progress bars and the daemon's metrics cost `verify` (issue 14).

Run as `.venv/bin/python benchmarks/overhead.py [--size-mib 256] [--repeats 5]`.

A torch checkpoint of `--size-mib` (64 MiB float32 tensors, written by `torch.save` in a subprocess, as
benchmarks/verify.py writes them) is created once under /tmp/ckptd-bench. Then `ckptd.verify.verify` runs in this
process three ways, `--repeats` times each after one untimed warm-up round, in an order that rotates every round:

- plain: `verify(path)`, no callback: what a piped command and the daemon run;
- progress: `verify(path, progress=cb)` inside `ckptd.progress.shown()`, exactly as `ckptd verify` on a terminal:
  stderr is a pseudo-terminal for the duration (a thread drains it as a terminal would), so rich's Progress draws
  at 10 Hz and `cb` advances two rich tasks under their lock for each 8 MiB piece, from the hashing thread;
- metrics: `verify(path)` then the daemon's per-checkpoint metrics work, `Metrics().verified(watch, status,
  seconds, hashed)` and `Metrics().run(...)` (ckptd/metrics.py; the registry built once, as the daemon does).

Each way runs with the file in the page cache (read whole just before) and cold (dropped with
POSIX_FADV_DONTNEED just before; verify leaves the cache as it found it anyway). The table gives the median wall
time and the median CPU time of this process (every thread: the hashing and CRC threads, rich's refresh thread
and the terminal's drain thread) and each as a ratio to plain, measured in the same run. The load average before
and after is printed too: on a shared machine it says how much the other tenants took.
"""

from __future__ import annotations

import argparse
import os
import platform
import pty
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common import CREATE_CODE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptd import progress  # noqa: E402
from ckptd.metrics import Metrics  # noqa: E402
from ckptd.verify import verify  # noqa: E402

CACHE_DIR = Path("/tmp/ckptd-bench")
BIG_TENSOR = 64 << 20
WAYS = ("plain", "progress", "metrics")
STATES = ("cached", "cold")


def ensure_checkpoint(size_mib: int) -> Path:
    """The checkpoint of `size_mib` MiB of 64 MiB tensors, written once in a subprocess and reused."""
    n_big = max(1, size_mib * (1 << 20) // BIG_TENSOR)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"checkpoint-{n_big * BIG_TENSOR >> 20}MiB.pt"
    if not path.exists():
        print(f"creating {path} ...", flush=True)
        args = [str(path), str(n_big), str(BIG_TENSOR // 4), "16", "4096"]
        subprocess.run([sys.executable, "-c", CREATE_CODE, *args], check=True)
    return path


def cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextmanager
def on_a_terminal() -> Iterator[None]:
    """sys.stderr a pseudo-terminal while the block runs; a thread reads what is drawn on it, as a terminal does."""
    master, slave = pty.openpty()
    drawn = [0]

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            drawn[0] += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    saved = sys.stderr
    sys.stderr = open(slave, "w", encoding="utf-8", closefd=True)  # noqa: SIM115
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = saved
        reader.join(timeout=5)
        os.close(master)
    if drawn[0] == 0:
        raise SystemExit("the progress way drew nothing on its terminal: it measured no progress")


def plain(path: Path, _metrics: Metrics) -> None:
    assert verify(path).status == "ok"


def with_progress(path: Path, _metrics: Metrics) -> None:
    with on_a_terminal(), progress.shown() as bars:
        assert bars is not None, "stderr is a terminal here"
        read = bars.start(path.name, progress.size_of(path), "verify")
        assert verify(path, progress=read).status == "ok"


def with_metrics(path: Path, metrics: Metrics) -> None:
    started = time.monotonic()
    result = verify(path)
    assert result.status == "ok"
    metrics.verified("w", result.status, time.monotonic() - started, result.size_bytes)
    metrics.run("w", "exp", activity=time.time(), step=result.global_step, metric="val_loss", value=0.5)


RUNNERS: dict[str, Callable[[Path, Metrics], None]] = {"plain": plain, "progress": with_progress,
                                                       "metrics": with_metrics}  # fmt: skip


def bench(path: Path, repeats: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(way, state): [(wall s, CPU s)]}; one untimed round first (torch's import, the allocator's first pages)."""
    metrics = Metrics()
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {(w, s): [] for w in WAYS for s in STATES}
    for round_ in range(repeats + 1):
        order = WAYS[round_ % 3 :] + WAYS[: round_ % 3]
        for state in STATES:
            for way in order:
                cache(path) if state == "cached" else drop(path)
                wall, cpu = time.perf_counter(), time.process_time()
                RUNNERS[way](path, metrics)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if round_:
                    runs[(way, state)].append((wall, cpu))
        print(f"round {round_}/{repeats} done", file=sys.stderr, flush=True)
    return runs


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def table(runs: dict[tuple[str, str], list[tuple[float, float]]]) -> str:
    lines = ["| file | way | median wall s | min–max s | × plain | median CPU s | × plain |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for state in STATES:
        base_wall = statistics.median(w for w, _c in runs[("plain", state)])
        base_cpu = statistics.median(c for _w, c in runs[("plain", state)])
        for way in WAYS:
            walls = [w for w, _c in runs[(way, state)]]
            wall, cpu = statistics.median(walls), statistics.median(c for _w, c in runs[(way, state)])
            lines.append(f"| {state} | {way} | {wall:.3f} | {min(walls):.3f}–{max(walls):.3f} | {wall / base_wall:.3f}"
                         f" | {cpu:.3f} | {cpu / base_cpu:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="checkpoint size in MiB (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per way and state (default 5)")
    args = parser.parse_args()
    path = ensure_checkpoint(args.size_mib)
    before = loadavg()
    runs = bench(path, args.repeats)
    after = loadavg()
    print()
    print(f"Machine: {machine()}")
    print(f"Command: {Path(sys.executable).name} benchmarks/overhead.py " + " ".join(sys.argv[1:]))
    print(f"Checkpoint: {path} ({path.stat().st_size:,} bytes); {args.repeats} timed runs per way and state;"
          f" load average (1, 5, 15 min) {before} before, {after} after")  # fmt: skip
    print()
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
