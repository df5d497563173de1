"""The retention planner: property tests over random runs and policies, and the policies users write today.

The planner is pure, so every test builds `Entry` values in memory. The property test checks each decision
against an oracle written here from the requirements, not from the planner's code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.model import Entry
from ckptd.retention import Decision, OnCorrupt, Plan, Policy, plan

NOW = 1_700_000_000.0
HOUR = 3600.0
DAY = 86400.0
METRIC = "val_loss"
WITHIN_TEXT = {HOUR: "within 1h", DAY: "within 24h", 3 * DAY: "within 3d"}
MAX_SIZE_REASON = re.compile(r"^over max_size \S+ \(\S+ kept\), oldest first$")
NO_RULE = ("no keep rule applies",)


# ------------------------------------------------------------------------------------------- the oracle


def _recency(e: Entry) -> tuple[int, int, float, str]:
    """Newest is largest: step (missing = -1), then epoch (likewise), then mtime, then path."""
    return (e.step if e.step is not None else -1, e.epoch if e.epoch is not None else -1, e.mtime, e.path)


def _value(e: Entry) -> float | None:
    v = e.metrics.get(METRIC)
    return v if isinstance(v, int | float) and math.isfinite(v) else None


@dataclass
class Expected:
    """What the requirements say about one checkpoint, before max_size."""

    reasons: list[str]  # every keep reason (order ignored), corrupt/status notes excluded
    protected: bool  # an invariant holds it: nothing may delete it
    corrupt_action: str | None = None  # on_corrupt's action when it applies
    note: str | None = None  # the corrupt/status note the plan adds


def _oracle(
    entries: Sequence[Entry], policy: Policy, now: float, awaiting: frozenset[str], targets: Mapping[str, str]
) -> dict[str, Expected]:
    """The expected reasons of every entry, run by run, straight from the requirements."""
    expected: dict[str, Expected] = {}
    runs: dict[str, list[Entry]] = {}
    for e in entries:
        runs.setdefault(e.run, []).append(e)
    for run_entries in runs.values():
        ok = [e for e in run_entries if e.status == "ok" and e.verified]
        reasons: dict[str, list[str]] = {e.path: [] for e in run_entries}
        protected: set[str] = set()
        if ok:
            newest = max(ok, key=_recency)
            reasons[newest.path].append("latest")
            protected.add(newest.path)
        if len(ok) == 1:
            reasons[ok[0].path].append("only ok checkpoint of the run")
        if policy.metric:
            scored = [e for e in ok if _value(e) is not None]
            sign = 1 if policy.mode == "min" else -1
            ranked = sorted(sorted(scored, key=_recency, reverse=True), key=lambda e: sign * (_value(e) or 0.0))
            for rank, e in enumerate(ranked[: max(policy.keep_best, 1)], start=1):
                text = f"{METRIC}={_value(e):.6g}"
                if rank == 1:
                    reasons[e.path].append(f"best {text}")
                    protected.add(e.path)
                else:
                    reasons[e.path].append(f"keep_best {rank}/{policy.keep_best} {text}")
        for rank, e in enumerate(sorted(ok, key=_recency, reverse=True)[: policy.keep_last], start=1):
            reasons[e.path].append(f"keep_last {rank}/{policy.keep_last}")
        for e in ok:
            if e.epoch is not None and e.epoch < policy.min_epoch:
                continue
            if policy.keep_every and e.epoch and e.epoch > 0 and e.epoch % policy.keep_every == 0:
                reasons[e.path].append(f"milestone epoch {e.epoch}")
            if policy.keep_every_steps and e.step and e.step > 0 and e.step % policy.keep_every_steps == 0:
                reasons[e.path].append(f"milestone step {e.step}")
            if policy.keep_within and now - e.mtime <= policy.keep_within:
                reasons[e.path].append(WITHIN_TEXT[policy.keep_within])
        for e in run_entries:
            why = reasons[e.path]
            invariants = [
                ("pinned", e.pinned),
                ("not verified yet", not e.verified or e.status is None),
                ("awaiting mirror", e.path in awaiting),
                (f"target of link {targets.get(e.path)}", e.path in targets),
            ]
            why += [text for text, holds in invariants if holds]
            held = any(holds for _t, holds in invariants) or e.path in protected or (len(ok) == 1 and e in ok)
            result = Expected(reasons=why, protected=held)
            if e.verified and e.status == "corrupt" and not (e.pinned or e.path in awaiting or e.path in targets):
                result.note = f"corrupt, on_corrupt={policy.on_corrupt}"
                if policy.on_corrupt == "keep":
                    result.protected = True
                else:
                    result.corrupt_action = policy.on_corrupt
            elif e.verified and e.status in ("unsafe", "unsupported"):
                result.note = f"status {e.status}, kept for review"
                result.protected = True
            expected[e.path] = result
    return expected


# ------------------------------------------------------------------------------------------- strategies


@st.composite
def watches(draw: st.DrawFn) -> tuple[list[Entry], frozenset[str], dict[str, str]]:
    """Several runs of random checkpoints, a random awaiting-mirror subset and random link targets."""
    entries: list[Entry] = []
    for r in range(draw(st.integers(1, 4))):
        run = f"/watch/run{r}"
        for i in range(draw(st.integers(1, 8))):
            status = draw(st.sampled_from(["ok", "ok", "ok", "ok", "corrupt", "unsafe", "unsupported", None]))
            metric = draw(
                st.one_of(
                    st.sampled_from([0.1, 0.2, 0.2, 0.5]),  # ties
                    st.sampled_from([math.nan, math.inf, -math.inf]),
                    st.floats(0, 2, allow_nan=False),
                    st.none(),  # missing
                )
            )
            entries.append(
                Entry(
                    path=f"{run}/ckpt-{i}.pt",
                    run=run,
                    status=status,
                    size=draw(st.integers(1, 1000)),
                    mtime=NOW - draw(st.integers(0, 100)) * HOUR + draw(st.sampled_from([0.0, 0.5])),
                    sha256=f"{r:02x}{i:062x}",
                    epoch=draw(st.none() | st.integers(0, 40)),
                    step=draw(st.none() | st.integers(0, 60)),
                    metrics={} if metric is None else {METRIC: metric},
                    pinned=draw(st.sampled_from([False, False, False, True])),
                    verified=status is not None and draw(st.sampled_from([True, True, True, False])),
                )
            )
    paths = [e.path for e in entries]
    awaiting = frozenset(draw(st.sets(st.sampled_from(paths), max_size=3)))
    targets = {p: f"{p.rsplit('/', 1)[0]}/link-{i}.pt" for i, p in enumerate(draw(st.sets(st.sampled_from(paths))))}
    return entries, awaiting, targets


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Entry], frozenset[str], dict[str, str], Policy]:
    """A watch and a random policy for it, max_size included: none, anywhere from 0 to more than everything, or
    often a budget that binds (between what the invariants hold and what the rules keep)."""
    entries, awaiting, targets = draw(watches())
    policy = Policy(
        keep_last=draw(st.integers(0, 6)),
        keep_best=draw(st.integers(0, 3)),
        keep_every=draw(st.sampled_from([0, 1, 5, 10])),
        keep_every_steps=draw(st.sampled_from([0, 10, 25])),
        keep_within=draw(st.sampled_from([0.0, HOUR, DAY, 3 * DAY])),
        min_epoch=draw(st.sampled_from([0, 10, 20])),
        on_corrupt=draw(st.sampled_from(["quarantine", "keep", "delete"])),
        metric=draw(st.sampled_from([None, METRIC])),
        mode=draw(st.sampled_from(["min", "max"])),
    )
    unbounded = plan(entries, policy, NOW, awaiting_mirror=awaiting, link_targets=targets).decisions
    held = sum(d.size for d in unbounded if d.action == "keep" and d.protected)
    kept = sum(d.size for d in unbounded if d.action == "keep")
    total = sum(e.size for e in entries)
    budget = draw(
        st.sampled_from(["none", "any", "binds", "binds"]).flatmap(
            lambda kind: {
                "none": st.none(),
                "any": st.integers(0, total + 100),
                "binds": st.integers(held, max(held, kept)),
            }[kind]
        )
    )
    return entries, awaiting, targets, replace(policy, max_size=budget)


# ------------------------------------------------------------------------------------------- properties


def _check(entries: list[Entry], awaiting: frozenset[str], targets: dict[str, str], policy: Policy) -> Plan:
    """Plan, and check every decision against the oracle; return the plan."""
    result = plan(entries, policy, NOW, awaiting_mirror=awaiting, link_targets=targets)
    by_path = {e.path: e for e in entries}
    decisions = {d.path: d for d in result.decisions}
    assert sorted(decisions) == sorted(by_path), "one decision for every checkpoint, and only those"
    expected = _oracle(entries, policy, NOW, awaiting, targets)
    over_budget: list[Decision] = []
    for path, d in decisions.items():
        e, want = by_path[path], expected[path]
        assert (d.run, d.size, d.sha256) == (e.run, e.size, e.sha256)
        assert d.reasons, "every decision gives at least one reason"
        if d.action == "delete" and e.status == "corrupt" and e.verified:
            assert policy.on_corrupt == "delete", "a corrupt checkpoint is deleted only when on_corrupt = delete"
        if want.protected:
            assert d.action == "keep", f"an invariant holds {path}: {want.reasons} {want.note}"
            assert d.protected
        if want.corrupt_action is not None:
            assert (d.action, d.reasons) == (want.corrupt_action, (want.note,))
            continue
        assert d.action != "quarantine", "only a corrupt checkpoint is quarantined"
        notes = [want.note] if want.note else []
        if d.reasons and MAX_SIZE_REASON.match(d.reasons[0]):
            assert d.action == "delete" and policy.max_size is not None and not want.protected
            assert sorted(d.reasons[1:]) == sorted(want.reasons + notes) and want.reasons
            over_budget.append(d)
        elif not want.reasons and not notes:
            assert (d.action, d.reasons) == ("delete", NO_RULE), "deleted exactly when no rule keeps it"
        else:
            assert d.action == "keep"
            assert sorted(d.reasons) == sorted(want.reasons + notes)
    _check_budget(result, policy, by_path, expected, over_budget)
    return result


def _check_budget(
    result: Plan, policy: Policy, by_path: dict[str, Entry], expected: dict[str, Expected], chosen: list[Decision]
) -> None:
    """max_size deletes the oldest unprotected checkpoints, only as many as it takes, or warns."""
    kept = [d for d in result.decisions if d.action == "keep"]
    kept_size = sum(d.size for d in kept)
    if policy.max_size is None:
        assert not chosen and not result.warnings
        return
    age = {p: (e.mtime, *_recency(e)) for p, e in by_path.items()}
    deletable = sorted([d.path for d in kept if not expected[d.path].protected] + [d.path for d in chosen], key=age.get)
    assert [d.path for d in sorted(chosen, key=lambda d: age[d.path])] == deletable[: len(chosen)], "oldest first"
    if chosen:
        last = max(chosen, key=lambda d: age[d.path])
        assert kept_size + last.size > policy.max_size, "it deleted no more than it had to"
    if kept_size > policy.max_size:
        assert all(expected[d.path].protected for d in kept), "an unmet budget leaves only protected checkpoints"
        assert len(result.warnings) == 1 and " cannot be met: " in result.warnings[0]
        assert result.warnings[0].startswith("max_size ")
    else:
        assert not result.warnings


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_every_decision_follows_the_rules_and_no_invariant_is_broken(
    scenario: tuple[list[Entry], frozenset[str], dict[str, str], Policy],
) -> None:
    """Random runs and policies: invariants hold, deletion only when no rule keeps it or max_size needs it."""
    entries, awaiting, targets, policy = scenario
    _check(entries, awaiting, targets, policy)


@settings(max_examples=120, deadline=None)
@given(scenarios())
def test_planning_again_after_applying_a_plan_deletes_nothing_more(
    scenario: tuple[list[Entry], frozenset[str], dict[str, str], Policy],
) -> None:
    """Applying a plan (removing what it deletes or quarantines) then planning again with the same now is a no-op."""
    entries, awaiting, targets, policy = scenario
    first = plan(entries, policy, NOW, awaiting_mirror=awaiting, link_targets=targets)
    gone = {d.path for d in first.decisions if d.action != "keep"}
    left = [e for e in entries if e.path not in gone]
    again = _check(left, awaiting - gone, {t: link for t, link in targets.items() if t not in gone}, policy)
    assert [d.path for d in again.decisions if d.action != "keep"] == []
    assert again.freed() == 0


@st.composite
def budgets(draw: st.DrawFn) -> tuple[list[Entry], int]:
    """Runs of ok checkpoints whose steps and mtimes disagree across runs, and a budget between the latests and all."""
    entries = [
        Entry(
            path=f"/watch/run{r}/ckpt-{i}.pt",
            run=f"/watch/run{r}",
            status="ok",
            size=draw(st.integers(1, 500)),
            mtime=NOW - draw(st.integers(0, 1000)) * 60.0,
            step=draw(st.none() | st.integers(0, 10_000)),
        )
        for r in range(draw(st.integers(1, 4)))
        for i in range(draw(st.integers(1, 6)))
    ]
    return entries, draw(st.integers(0, sum(e.size for e in entries)))


@settings(max_examples=150, deadline=None)
@given(budgets())
def test_max_size_deletes_the_oldest_by_mtime_first_across_runs(scenario: tuple[list[Entry], int]) -> None:
    """With every checkpoint kept by a rule, max_size deletes the oldest (by mtime) unprotected ones until it fits."""
    entries, budget = scenario
    result = _check(entries, frozenset(), {}, Policy(keep_last=100, keep_best=0, max_size=budget))
    deleted = [d for d in result.decisions if d.action == "delete"]
    assert all(MAX_SIZE_REASON.match(d.reasons[0]) for d in deleted)


@settings(max_examples=80, deadline=None)
@given(watches(), st.integers(0, 3))
def test_the_invariants_hold_under_the_harshest_policy(
    watch: tuple[list[Entry], frozenset[str], dict[str, str]], keep_best: int
) -> None:
    """Keep nothing, budget 0: every latest, best, pinned, unverified, awaited and link target still stays."""
    entries, awaiting, targets = watch
    policy = Policy(keep_last=0, keep_best=keep_best, max_size=0, metric=METRIC, on_corrupt="delete")
    result = _check(entries, awaiting, targets, policy)
    kept = {d.path for d in result.decisions if d.action == "keep"}
    for run in {e.run for e in entries}:
        ok = [e for e in entries if e.run == run and e.status == "ok" and e.verified]
        if ok:
            assert max(ok, key=_recency).path in kept
        scored = [e for e in ok if _value(e) is not None]
        if scored:
            best = min(_value(e) or 0.0 for e in scored)
            assert any(e.path in kept for e in scored if _value(e) == best)
    for e in entries:
        if e.pinned or not e.verified or e.path in awaiting or e.path in targets:
            assert e.path in kept, e


# --------------------------------------------------------------------------------- policies users write


def _run(n: int, *, run: str = "/w/exp", losses: Sequence[float] | None = None, size: int = 100) -> list[Entry]:
    """n ok checkpoints of one run, epoch i at step 100*(i+1), an hour apart, the last one an hour old."""
    return [
        Entry(
            path=f"{run}/epoch={i}.pt",
            run=run,
            status="ok",
            size=size,
            mtime=NOW - (n - i) * HOUR,
            sha256=f"{i:064x}",
            epoch=i,
            step=100 * (i + 1),
            metrics={METRIC: losses[i]} if losses else {},
        )
        for i in range(n)
    ]


def _actions(result: Plan) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{file name: (action, reasons)}."""
    return {d.path.rsplit("/", 1)[1]: (d.action, d.reasons) for d in result.decisions}


