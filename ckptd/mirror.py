"""Mirroring best and latest checkpoints to backup targets, proving every copy, and bringing them back.

Layout on a target: `<watch>/<run path relative to the watched folder>/<checkpoint>` with its sidecar beside
it, and per run an `index.json` listing every copy the target holds for the run (roles, step, epoch, sha256,
when copied) and naming the mirror's best and latest. The checkpoint goes first, its sidecar second,
`index.json` last: a sidecar on a target means its checkpoint is complete there.

Mirror history (render_index): local selection decides the mirror's best and latest, except that it never
moves a role from a copy whose local checkpoint rotted to a worse or older one: after the local best rots, or
a save that crashed half-way truncates the local latest, the target's good copy keeps the role until a
better or newer copy is proved there. A copy leaves the target only once superseded (it holds no role there
and local selection moved its role on), beyond the newest `keep_superseded`, and only while its local
checkpoint is intact or was deleted (by the user, retention, the trainer's own rotation): a copy whose local
checkpoint rotted (corrupt, quarantined) is held for good, since it may be the only good one.

What to copy is queued in the catalog (`mirror_queue`), so a restart picks it up; a failed copy is retried
with backoff and never blocks verification; retention keeps a checkpoint while it is queued. The queue is
derived, not remembered: `recheck` (the daemon's mirror thread after every reconciliation, `ckptd mirror`,
`mirror --verify`) compares the copies each target should hold (wanted now, proved there) with a listing of the
target and queues what it lost again; a lost index.json is rebuilt from the sidecars of the copies held; copies
a pass killed between rewriting index.json and deleting superseded copies left unlisted (orphans) are deleted,
only this machine's and only superseded ones; `Target.sweep` removes temp files and incomplete uploads.
`roles_for`, `local_state`, `clean_index`, `render_index`, `ranked_copies`, `choose_copy`, `copy_label`,
`wanted_copies`, `held_copies`, `lost_copies`, `orphans` and `rebuilt_index` are pure; the rest drives targets
and the catalog.

A target is untrusted storage. Every name read from one (index entries, superseded lists, listings) is
checked to be one plain file name (untrusted.component) before it is used; a target may only have deleted
what this machine copied there for the same run; a copy is proved against the SHA-256 in this machine's
catalog wherever the catalog knows it, not only against the target's own sidecar and index (which whoever
can write the target can rewrite together); and `restore` writes only inside its `--to` folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from ckptd import delete, layouts, log, selection, sidecar
from ckptd.catalog import Catalog, Row
from ckptd.config import Config, WatchConfig
from ckptd.discover import directory_digest
from ckptd.fsutil import fsync_dir, open_confined, sha256_fd, temp_name
from ckptd.layouts import nshtrainer
from ckptd.mirrors import IntegrityError, MirrorError, NotFound, Progress, Target, make_target
from ckptd.model import Entry
from ckptd.untrusted import UntrustedInput, component, load_json, relative

if TYPE_CHECKING:
    from ckptd.progress import Tracker

INDEX = "index.json"
_BESIDE = sidecar.Store()
INDEX_SCHEMA = 2  # 2: every copy held, with `was` and `local`; version 1 indexes are still read (clean_index)
MAX_BACKOFF = 3600.0
COMPANION_MAX = 16 << 20  # a producer's record beside a checkpoint (nshtrainer's is ~350 KB)
COPY_PROGRESS_EVERY = 10.0  # seconds between `mirror copy progress` lines of one long copy


# ------------------------------------------------------------------------------------------ pure planning


def roles_for(entries: Iterable[Entry], what: Iterable[str], metric: str | None, mode: selection.Mode,
              milestone_every: int = 0) -> dict[str, list[str]]:  # fmt: skip
    """Which of a run's checkpoints a mirror rule copies, each with its roles (best, latest, milestone, all).
    Latest is the newest checkpoint training can resume from (the newest of all in a run of weights only); best,
    by the metric or else the trainer's own best file (see ckptd.selection)."""
    ok = selection.usable(entries)
    roles: dict[str, list[str]] = {}
    wanted = set(what)
    if "all" in wanted:  # every checkpoint includes the best and latest: the index names them (restore --latest)
        wanted |= {"best", "latest"}
    # The newest a run can resume from; in a run of weights only, the newest of those: still what to back up.
    if "latest" in wanted and (newest := selection.latest(ok) or selection.latest(ok, weights=True)) is not None:
        roles.setdefault(newest.path, []).append("latest")
    if "best" in wanted and (top := selection.best(ok, metric, mode)) is not None:  # or the trainer's best slot
        roles.setdefault(top.path, []).append("best")
    if "milestones" in wanted and milestone_every:
        for entry in ok:
            if entry.epoch and entry.epoch % milestone_every == 0:
                roles.setdefault(entry.path, []).append("milestone")
    if "all" in wanted:
        for entry in ok:
            roles.setdefault(entry.path, []).append("all")
    return roles


def run_key(watch: WatchConfig, run: str) -> str:
    """The target folder of a run: `<watch>/<run relative to the watched folder>`."""
    relative = Path(run).relative_to(watch.path).as_posix()
    return watch.name if relative == "." else f"{watch.name}/{relative}"


LocalState = Literal["intact", "gone", "replaced", "rotted"]
_RELEASED = frozenset({"intact", "gone", "replaced"})  # a copy of such a source may leave once superseded
_ROLES = ("best", "latest", "milestone", "all")
_KEPT = frozenset({"milestone", "all"})  # copies made for these roles are never superseded
_ALONE = frozenset({"rotted", "replaced"})  # no good local copy left: the target's keeps its roles (ranked_copies)
_POINTER = ("name", "sha256", "step", "epoch", "metrics")


def local_state(row: Row | None, sha256: object) -> LocalState:
    """What became of the local checkpoint a copy with `sha256` was made from, by its catalog row (None: none).

    "intact": still there, ok, the same bytes. "gone": deleted while ok (by the user, by retention, by the
    trainer's own rotation, renamed by migrate), or never known here. "replaced": the name holds another ok
    checkpoint now (a slot such as last.ckpt saved again). "rotted": found not ok: bit rot caught by scrub, a
    save that crashed half-way through rewriting it in place, quarantined. A copy of a rotted checkpoint is
    never deleted from a target: it may be the only good one there is.
    """
    if row is None or row.kind == "link":
        return "gone"
    if row.status != "ok":
        return "rotted"
    if row.sha256 != sha256:
        return "replaced"
    return "gone" if row.gone_at is not None else "intact"


def _roles(entry: Mapping[str, Any] | None, key: str = "roles") -> list[str]:
    value = (entry or {}).get(key)
    return sorted({r for r in value if r in _ROLES}) if isinstance(value, list) else []


