"""`ckptd migrate`: rename checkpoints from the naming schemes of old training scripts to one canonical scheme.

Canonical: `epoch-NN_step-SSSSSS<ext>`, or `epoch-NN<ext>` for a step-less name (`epoch_NNN_checkpoint.pt`)
whose contents hold no step either. `parse_name` and `plan_renames` are pure; `migrate` applies a plan.
Names it cannot parse are listed, never guessed; the trainer's own names (`last.ckpt`, `best_model.pt`,
`latest_checkpoint.pt`: selection.is_slot) and canonical names are never touched; two files that would get
the same name are both left alone and reported. Sidecars, catalog rows and a producer's files beside a
checkpoint (nshtrainer's `.metadata.json`) follow the rename, and a link to a renamed checkpoint is pointed at
its new name. `--delete-old` removes checkpoints below an epoch through the retention invariants (never the
latest, the best, a pinned one or the only one).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import layouts, retention, selection, sidecar
from ckptd.catalog import Catalog
from ckptd.fsutil import atomic_write_bytes, fsync_dir, temp_path_for
from ckptd.model import CheckpointChanged, Entry, Verification

CANONICAL = re.compile(r"^epoch-(\d+)(?:_step-(\d+))?(\.[A-Za-z0-9]+)$")
_SCHEMES = [
    re.compile(r"^epoch_epoch_(?P<epoch>\d+)_step_step_(?P<step>\d+)_(?P<stamp>[0-9T:._-]+)(?P<ext>\.[A-Za-z0-9]+)$"),
    re.compile(r"^epoch_(?P<epoch>\d+)_step_(?P<step>\d+)(?P<ext>\.[A-Za-z0-9]+)$"),
    re.compile(r"^epoch=(?P<epoch>\d+)-step=(?P<step>\d+)(?P<ext>\.[A-Za-z0-9]+)$"),
    re.compile(r"^epoch_(?P<epoch>\d+)_checkpoint(?P<ext>\.[A-Za-z0-9]+)$"),
]


class Unreadable(Exception):
    """A checkpoint whose contents could not be read for its step (corrupt, changing): it is left alone."""


@dataclass(frozen=True)
class Parsed:
    """What a legacy name says: the epoch, the step (None when only the contents know it), the extension."""

    epoch: int
    step: int | None
    ext: str


def untouchable(name: str) -> bool:
    """The trainer's own names (`last.ckpt`, `best.pt`, `latest_checkpoint.pt`) and canonical names are never
    renamed."""
    return selection.is_slot(name) or name.startswith("best") or CANONICAL.match(name) is not None


def parse_name(name: str) -> Parsed | None:
    """Parse a legacy checkpoint name, or return None when no known scheme matches."""
    for scheme in _SCHEMES:
        match = scheme.match(name)
        if match:
            step = match.groupdict().get("step")
            return Parsed(int(match["epoch"]), int(step) if step is not None else None, match["ext"])
    return None


def canonical(epoch: int, step: int | None, ext: str) -> str:
    """The canonical name (`epoch-NN<ext>` when the step is not known)."""
    return f"epoch-{epoch:02d}_step-{step:06d}{ext}" if step is not None else f"epoch-{epoch:02d}{ext}"


@dataclass
class MigrationPlan:
    """Renames to do, and what is left alone with why."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)
    collisions: list[tuple[list[Path], Path]] = field(default_factory=list)
    unparsable: list[tuple[Path, str]] = field(default_factory=list)
    untouched: list[Path] = field(default_factory=list)
    deletions: list[retention.Decision] = field(default_factory=list)  # each removed by ckptd.delete


def plan_renames(paths: Iterable[Path], step_of: Callable[[Path], int | None]) -> MigrationPlan:
    """Plan the renames of checkpoints in their folders.

    `step_of` gives the step from a checkpoint's contents, for names that carry none (without one, the name
    keeps the epoch alone). A target name that two sources would share, or that another file already has,
    leaves every source alone.
    """
    result = MigrationPlan()
    wanted: dict[Path, list[Path]] = {}
    existing = set()
    for path in sorted(paths):
        existing.add(path)
        if untouchable(path.name):
            result.untouched.append(path)
            continue
        parsed = parse_name(path.name)
        if parsed is None:
            result.unparsable.append((path, "no known naming scheme"))
            continue
        try:
            step = parsed.step if parsed.step is not None else step_of(path)  # None: `epoch-NN<ext>`
        except Unreadable as exc:
            result.unparsable.append((path, f"no step in its name, and {exc}"))
            continue
        wanted.setdefault(path.with_name(canonical(parsed.epoch, step, parsed.ext)), []).append(path)
    for target, sources in sorted(wanted.items()):
        if len(sources) > 1 or (target in existing and target not in sources) or target.exists():
            result.collisions.append((sources, target))
        else:
            result.renames.append((sources[0], target))
    return result


