"""Retention planning. Pure: the checkpoints, the policy and `now` in, a plan with reasons out.

The rules are a union of what to keep; a checkpoint is deleted only when no rule keeps it, or when the
watch is over `max_size` and it is among the oldest that no invariant protects. Invariants hold whatever
the policy says: a run's latest ok checkpoint (the newest it can resume from, and the newest of all), its best,
a pinned one, one not yet verified, one a mirror still has to copy, the only ok checkpoint of a run, the best
that the trainer's records in the latest name (its `best_model_checkpoint`, `best_model_path`), a name the
trainer rewrites in place (`latest_checkpoint.pt`, `last.ckpt`, `best_model.pt`: see selection.is_slot), and
the target of a link are never deleted; nor is anything in a run whose trainer was seen deleting its own old
checkpoints (deleting beside it would race it). The keep rules count only names that are not slots, so
keep_last = 1 still holds the last good epoch under a name of its own when the trainer rewrites its slot.
Byte-identical checkpoints count once for keep_last and keep_best. Corrupt
checkpoints are never deleted silently: they follow `on_corrupt` with their problem as the reason.
Applying a plan is `ckptd.prune`'s job; nothing here touches the disk, the clock or the log.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from ckptd import selection
from ckptd.model import Entry, Identity

Action = Literal["keep", "delete", "quarantine"]
OnCorrupt = Literal["quarantine", "keep", "delete"]

# Reasons that no policy, max_size included, can override.
LATEST = "latest"
PINNED = "pinned"
UNVERIFIED = "not verified yet"
AWAITING_MIRROR = "awaiting mirror"
ONLY_OK = "only ok checkpoint of the run"
TRAINER_NEEDS = "the trainer's best"
SLOT = "the trainer's own name (rewritten in place)"
LATEST_WEIGHTS = "latest weights"
TRAINER_ROTATES = "its trainer deletes this run's old checkpoints itself"
NO_RULE = ("no keep rule applies",)


class Invariant(enum.Enum):
    """Why a checkpoint is kept whatever the policy says, max_size included. Decisions carry these as values:
    the reasons beside them are for people, and rewording one never changes what may be deleted."""

    LATEST = "latest"  # the run's newest resumable checkpoint, and its newest of all
    BEST = "best"  # the run's best by the watch's metric
    PINNED = "pinned"
    UNVERIFIED = "unverified"
    AWAITING_MIRROR = "awaiting mirror"
    ONLY_OK = "only ok"
    TRAINER_NEEDS = "trainer needs"  # the best that the trainer's records in the latest name
    TRAINER_ROTATES = "trainer rotates"
    SLOT = "slot"
    LINK_TARGET = "link target"
    FOR_REVIEW = "for review"  # corrupt, unsafe or unsupported, kept (or moved to quarantine) for a person


@dataclass(frozen=True)
class Policy:
    """A watch's `[watch.retention]`, with sizes in bytes and durations in seconds."""

    keep_last: int = 3
    keep_best: int = 1
    keep_every: int = 0
    keep_every_steps: int = 0
    keep_within: float = 0.0
    min_epoch: int = 0
    max_size: int | None = None
    free_deficit: int = 0  # bytes to free because the disk is below min_free (measured by the caller)
    on_corrupt: OnCorrupt = "quarantine"
    metric: str | None = None
    mode: selection.Mode = "min"


class Decision(NamedTuple):
    """What the plan does with one checkpoint, and every reason why."""

    # Speed: a NamedTuple (immutable, like a frozen dataclass) builds about twice as fast, and a plan makes one
    # per checkpoint (100,000 in benchmarks/retention.py).

    path: str
    run: str
    action: Action
    reasons: tuple[str, ...]
    size: int
    sha256: str | None = None
    identity: Identity | None = None  # what the plan saw: the executor removes these bytes or nothing
    invariants: frozenset[Invariant] = frozenset()

    @property
    def protected(self) -> bool:
        """True when an invariant keeps it, so that even max_size cannot delete it."""
        return bool(self.invariants)