def _was(entry: Mapping[str, Any]) -> list[str]:
    """The roles a copy has ever been mirrored for (its current ones in an index written before `was`)."""
    return _roles(entry, "was") or _roles(entry)


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _clean_copy(entry: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One entry of an index (a copy, or the best or latest pointer) with every field of the type ckptd writes;
    anything else is left out, so a hostile index cannot make sorting or comparing fail."""
    clean: dict[str, Any] = {"name": name}
    if isinstance(entry.get("sha256"), str):
        clean["sha256"] = entry["sha256"]
    clean["step"], clean["epoch"] = _number(entry.get("step")), _number(entry.get("epoch"))
    metrics = entry.get("metrics")
    clean["metrics"] = {
        str(k): v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    } if isinstance(metrics, dict) else {}  # fmt: skip
    if _number(entry.get("size_bytes")) is not None:
        clean["size_bytes"] = entry["size_bytes"]
    if isinstance(entry.get("resumable"), bool):
        clean["resumable"] = entry["resumable"]
    clean["roles"], clean["was"] = _roles(entry), _roles(entry, "was")
    if isinstance(entry.get("mirrored_at"), str):
        clean["mirrored_at"] = entry["mirrored_at"]
    if entry.get("local") in ("intact", "gone", "replaced", "rotted"):
        clean["local"] = entry["local"]
    return clean


def clean_index(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """A run's index as read from a target, with every name that is not one plain file name dropped.

    Returns the index (copies, best, latest, superseded; anything malformed left out) and the refused names.
    A hostile index naming `../exp2/best.ckpt` or `/etc/passwd` can then neither be restored nor deleted.
    An index written before schema 2 (copies without `was`) is read as one: each copy's `was` is the roles it
    was copied for plus the pointers naming it, and its current roles only what the pointers say.
    """
    refused: list[str] = []

    def name_of(value: Any) -> str | None:
        try:
            return component(value, what="a name in index.json")
        except UntrustedInput:
            refused.append(repr(value)[:200])
            return None

    body: dict[str, Any] = raw if isinstance(raw, dict) else {}
    copies: dict[Any, Any] = body["copies"] if isinstance(body.get("copies"), dict) else {}
    index: dict[str, Any] = {
        "schema_version": INDEX_SCHEMA, "run": body.get("run") if isinstance(body.get("run"), str) else None,
        "copies": {n: _clean_copy(c, n) for k, c in copies.items() if (n := name_of(k)) and isinstance(c, dict)},
        "superseded": [n for v in body.get("superseded") or [] if (n := name_of(v))]
        if isinstance(body.get("superseded"), list) else [],
    }  # fmt: skip
    for role in ("best", "latest"):
        entry = body.get(role)
        named = name_of(entry.get("name")) if isinstance(entry, dict) else None
        pointer = _clean_copy(entry, named) if isinstance(entry, dict) and named else None
        index[role] = {k: pointer[k] for k in _POINTER if k in pointer} if pointer else None
    for key, raw_copy in copies.items():
        copy = index["copies"].get(key) if isinstance(key, str) and isinstance(raw_copy, dict) else None
        if copy is not None and "was" not in raw_copy:  # schema 1: `roles` were what it was copied for, kept after
            pointed = [r for r in ("best", "latest") if (index[r] or {}).get("name") == key]
            copy["was"] = sorted({*copy["roles"], *pointed})
            copy["roles"] = sorted({*(set(copy["roles"]) & _KEPT), *pointed})
    return index, refused


def _recency(entry: Mapping[str, Any]) -> tuple[int, int]:
    step, epoch = _number(entry.get("step")), _number(entry.get("epoch"))
    return (step if step is not None else -1, epoch if epoch is not None else -1)


def _best_key(entry: Mapping[str, Any], metric: str | None, mode: selection.Mode) -> tuple[Any, ...]:
    value = (entry.get("metrics") or {}).get(metric) if metric else None
    finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    score = float(value) * (-1.0 if mode == "min" else 1.0) if finite and value is not None else 0.0
    return (finite, score, "best" in _roles(entry), _recency(entry), str(entry.get("mirrored_at", "")))


def _latest_key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return (entry.get("resumable") is not False, _recency(entry), "latest" in _roles(entry),
            "latest" in _was(entry), str(entry.get("mirrored_at", "")))  # fmt: skip


def ranked_copies(copies: Mapping[str, Mapping[str, Any]], role: str, metric: str | None = None,
                  mode: selection.Mode = "min") -> list[str]:  # fmt: skip
    """The names of the copies that may hold `role` (best or latest) on a target, the one that holds it first.

    They are the copy local selection names for the role (its `roles`) and every copy ever mirrored for the
    role whose local checkpoint rotted or was overwritten (`local` "rotted" or "replaced"; the target's copy
    is then the only good one): local selection decides, except that it never moves a role from such a copy
    to a worse or older one. latest: newest first (one training can resume from before a weights-only one,
    then by step, then epoch as selection.recency, then the one local selection names). best: by `metric` and
    `mode` (a copy without a finite value last), then the one local selection names, then the newest.
    """
    eligible = [n for n, c in copies.items() if role in _roles(c) or (role in _was(c) and c.get("local") in _ALONE)]
    if role == "best":
        return sorted(eligible, key=lambda n: (_best_key(copies[n], metric, mode), n), reverse=True)
    return sorted(eligible, key=lambda n: (_latest_key(copies[n]), n), reverse=True)


def _active(index: Mapping[str, Any], copies: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The copies that hold a role: the mirror's best and latest, and those local selection names best or
    latest; in that order."""
    named = [(index.get(r) or {}).get("name") for r in ("best", "latest")]
    chosen = [n for n, c in copies.items() if {"best", "latest"} & set(_roles(c))]
    return [n for n in dict.fromkeys([*named, *chosen]) if isinstance(n, str) and n in copies]


def render_index(previous: Mapping[str, Any] | None, *, run: str, copy: Mapping[str, Any], roles: list[str],
                 keep_superseded: int, now: float, ours: frozenset[str] | None = None,
                 local: Mapping[str, LocalState] | None = None, metric: str | None = None,
                 mode: selection.Mode = "min") -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The run's new index.json after `copy` (name, sha256, metrics, step, epoch) is proved on the target for
    `roles` (what local selection names it now); pure: every input is an argument.

    `previous` is the index as clean_index left it. Every copy the target holds stays listed with the roles
    local selection last gave it (`roles`), every role it was ever mirrored for (`was`), and what became of
    its local checkpoint (`local`, from `local`: local_state per copy name; missing counts as intact). The
    mirror's best and latest: ranked_copies, by `metric` and `mode` (local selection's, unless a copy whose
    local checkpoint rotted or was overwritten is better or newer). A copy that holds no role any more is
    superseded. Returns
    the index and the copies to delete from the target: superseded ones beyond the newest `keep_superseded`,
    only those whose local checkpoint is intact, gone or replaced (never rotted: such a copy is held), and
    only those in `ours` (what this machine copied there for this run; None for all). Copies made as
    milestones or for `all` are never superseded.
    """
    before: Mapping[str, Any] = previous or {}
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    copies = {n: dict(c) for n, c in (before.get("copies") or {}).items()}
    superseded = [n for n in before.get("superseded") or [] if n in copies]
    active_before = _active(before, copies)
    name, wanted = copy["name"], sorted(set(roles) & set(_ROLES))
    old = copies.get(name)
    same = old is not None and old.get("sha256") == copy.get("sha256")  # else a new version of the name
    for role in ("best", "latest"):  # local selection names one best and one latest
        if role in wanted:
            for other, entry in copies.items():
                if other != name and role in _roles(entry):
                    entry["roles"] = [r for r in _roles(entry) if r != role]
    copies[name] = {
        **copy, "roles": wanted, "was": sorted({*wanted, *(_was(old) if old and same else [])}),
        "mirrored_at": old["mirrored_at"] if old and same and isinstance(old.get("mirrored_at"), str) else stamp,
    }  # fmt: skip
    states: dict[str, LocalState] = {n: (local or {}).get(n, "intact") for n in copies}
    if local is not None:
        for n, entry in copies.items():
            entry["local"] = states[n]
    index: dict[str, Any] = {"schema_version": INDEX_SCHEMA, "run": run}
    for role in ("best", "latest"):
        order = ranked_copies(copies, role, metric, mode)
        index[role] = {k: copies[order[0]][k] for k in _POINTER if k in copies[order[0]]} if order else None
    active = _active(index, copies)
    for n in active_before:
        if n in copies and n not in active and n not in superseded and not set(_roles(copies[n])) & _KEPT:
            superseded.append(n)
    superseded = [n for n in superseded if n not in active]
    deletable = [n for n in superseded if states[n] in _RELEASED and (ours is None or n in ours)
                 and not set(_roles(copies[n])) & _KEPT]  # fmt: skip
    doomed = deletable[: max(0, len(deletable) - keep_superseded)]
    for n in doomed:
        copies.pop(n)
    index.update(copies=copies, superseded=[n for n in superseded if n not in doomed], updated_at=stamp)
    return index, doomed


def choose_copy(index: Mapping[str, Any], *, role: str | None = None, step: int | None = None,
                sha256: str | None = None) -> tuple[str, Mapping[str, Any]]:  # fmt: skip
    """Which copy `restore` fetches from a cleaned index, as (name, entry naming its sha256).

    `role` "best" or "latest": the mirror's best or latest (see ranked_copies); else the copy at global step
    `step`, or the one whose SHA-256 starts with `sha256`, whatever its roles. Raises NotFound when none is,
    and when `step` or `sha256` fit copies of different bytes (say which with a longer --sha256).
    """
    if role is not None:
        chosen = index.get(role)
        if not chosen:
            raise NotFound(f"the index names no {role} checkpoint")
        return str(chosen["name"]), chosen
    copies: Mapping[str, Mapping[str, Any]] = index.get("copies") or {}
    order = sorted(copies, key=lambda n: (_latest_key(copies[n]), n), reverse=True)
    if step is not None:
        found, what = [n for n in order if _number(copies[n].get("step")) == step], f"at step {step}"
    else:
        prefix = (sha256 or "").lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise NotFound(f"--sha256 takes a hex prefix of a copy's SHA-256, not {sha256!r}")
        found = [n for n in order if str(copies[n].get("sha256", "")).startswith(prefix)]
        what = f"whose sha256 starts with {prefix}"
    if not found:
        raise NotFound(f"no copy {what}")
    if len({copies[n].get("sha256") for n in found}) > 1:
        several = ", ".join(f"{n} (sha256 {str(copies[n].get('sha256'))[:16]})" for n in found)
        raise NotFound(f"several copies {what}: {several}; choose one with --sha256")
    return found[0], copies[found[0]]


def copy_label(index: Mapping[str, Any], name: str) -> str:
    """How `ckptd ls` labels a copy: the roles the index itself gives it; pure.

    "best" and "latest" only for the copies the mirror's pointers name (one of each: what `restore --best` and
    `--latest` fetch); "milestone" and "all" for copies kept for those; "run's best" or "run's latest" for the
    copy local selection names so while the mirror keeps another (a better or newer good copy, whose local
    checkpoint rotted); else "superseded" (listed so) or "-".
    """
    copy = (index.get("copies") or {}).get(name) or {}
    pointed = [r for r in ("best", "latest") if (index.get(r) or {}).get("name") == name]
    kept = [r for r in _roles(copy) if r in _KEPT]
    elsewhere = [f"run's {r}" for r in ("best", "latest") if r in _roles(copy) and r not in pointed]
    return ",".join([*pointed, *kept, *elsewhere]) or ("superseded" if name in index.get("superseded", []) else "-")


def wanted_copies(entries: Iterable[Entry], watch: WatchConfig) -> dict[str, tuple[list[str], str]]:
    """What the watch's mirror rule wants every target to hold of one run: {path: (roles, sha256)} (roles_for)."""
    if watch.mirror is None:
        return {}
    known = list(entries)
    wanted = roles_for(
        known, watch.mirror.what, watch.metric.name if watch.metric else None,
        watch.metric.mode if watch.metric else "min", watch.retention.keep_every if watch.retention else 0,
    )  # fmt: skip
    by_path = {e.path: e for e in known}
    return {path: (roles, by_path[path].sha256 or "") for path, roles in wanted.items()}


