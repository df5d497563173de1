"""Finding checkpoints on disk, and telling whether one changed. No torch, no catalog.

A checkpoint is whatever one save of a trainer produced: a file matching the watch's patterns, or a folder a
trainer writes as one save (a `checkpoint-<step>/` of the Hugging Face Trainer, a DCP step folder...: see
ckptd.layouts), recognised while it is still being written so that none of its files is taken for a checkpoint
of its own. Its run is the folder the trainer writes its checkpoints into (usually the one that holds it).
Symbolic links are reported as links to their target and never followed; a link whose target lies outside
every watched folder is ignored. Hidden folders (such as a `.ckptd` state folder) are skipped.
Only regular files are checkpoints: a FIFO, socket or device is never opened (a FIFO would block its
reader for good); inside a directory checkpoint one is listed by `special_files` and makes it unsupported.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckptd import layouts
from ckptd.fsutil import TEMP_MARK, TRASH_PREFIX, kind_of, unlink_confined
from ckptd.layouts import hf_trainer, nshtrainer, pretrained
from ckptd.model import Identity
from ckptd.sidecar import SIDECAR_SUFFIX, checkpoint_of, sidecar_name, sidecar_path

Kind = Literal["file", "directory", "link"]


@dataclass(frozen=True)
class Candidate:
    """A checkpoint found on disk."""

    path: Path
    kind: Kind
    run: Path
    link_target: Path | None = None


def is_ckptd_file(name: str) -> bool:
    """True for ckptd's own sidecars, temp files and trash (a checkpoint being deleted)."""
    return name.endswith(SIDECAR_SUFFIX) or TEMP_MARK in name or name.startswith(TRASH_PREFIX)


def _walk_directory(folder: Path) -> Iterator[tuple[str, int]]:
    """(relative path, st_mode) of every non-folder entry inside `folder`, links not followed, ckptd's own
    files left out. Folders are descended into; a link to a folder is reported as a link."""
    pending = [("", folder)]
    while pending:
        prefix, current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                rel = f"{prefix}{entry.name}"
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append((rel + "/", Path(entry.path)))
                elif not is_ckptd_file(entry.name):
                    yield rel, mode


def directory_files(folder: Path) -> list[str]:
    """The relative paths of the regular files inside a directory checkpoint, sorted.

    Symbolic links are not followed, FIFOs, sockets and devices are left out (see `special_files`), and so
    are ckptd's own sidecars and temp files.
    """
    return sorted(rel for rel, mode in _walk_directory(folder) if stat.S_ISREG(mode))


def special_files(folder: Path) -> list[str]:
    """`<relative path> (<kind>)` for each FIFO, socket or device inside a directory checkpoint, sorted."""
    return sorted(
        f"{rel} ({kind_of(mode)})"
        for rel, mode in _walk_directory(folder)
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode))
    )


def directory_digest(files: Mapping[str, str]) -> str:
    """The SHA-256 of a directory checkpoint: of `sha256sum`-style lines, one per file, sorted by name."""
    lines = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def identity(path: Path) -> Identity:
    """The identity of a file, or of a directory checkpoint (sizes summed, newest mtime of all its files).

    Raises FileNotFoundError when the checkpoint is gone.
    """
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        return Identity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    size, newest = 0, st.st_mtime_ns
    for rel in directory_files(path):
        inner = (path / rel).lstat()
        size += inner.st_size
        newest = max(newest, inner.st_mtime_ns)
    return Identity(size, newest, st.st_ino, st.st_dev)


