"""Benchmark: every per-run command, a whole-tree listing, a restart and a rescan as the catalog grows to 1,000,000.

Run as `.venv/bin/python benchmarks/scale.py [--sizes 1000 10000 100000 1000000] [--repeats 5] [--base DIR]`.

One tree is grown in `--base` (default /tmp/ckptd-scale, wiped first unless `--reuse`) to each size in turn:
runs of 100 checkpoints, each a hardlink of a real 1.7 KB torch.save file, with its real sidecar (its own
step and val_loss) and its catalog row, as a daemon leaves them after verifying all of them (nothing here
hashes: the commands measured read sidecars and the catalog). Each run's latest and best are recorded. The
config watches the tree with a metric and a retention policy (keep_last 5, keep_best 2).

At each size, medians of `--repeats`, each command a fresh `ckptd` process (what a launch script pays):
- `latest RUN`, `best RUN`, `list RUN --json`, `status --json --run RUN`, `prune --dry-run --run RUN` for one
  run, as ratios to their own figure at the first size (the issue's target: within 2x up to 1M);
- `list --json` of the whole tree (once per size), with its peak memory: it must stream (memory flat);
- restart to READY: `ckptd run` from exec to the READY=1 datagram on $NOTIFY_SOCKET (it surveys every
  checkpoint before READY), and a no-change rescan (`survey(read_sidecars=False)`, the daemon's scheduled
  pass, in this process), both as ratios to a plain `os.walk` + `lstat` of the same tree measured in the same
  run (the target: within 3x);
- `ckptd --version`, the floor every command pays (Python and the CLI's imports).
Peak memory of each command comes from GNU time; the daemon's is its VmHWM at READY (after the first survey).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptd import sidecar  # noqa: E402
from ckptd.catalog import Catalog  # noqa: E402
from ckptd.config import DEFAULT_PATTERNS, MetricConfig  # noqa: E402
from ckptd.scan import sidecar_bytes, survey, update_run  # noqa: E402
from ckptd.verify import verify  # noqa: E402

CKPTD = str(Path(sys.executable).with_name("ckptd"))
PER_RUN = 100
LINKS_PER_INODE = 50_000  # a file system allows some 65,000 links to one inode


class Tree:
    """The growing tree: runs of PER_RUN checkpoints under base/runs, the catalog in base/state."""

    def __init__(self, base: Path) -> None:
        self.base, self.runs, self.state = base, base / "runs", base / "state"
        self.config = base / "config.toml"
        self.seed = base / "seed.pt"
        if not self.seed.exists():
            base.mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": 1, "global_step": 100, "model": {"w": torch.ones(64)}, "optimizer": {"lr": 0.1}},
                       self.seed)  # fmt: skip
        self.record = verify(self.seed)
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.state}"\nlog_format = "json"\nrescan_interval = "1h"\n'
            f'worker_idle_timeout = "10m"\n\n[[watch]]\nname = "runs"\npath = "{self.runs}"\n'
            '[watch.metric]\nname = "val_loss"\nmode = "min"\n'
            "[watch.retention]\nkeep_last = 5\nkeep_best = 2\n"
        )
        self.size = sum(1 for _ in self.runs.glob("run*/*.pt")) if self.runs.exists() else 0

    def run_path(self, index: int) -> Path:
        return self.runs / f"run{index // PER_RUN:05d}"

    def grow(self, size: int) -> float:
        """Add checkpoints until the tree holds `size`; return the seconds it took."""
        started = time.perf_counter()
        now = time.time()
        metric = MetricConfig(name="val_loss", mode="min")
        with Catalog(self.state) as catalog:
            for first in range(self.size, size, PER_RUN):
                run = self.run_path(first)
                run.mkdir(parents=True, exist_ok=True)
                source = self.base / f"seed-{first // LINKS_PER_INODE}.pt"
                if not source.exists():
                    shutil.copyfile(self.seed, source)
                catalog._exec("BEGIN")
                for i in range(first, min(first + PER_RUN, size)):
                    path = run / f"epoch_{i % PER_RUN:03d}.pt"
                    os.link(source, path)
                    found = path.stat()
                    mine = dataclasses.replace(
                        self.record, path=str(path), mtime_ns=found.st_mtime_ns, mtime=found.st_mtime_ns / 1e9,
                        inode=found.st_ino, device=found.st_dev, global_step=i % PER_RUN,
                        metrics={"val_loss": 1.0 + ((i * 7919) % PER_RUN) / PER_RUN},
                    )  # fmt: skip
                    sidecar.sidecar_path(path).write_bytes(sidecar_bytes(mine, {}, now))
                    catalog.record_verified(watch="runs", run=str(run), verification=mine,
                                            mtime_ns=found.st_mtime_ns, now=now)  # fmt: skip
                catalog._exec("COMMIT")
                update_run(catalog, watch="runs", run=str(run), metric=metric, now=now)
        self.size = size
        return time.perf_counter() - started


def measured(argv: Sequence[str]) -> tuple[float, int, bytes]:
    """Run a command to its end: (seconds, peak RSS in bytes, stdout).

    Through GNU time: a child forked straight from this process (torch loaded, 250 MB) would report this
    process's size as its own peak, since ru_maxrss survives exec."""
    report = Path(f"/tmp/ckptd-scale-time-{os.getpid()}")
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *argv], capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return seconds, int(report.read_text().split()[-1]) * 1024, done.stdout