def held_copies(keys: Iterable[str], prefix: str) -> set[str]:
    """The copies a run folder on a target holds whole, by a listing of its keys: each name that is a file or
    a folder of files with its sidecar beside it (written last, so the copy is complete). Names that are not
    one plain file name (a hostile listing) are left out."""
    children: set[str] = set()
    for key in keys:
        first = key.removeprefix(f"{prefix}/").split("/", 1)[0] if key.startswith(f"{prefix}/") else ""
        with contextlib.suppress(UntrustedInput):
            children.add(component(first, what="a name on the target"))
    return {c for c in children if c != INDEX and not c.endswith(sidecar.SIDECAR_SUFFIX)
            and sidecar.sidecar_name(c) in children}  # fmt: skip


def rebuilt_index(run: str, copies: Mapping[str, Mapping[str, Any]], *, roles: Mapping[str, list[str]],
                  was: Mapping[str, list[str]], local: Mapping[str, LocalState], now: float,
                  metric: str | None = None, mode: selection.Mode = "min") -> dict[str, Any]:  # fmt: skip
    """A run's index.json made again from the copies the target holds (`copies`: name to what its sidecar on
    the target says: sha256, step, epoch, metrics...) after the index was lost; pure.

    Each copy gets the roles local selection gives it now (`roles`: only where the catalog wants these very
    bytes there), every role this machine ever mirrored it for (`was`, from the catalog; a milestone or `all`
    copy stays one), and what became of its local checkpoint (`local`). The mirror's best and latest are then
    ranked as render_index ranks them, so a copy of a rotted best keeps its role. Every other copy is listed as
    superseded, oldest first, for render_index to keep or delete by its rules (a copy this machine did not
    make is never deleted).
    """
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    held: dict[str, dict[str, Any]] = {}
    for name, found in copies.items():
        entry = _clean_copy(found, name)
        kept = set(was.get(name, [])) & _KEPT
        entry["roles"] = sorted((set(roles.get(name, [])) | kept) & set(_ROLES))
        entry["was"] = sorted((set(was.get(name, [])) | set(entry["roles"])) & set(_ROLES))
        entry["local"] = local.get(name, "intact")
        held[name] = entry
    index: dict[str, Any] = {"schema_version": INDEX_SCHEMA, "run": run}
    for role in ("best", "latest"):
        order = ranked_copies(held, role, metric, mode)
        index[role] = {k: held[order[0]][k] for k in _POINTER if k in held[order[0]]} if order else None
    active = _active(index, held)
    idle = [n for n in held if n not in active and not set(held[n]["roles"]) & _KEPT]
    index.update(copies=held, superseded=sorted(idle, key=lambda n: (_recency(held[n]), n)), updated_at=stamp)
    return index


def lost_copies(wanted: Mapping[str, str], held: Set[str], index: Mapping[str, Any] | None) -> list[str]:
    """The copies (name to sha256) the catalog says a run folder holds that it does not hold as they were made:
    missing, missing their sidecar, or not named by the run's index with that sha256. Pure."""
    listed: Mapping[str, Mapping[str, Any]] = (index or {}).get("copies") or {}
    return sorted(n for n, sha in wanted.items() if n not in held or listed.get(n, {}).get("sha256") != sha)