def identity_at(dir_fd: int, name: str) -> Identity:
    """The identity of the entry `name` in an open folder, without following a link (see `identity`).

    A link is reported with the link's own inode, so it never equals the identity of a checkpoint.
    Raises FileNotFoundError when it is gone.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return Identity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    size, newest = 0, st.st_mtime_ns
    for _root, _dirs, files, root_fd in os.fwalk(name, dir_fd=dir_fd, follow_symlinks=False):
        for inner_name in files:
            if is_ckptd_file(inner_name):
                continue
            inner = os.stat(inner_name, dir_fd=root_fd, follow_symlinks=False)
            if stat.S_ISREG(inner.st_mode):
                size += inner.st_size
                newest = max(newest, inner.st_mtime_ns)
    return Identity(size, newest, st.st_ino, st.st_dev)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when a file name matches one of the watch's glob patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def inside(path: Path, root: Path) -> bool:
    """True when `path` (resolved) lies inside `root` (resolved)."""
    return path.resolve().is_relative_to(root.resolve())


Roots = Path | Sequence[Path]


def _inside_any(path: Path, roots: Roots) -> bool:
    return any(inside(path, root) for root in ([roots] if isinstance(roots, Path) else roots))


def classify(path: Path, root: Roots, patterns: Sequence[str]) -> Candidate | None:
    """Return the candidate that `path` is, or None if it is not a checkpoint ckptd should look at.

    `root` is the watched folder, or every watched folder: a link is recorded (never followed) when its
    target lies in one of them, so that the target is protected from retention wherever it lives.
    """
    name = path.name
    if is_ckptd_file(name):
        return None
    if path.is_symlink():
        target = path.resolve()
        if not matches(name, patterns) and not (target.is_dir() and layouts.detect(target)):
            return None
        if not target.exists() or not _inside_any(target, root):
            return None  # never follow a link out of the watched folders
        return Candidate(path, "link", layouts.run_of(path, None), target)
    if path.is_dir():
        layout = layouts.detect(path)
        return Candidate(path, "directory", layout.run_of(path)) if layout is not None else None
    if path.is_file() and matches(name, patterns) and not part_of_a_save(name) and not _final_model(path):
        return Candidate(path, "file", layouts.run_of(path, None))
    return None


def part_of_a_save(name: str) -> bool:
    """True for files that are never a checkpoint of their own, wherever they lie: a shard of sharded weights
    (`model-00001-of-00003.safetensors`) and the Trainer's arguments (`training_args.bin`)."""
    return pretrained.SHARD.search(name) is not None or name == "training_args.bin"


def _final_model(path: Path) -> bool:
    """True for the weights a Trainer's `save_model(output_dir)` leaves beside its `checkpoint-<step>/` folders:
    the product of the run, not one of its rotating checkpoints, so retention must never take it for the oldest
    one (it has no step). Like the shards of a sharded final model, it is left alone."""
    if path.name not in hf_trainer.WEIGHTS:
        return False
    beside = layouts.entries(path.parent)
    return any(hf_trainer.NAME.match(name) and (path.parent / name).is_dir() for name in beside)


@dataclass(frozen=True)
class Found:
    """A checkpoint `sweep` found, with what the walk learnt of it without another system call."""

    candidate: Candidate
    identity: Identity | None  # None for a link: links are never hashed
    complete: bool = True  # False for a folder checkpoint its trainer has not finished
    sidecar_beside: bool = False  # its `<name>.ckptd.json` was listed beside it


@dataclass(frozen=True)
class Leftover:
    """A file of ckptd's own that the walk found and that may have to go: a sidecar whose checkpoint is gone
    (`orphan`), or a temp file a killed process left (`temp`: its age is for the caller to judge)."""

    path: Path
    kind: Literal["orphan", "temp"]


def discover(root: Path, patterns: Sequence[str], boundary: Roots | None = None) -> Iterator[Candidate]:
    """Walk `root` and yield every checkpoint in it; directory checkpoints are not descended into.

    `root` may itself be a checkpoint (a file or a directory checkpoint). Links may point anywhere inside
    `boundary` (the watched folder, or every watched folder; `root` by default), never out of it.
    """
    for item in sweep(root, patterns, boundary):
        if isinstance(item, Found):
            yield item.candidate


