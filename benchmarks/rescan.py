"""Benchmark: a no-change rescan (`ckptd.scan.survey`) of a cataloged tree, against a plain walk and stat of it.

Run as `.venv/bin/python benchmarks/rescan.py [--sizes 1000 10000 100000] [--repeats 3]`.

For each size, a tree of runs with 100 checkpoints each is built in a temp folder: every checkpoint is a
hardlink of a copy of one real torch.save file (1.7 KB) and every sidecar a copy of that file's real sidecar, and the
catalog holds a row for each, recorded from the one real verification (the planner and the rescan never hash,
so this is what a daemon's catalog holds after verifying them all). Timed, after one untimed warm-up, medians of
`--repeats` runs:
- baseline: `os.walk` of the tree with an `lstat` of every file (what any rescan must do at least);
- daemon rescan: `survey(..., read_sidecars=False)` (the daemon's start-up and scheduled rescans: one stat per
  checkpoint, the catalog's identities in one query, a sidecar's presence looked at);
- scan rescan: `survey(..., read_sidecars=True)` (`ckptd scan`: each sidecar parsed too).
The issue's target: the daemon's rescan within 3x the baseline at every size.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptd import sidecar  # noqa: E402
from ckptd.catalog import Catalog  # noqa: E402
from ckptd.config import DEFAULT_PATTERNS  # noqa: E402
from ckptd.scan import Survey, sidecar_bytes, survey  # noqa: E402
from ckptd.verify import verify  # noqa: E402


def build(base: Path, count: int) -> tuple[Path, Catalog]:
    """`count` cataloged checkpoints with sidecars under base/runs, 100 to a run."""
    seed = base / "seed.pt"
    torch.save({"epoch": 1, "global_step": 100, "model": {"w": torch.ones(64)}, "optimizer": {"lr": 0.1}}, seed)
    verified = verify(seed)
    catalog = Catalog(base / "state")
    runs = base / "runs"
    now = time.time()
    for i in range(count):
        run = runs / f"run{i // 100:05d}"
        if i % 100 == 0:
            run.mkdir(parents=True)
        path = run / f"epoch_{i % 100:03d}.pt"
        if i % 50_000 == 0:  # a file system allows some 65,000 links to one inode
            source = base / f"seed-{i}.pt"
            shutil.copyfile(seed, source)
        os.link(source, path)
        found = path.stat()
        record = verified.__class__(**{**verified.__dict__, "path": str(path), "mtime_ns": found.st_mtime_ns,
                                       "inode": found.st_ino, "device": found.st_dev})  # fmt: skip
        sidecar.sidecar_path(path).write_bytes(sidecar_bytes(record, {}, now))
        catalog.record_verified(watch="runs", run=str(run), verification=record, mtime_ns=found.st_mtime_ns, now=now)
    return runs, catalog


def walk_and_stat(root: Path) -> int:
    seen = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.lstat(f"{folder}/{name}")
            seen += 1
    return seen


def rescan(runs: Path, catalog: Catalog, read_sidecars: bool) -> Survey:
    return survey(runs, watch="runs", patterns=DEFAULT_PATTERNS, catalog=catalog, read_sidecars=read_sidecars)


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: the page cache and the catalog's pages, as a daemon that has run a while has them
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"machine: {os.uname().machine}, {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}")
    print(f"1-minute load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'checkpoints':>12} {'walk+stat':>10} {'daemon rescan':>14} {'x walk':>7} {'scan rescan':>12}"
          f" {'x walk':>7}")  # fmt: skip
    worst = 0.0
    for size in a.sizes:
        base = Path(tempfile.mkdtemp(prefix="ckptd-rescan-"))
        try:
            runs, catalog = build(base, size)
            with catalog:
                base_s = timed(functools.partial(walk_and_stat, runs), a.repeats)
                daemon_s = timed(functools.partial(rescan, runs, catalog, False), a.repeats)
                scan_s = timed(functools.partial(rescan, runs, catalog, True), a.repeats)
                found = rescan(runs, catalog, False)
                assert found.unchanged == size and not found.to_verify, "the tree must read as unchanged"
            worst = max(worst, daemon_s / base_s)
            print(f"{size:>12,} {base_s:>9.3f}s {daemon_s:>13.3f}s {daemon_s / base_s:>6.1f}x"
                  f" {scan_s:>11.3f}s {scan_s / base_s:>6.1f}x")  # fmt: skip
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print(f"1-minute load average after: {os.getloadavg()[0]:.1f}")
    print(f"target: daemon rescan within 3x walk+stat: {'meets' if worst <= 3 else 'misses'} (worst {worst:.1f}x)")
    return 0 if worst <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