@dataclass(frozen=True)
class Plan:
    """A watch's plan: one decision per checkpoint, and warnings (such as an unmet max_size)."""

    decisions: list[Decision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def freed(self) -> int:
        """Bytes the plan frees in the watched folder."""
        return sum(d.size for d in self.decisions if d.action != "keep")


def plan(
    entries: Iterable[Entry],
    policy: Policy,
    now: float,
    *,
    awaiting_mirror: frozenset[str] = frozenset(),
    link_targets: Mapping[str, str] | None = None,
    rotating: frozenset[str] = frozenset(),
) -> Plan:
    """Plan retention for one watch.

    Given its checkpoints (links excluded), the policy, the current time, the paths a mirror still has to
    copy, {target: link} for checkpoints that links point to, and the runs whose trainer deletes its own old
    checkpoints (ckptd never races it: everything there is kept). Returns a decision for every entry.
    """
    targets = link_targets or {}
    by_run: dict[str, list[Entry]] = {}
    for entry in entries:
        by_run.setdefault(entry.run, []).append(entry)
    ordered: list[Entry] = []  # the entries in the order of their decisions
    decisions: list[Decision] = []
    for run in sorted(by_run):
        ordered += by_run[run]
        if run in rotating:
            held = frozenset({Invariant.TRAINER_ROTATES})
            decisions += [Decision(e.path, run, "keep", (TRAINER_ROTATES,), e.size, e.sha256, e.identity, held)
                          for e in by_run[run]]  # fmt: skip
        else:
            decisions += _plan_run(by_run[run], policy, now, awaiting_mirror, targets)
    warnings: list[str] = []
    if policy.max_size is not None:
        decisions, warnings = _enforce_max_size(decisions, ordered, policy.max_size)
    if policy.free_deficit > 0:
        kept = sum(d.size for d in decisions if d.action == "keep")
        decisions, short = _enforce_max_size(
            decisions,
            ordered,
            max(kept - policy.free_deficit, 0),
            label=f"disk below min_free by {_size(policy.free_deficit)}",
        )
        warnings += short
    return Plan(decisions=decisions, warnings=warnings)


def _plan_run(
    entries: Sequence[Entry], policy: Policy, now: float, awaiting: frozenset[str], targets: Mapping[str, str]
) -> list[Decision]:
    # Speed (100,000 checkpoints in well under a second): one sort by recency serves both latest (its first, as
    # selection.latest) and keep_last; reasons are lists only for checkpoints some rule keeps, and deletions
    # share one reasons tuple, so the cyclic GC has far fewer new containers to walk.
    # The keep rules count only names that are not slots: a slot is kept anyway (SLOT), and its bytes go when
    # the trainer writes it again, or a crash truncates it; keep_last = 1 must then still hold the last good
    # epoch under a name of its own.
    slots = {e.path for e in entries if selection.is_slot(e.path)}  # one look at each name
    ok = _one_per_content([e for e in selection.usable(entries) if e.path not in slots])
    newest_first = sorted(ok, key=selection.recency, reverse=True)
    reasons: dict[str, list[str]] = {}
    invariants: dict[str, set[Invariant]] = {}

    def hold(path: str, reason: str, invariant: Invariant) -> None:
        reasons.setdefault(path, []).append(reason)
        invariants.setdefault(path, set()).add(invariant)

    resume = next((e for e in newest_first if selection.resumable(e)), None)
    if resume is not None:
        hold(resume.path, LATEST, Invariant.LATEST)
    if newest_first and newest_first[0] is not resume:
        hold(newest_first[0].path, LATEST_WEIGHTS, Invariant.LATEST)
    if newest_first:
        newest = resume or newest_first[0]
        if newest.needs:  # the trainer's own records name its best (load_best_model_at_end, ckpt_path="best")
            folder = newest.path.rpartition("/")[0]
            for entry in entries:
                name = entry.path.rpartition("/")[2]
                if name in newest.needs and entry.path.rpartition("/")[0] == folder:
                    named_by = newest.path.rpartition("/")[2]
                    hold(entry.path, f"{TRAINER_NEEDS} (named by {named_by})", Invariant.TRAINER_NEEDS)
    if len(ok) == 1:
        hold(ok[0].path, ONLY_OK, Invariant.ONLY_OK)
    if policy.metric:
        ranked = selection.ranked(ok, policy.metric, policy.mode)
        for rank, entry in enumerate(ranked[: max(policy.keep_best, 1)], start=1):
            value = selection.metric_value(entry, policy.metric)
            if rank == 1:
                hold(entry.path, f"best {policy.metric}={value:.6g}", Invariant.BEST)
            else:
                text = f"keep_best {rank}/{policy.keep_best} {policy.metric}={value:.6g}"
                reasons.setdefault(entry.path, []).append(text)
    for rank, entry in enumerate(newest_first[: policy.keep_last], start=1):
        reasons.setdefault(entry.path, []).append(f"keep_last {rank}/{policy.keep_last}")
    every, every_steps, within = policy.keep_every, policy.keep_every_steps, policy.keep_within
    within_reason = f"within {_duration(within)}"
    for entry in ok:
        if entry.epoch is not None and entry.epoch < policy.min_epoch:
            continue  # below min_epoch only keep_best and keep_last (and the invariants) protect
        if every and entry.epoch and entry.epoch % every == 0:
            reasons.setdefault(entry.path, []).append(f"milestone epoch {entry.epoch}")
        if every_steps and entry.step and entry.step % every_steps == 0:
            reasons.setdefault(entry.path, []).append(f"milestone step {entry.step}")
        if within and now - entry.mtime <= within:
            reasons.setdefault(entry.path, []).append(within_reason)
    decisions = []
    for entry in entries:
        path = entry.path
        if entry.pinned:
            hold(path, PINNED, Invariant.PINNED)
        slot = path in slots
        if slot:
            hold(path, SLOT, Invariant.SLOT)
        if not entry.verified or entry.status is None:
            hold(path, UNVERIFIED, Invariant.UNVERIFIED)
        mirroring = path in awaiting
        if mirroring:
            hold(path, AWAITING_MIRROR, Invariant.AWAITING_MIRROR)
        link = targets.get(path)
        if link is not None:
            hold(path, f"target of link {link}", Invariant.LINK_TARGET)
        why = reasons.get(path, [])
        kept_by = invariants.get(path, set())
        action: Action = "keep"
        # Fix: a link's target is an invariant too (it was missing here, so a corrupt target was quarantined or
        # deleted under its link); only a corrupt checkpoint no invariant holds follows on_corrupt.
        # A slot is never moved either, even corrupt: the trainer may be writing it again under that very name.
        held = entry.pinned or mirroring or link is not None or slot
        if entry.status == "corrupt" and entry.verified and not held:
            problem = f"corrupt, on_corrupt={policy.on_corrupt}"
            action = "keep" if policy.on_corrupt == "keep" else policy.on_corrupt
            why = [problem] if action != "keep" else [*why, problem]
            kept_by = {Invariant.FOR_REVIEW} if action != "delete" else set()
        elif entry.status in ("unsafe", "unsupported") and entry.verified:
            why.append(f"status {entry.status}, kept for review")
            kept_by = {*kept_by, Invariant.FOR_REVIEW}
        elif not why:
            decisions.append(Decision(path, entry.run, "delete", NO_RULE, entry.size, entry.sha256, entry.identity))
            continue
        kept = frozenset(kept_by)
        decisions.append(Decision(path, entry.run, action, tuple(why), entry.size, entry.sha256, entry.identity, kept))
    return decisions


def _one_per_content(entries: list[Entry]) -> list[Entry]:
    """Byte-identical checkpoints (a run migrated twice: `epoch=7-step=700.ckpt` and `epoch_07_step_000700.ckpt`)
    count once for keep_last and keep_best: the one kept for them is the newest. The others are judged by the
    remaining rules alone."""
    chosen: dict[str, Entry] = {}
    for entry in entries:
        if entry.sha256 is None:
            continue
        held = chosen.get(entry.sha256)
        if held is None or selection.recency(entry) > selection.recency(held):
            chosen[entry.sha256] = entry
    return [e for e in entries if e.sha256 is None or chosen[e.sha256] is e]


def _enforce_max_size(
    decisions: list[Decision], entries: Sequence[Entry], max_size: int, label: str = ""
) -> tuple[list[Decision], list[str]]:
    """Past max_size, delete the oldest checkpoints that only soft rules keep until the watch fits.

    `entries[i]` is the checkpoint of `decisions[i]`; `label` names the budget when it is not max_size (the
    space min_free asks for).
    """
    kept = [i for i, d in enumerate(decisions) if d.action == "keep"]
    total = sum(decisions[i].size for i in kept)
    if total <= max_size:
        return decisions, []
    # Fix: "oldest" is by mtime (then step, path). It was by step first, which across the runs of one watch
    # deleted a new run's early checkpoints before an old run's late ones.
    deletable = sorted(
        (i for i in kept if not decisions[i].protected),
        key=lambda i: (entries[i].mtime, selection.recency(entries[i])),
    )
    result = list(decisions)
    budget = _size(max_size)
    for i in deletable:
        if total <= max_size:
            break
        reason = f"{label or f'over max_size {budget}'} ({_size(total)} kept), oldest first"
        d = decisions[i]
        result[i] = d._replace(action="delete", reasons=(reason, *d.reasons))
        total -= d.size
    warnings = []
    if total > max_size:
        warnings.append(
            f"{label or f'max_size {budget}'} cannot be met: {_size(total)} remain, all protected"
            " (latest, best, pinned, unverified or awaiting mirror)"
        )
    return result, warnings


def _size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{size:.1f}TB"


def _duration(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        # Fix: one day reads "24h" (the reason users expect for keep_within = "24h"), not "1d"; 2d and up stay days.
        if seconds >= length and seconds % length == 0 and not (unit == "d" and seconds < 2 * length):
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:g}s"