def orphans(held: Set[str], index: Mapping[str, Any], *, proved: Mapping[str, Mapping[str, list[str]]],
            wanted: Set[str], local: Mapping[str, LocalState],
            stored: Mapping[str, str | None]) -> list[str]:  # fmt: skip
    """The copies in a run folder that a pass killed between rewriting index.json and deleting superseded
    copies left behind (or whose deletion failed), to delete now; pure.

    A copy is one only when all of these hold: the run's index (read, not rebuilt) does not list it; this
    machine proved these very bytes there (`proved`: name to {sha256: roles it was copied for}; `stored`: the
    sha256 its sidecar on the target says, None when unreadable); local selection no longer wants it; its
    local checkpoint is intact, gone or replaced (never rotted: it may be the only good copy); it was never
    a milestone or `all` copy; and for every role it was copied for the index names a successor that the
    folder holds. A copy another machine made is never one, listed or not.
    """
    listed = (index.get("copies") or {}).keys()
    succeeded = {r for r in ("best", "latest") if (index.get(r) or {}).get("name") in held}
    found = []
    for name in sorted(held - set(listed) - set(wanted)):
        sha = stored.get(name)
        copied_for = proved.get(name, {}).get(sha) if sha else None
        if copied_for is None or local.get(name) not in _RELEASED or set(copied_for) & _KEPT:
            continue
        if set(copied_for) <= succeeded:
            found.append(name)
    return found


# ------------------------------------------------------------------------------------------------ queueing


def enqueue_run(catalog: Catalog, config: Config, watch: WatchConfig, run: str, now: float,
                entries: Iterable[Entry] | None = None) -> int:  # fmt: skip
    """Queue the run's checkpoints that its mirror rule copies; drop queued ones it no longer wants. `entries`:
    the run's checkpoints when the caller has just read them (the record step), else read here."""
    if watch.mirror is None:
        return 0
    if entries is None:
        entries = (r.entry() for r in catalog.in_run(run) if r.kind != "link")
    current = wanted_copies(entries, watch)
    queued = 0
    for target in watch.mirror.to:
        queued += catalog.sync_mirror_queue(target=target, watch=watch.name, run=run, wanted=current, now=now)
    return queued


# ------------------------------------------------------------------------------------------------- copying


@dataclass
class MirrorReport:
    """What one mirror pass did."""

    copied: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # --dry-run: what would be copied
    repaired: list[str] = field(default_factory=list)
    checked: int = 0


def targets_of(config: Config, broken: dict[str, str] | None = None) -> dict[str, Target]:
    """Every configured target that can be built, by URL scheme. One that cannot (boto3 missing, a folder it
    may not create) is left out with why in `broken` (when given): it never stops the others."""
    targets: dict[str, Target] = {}
    for name, settings in config.mirror.items():
        try:
            targets[name] = make_target(name, settings, config.source.parent, node=config.daemon.node)
        except Exception as exc:  # whatever it is, it concerns this target alone
            if broken is None:
                raise
            broken[name] = str(exc) or type(exc).__name__
    return targets


def _files_of(checkpoint: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of each file to copy: the file itself, or every file of a directory checkpoint."""
    if not checkpoint.is_dir():
        return [(checkpoint.name, checkpoint)]
    from ckptd.discover import directory_files

    return [(f"{checkpoint.name}/{rel}", checkpoint / rel) for rel in directory_files(checkpoint)]


def _sidecar_bytes(store: sidecar.Store, root: Path, checkpoint: Path) -> bytes:
    """The bytes of a checkpoint's sidecar: from the state folder, or from beside it through no link."""
    where = store.path_of(checkpoint)
    if where is None:
        raise FileNotFoundError(f"{checkpoint} has no sidecar")
    fd = open_confined(root, where) if where.is_relative_to(root) else os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, sidecar.MAX_SIDECAR_BYTES + 1)
    finally:
        os.close(fd)


def copy_checkpoint(target: Target, key_prefix: str, checkpoint: Path, found: sidecar.Sidecar, root: Path,
                    store: sidecar.Store = _BESIDE, progress: Progress | None = None) -> None:  # fmt: skip
    """Copy one checkpoint, then its sidecar, proving each file against the sidecar's hashes.

    Every local file is opened from the watched folder `root` down without following a link (a run folder
    swapped for a link to root's files is never read, so never uploaded). Raises IntegrityError (a copy did
    not match, or the local file changed) or MirrorError.
    """
    record = found.verification
    # Fix: read the sidecar before the upload, and a missing one is a failed copy: read after it, a sidecar
    # removed meanwhile (the checkpoint deleted by save_top_k) raised FileNotFoundError out of mirror_pass and
    # left the uploaded checkpoint on the target without sidecar or index entry.
    try:
        sidecar_data = _sidecar_bytes(store, root, checkpoint)
        files = _files_of(checkpoint)
    except (OSError, ValueError) as exc:
        raise MirrorError(f"{checkpoint}: {exc}") from exc
    if not files:  # a directory checkpoint removed meanwhile: never a sidecar without its checkpoint
        raise MirrorError(f"{checkpoint}: no files to copy (deleted?)")
    for name, path in files:
        expected = record.sha256 if not record.is_directory else (record.files or {}).get(name.split("/", 1)[1])
        if expected is None:
            raise IntegrityError(f"{path}: not in its sidecar; it changed since it was verified")
        try:
            fd = open_confined(root, path)
        except (OSError, ValueError) as exc:
            raise MirrorError(f"{path}: {exc}") from exc
        try:  # the backend opens this path again: /proc/self/fd/N is the very file opened here
            _put_with_retries(target, f"{key_prefix}/{name}", Path(f"/proc/self/fd/{fd}"), expected, progress)
        finally:
            os.close(fd)
    for companion in layouts.companions(checkpoint):  # a producer's record of it goes along (nshtrainer)
        try:
            fd = open_confined(root, checkpoint.with_name(companion))
        except (OSError, ValueError):
            continue  # not written yet, or no regular file: the checkpoint is whole without it
        try:
            data = os.read(fd, COMPANION_MAX + 1)
        finally:
            os.close(fd)
        if len(data) <= COMPANION_MAX:
            target.put_bytes(f"{key_prefix}/{companion}", data)
    target.put_bytes(f"{key_prefix}/{sidecar.sidecar_name(checkpoint.name)}", sidecar_data)


@retry(
    retry=retry_if_exception_type(IntegrityError),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.5, max=5),
    reraise=True,
)
def _put_with_retries(target: Target, key: str, path: Path, sha256: str, progress: Progress | None = None) -> None:
    """A mismatch is retried at once a few times (a flaky link); target outages back off in the queue."""
    target.put_file(key, path, sha256=sha256, progress=progress)


class CopyProgress:
    """Logs a long copy as it goes: `mirror copy progress` every COPY_PROGRESS_EVERY seconds (a 50 GB checkpoint
    to a slow store takes minutes, which would otherwise be silence between `started` and `mirrored`), and
    passes each count on to `also` (a terminal's progress bar, for `ckptd mirror`)."""

    def __init__(self, logger: Any, *, path: Path, target: str, total: int, also: Progress | None = None) -> None:
        self.logger, self.path, self.target, self.total, self.also = logger, path, target, total, also
        self.done = 0
        self.started = self.said = time.monotonic()

    def __call__(self, count: int) -> None:
        self.done += count
        if self.also is not None:
            self.also(count)
        now = time.monotonic()
        if now - self.said >= COPY_PROGRESS_EVERY:
            self.said = now
            rate = self.done / max(now - self.started, 1e-9)
            self.logger.info("mirror copy progress", path=str(self.path), target=self.target, bytes_done=self.done,
                             bytes=self.total, mb_per_s=round(rate / 1e6, 1),
                             eta_s=round((self.total - self.done) / rate) if rate > 0 else None)  # fmt: skip