def test_keep_the_3_newest() -> None:
    """keep_last = 3 keeps the three newest (the newest also as latest) and deletes the rest, saying why."""
    result = plan(_run(6), Policy(keep_last=3, keep_best=0), NOW)
    assert _actions(result) == {
        "epoch=0.pt": ("delete", NO_RULE),
        "epoch=1.pt": ("delete", NO_RULE),
        "epoch=2.pt": ("delete", NO_RULE),
        "epoch=3.pt": ("keep", ("keep_last 3/3",)),
        "epoch=4.pt": ("keep", ("keep_last 2/3",)),
        "epoch=5.pt": ("keep", ("latest", "keep_last 1/3")),
    }
    assert result.freed() == 300 and result.warnings == []


def test_keep_the_best_k_by_a_metric() -> None:
    """keep_best = 2 by val_loss (min) keeps the two lowest losses, and the latest; a tie goes to the newer."""
    losses = [0.9, 0.3, 0.5, 0.3, 0.8, 0.7]
    result = plan(_run(6, losses=losses), Policy(keep_last=0, keep_best=2, metric=METRIC, mode="min"), NOW)
    assert _actions(result) == {
        "epoch=0.pt": ("delete", NO_RULE),
        "epoch=1.pt": ("keep", ("keep_best 2/2 val_loss=0.3",)),
        "epoch=2.pt": ("delete", NO_RULE),
        "epoch=3.pt": ("keep", ("best val_loss=0.3",)),
        "epoch=4.pt": ("delete", NO_RULE),
        "epoch=5.pt": ("keep", ("latest",)),
    }