def median_of(repeats: int, fn: Callable[[], tuple[float, int, bytes]]) -> tuple[float, int]:
    fn()  # warm-up: the page cache, as a box that has run a while has it
    runs = [fn() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def restart_to_ready(tree: Tree) -> tuple[float, int, bytes]:
    """Start the daemon, wait for READY=1, stop it; (seconds to READY, 0, b"")."""
    address = str(tree.base / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        Path(address).unlink(missing_ok=True)
        sock.bind(address)
        sock.settimeout(600)
        env = {**os.environ, "NOTIFY_SOCKET": address}
        started = time.perf_counter()
        proc = subprocess.Popen([CKPTD, "run", "--config", str(tree.config)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            seconds = time.perf_counter() - started
            peak = _high_water(proc.pid)  # the daemon's own peak so far: the start-up survey's
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return seconds, peak, b""


def _high_water(pid: int) -> int:
    """VmHWM of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def walk_and_stat(root: Path) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.lstat(f"{folder}/{name}")
    return time.perf_counter() - started, 0, b""


def rescan(tree: Tree) -> tuple[float, int, bytes]:
    with Catalog(tree.state) as catalog:
        started = time.perf_counter()
        found = survey(tree.runs, watch="runs", patterns=DEFAULT_PATTERNS, catalog=catalog, read_sidecars=False)
        seconds = time.perf_counter() - started
    assert found.unchanged == tree.size and not found.to_verify, "the tree must read as unchanged"
    return seconds, 0, b""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base", type=Path, default=Path("/tmp/ckptd-scale"))
    p.add_argument("--reuse", action="store_true", help="keep a tree --base already holds (grown further)")
    a = p.parse_args()
    if not a.reuse:
        shutil.rmtree(a.base, ignore_errors=True)
    tree = Tree(a.base)
    print(f"machine: {os.uname().machine}, {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}")
    print(f"1-minute load average before: {os.getloadavg()[0]:.1f}")
    config = ["--config", str(tree.config)]
    results: dict[int, dict[str, tuple[float, int]]] = {}
    if tree.size == 0:  # what a start costs whatever the tree: Python, imports, the verifier warmed, the lease
        tree.runs.mkdir(parents=True, exist_ok=True)
        empty = median_of(min(a.repeats, 3), lambda: restart_to_ready(tree))[0]
        print(f"restart to READY over an empty tree: {empty:.3f} s", flush=True)
    else:
        empty = 0.0
    for size in a.sizes:
        if size < tree.size:
            print(f"skipping {size:,}: the tree already holds {tree.size:,}")
            continue
        print(f"growing to {size:,}: {tree.grow(size):.0f} s", flush=True)
        run = str(tree.run_path(0))
        commands: dict[str, list[str]] = {
            "--version": [CKPTD, "--version"],
            "latest RUN": [CKPTD, "latest", run, *config],
            "best RUN": [CKPTD, "best", run, *config],
            "list RUN --json": [CKPTD, "list", run, "--json", *config],
            "status --json --run RUN": [CKPTD, "status", "--json", "--run", run, *config],
            "prune --dry-run --run RUN": [CKPTD, "prune", "--dry-run", "--json", "--run", run, *config],
        }
        row: dict[str, tuple[float, int]] = {}
        for name, argv in commands.items():
            row[name] = median_of(a.repeats, lambda argv=argv: measured(argv))  # type: ignore[misc]
        seconds, peak, out = measured([CKPTD, "list", str(tree.runs), "--json", *config])
        assert len(json.loads(out)) == size
        row["list --json (tree)"] = (seconds, peak)
        row["walk+stat"] = median_of(a.repeats, lambda: walk_and_stat(tree.runs))
        row["no-change rescan"] = median_of(min(a.repeats, 3), lambda: rescan(tree))
        ready = median_of(min(a.repeats, 3), lambda: restart_to_ready(tree))
        row["restart to READY"] = ready
        row["READY minus empty start"] = (ready[0] - empty, 0)
        results[size] = row
        walk = row["walk+stat"][0]
        print(f"\n{size:,} checkpoints ({size // PER_RUN:,} runs); 1-minute load {os.getloadavg()[0]:.1f}")
        print(f"{'':>28} {'seconds':>9} {'x first':>8} {'x walk':>7} {'peak MB':>8}")
        first = results[min(results)]
        for name, (secs, rss) in row.items():
            ratio = secs / first[name][0] if first[name][0] else 0.0
            print(f"{name:>28} {secs:>9.3f} {ratio:>8.2f} {secs / walk:>7.1f} {rss / 1e6:>8.0f}", flush=True)
    print(f"\n1-minute load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