def mirror_pass(config: Config, catalog: Catalog, targets: Mapping[str, Target], *, dry_run: bool = False,
                now: Callable[[], float] = time.time, due_only: bool = True,
                stop: Callable[[], bool] = lambda: False,
                standby: Callable[[], Set[str]] = frozenset,
                on_copy: Callable[[str, float, bool], None] | None = None,
                progress: Tracker | None = None) -> MirrorReport:  # fmt: skip
    """Copy every queued checkpoint that is due, target by target; a failing target never stops the others.

    `stop` is asked between copies, so a daemon shutting down does not start another one. Watches in `standby`
    (their folder owned by another daemon: ckptd.lease) are left to that daemon. `on_copy(target, seconds, ok)`
    hears of each copy made or failed (the daemon's metrics). `progress` (a terminal's) is told of each copy and
    its bytes; every copy is logged as it starts and, when long, as it goes (CopyProgress), with or without it.
    """
    logger = log.get("ckptd.mirror")
    report = MirrorReport()
    store = sidecar.store_of(config)
    due = catalog.mirror_due(now() if due_only else None)
    if progress is not None and not dry_run:
        from ckptd.progress import size_of

        sizes = {str(item["path"]): size_of(Path(item["path"])) for item in due}
        progress.plan(len(due), sum(sizes.values()), "copies")
    for item in due:
        if stop():
            break
        shown = None  # a terminal's bar for this item: every item planned is started, a skipped one reads nothing
        if progress is not None and not dry_run:
            path = Path(item["path"])
            shown = progress.start(path.name, sizes[str(path)], f"copy to {item['target']}")
        if item["watch"] in standby():
            continue
        watch = config.watch_named(item["watch"])
        target = targets.get(item["target"])
        path = Path(item["path"])
        if watch is None or target is None:
            continue
        found = store.read(path)
        if found is None or found.verification.sha256 != item["sha256"] or not path.exists():
            catalog.mirror_finish(item, state="dropped", now=now(), error="changed or gone before it was copied")
            report.dropped.append(str(path))
            continue
        if dry_run:
            report.pending.append(f"{path} -> {target.name}")
            continue
        prefix = run_key(watch, item["run"])
        started = time.monotonic()
        try:
            if not (item["copied"] and target.stat(f"{prefix}/{sidecar.sidecar_name(path.name)}")):
                total = found.verification.size_bytes
                logger.info("mirror copy started", path=str(path), target=target.name, bytes=total)
                told = CopyProgress(logger, path=path, target=target.name, total=total, also=shown)
                copy_checkpoint(target, prefix, path, found, watch.path, store, told)
            ours = catalog.mirrored_names(target=target.name, run=item["run"])
            doomed = _update_index(target, prefix, item, found, config, now(), ours, catalog)
        except MirrorError as exc:
            if not (path.exists() or path.is_symlink()):  # deleted while copied (a trainer's rotation): nothing lost
                catalog.mirror_finish(item, state="dropped", now=now(), error="gone while it was copied")
                report.dropped.append(str(path))
                logger.info("mirror copy dropped", path=str(path), target=target.name, reason="gone from disk")
                continue
            delay = min(MAX_BACKOFF, 5.0 * 2 ** min(int(item["attempts"]), 12))
            failed_at = now()
            catalog.mirror_retry(item, error=str(exc), next_try=failed_at + delay, now=failed_at)
            report.failed.append(f"{path} -> {target.name}: {exc}")
            if on_copy is not None:
                on_copy(target.name, time.monotonic() - started, False)
            logger.warning("mirror copy failed, will retry", path=str(path), target=target.name, error=str(exc),
                           retry_in=round(delay), attempts=int(item["attempts"]) + 1)  # fmt: skip
            continue
        catalog.mirror_finish(item, state="done", now=now())
        report.copied.append(f"{path} -> {target.name}")
        if on_copy is not None:
            on_copy(target.name, time.monotonic() - started, True)
        logger.info("checkpoint mirrored", path=str(path), run=item["run"], target=target.name, roles=item["role"],
                    bytes=found.verification.size_bytes, seconds=round(time.monotonic() - started, 3))  # fmt: skip
        for name in doomed:  # the index no longer lists them; one left behind is an orphan (recheck removes it)
            try:
                _delete_copy(target, prefix, name)
            except MirrorError as exc:  # Fix: it raised out of mirror_pass, after the copy was recorded done
                logger.warning("superseded copy not removed, removed at the next recheck", target=target.name,
                               run=item["run"], name=name, error=str(exc))  # fmt: skip
                continue
            logger.info("superseded copy removed", target=target.name, run=item["run"], name=name)
    return report


def read_index(target: Target, prefix: str) -> dict[str, Any] | None:
    """A run's index.json on a target, cleaned (see clean_index); None when there is none or it is unreadable.

    Raises MirrorError when the target fails.
    """
    try:
        raw = load_json(target.get_bytes(f"{prefix}/{INDEX}"), what=f"{target.name}:{prefix}/{INDEX}")
    except (NotFound, UntrustedInput):
        return None  # an unreadable index is rebuilt from what is copied next
    index, refused = clean_index(raw)
    if refused:
        log.get("ckptd.mirror").warning("index names refused", target=target.name, run=prefix, names=refused[:20])
    return index


def _update_index(target: Target, prefix: str, item: Mapping[str, Any], found: sidecar.Sidecar, config: Config,
                  now: float, ours: frozenset[str], catalog: Catalog) -> list[str]:  # fmt: skip
    """Rewrite the run's index.json for the copy just proved; return the superseded copies to delete now.
    What became of each copy's local checkpoint comes from the catalog (local_state). A run folder that holds
    copies but lost its index.json (or holds an unreadable one) gets it rebuilt from them first: rendered from
    nothing, the new index would leave every copy the target holds unlisted, the held copy of a rotted best
    included."""
    record = found.verification
    name = Path(record.path).name
    previous = read_index(target, prefix)
    watch = config.watch_named(item["watch"])
    if previous is None and watch is not None and (held := held_copies(target.list(f"{prefix}/"), prefix) - {name}):
        previous = _rebuild_index(target, prefix, item["run"], watch, catalog, held, now)
        log.get("ckptd.mirror").warning("mirror index rebuilt", target=target.name, run=prefix,
                                        copies=sorted(previous["copies"]))  # fmt: skip
    copy = {"name": name, "sha256": record.sha256, "step": record.global_step, "epoch": record.epoch,
            "metrics": record.metrics, "size_bytes": record.size_bytes, "resumable": record.resumable}  # fmt: skip
    run = Path(item["run"])
    local = {n: local_state(catalog.get(str(run / n)), c.get("sha256"))
             for n, c in ((previous or {}).get("copies") or {}).items()}  # fmt: skip
    local[name] = local_state(catalog.get(str(run / name)), record.sha256)
    metric = watch.metric if watch is not None else None
    keep = config.mirror[item["target"]].keep_superseded
    index, doomed = render_index(previous, run=prefix, copy=copy, roles=str(item["role"]).split(","),
                                 keep_superseded=keep, now=now, ours=ours | {name}, local=local,
                                 metric=metric.name if metric else None,
                                 mode=metric.mode if metric else "min")  # fmt: skip
    _write_index(target, prefix, index)
    return doomed