def test_keep_the_best_by_a_metric_to_maximise_ignoring_nan_and_missing() -> None:
    """mode = max keeps the highest accuracy; NaN, Inf and a missing metric never count as best."""
    entries = _run(4)
    values: list[dict[str, float]] = [{"acc": 0.7}, {"acc": math.nan}, {"acc": math.inf}, {}]
    entries = [replace(e, metrics=m) for e, m in zip(entries, values, strict=True)]
    result = plan(entries, Policy(keep_last=0, keep_best=1, metric="acc", mode="max"), NOW)
    assert _actions(result) == {
        "epoch=0.pt": ("keep", ("best acc=0.7",)),
        "epoch=1.pt": ("delete", NO_RULE),
        "epoch=2.pt": ("delete", NO_RULE),
        "epoch=3.pt": ("keep", ("latest",)),
    }


def test_delete_epochs_below_10_except_best_and_latest() -> None:
    """min_epoch=10, keep_last=1, keep_best=1: below 10 only the best stays; from 10 milestones and within apply."""
    losses = [0.9 - 0.01 * i for i in range(25)]
    losses[4] = 0.01  # the best is an early epoch
    policy = Policy(keep_last=1, keep_best=1, keep_every=10, keep_within=DAY, min_epoch=10, metric=METRIC)
    entries = [replace(e, mtime=NOW - 60.0 * (25 - e.epoch)) for e in _run(25, losses=losses) if e.epoch]
    result = plan(entries, policy, NOW)  # every checkpoint is within 24h; epoch 0 is left out
    actions = _actions(result)
    assert actions["epoch=4.pt"] == ("keep", ("best val_loss=0.01",))
    for epoch in (1, 2, 3, 5, 6, 7, 8, 9):
        assert actions[f"epoch={epoch}.pt"] == ("delete", NO_RULE), epoch
    assert actions["epoch=10.pt"] == ("keep", ("milestone epoch 10", "within 24h"))
    assert actions["epoch=20.pt"] == ("keep", ("milestone epoch 20", "within 24h"))
    assert actions["epoch=13.pt"] == ("keep", ("within 24h",))
    assert actions["epoch=24.pt"] == ("keep", ("latest", "keep_last 1/1", "within 24h"))


