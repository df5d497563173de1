"""Applying retention: plan from the catalog, then delete or quarantine, journaled, one checkpoint at a time.

`prune_watch` is a plain function returning a report: `ckptd prune` calls it, and the daemon's scheduler
registers it. Before it touches a checkpoint, the executor checks again what the planner could not: the
path lies inside the watched folder and is not a link, and the checkpoint is byte-for-byte the one that was
planned (same size, mtime and inode). It writes a journal intent first, then acts (checkpoint, then
sidecar), then closes the intent and marks the row gone in one transaction; `finish_pending` completes what a
killed run left, so no sidecar outlives its checkpoint and no row outlives its file. `dry_run` reaches the
line that would unlink, and stops there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ckptd import discover, log, sidecar
from ckptd.catalog import Catalog
from ckptd.config import RetentionConfig, WatchConfig
from ckptd.fsutil import atomic_write_bytes, fsync_dir
from ckptd.retention import Decision, Plan, Policy, plan

DELETING_MARK = ".ckptd-deleting"


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


def policy_of(watch: WatchConfig, retention: RetentionConfig) -> Policy:
    """The planner's policy for a watch."""
    return Policy(
        keep_last=retention.keep_last, keep_best=retention.keep_best, keep_every=retention.keep_every,
        keep_every_steps=retention.keep_every_steps, keep_within=retention.keep_within,
        min_epoch=retention.min_epoch, max_size=retention.max_size, on_corrupt=retention.on_corrupt,
        metric=watch.metric.name if watch.metric else None, mode=watch.metric.mode if watch.metric else "min",
    )  # fmt: skip


def plan_watch(
    watch: WatchConfig, retention: RetentionConfig, catalog: Catalog, now: float, awaiting_mirror: frozenset[str]
) -> Plan:
    """Plan retention for a watch from the catalog's rows."""
    rows = [r for r in catalog.present(watch=watch.name) if r.kind != "link"]
    return plan(
        [r.entry() for r in rows], policy_of(watch, retention), now,
        awaiting_mirror=awaiting_mirror, link_targets=catalog.link_targets(watch.name),
    )  # fmt: skip


def prune_watch(
    watch: WatchConfig,
    retention: RetentionConfig,
    *,
    catalog: Catalog,
    state_dir: Path,
    dry_run: bool,
    awaiting_mirror: Callable[[], frozenset[str]] = frozenset,
    now: Callable[[], float] = time.time,
) -> PruneReport:
    """Plan and (unless dry_run or the policy's dry_run) apply retention for one watch."""
    logger = log.get("ckptd.prune")
    if not (dry_run or retention.dry_run):  # a dry run changes nothing, not even an interrupted run's leftovers
        finish_pending(catalog, now=now)
    current = plan_watch(watch, retention, catalog, now(), awaiting_mirror())
    report = PruneReport(watch=watch.name, plan=current, dry_run=dry_run or retention.dry_run)
    for warning in current.warnings:
        logger.warning("retention cannot meet its budget", watch=watch.name, detail=warning)
    for decision in current.decisions:
        if decision.action == "keep":
            continue
        why = _refusal(decision, watch, catalog)
        if why is not None:
            report.skipped.append((decision, why))
            logger.warning("retention skipped a checkpoint", path=decision.path, run=decision.run, why=why)
            continue
        if report.dry_run:
            logger.info(f"would {decision.action}", path=decision.path, run=decision.run, reasons=decision.reasons)
            continue
        try:
            _apply(decision, watch, catalog, state_dir, now())
        except OSError as exc:
            report.skipped.append((decision, f"failed: {exc}"))
            logger.error(f"{decision.action} failed", path=decision.path, run=decision.run, error=str(exc))
            continue
        report.done.append(decision)
        logger.info(
            "checkpoint deleted" if decision.action == "delete" else "checkpoint quarantined",
            path=decision.path, run=decision.run, reasons=list(decision.reasons), bytes=decision.size,
        )  # fmt: skip
    return report