def _write_index(target: Target, prefix: str, index: Mapping[str, Any]) -> None:
    target.put_bytes(f"{prefix}/{INDEX}", (json.dumps(index, indent=2) + "\n").encode())


def copy_keys(target: Target, prefix: str, name: str) -> list[str]:
    """The keys of one copied checkpoint: the file, or every file of a directory checkpoint (no sidecar)."""
    return [k for k in target.list(f"{prefix}/{name}") if k == f"{prefix}/{name}" or k.startswith(f"{prefix}/{name}/")]


def _delete_copy(target: Target, prefix: str, name: str) -> None:
    """Remove a superseded copy: its files first, then a producer's record of it, then its sidecar."""
    for key in copy_keys(target, prefix, name):
        target.delete(key)
    if name.endswith(".ckpt"):  # nshtrainer's `<stem>.metadata.json`, copied with it
        companion = f"{prefix}/{name.removesuffix('.ckpt')}{nshtrainer.METADATA_SUFFIX}"
        if target.stat(companion) is not None:
            target.delete(companion)
    target.delete(f"{prefix}/{sidecar.sidecar_name(name)}")


# ------------------------------------------------------------------------------------ reading the targets


def indexes(target: Target, run: str | None = None) -> dict[str, dict[str, Any]]:
    """Every run's index.json on a target (or the one under `run`), cleaned, keyed by run folder."""
    found = {}
    # Fix: list under "<run>/", not the bare string "<run>": S3-style prefixes are plain string matches, so
    # `ckptd ls TARGET runs/exp1` also showed runs/exp10's index.
    for key in target.list(run.strip("/") + "/" if run else ""):
        if key.endswith(f"/{INDEX}") or key == INDEX:
            prefix = key.removesuffix(INDEX).rstrip("/")
            index = read_index(target, prefix)
            if index is not None:
                found[prefix] = index
    return found


def local_run(config: Config, prefix: str) -> str | None:
    """The local run folder whose copies live under `prefix` on a target (the inverse of run_key), or None."""
    watch_name, _, rest = prefix.partition("/")
    watch = config.watch_named(watch_name)
    if watch is None:
        return None
    try:
        return str(watch.path.joinpath(*relative(rest))) if rest else str(watch.path)
    except UntrustedInput:
        return None


def recorded_sha(config: Config, catalog: Catalog | None, target: str, prefix: str, name: str) -> str | None:
    """The SHA-256 this machine's catalog recorded for the copy `prefix/name` it made on `target`, or None."""
    run = local_run(config, prefix)
    if catalog is None or run is None:
        return None
    return catalog.mirrored_sha(target=target, run=run, name=name)


# ------------------------------------------------------------------------- rechecking what the targets hold


@dataclass
class Recheck:
    """What one recheck of the targets found (and did, unless a dry run)."""

    lost: list[str] = field(default_factory=list)  # "<target>:<key>": proved copies a target no longer holds
    requeued: list[str] = field(default_factory=list)  # "<local path> -> <target>": queued to be copied again
    rebuilt: list[str] = field(default_factory=list)  # "<target>:<run>/index.json": made again from what is held
    orphans: list[str] = field(default_factory=list)  # "<target>:<key>": left by an interrupted deletion, removed
    swept: list[str] = field(default_factory=list)  # temp files and incomplete uploads removed (Target.sweep)
    unreachable: dict[str, str] = field(default_factory=dict)  # target: why it could not be rechecked now
    indexes: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (target, run): rebuilt index


def recheck(catalog: Catalog, config: Config, targets: Mapping[str, Target], *, now: Callable[[], float] = time.time,
            dry_run: bool = False, sweep_idle: float | None = None) -> Recheck:  # fmt: skip
    """The mirror queue is derived, not remembered: compare what each target should hold with what it holds,
    and queue the difference.

    What a target should hold: each run's copies its watch's mirror rule wants now (wanted_copies) that the
    catalog records as proved there (done). What it holds: one listing per watch, and each run's index.json.
    A copy missing, without its sidecar or not named by the index with its sha256 is queued to be copied
    again (a store emptied, a folder wiped); a lost index.json is made again from the sidecars the run folder
    holds (rebuilt_index); copies an interrupted pass left unlisted are deleted (orphans). With `sweep_idle`,
    each target is first swept of temp files and incomplete uploads idle that long (Target.sweep). A target
    that fails is reported in `unreachable` and the others go on. Network calls: run it on the mirror thread.
    """
    logger = log.get("ckptd.mirror")
    report = Recheck()
    for name, target in targets.items():
        if sweep_idle is not None and not dry_run:
            try:  # on its own: a store that may not list uploads (an IAM policy without it) is still rechecked
                swept = target.sweep(sweep_idle)
            except MirrorError as exc:
                logger.warning("mirror target not swept", target=name, error=str(exc))
                swept = []
            report.swept += swept
            if swept:
                logger.info("mirror target swept", target=name, removed=swept[:20], count=len(swept))
        try:
            _recheck_target(catalog, config, target, report, now(), dry_run=dry_run)
        except MirrorError as exc:  # this target is down: the others are rechecked now, it at the next one
            report.unreachable[name] = str(exc)
            logger.warning("mirror target not rechecked", target=name, error=str(exc))
    if report.lost:
        logger.warning("mirror copies lost by their target", copies=report.lost[:20], count=len(report.lost),
                       queued_again=not dry_run)  # fmt: skip
    return report


def _recheck_target(catalog: Catalog, config: Config, target: Target, report: Recheck, now: float, *,
                    dry_run: bool) -> None:  # fmt: skip
    proved: dict[str, list[dict[str, Any]]] = {}
    for row in catalog.mirror_proved(target=target.name):
        proved.setdefault(row["run"], []).append(row)
    for watch in config.watch:
        if watch.mirror is None or target.name not in watch.mirror.to:
            continue
        under: dict[str, list[str]] = {}  # every folder on the target: the keys below it
        for key in target.list(f"{watch.name}/"):
            parts = key.split("/")
            for depth in range(1, len(parts)):
                under.setdefault("/".join(parts[:depth]), []).append(key)
        runs = {r.run for r in catalog.present(watch=watch.name)} | {
            run for run, rows in proved.items() if any(r["watch"] == watch.name for r in rows)
        }
        for run in sorted(runs):
            try:
                prefix = run_key(watch, run)
            except ValueError:  # no longer below the watched folder (the config changed)
                continue
            _recheck_run(catalog, target, watch, run, prefix, under.get(prefix, []), proved.get(run, []), report,
                         now, dry_run=dry_run)  # fmt: skip