def test_milestones_by_epoch_and_step_and_keep_within() -> None:
    """keep_every = 10 keeps epochs 10, 20, 30; keep_every_steps = 1000 keeps steps 1000, 2000; epoch 0 is none."""
    entries = [replace(e, mtime=NOW - 2 * DAY) for e in _run(31)]
    entries[-2] = replace(entries[-2], mtime=NOW - 30 * 60)  # epoch 29 written half an hour ago
    result = plan(
        entries, Policy(keep_last=0, keep_best=0, keep_every=10, keep_every_steps=1000, keep_within=HOUR), NOW
    )
    kept = {name: reasons for name, (action, reasons) in _actions(result).items() if action == "keep"}
    assert kept == {
        "epoch=9.pt": ("milestone step 1000",),
        "epoch=10.pt": ("milestone epoch 10",),
        "epoch=19.pt": ("milestone step 2000",),
        "epoch=20.pt": ("milestone epoch 20",),
        "epoch=29.pt": ("milestone step 3000", "within 1h"),
        "epoch=30.pt": ("latest", "milestone epoch 30"),
    }


def test_a_disk_budget_deletes_the_oldest_unprotected_checkpoints_first() -> None:
    """max_size over budget deletes the oldest checkpoints that only soft rules keep, across runs, until it fits."""
    old = _run(4, run="/w/old")  # finished days ago, at high steps
    old = [replace(e, mtime=e.mtime - 10 * DAY, step=e.step + 50_000) for e in old]
    new = _run(4, run="/w/new")
    policy = Policy(keep_last=4, keep_best=0, max_size=500)
    result = plan(old + new, policy, NOW)
    actions = {d.path: d for d in result.decisions}
    deleted = [p for p, d in actions.items() if d.action == "delete"]
    # 800 bytes kept by keep_last; the two latest are protected; the oldest of the rest go first: the old run's
    assert deleted == ["/w/old/epoch=0.pt", "/w/old/epoch=1.pt", "/w/old/epoch=2.pt"]
    assert actions["/w/old/epoch=0.pt"].reasons == ("over max_size 500B (800B kept), oldest first", "keep_last 4/4")
    assert actions["/w/old/epoch=2.pt"].reasons == ("over max_size 500B (600B kept), oldest first", "keep_last 2/4")
    assert actions["/w/old/epoch=3.pt"].reasons == ("latest", "keep_last 1/4")
    assert sum(d.size for d in result.decisions if d.action == "keep") == 500
    assert result.warnings == []


