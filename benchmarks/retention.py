"""Benchmark: retention planning (`ckptd.retention.plan`) over 100,000 cataloged checkpoints in 1,000 runs.

Run as `.venv/bin/python benchmarks/retention.py [--runs 1000] [--per-run 100] [--repeats 5]`.

The entries are built in memory (the planner is pure: no catalog, no disk), with a fixed seed:

- 1,000 runs started at random times over the last 90 days, each with 100 checkpoints: epoch i, global step
  500 * (i + 1) plus jitter, one every 10 to 30 minutes, 200 MB to 2 GB each;
- val_loss falling with noise, with ties (rounded to 4 decimals), about 1% NaN and 1% missing;
- about 0.5% corrupt, 0.2% unsafe, the newest checkpoint of every tenth run not verified yet, 0.1% pinned,
  1% awaiting a mirror, and every run's latest the target of a `last.ckpt` link;
- the policy: keep_last 3, keep_best 2 by val_loss (min), keep_every 10 epochs, keep_within 7 days, and a
  max_size of 15% of all bytes, so the budget binds and the oldest-first pass has real work to do.

Timed: `plan(entries, policy, now, awaiting_mirror=..., link_targets=...)`, `--repeats` times after one untimed
warm-up; the medians of wall time (perf_counter) and CPU time (process_time) are reported. Baseline, measured
in the same run the same way: `sorted(entries, key=lambda e: (e.run, e.step))`, the one sort by (run, step) that
any planner has to do at least, so the ratio says how many such sorts the whole plan costs. Target: the plan's
median wall time under 1 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptd.model import Entry  # noqa: E402
from ckptd.retention import Plan, Policy, plan  # noqa: E402

NOW = 1_750_000_000.0
DAY = 86400.0
TARGET_SECONDS = 1.0


def build(runs: int, per_run: int, seed: int = 0) -> tuple[list[Entry], frozenset[str], dict[str, str]]:
    """The entries of `runs` runs of `per_run` checkpoints, the awaiting-mirror paths and {target: link}."""
    rng = random.Random(seed)
    entries: list[Entry] = []
    awaiting: set[str] = set()
    targets: dict[str, str] = {}
    for r in range(runs):
        run = f"/data/runs/project-{r % 37}/exp-{r:04d}"
        start = NOW - rng.uniform(0, 90) * DAY
        mtime, loss = start, rng.uniform(2.0, 4.0)
        for i in range(per_run):
            mtime += rng.uniform(600, 1800)
            loss *= rng.uniform(0.95, 1.01)
            roll = rng.random()
            metrics: dict[str, float] = {"val_loss": round(loss, 4), "train_loss": loss * 0.9}
            if roll < 0.01:
                metrics["val_loss"] = float("nan")
            elif roll < 0.02:
                del metrics["val_loss"]
            status: str | None = "ok"
            if roll > 0.995:
                status = "corrupt"
            elif roll > 0.993:
                status = "unsafe"
            newest = i == per_run - 1
            if newest and r % 10 == 0:
                status = None
            path = f"{run}/epoch={i}-step={500 * (i + 1)}.ckpt"
            entries.append(
                Entry(
                    path=path, run=run, status=status, size=rng.randint(200_000_000, 2_000_000_000),
                    mtime=min(mtime, NOW), sha256=f"{r:08x}{i:056x}", epoch=i,
                    step=500 * (i + 1) + rng.randint(0, 3), metrics=metrics, pinned=rng.random() < 0.001,
                    format="torch_zip", verified=status is not None,
                )
            )  # fmt: skip
            if rng.random() < 0.01:
                awaiting.add(path)
            if newest:
                targets[path] = f"{run}/last.ckpt"
    return entries, frozenset(awaiting), targets


def timed(job: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Run `job` once untimed, then `repeats` times; return every wall time and every CPU time (seconds)."""
    job()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        job()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return wall, cpu


def main() -> int:
    """Build the entries, time the baseline and the plan, print the table; exit 1 if the target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--per-run", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    entries, awaiting, targets = build(args.runs, args.per_run)
    total = sum(e.size for e in entries)
    policy = Policy(
        keep_last=3, keep_best=2, keep_every=10, keep_within=7 * DAY, max_size=int(total * 0.15), metric="val_loss",
        mode="min",
    )  # fmt: skip
    result: list[Plan] = []

    def planning() -> None:
        result[:] = [plan(entries, policy, NOW, awaiting_mirror=awaiting, link_targets=targets)]

    def baseline() -> None:
        sorted(entries, key=lambda e: (e.run, e.step))

    load_before = os.getloadavg()[0]
    base_wall, base_cpu = timed(baseline, args.repeats)
    plan_wall, plan_cpu = timed(planning, args.repeats)
    load_after = os.getloadavg()[0]
    done = result[0]
    actions: dict[str, int] = {}
    for d in done.decisions:
        actions[d.action] = actions.get(d.action, 0) + 1
    assert len(done.decisions) == len(entries)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}")
    print(f"entries: {len(entries):,} in {args.runs:,} runs; repeats: {args.repeats} (after one warm-up)")
    print(f"1-minute load average: {load_before:.1f} before, {load_after:.1f} after")
    over = sum(1 for d in done.decisions if d.reasons[0].startswith("over max_size"))
    print(f"plan: {actions}, {over:,} of the deletions for max_size ({'; '.join(done.warnings) or 'budget met'})")
    print()
    header = ("what", "wall median", "wall min-max", "x baseline", "CPU median", "x baseline")
    print(f"{header[0]:<30} {header[1]:>12} {header[2]:>16} {header[3]:>11} {header[4]:>11} {header[5]:>11}")
    base = (statistics.median(base_wall), statistics.median(base_cpu))
    for name, wall, cpu in (
        ("baseline: sort by (run, step)", base_wall, base_cpu),
        ("retention.plan", plan_wall, plan_cpu),
    ):
        w, c = statistics.median(wall), statistics.median(cpu)
        span = f"{min(wall):.3f}-{max(wall):.3f}s"
        print(f"{name:<30} {w:>11.3f}s {span:>16} {w / base[0]:>10.1f}x {c:>10.3f}s {c / base[1]:>10.1f}x")
    plan_median = statistics.median(plan_wall)
    verdict = "meets" if plan_median < TARGET_SECONDS else "MISSES"
    print(f"\ntarget: plan median under {TARGET_SECONDS:.0f} s: {verdict} ({plan_median:.3f} s)")
    return 0 if plan_median < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