def _recheck_run(catalog: Catalog, target: Target, watch: WatchConfig, run: str, prefix: str, keys: list[str],
                 rows: list[dict[str, Any]], report: Recheck, now: float, *, dry_run: bool) -> None:  # fmt: skip
    logger = log.get("ckptd.mirror")
    wanted_all = wanted_copies((r.entry() for r in catalog.in_run(run) if r.kind != "link"), watch)
    done = {(r["path"], r["sha256"]): r for r in rows if r["state"] == "done"}
    wanted = {Path(p).name: sha for p, (_roles, sha) in wanted_all.items() if (p, sha) in done}
    held = held_copies(keys, prefix)
    index = read_index(target, prefix) if f"{prefix}/{INDEX}" in keys else None
    rebuilt = False
    if index is None and held:
        index = _rebuild_index(target, prefix, run, watch, catalog, held, now)
        report.rebuilt.append(f"{target.name}:{prefix}/{INDEX}")
        report.indexes[(target.name, prefix)] = index
        rebuilt = True
        if not dry_run:
            _write_index(target, prefix, index)
            logger.warning("mirror index rebuilt", target=target.name, run=prefix, copies=sorted(index["copies"]))
    for name in lost_copies(wanted, held, index):
        item = done[(str(Path(run) / name), wanted[name])]
        report.lost.append(f"{target.name}:{prefix}/{name}")
        report.requeued.append(f"{item['path']} -> {target.name}")
        if not dry_run:
            catalog.mirror_requeue(item, now=now, recopy=True)
    if index is None or rebuilt:
        return  # a rebuilt index lists every copy held: none is an orphan
    copied: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        copied.setdefault(Path(row["path"]).name, {})[row["sha256"]] = str(row["role"]).split(",")
    listed = set((index.get("copies") or {}).keys())
    candidates = sorted(n for n in held - listed if n in copied and str(Path(run) / n) not in wanted_all)
    stored = {n: _stored_sha(target, prefix, n) for n in candidates}
    local = {n: local_state(catalog.get(str(Path(run) / n)), sha) for n, sha in stored.items()}
    for name in orphans(held, index, proved=copied, wanted={Path(p).name for p in wanted_all}, local=local,
                        stored=stored):  # fmt: skip
        report.orphans.append(f"{target.name}:{prefix}/{name}")
        if not dry_run:
            _delete_copy(target, prefix, name)
            logger.info("orphan copy removed", target=target.name, run=prefix, name=name,
                        reason="superseded, left unlisted by an interrupted pass")  # fmt: skip


def _stored_sha(target: Target, prefix: str, name: str) -> str | None:
    """The sha256 the sidecar of a copy on the target says, or None when it is missing or unreadable."""
    try:
        return sidecar.parse(target.get_bytes(f"{prefix}/{sidecar.sidecar_name(name)}")).verification.sha256
    except (NotFound, sidecar.SidecarError):
        return None


def _rebuild_index(target: Target, prefix: str, run: str, watch: WatchConfig, catalog: Catalog, held: Set[str],
                   now: float) -> dict[str, Any]:  # fmt: skip
    """The index of a run folder that lost its index.json, made again from the sidecars of the copies it holds
    (rebuilt_index), with roles, history and local state from this machine's catalog."""
    copies: dict[str, dict[str, Any]] = {}
    for name in sorted(held):
        try:
            record = sidecar.parse(target.get_bytes(f"{prefix}/{sidecar.sidecar_name(name)}")).verification
        except (NotFound, sidecar.SidecarError):
            continue
        copies[name] = {"sha256": record.sha256, "step": record.global_step, "epoch": record.epoch,
                        "metrics": record.metrics, "size_bytes": record.size_bytes,
                        "resumable": record.resumable}  # fmt: skip
    wanted = wanted_copies((r.entry() for r in catalog.in_run(run) if r.kind != "link"), watch)
    roles = {Path(p).name: r for p, (r, sha) in wanted.items() if copies.get(Path(p).name, {}).get("sha256") == sha}
    was: dict[str, list[str]] = {}
    for row in catalog.mirror_proved(target=target.name, run=run):
        name = Path(row["path"]).name
        if copies.get(name, {}).get("sha256") == row["sha256"]:
            was[name] = sorted({*was.get(name, []), *str(row["role"]).split(",")})
    local = {n: local_state(catalog.get(str(Path(run) / n)), c["sha256"]) for n, c in copies.items()}
    metric = watch.metric
    return rebuilt_index(prefix, copies, roles=roles, was=was, local=local, now=now,
                         metric=metric.name if metric else None, mode=metric.mode if metric else "min")  # fmt: skip


@dataclass
class CopyCheck:
    """What reading one copy back found: the keys that do not hold what they should, and why."""

    bad: list[str]
    why: str = ""
    stored: sidecar.Sidecar | None = None


def check_copy(target: Target, prefix: str, name: str, known: str | None, read_sha: Callable[[str], str]) -> CopyCheck:
    """Read back every file of the copy `prefix/name` and compare it with what it must hold.

    `known` is this machine's catalog record of the copy's SHA-256: when there is one, the target's sidecar
    must agree with it (a copy forged together with its sidecar and index is caught here); a directory
    sidecar's file list must hash to its digest. `read_sha` reads a key back (a throttled one for scrub).
    Raises MirrorError when the target fails.
    """
    where = f"{target.name}:{prefix}/{name}"
    keys = copy_keys(target, prefix, name)
    try:
        stored = sidecar.parse(target.get_bytes(f"{prefix}/{sidecar.sidecar_name(name)}"))
    except (NotFound, sidecar.SidecarError) as exc:
        return CopyCheck([f"{prefix}/{name}"], f"its sidecar is missing or unreadable ({exc})")
    record = stored.verification
    if known is not None and record.sha256 != known:
        return CopyCheck([f"{prefix}/{name}"], f"its sidecar says sha256 {record.sha256}, this machine's catalog"
                         f" recorded {known}: not the copy that was made", stored)  # fmt: skip
    if record.is_directory and directory_digest(record.files or {}) != record.sha256:
        return CopyCheck([f"{prefix}/{name}"], "its sidecar's file list does not hash to its sha256", stored)
    if not keys:
        return CopyCheck([f"{prefix}/{name}"], f"{where} is named by the index but missing", stored)
    bad = [k for k in keys if read_sha(k) != _expected(stored, prefix, name, k)]
    if record.is_directory and {k.removeprefix(f"{prefix}/{name}/") for k in keys} != set(record.files or {}):
        bad = bad or [f"{prefix}/{name}"]
    return CopyCheck(bad, "its bytes do not match" if bad else "", stored)


def verify_target(config: Config, catalog: Catalog, target: Target, *, repair: bool = True) -> MirrorReport:
    """Check every copy the target should hold, by the catalog and by its own indexes.

    First what the target holds against what this machine's catalog says it should (recheck, on a listing of
    the target itself, not its indexes): a proved copy it lost is bad, and copied again from the local
    checkpoint (`repair`); a lost index.json is bad, and rebuilt from the copies held. Then every copy an
    index names is read back and compared with the catalog where it knows the copy, else with the target's
    sidecar; a bad one is repaired from a local checkpoint that still holds the right bytes. Without `repair`
    nothing is written. Raises MirrorError when the target cannot be listed."""
    logger = log.get("ckptd.mirror")
    report = MirrorReport()
    found_lost = recheck(catalog, config, {target.name: target}, dry_run=not repair)
    if target.name in found_lost.unreachable:
        raise MirrorError(found_lost.unreachable[target.name])
    lost = {key.partition(":")[2] for key in found_lost.lost}
    report.checked += len(lost)
    report.failed += [*found_lost.lost, *found_lost.rebuilt]
    if repair:
        report.repaired += found_lost.rebuilt
        if found_lost.requeued:
            again = set(mirror_pass(config, catalog, {target.name: target}, due_only=False).copied)
            report.repaired += [key for key, item in zip(found_lost.lost, found_lost.requeued, strict=True)
                                if item in again]  # fmt: skip
    held = indexes(target)
    if not repair:  # the indexes it would rebuild are not written: read back the copies they list all the same
        held.update({prefix: index for (_target, prefix), index in found_lost.indexes.items()})
    for prefix, index in held.items():
        for name, copy in index.get("copies", {}).items():
            if f"{prefix}/{name}" in lost:
                continue  # counted above, and copied again (proved) or not
            report.checked += 1
            known = recorded_sha(config, catalog, target.name, prefix, name)
            try:
                found = check_copy(target, prefix, name, known, target.sha256)
            except MirrorError as exc:
                found = CopyCheck([f"{prefix}/{name}"], f"unreadable: {exc}")
            if not found.bad:
                continue
            report.failed.append(f"{target.name}:{prefix}/{name}")
            logger.error("mirror copy bad", target=target.name, key=f"{prefix}/{name}", why=found.why)
            if repair and repair_copy(config, catalog, target, prefix, name, known or copy.get("sha256")):
                report.repaired.append(f"{target.name}:{prefix}/{name}")
    return report