def test_an_unmet_disk_budget_warns_and_deletes_nothing_protected() -> None:
    """A budget that only protected checkpoints could meet: the unprotected go, the rest stay, with a warning."""
    entries = _run(3, losses=[0.1, 0.5, 0.6], size=1500)
    entries[1] = replace(entries[1], pinned=True)
    result = plan(entries, Policy(keep_last=3, keep_best=1, max_size=1000, metric=METRIC), NOW)
    assert _actions(result) == {
        "epoch=0.pt": ("keep", ("best val_loss=0.1", "keep_last 3/3")),
        "epoch=1.pt": ("keep", ("keep_last 2/3", "pinned")),
        "epoch=2.pt": ("keep", ("latest", "keep_last 1/3")),
    }
    assert result.warnings == [
        "max_size 1.0KB cannot be met: 4.5KB remain, all protected"
        " (latest, best, pinned, unverified or awaiting mirror)"
    ]


def test_corrupt_checkpoints_follow_on_corrupt_and_are_never_deleted_silently() -> None:
    """A corrupt checkpoint is quarantined by default, deleted or kept on request, each time with the reason."""
    entries = _run(3)
    entries[0] = replace(entries[0], status="corrupt")
    choices: tuple[OnCorrupt, ...] = ("quarantine", "delete", "keep")
    for on_corrupt in choices:
        result = plan(entries, Policy(keep_last=0, on_corrupt=on_corrupt), NOW)
        assert _actions(result)["epoch=0.pt"] == (on_corrupt, (f"corrupt, on_corrupt={on_corrupt}",))