def _refusal(decision: Decision, watch: WatchConfig, catalog: Catalog) -> str | None:
    """Why the executor will not touch this checkpoint after all, or None."""
    path = Path(decision.path)
    if path.is_symlink():
        return "is a symbolic link"
    root = watch.path.resolve()
    if not path.resolve().is_relative_to(root) or path.resolve() == root:
        return f"lies outside the watched folder {root}"
    row = catalog.get(decision.path)
    if row is None or row.gone_at is not None:
        return "no longer in the catalog"
    try:
        found = discover.identity(path)
    except FileNotFoundError:
        return "already gone"
    if (found.size, found.mtime_ns, found.inode) != (row.size, row.mtime_ns, row.inode):
        return "changed since it was verified; it will be verified again first"
    return None


def _apply(decision: Decision, watch: WatchConfig, catalog: Catalog, state_dir: Path, now: float) -> None:
    path = Path(decision.path)
    entry = catalog.journal_intent(
        action=decision.action, watch=watch.name, run=decision.run, path=decision.path, sha256=decision.sha256,
        size=decision.size, reasons=list(decision.reasons), now=now,
    )  # fmt: skip
    detail = None
    if decision.action == "quarantine":
        detail = str(quarantine(path, watch, state_dir, list(decision.reasons), decision.sha256, decision.size, now))
    else:
        delete_checkpoint(path)
    fsync_dir(path.parent)
    catalog.journal_finish(entry, state="done", now=now, detail=detail)


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint, then its sidecar; a directory goes through a hidden rename so half is never seen."""
    if path.is_dir():
        trash = path.with_name(f".{path.name}{DELETING_MARK}")
        os.replace(path, trash)
        shutil.rmtree(trash)
    else:
        path.unlink()
    sidecar.remove(path)


def quarantine(path: Path, watch: WatchConfig, state_dir: Path, reasons: list[str], sha256: str | None, size: int,
               now: float) -> Path:  # fmt: skip
    """Move a corrupt checkpoint (and its sidecar) to <state_dir>/quarantine/<watch>/<relative path>.

    A `.quarantine.json` note beside it says where it came from and why. Returns where it went.
    """
    target = state_dir / "quarantine" / watch.name / path.relative_to(watch.path)
    if target.exists():
        target = target.with_name(f"{target.name}.{int(now)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    note = {
        "original_path": str(path), "quarantined_at": datetime.fromtimestamp(now, UTC).isoformat(),
        "reasons": reasons, "sha256": sha256, "size_bytes": size,
    }  # fmt: skip
    found = sidecar.read(path)
    if found is not None:
        note["problems"] = found.verification.problems
    atomic_write_bytes(target.with_name(target.name + ".quarantine.json"), json.dumps(note, indent=2).encode())
    # Fix: the sidecar goes first. Moved second, a kill (or a failed move) between the two left a sidecar
    # beside nothing; this way round the worst case is a checkpoint without a sidecar, verified again.
    side = sidecar.sidecar_path(path)
    if side.exists():
        shutil.move(side, sidecar.sidecar_path(target))
    shutil.move(path, target)
    return target


def finish_pending(catalog: Catalog, now: Callable[[], float] = time.time) -> int:
    """Complete journal intents that a killed run left; return how many were finished.

    An intent whose checkpoint is gone is completed (sidecar removed, row marked gone); one whose
    checkpoint is still there was never acted on and is closed as skipped: the next plan decides again.
    """
    finished = 0
    for entry in catalog.journal(state="pending"):
        path = Path(entry["path"])
        trash = path.with_name(f".{path.name}{DELETING_MARK}")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        if path.exists() or path.is_symlink():
            catalog.journal_finish(entry["id"], state="skipped", now=now(), detail="interrupted before acting")
            continue
        if entry["action"] == "delete":
            sidecar.remove(path)
        catalog.journal_finish(entry["id"], state="done", now=now(), detail="completed after an interruption")
        finished += 1
    return finished