def repair_copy(config: Config, catalog: Catalog, target: Target, prefix: str, name: str, sha: object) -> str | None:
    """Copy the local checkpoint of that name and SHA-256 over a bad copy, and correct the index; return the
    local checkpoint it came from, or None when there is no good one (or the target failed)."""
    logger = log.get("ckptd.mirror")
    run, watch = local_run(config, prefix), config.watch_named(prefix.partition("/")[0])
    row = next((r for r in catalog.in_run(run) if Path(r.path).name == name and r.sha256 == sha
                and r.status == "ok"), None) if run else None  # fmt: skip
    store = sidecar.store_of(config)
    found = store.read(Path(row.path)) if row is not None else None
    if row is None or watch is None or found is None or found.verification.sha256 != sha:
        return None  # renamed since (ckptd migrate), rotted or gone: no good local source
    # Fix: a repair that fails (the local file deleted by hand under its sidecar, the target going down) is
    # reported as not repaired; it raised out of verify_target and ended `ckptd mirror --verify` with a
    # traceback before the other copies were checked.
    try:
        copy_checkpoint(target, prefix, Path(row.path), found, watch.path, store)
        index = read_index(target, prefix)
        if index is not None and index["copies"].get(name, {}).get("sha256") != sha:
            index["copies"].setdefault(name, {})["sha256"] = sha
            for role in ("best", "latest"):
                if (index[role] or {}).get("name") == name:
                    index[role]["sha256"] = sha
            target.put_bytes(f"{prefix}/{INDEX}", (json.dumps(index, indent=2) + "\n").encode())
    except (MirrorError, OSError) as exc:
        logger.error("mirror copy repair failed", target=target.name, key=f"{prefix}/{name}", source=row.path,
                     error=str(exc))  # fmt: skip
        return None
    logger.info("mirror copy repaired", target=target.name, key=f"{prefix}/{name}", source=row.path)
    return row.path


def _expected(stored: sidecar.Sidecar, prefix: str, name: str, key: str) -> str | None:
    record = stored.verification
    if not record.is_directory:
        return record.sha256
    return (record.files or {}).get(key.removeprefix(f"{prefix}/{name}/"))


@dataclass(frozen=True)
class Restored:
    """A checkpoint brought back from a target: where it is, its mirrored sidecar, and what proved its bytes."""

    path: Path
    sidecar: sidecar.Sidecar
    proof: str


def restore(target: Target, run: str, role: str | None, destination: Path, known: Callable[[str], str | None], *,
            step: int | None = None, sha256: str | None = None,
            progress: Tracker | None = None) -> Restored:  # fmt: skip
    """Download one copy of a run into the folder `destination`, proving every byte before it is in place.

    Which copy (choose_copy): `role` "best" (the mirror's best) or "latest" (the newest copy the target
    holds), else the copy at global step `step`, or the one whose SHA-256 starts with `sha256`.
    The bytes are proved against this machine's catalog record of the copy when `known(name)` has one (the
    target's sidecar and index must then agree with it), else against the mirrored sidecar. Nothing is
    written outside `destination`, whatever the target's index names: names are checked (one plain file
    name), files are created relative to the open folder without following links, in a temp name that only
    a proved copy replaces. `progress` (a terminal's) is told of the bytes downloaded. Raises NotFound (no such
    run or copy), IntegrityError, MirrorError.
    """
    try:
        prefix = "/".join(relative(run.strip("/"), what="the run"))
    except UntrustedInput as exc:
        raise NotFound(f"{target.name}: {exc}") from None
    index = read_index(target, prefix)
    if index is None:
        raise NotFound(f"{target.name}: no run {run!r} (no {prefix}/{INDEX}); see: ckptd ls {target.name}")
    try:
        picked, chosen = choose_copy(index, role=role, step=step, sha256=sha256)
    except NotFound as exc:
        raise NotFound(f"{target.name}:{prefix}: {exc}; see: ckptd ls {target.name} {prefix}") from None
    name = component(picked, what="the checkpoint's name")
    stored = sidecar.parse(target.get_bytes(f"{prefix}/{sidecar.sidecar_name(name)}"))
    record = stored.verification
    if record.sha256 != chosen.get("sha256"):
        raise IntegrityError(f"{target.name}:{prefix}/{name}: sidecar and index disagree on the sha256")
    recorded = known(name)
    if recorded is not None and recorded != record.sha256:
        raise IntegrityError(
            f"{target.name}:{prefix}/{name}: the target says sha256 {record.sha256}, but this machine mirrored"
            f" {recorded} there: the copy was replaced since; not restored"
        )
    proof = "this machine's catalog" if recorded is not None else "the mirrored sidecar"
    keys = copy_keys(target, prefix, name)
    if not keys:
        raise NotFound(f"{target.name}:{prefix}/{name}: the index names it but the target does not hold it")
    destination.mkdir(parents=True, exist_ok=True)
    folder = os.open(destination, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    staging = temp_name(name)
    read = progress.start(name, record.size_bytes, "restore") if progress is not None else None
    try:
        if record.is_directory:
            actual = _download_folder(target, keys, f"{prefix}/{name}/", folder, staging, read)
        else:
            actual = _download_file(target, f"{prefix}/{name}", folder, staging, read)
        if actual != record.sha256:
            raise IntegrityError(
                f"{destination / name}: sha256 {actual} does not match {record.sha256} ({proof}); not restored"
            )
        try:
            os.replace(staging, name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError as exc:
            raise MirrorError(f"{destination / name}: cannot move the restored copy into place: {exc}") from exc
        fsync_dir(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            delete.remove_at(folder, staging)
        os.close(folder)
    return Restored(destination / name, stored, proof)


_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _download_file(target: Target, key: str, folder: int, name: str, progress: Progress | None = None) -> str:
    """Download `key` into a new file `name` in the open folder; return the SHA-256 of what landed."""
    out = os.open(name, _NEW, 0o644, dir_fd=folder)
    try:
        target.read_into(key, out, progress)
        os.fsync(out)
        return sha256_fd(out)
    finally:
        os.close(out)


def _download_folder(target: Target, keys: list[str], under: str, folder: int, name: str,
                     progress: Progress | None = None) -> str:  # fmt: skip
    """Download the keys of a directory copy into a new folder `name`; return its directory digest."""
    os.mkdir(name, 0o755, dir_fd=folder)
    files: dict[str, str] = {}
    for key in keys:
        try:
            parts = relative(key.removeprefix(under), what="a file of the copy")
        except UntrustedInput as exc:
            raise IntegrityError(f"{target.name}:{key}: {exc}") from None
        parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        try:
            for part in parts[:-1]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=parent)
                below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                os.close(parent)
                parent = below
            files["/".join(parts)] = _download_file(target, key, parent, parts[-1], progress)
        finally:
            os.close(parent)
    return directory_digest(files)