def test_a_corrupt_checkpoint_that_an_invariant_holds_is_kept() -> None:
    """A corrupt checkpoint that is pinned, awaited by a mirror or a link's target is kept, whatever on_corrupt says."""
    entries = [replace(e, status="corrupt") for e in _run(3)]
    entries[0] = replace(entries[0], pinned=True)
    result = plan(
        entries, Policy(on_corrupt="delete"), NOW,
        awaiting_mirror=frozenset({entries[1].path}), link_targets={entries[2].path: "/w/exp/last.pt"},
    )  # fmt: skip
    assert _actions(result) == {
        "epoch=0.pt": ("keep", ("pinned",)),
        "epoch=1.pt": ("keep", ("awaiting mirror",)),
        "epoch=2.pt": ("keep", ("target of link /w/exp/last.pt",)),
    }


def test_unverified_unsafe_and_awaiting_checkpoints_are_kept_with_their_reason() -> None:
    """Not yet verified, unsafe or unsupported, awaiting a mirror: kept, each with its reason."""
    entries = _run(6)
    entries[0] = replace(entries[0], status=None, verified=False)
    entries[1] = replace(entries[1], verified=False)  # changed since it was verified
    entries[2] = replace(entries[2], status="unsafe")
    entries[3] = replace(entries[3], status="unsupported")
    result = plan(entries, Policy(keep_last=0, keep_best=0), NOW, awaiting_mirror=frozenset({entries[4].path}))
    assert _actions(result) == {
        "epoch=0.pt": ("keep", ("not verified yet",)),
        "epoch=1.pt": ("keep", ("not verified yet",)),
        "epoch=2.pt": ("keep", ("status unsafe, kept for review",)),
        "epoch=3.pt": ("keep", ("status unsupported, kept for review",)),
        "epoch=4.pt": ("keep", ("awaiting mirror",)),
        "epoch=5.pt": ("keep", ("latest",)),
    }


def test_the_only_ok_checkpoint_of_a_run_is_kept() -> None:
    """A run whose other checkpoints are corrupt keeps its one ok checkpoint, even with everything set to zero."""
    entries = _run(3)
    entries = [replace(entries[0], status="corrupt"), entries[1], replace(entries[2], status="corrupt")]
    result = plan(entries, Policy(keep_last=0, keep_best=0, max_size=0, on_corrupt="delete"), NOW)
    assert _actions(result)["epoch=1.pt"] == ("keep", ("latest", "only ok checkpoint of the run"))
    assert result.warnings and result.warnings[0].startswith("max_size 0B cannot be met: 100B remain")