def sweep(root: Path, patterns: Sequence[str], boundary: Roots | None = None) -> Iterator[Found | Leftover]:
    """`discover`, with each checkpoint's identity, completeness and sidecar, and ckptd's leftovers: one walk.

    The rescan of a watch with 100,000 checkpoints must cost little more than listing and `lstat`-ing its
    files (issue 13): each folder is listed once (`os.scandir`, whose entries say what they are without a
    `stat`), each file is `lstat`-ed once, and orphan sidecars and temp files are found in the same pass.
    Depth first, by name: a folder's subfolders (each walked when met) before its files. Only the listings of
    the folders on the way down are held, never those of a whole level (10,000 run folders listed ahead took
    most of a gigabyte at 1,000,000 checkpoints), and no recursion: a hostile tree thousands of folders deep
    is walked like any other. Hidden folders are skipped; links are classified (never followed).
    """
    boundary = boundary or root
    if is_ckptd_file(root.name):  # a folder being deleted by ckptd (or its temp): nothing to find
        return
    if root.is_symlink():  # a folder that is a link (a new one an event names): recorded as a link or nothing
        link = classify(root, boundary, patterns)
        if link is not None:
            yield Found(link, None)
        return
    if root.is_file():
        top = classify(root, root.parent, patterns)
        if top is not None:
            yield Found(top, identity(root), sidecar_beside=sidecar_path(root).is_file())
        return
    listed = _listing(root)
    if listed is None:
        return
    layout = layouts.detect(root, frozenset(listed))
    if layout is not None:
        yield _folder_checkpoint(root, layout, listed, sidecar_path(root).is_file())
        return
    stack = [_sweep_folder(root, listed, patterns, boundary)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, _Descend):
            stack.append(_sweep_folder(item.folder, item.listing, patterns, boundary))
        else:
            yield item


@dataclass(frozen=True)
class _Descend:
    """What `_sweep_folder` yields for a subfolder that is no checkpoint: walk it now."""

    folder: Path
    listing: dict[str, os.DirEntry[str]]


def _listing(folder: Path) -> dict[str, os.DirEntry[str]] | None:
    """The entries of `folder` by name, or None when it cannot be listed (gone, not a folder, no permission)."""
    try:
        with os.scandir(folder) as found:
            return {entry.name: entry for entry in found}
    except OSError:
        return None


def _sweep_folder(
    folder: Path, listing: dict[str, os.DirEntry[str]], patterns: Sequence[str], boundary: Roots
) -> Iterator[Found | Leftover | _Descend]:
    """The checkpoints and leftovers directly in one folder, and each subfolder to walk (`_Descend`)."""
    files: list[os.DirEntry[str]] = []
    for name in sorted(listing):
        entry = listing[name]
        if is_ckptd_file(name):
            yield from _leftover(folder, entry, listing)
            continue
        try:
            if entry.is_symlink():
                found = classify(folder / name, boundary, patterns)
                if found is not None:
                    yield Found(found, None)
            elif entry.is_dir(follow_symlinks=False):
                if name.startswith("."):
                    continue
                sub = folder / name
                inner = _listing(sub)
                if inner is None:
                    continue
                layout = layouts.detect(sub, frozenset(inner))
                if layout is None:
                    yield _Descend(sub, inner)
                else:
                    yield _folder_checkpoint(sub, layout, inner, sidecar_name(name) in listing)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry)
        except OSError:  # gone meanwhile: the next pass or event sees what replaced it
            continue
    runs: dict[bool, Path] = {}
    for entry in files:
        name = entry.name
        if not matches(name, patterns) or part_of_a_save(name) or _final_model_in(name, listing):
            continue
        path = folder / name
        shared = name.endswith(".ckpt")  # the run of a file depends on its folder and, for nshtrainer, suffix
        run = runs.get(shared) or runs.setdefault(shared, layouts.run_of(path, None))
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        yield Found(
            Candidate(path, "file", run),
            Identity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev),
            sidecar_beside=name + SIDECAR_SUFFIX in listing or sidecar_name(name) in listing,
        )


def _leftover(folder: Path, entry: os.DirEntry[str], listing: Mapping[str, object]) -> Iterator[Leftover]:
    name = entry.name
    if TEMP_MARK in name:
        yield Leftover(folder / name, "temp")
    elif name.endswith(SIDECAR_SUFFIX) and name.removesuffix(SIDECAR_SUFFIX) not in listing:
        checkpoint = checkpoint_of(folder / name)  # a shortened name says its checkpoint in its body
        if checkpoint is None or not (checkpoint.exists() or checkpoint.is_symlink()):
            yield Leftover(folder / name, "orphan")


def _final_model_in(name: str, listing: Mapping[str, os.DirEntry[str]]) -> bool:
    """`_final_model`, from the folder's listing."""
    if name not in hf_trainer.WEIGHTS:
        return False
    return any(hf_trainer.NAME.match(n) and e.is_dir() for n, e in listing.items())


