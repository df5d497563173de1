"""Applying retention: plan from the catalog, then delete or quarantine through the one executor.

`prune_watch` is a plain function returning a report: `ckptd prune` calls it, and the daemon's scheduler
registers it. Each decision to delete or quarantine carries the identity its checkpoint had when planned;
`ckptd.delete.execute` removes exactly those bytes or nothing (see there: no links followed, a journal
intent first, a killed run finished by `finish_pending`). `dry_run` goes through every check the executor
makes, and stops before the journal.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import delete, log
from ckptd.catalog import Catalog, Row
from ckptd.config import RetentionConfig, WatchConfig, min_free_bytes
from ckptd.retention import Decision, Plan, Policy, plan


@dataclass
class PruneReport:
    """What one retention pass over a watch planned and did."""

    watch: str
    plan: Plan
    dry_run: bool
    done: list[Decision] = field(default_factory=list)
    skipped: list[tuple[Decision, str]] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, object]]:
        """The plan as JSON-ready rows (what `ckptd prune --json` prints)."""
        skipped = {d.path: why for d, why in self.skipped}
        return [
            {
                "path": d.path, "run": d.run, "watch": self.watch, "action": d.action, "reasons": list(d.reasons),
                "size_bytes": d.size, "skipped": skipped.get(d.path),
            }
            for d in self.plan.decisions
        ]  # fmt: skip


def policy_of(watch: WatchConfig, retention: RetentionConfig, free_deficit: int = 0) -> Policy:
    """The planner's policy for a watch."""
    return Policy(
        keep_last=retention.keep_last, keep_best=retention.keep_best, keep_every=retention.keep_every,
        keep_every_steps=retention.keep_every_steps, keep_within=retention.keep_within,
        min_epoch=retention.min_epoch, max_size=retention.max_size, on_corrupt=retention.on_corrupt,
        metric=watch.metric.name if watch.metric else None, mode=watch.metric.mode if watch.metric else "min",
        free_deficit=free_deficit,
    )  # fmt: skip


def free_deficit(watch: WatchConfig, retention: RetentionConfig) -> int:
    """Bytes short of `min_free` on the watched folder's file system now (0 when met, unset or unknown)."""
    if retention.min_free is None:
        return 0
    try:
        found = os.statvfs(watch.path)
    except OSError:
        return 0
    wanted = min_free_bytes(retention.min_free, found.f_blocks * found.f_frsize)
    return max(wanted - found.f_bavail * found.f_frsize, 0)


def plan_watch(
    watch: WatchConfig, retention: RetentionConfig, catalog: Catalog, now: float, awaiting_mirror: frozenset[str],
    free_deficit: int = 0, run: str | None = None,
) -> Plan:  # fmt: skip
    """Plan retention for a watch, or for one `run` of it, from the catalog's rows.

    Run by run, each plan reading only its own run's rows (a run's keep rules never look at another run):
    memory stays that of one run at a million checkpoints, and `prune --run` costs the same at any size. A
    budget over the whole watch (max_size, or a disk below min_free) ranks every run's checkpoints together,
    so it plans the watch at once (and `--run` keeps that run's decisions of it).
    """
    policy = policy_of(watch, retention, free_deficit)
    links, rotating = catalog.link_targets(), catalog.rotating_runs()

    def planned(rows: list[Row]) -> Plan:
        entries = [r.entry() for r in rows if r.kind != "link" and r.watch == watch.name]
        return plan(entries, policy, now, awaiting_mirror=awaiting_mirror, link_targets=links, rotating=rotating)

    if policy.max_size is None and policy.free_deficit == 0:
        parts = [planned(catalog.in_run(name)) for name in sorted([run] if run else catalog.run_names(watch.name))]
        return Plan([d for p in parts for d in p.decisions], [w for p in parts for w in p.warnings])
    whole = planned(list(catalog.present(watch=watch.name)))
    return whole if run is None else Plan([d for d in whole.decisions if d.run == run], whole.warnings)


def prune_watch(
    watch: WatchConfig,
    retention: RetentionConfig,
    *,
    catalog: Catalog,
    state_dir: Path,
    dry_run: bool,
    awaiting_mirror: Callable[[], frozenset[str]] = frozenset,
    now: Callable[[], float] = time.time,
    finish_before: float = math.inf,
    run: str | None = None,
) -> PruneReport:
    """Plan and (unless dry_run or the policy's dry_run) apply retention for one watch (or one `run` of it),
    after finishing the journal intents of a killed run planned before `finish_before` (see
    delete.finish_pending)."""
    logger = log.get("ckptd.prune")
    if not (dry_run or retention.dry_run):  # a dry run changes nothing, not even an interrupted run's leftovers
        delete.finish_pending(catalog, {watch.name: watch.path}, state_dir, now=now, before=finish_before)
    current = plan_watch(watch, retention, catalog, now(), awaiting_mirror(), free_deficit(watch, retention), run)
    report = PruneReport(watch=watch.name, plan=current, dry_run=dry_run or retention.dry_run)
    for warning in current.warnings:
        logger.warning("retention cannot meet its budget", watch=watch.name, detail=warning)
    for decision in current.decisions:
        if decision.action == "keep":
            continue
        try:
            removal = delete.Removal.planned(decision, watch.name, watch.path)
            delete.execute(removal, catalog, state_dir, now=now(), dry_run=report.dry_run)
        except delete.Refused as exc:
            report.skipped.append((decision, str(exc)))
            logger.warning("retention skipped a checkpoint", path=decision.path, run=decision.run, why=str(exc))
            continue
        except OSError as exc:
            report.skipped.append((decision, f"failed: {exc}"))
            logger.error(f"{decision.action} failed", path=decision.path, run=decision.run, error=str(exc))
            continue
        if report.dry_run:
            logger.info(f"would {decision.action}", path=decision.path, run=decision.run, reasons=decision.reasons)
            continue
        report.done.append(decision)
        logger.info(
            "checkpoint deleted" if decision.action == "delete" else "checkpoint quarantined",
            path=decision.path, run=decision.run, reasons=list(decision.reasons), bytes=decision.size,
        )  # fmt: skip
    return report