def test_the_latest_is_by_step_then_epoch_then_mtime() -> None:
    """The latest is the highest step; at the same step the higher epoch (one with an epoch is newer than one
    without), then the newer mtime; a checkpoint without a step counts as older than any with one."""
    entries = _run(4)
    entries[3] = replace(entries[3], step=None, mtime=NOW)
    entries[0] = replace(entries[0], step=200, epoch=1, mtime=NOW - 10)  # same step as epoch=1.pt, newer mtime
    entries[2] = replace(entries[2], step=200, epoch=None, mtime=NOW)  # same step, no epoch, newest mtime
    result = plan(entries, Policy(keep_last=0, keep_best=0), NOW)
    assert _actions(result) == {
        "epoch=0.pt": ("keep", ("latest",)),
        "epoch=1.pt": ("delete", NO_RULE),
        "epoch=2.pt": ("delete", NO_RULE),
        "epoch=3.pt": ("delete", NO_RULE),
    }


def test_the_best_that_the_trainers_records_name_is_kept_whatever_the_policy() -> None:
    """The Trainer's best_model_checkpoint (load_best_model_at_end loads it at the end of training) is named in
    the latest checkpoint's trainer_state.json: nothing deletes it, max_size included. Only the latest's records
    count (an older checkpoint's best is history), and only a name beside it (never a path elsewhere)."""
    entries = _run(5)
    entries[4] = replace(entries[4], needs=("epoch=1.pt", "../other/epoch=0.pt"))
    entries[3] = replace(entries[3], needs=("epoch=0.pt",))
    result = plan(entries, Policy(keep_last=1, keep_best=0, max_size=0), NOW)
    actions = _actions(result)
    assert actions["epoch=1.pt"] == ("keep", ("the trainer's best (named by epoch=4.pt)",))
    assert actions["epoch=0.pt"][0] == actions["epoch=2.pt"][0] == actions["epoch=3.pt"][0] == "delete"
    assert actions["epoch=4.pt"] == ("keep", ("latest", "keep_last 1/1"))


def test_a_run_whose_trainer_rotates_its_checkpoints_is_left_to_it() -> None:
    """Once its trainer was seen deleting its own old checkpoints, a run keeps everything whatever the policy
    (max_size included): deleting beside the trainer's rotation would race it. Other runs are planned as ever."""
    rotating, other = _run(4, run="/runs/hf"), _run(4, run="/runs/other")
    result = plan([*rotating, *other], Policy(keep_last=1, keep_best=0, max_size=0), NOW,
                  rotating=frozenset({"/runs/hf"}))  # fmt: skip
    kept = {d.path: d.reasons for d in result.decisions if d.run == "/runs/hf"}
    assert kept == {e.path: ("its trainer deletes this run's old checkpoints itself",) for e in rotating}
    assert all(d.action == "keep" for d in result.decisions if d.run == "/runs/hf")
    assert [d.action for d in result.decisions if d.run == "/runs/other"].count("delete") == 3


def test_the_loops_own_names_are_never_deleted_and_twins_count_once() -> None:
    """A loop's `latest_checkpoint.pt` (full state) and `best_model.pt` (weights only) are the trainer's own names:
    kept under keep_last = 1, even when corrupt (the trainer may be writing them again). `best.pt` and
    `epoch_11.pt` hold the same bytes. Slots never count for keep_last and keep_best (their bytes go when the
    trainer writes them again): the newest name of its own is kept for them, even beside a newer good slot. The
    newest resumable checkpoint is `latest`; a newer weights-only one is kept as `latest weights`."""
    run = "/w/loop"

    def entry(name: str, **fields: object) -> Entry:
        values: dict[str, object] = {"path": f"{run}/{name}", "run": run, "status": "ok", "size": 10, "mtime": NOW,
                                     "sha256": name}  # fmt: skip
        return Entry(**(values | fields))  # type: ignore[arg-type]

    entries = [
        entry("latest_checkpoint.pt", epoch=12, resumable=True, mtime=NOW - 30, status="corrupt"),
        entry("epoch_010_checkpoint.pt", epoch=10, resumable=True, mtime=NOW - 300),
        entry("epoch_011_checkpoint.pt", epoch=11, resumable=True, mtime=NOW - 200),
        entry("best_model.pt", resumable=False, mtime=NOW),
        entry("best.pt", epoch=11, resumable=True, mtime=NOW - 100, sha256="twin", metrics={"val_loss": 0.1}),
        entry("epoch_11.pt", epoch=11, resumable=True, mtime=NOW - 200, sha256="twin", metrics={"val_loss": 0.1}),
    ]
    result = plan(entries, Policy(keep_last=1, keep_best=1, metric="val_loss", on_corrupt="delete"), NOW)
    actions = _actions(result)
    slot = "the trainer's own name (rewritten in place)"
    assert actions["latest_checkpoint.pt"] == ("keep", (slot,))  # corrupt, but never moved
    assert actions["best_model.pt"] == ("keep", (slot,))  # no epoch: older than any with one
    assert actions["epoch_11.pt"] == ("keep", ("latest", "best val_loss=0.1", "keep_last 1/1"))
    assert actions["best.pt"] == ("keep", (slot,))
    assert actions["epoch_010_checkpoint.pt"] == actions["epoch_011_checkpoint.pt"] == ("delete", NO_RULE)
    rewritten = [entry("latest_checkpoint.pt", epoch=12, resumable=True, mtime=NOW - 30), *entries[1:]]
    actions = _actions(plan(rewritten, Policy(keep_last=1, keep_best=1, metric="val_loss"), NOW))
    assert actions["latest_checkpoint.pt"] == ("keep", (slot,))
    assert actions["epoch_11.pt"] == ("keep", ("latest", "best val_loss=0.1", "keep_last 1/1"))  # survives a crash
    final = entry("final_weights_13.pt", epoch=13, resumable=False)  # torchtitan's last_model_only save
    actions = _actions(plan([*entries, final], Policy(keep_last=0, keep_best=0), NOW))
    assert actions["final_weights_13.pt"] == ("keep", ("latest weights",))
    assert actions["epoch_11.pt"] == ("keep", ("latest",))
    assert actions["best.pt"] == ("keep", (slot,))