def _folder_checkpoint(
    folder: Path, layout: layouts.Layout, listing: dict[str, os.DirEntry[str]], sidecar_beside: bool
) -> Found:
    """A folder checkpoint, its identity summed from one walk of its files (see `identity`)."""
    names = frozenset(listing)
    candidate = Candidate(folder, "directory", layout.run_of(folder))
    try:
        top = folder.stat()
        size, newest = 0, top.st_mtime_ns
        pending = [listing]
        while pending:
            for name, entry in pending.pop().items():
                if entry.is_dir(follow_symlinks=False):
                    inner = _listing(Path(entry.path))
                    if inner is not None:
                        pending.append(inner)
                elif not is_ckptd_file(name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    size += st.st_size
                    newest = max(newest, st.st_mtime_ns)
    except OSError:  # changing under the walk: unknown identity, so it is looked at again
        return Found(candidate, None, complete=False, sidecar_beside=sidecar_beside)
    return Found(
        candidate,
        Identity(size, newest, top.st_ino, top.st_dev),
        complete=layout.complete(folder, names),
        sidecar_beside=sidecar_beside,
    )


Vanishing = Literal["present", "deleted", "moved"]


def vanishing(checkpoint: Path) -> Vanishing:
    """Whether a cataloged checkpoint is still there; if not, whether it was deleted from a folder that stays
    (what a trainer's own rotation does) or went with its folder (a run moved, removed or swapped for a link).
    Asked twice around the folder's check: a folder away for an instant is no deletion."""

    def there() -> bool:
        return checkpoint.exists() or checkpoint.is_symlink()

    if there():
        return "present"
    try:
        stays = stat.S_ISDIR(checkpoint.parent.lstat().st_mode)
    except OSError:
        stays = False
    if not stays:
        return "moved"
    return "present" if there() else "deleted"


def orphan_sidecars(root: Path) -> Iterator[Path]:
    """Sidecars under `root` whose checkpoint is gone."""
    for item in sweep(root, ()):
        if isinstance(item, Leftover) and item.kind == "orphan":
            yield item.path


def stale_temps(root: Path, *, older_than: float, now: float) -> list[Path]:
    """Delete ckptd temp files under `root` older than `older_than` seconds (left by a killed process)."""
    temps = [item.path for item in sweep(root, ()) if isinstance(item, Leftover) and item.kind == "temp"]
    return [path for path in temps if remove_stale(root, path, older_than=older_than, now=now)]


def remove_stale(root: Path, temp: Path, *, older_than: float, now: float) -> bool:
    """Delete one temp file below `root` when it is older than `older_than` seconds; True when it went."""
    try:
        return now - temp.lstat().st_mtime >= older_than and unlink_confined(root, temp)
    except (OSError, ValueError):  # gone, or its folder became a link meanwhile: never followed
        return False


def directory_complete(folder: Path) -> bool:
    """True when a folder checkpoint's trainer has finished writing it (see each layout's `complete`)."""
    names = layouts.entries(folder)
    layout = layouts.detect(folder, names)
    return layout is not None and layout.complete(folder, names)


def candidate_for(path: Path, root: Path, patterns: Sequence[str], boundary: Roots | None = None) -> Candidate | None:
    """The checkpoint an event at `path` concerns: the directory checkpoint holding it, or the file itself.

    `boundary`: where links may point (the watched folder `root` by default, or every watched folder). A path
    reached through a folder that is a link is nothing: links are never followed.
    """
    below = [p for p in path.parents if p != root and p.is_relative_to(root)]
    if any(p.is_symlink() or is_ckptd_file(p.name) for p in below):
        return None
    for parent in reversed(below):  # the outermost folder checkpoint: a DeepSpeed tag inside a Trainer's one
        layout = layouts.detect(parent)
        if layout is not None:
            return Candidate(parent, "directory", layout.run_of(parent))
    described = nshtrainer.checkpoint_of(path)  # its record lands after it: verify it again with its metrics
    if described is not None and not path.is_symlink() and described.is_file() and not described.is_symlink():
        path = described
    return classify(path, boundary or root, patterns) if path.exists() or path.is_symlink() else None