def plan_deletions(entries: Iterable[Entry], min_epoch: int, metric: str | None, mode: selection.Mode,
                   link_targets: Mapping[str, str] | None = None,
                   awaiting_mirror: frozenset[str] = frozenset()) -> list[retention.Decision]:  # fmt: skip
    """Checkpoints below `min_epoch` that the retention invariants allow to delete, each with its reason and
    the identity it was planned with (ckptd.delete removes exactly that or nothing).

    `link_targets` ({target: link}) are kept, as retention keeps them: deleting one would leave a dangling link;
    so are the checkpoints a mirror still has to copy (`awaiting_mirror`).
    """
    policy = retention.Policy(keep_last=0, keep_best=1 if metric else 0, min_epoch=min_epoch, metric=metric,
                              mode=mode, on_corrupt="keep")  # fmt: skip
    by_path = {e.path: e for e in entries}
    found = retention.plan(by_path.values(), policy, now=0.0, link_targets=link_targets,
                           awaiting_mirror=awaiting_mirror)  # fmt: skip
    # Fix: a `last.*` or `best*` file is the run's latest or best by name. Without a configured metric the
    # planner knew no best, so `best.ckpt` below min_epoch was deleted; names migrate never touches stay.
    return [
        d._replace(reasons=(f"epoch < {min_epoch}",))
        for d in found.decisions
        if d.action == "delete"
        and (epoch := by_path[d.path].epoch) is not None
        and epoch < min_epoch
        and not untouchable(Path(d.path).name)
    ]


def apply_rename(source: Path, target: Path, catalog: Catalog | None) -> None:
    """Rename a checkpoint without ever replacing a file, then its sidecar and its catalog row."""
    if source.is_dir():
        if target.exists():
            raise FileExistsError(target)
        source.rename(target)
    else:
        os.link(source, target)  # fails if the target exists: no checkpoint is ever overwritten
        source.unlink()
    old_sidecar = sidecar.sidecar_path(source)
    if old_sidecar.exists():
        body = json.loads(old_sidecar.read_bytes())
        body["path"] = str(target)
        atomic_write_bytes(sidecar.sidecar_path(target), (json.dumps(body, indent=2) + "\n").encode())
        old_sidecar.unlink()
    for old, new in zip(layouts.companions(source), layouts.companions(target), strict=False):
        companion = source.with_name(old)
        if companion.is_file() and not companion.is_symlink() and not target.with_name(new).exists():
            companion.rename(target.with_name(new))
    fsync_dir(target.parent)
    if catalog is not None:
        catalog.rename(str(source), str(target))


def repoint(link: Path, target: Path) -> None:
    """Point `link` at `target` (a renamed checkpoint), atomically, keeping it relative when it was."""
    new = target if link.readlink().is_absolute() else Path(os.path.relpath(target, link.parent))
    temp = temp_path_for(link)
    temp.symlink_to(new)
    try:
        os.replace(temp, link)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def sidecar_entries(paths: Iterable[Path]) -> dict[str, Entry]:
    """Entries of the checkpoints whose sidecar is current, for the retention invariants."""
    found: dict[str, Entry] = {}
    for path in paths:
        parsed = sidecar.read(path)
        if parsed is None:
            continue
        current = sidecar.is_current(parsed, path)
        found[str(path)] = Entry.of(parsed.verification, run=str(path.parent), pinned=parsed.pinned, verified=current)
    return found


def steps_from_sidecars(entries: Mapping[str, Entry], verifier: Callable[[Path], Verification] | None = None
                        ) -> Callable[[Path], int | None]:  # fmt: skip
    """A `step_of` that reads the step recorded in a checkpoint's current sidecar.

    Without a current sidecar, `verifier` (ckptd.verify.verify) reads the step from the checkpoint itself;
    one that is not ok raises Unreadable (a corrupt file is never renamed).
    """

    def step_of(path: Path) -> int | None:
        entry = entries.get(str(path))
        if entry is not None and entry.verified:
            return entry.step
        # Fix: the step comes from the checkpoint's contents. A folder never scanned (no sidecar) had every
        # `epoch_NNN_checkpoint.pt` listed as "no step in its contents" without its contents being read.
        if verifier is None:
            return None
        try:
            found = verifier(path)
        except (CheckpointChanged, OSError) as exc:
            raise Unreadable(f"its contents could not be read ({exc})") from exc
        if found.status != "ok":
            raise Unreadable(f"its contents are {found.status}")
        return found.global_step

    return step_of