def test_what_max_size_may_delete_is_decided_by_typed_invariants_not_by_reason_text() -> None:
    """Each decision carries its invariants as values; `protected` reads only them. Under a max_size that
    nothing fits, the latest and the best stay (LATEST, BEST), the second best and the second newest go."""
    from ckptd.retention import Invariant

    def entry(name: str, step: int, loss: float) -> Entry:
        return Entry(path=f"/w/r/{name}", run="/w/r", status="ok", size=10, mtime=NOW - 1000 + step, step=step,
                     sha256=name, resumable=True, metrics={"val_loss": loss})  # fmt: skip

    entries = [entry("a.pt", 1, 0.1), entry("b.pt", 2, 0.2), entry("c.pt", 3, 0.5), entry("d.pt", 4, 0.9)]
    policy = Policy(keep_last=2, keep_best=2, metric="val_loss", max_size=1)
    by_name = {d.path.rpartition("/")[2]: d for d in plan(entries, policy, NOW).decisions}
    assert by_name["d.pt"].invariants == {Invariant.LATEST} and by_name["d.pt"].action == "keep"
    assert by_name["a.pt"].invariants == {Invariant.BEST} and by_name["a.pt"].action == "keep"
    assert by_name["b.pt"].action == by_name["c.pt"].action == "delete"  # keep_best 2/2 and keep_last 2/2: soft
    reworded = by_name["b.pt"]._replace(reasons=("best val_loss=0.2 (reworded)",), action="keep")
    assert not reworded.protected  # no text makes a decision protected


def test_a_disk_below_min_free_deletes_the_oldest_soft_kept_first_never_an_invariant() -> None:
    """free_deficit (measured by the caller) deletes the oldest checkpoints that only soft rules keep until
    that many bytes are planned free; latest and best stay even when the deficit is larger than the rest."""

    def entry(name: str, step: int, loss: float) -> Entry:
        return Entry(path=f"/w/r/{name}", run="/w/r", status="ok", size=100, mtime=NOW - 1000 + step, step=step,
                     sha256=name, resumable=True, metrics={"val_loss": loss})  # fmt: skip

    entries = [entry(f"s{i}.pt", i, loss) for i, loss in enumerate((0.1, 0.5, 0.4, 0.3, 0.2), start=1)]
    policy = Policy(keep_last=10, keep_best=1, metric="val_loss", free_deficit=150)
    actions = {d.path.rpartition("/")[2]: (d.action, d.reasons[0]) for d in plan(entries, policy, NOW).decisions}
    assert [n for n, (a, _) in sorted(actions.items()) if a == "delete"] == ["s2.pt", "s3.pt"]  # oldest, 200 >= 150
    assert actions["s2.pt"][1].startswith("disk below min_free by 150B")
    huge = plan(entries, Policy(keep_last=10, keep_best=1, metric="val_loss", free_deficit=10_000), NOW)
    kept = sorted(d.path.rpartition("/")[2] for d in huge.decisions if d.action == "keep")
    assert kept == ["s1.pt", "s5.pt"] and huge.warnings and "cannot be met" in huge.warnings[0]
