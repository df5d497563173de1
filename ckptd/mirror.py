"""Mirroring best and latest checkpoints to backup targets, proving every copy, and bringing them back.

Layout on a target: `<watch>/<run path relative to the watched folder>/<checkpoint>` with its sidecar beside
it, and per run an `index.json` naming the current best and latest with their sha256. The checkpoint goes
first, its sidecar second, `index.json` last: a sidecar on a target means its checkpoint is complete there.
A superseded copy leaves the target only after its successor is proved there, keeping `keep_superseded`.

What to copy is queued in the catalog (`mirror_queue`), so a restart picks it up; a failed copy is retried
with backoff and never blocks verification; retention keeps a checkpoint while it is queued.
`roles_for` and `render_index` are pure; the rest drives targets and the catalog.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from ckptd import log, selection, sidecar
from ckptd.catalog import Catalog
from ckptd.config import Config, WatchConfig
from ckptd.discover import directory_digest
from ckptd.fsutil import fsync_dir, sha256_file, temp_path_for
from ckptd.mirrors import IntegrityError, MirrorError, NotFound, Target, make_target
from ckptd.model import Entry

INDEX = "index.json"
INDEX_SCHEMA = 1
MAX_BACKOFF = 3600.0


# ------------------------------------------------------------------------------------------ pure planning


def roles_for(entries: Iterable[Entry], what: Iterable[str], metric: str | None, mode: selection.Mode,
              milestone_every: int = 0) -> dict[str, list[str]]:  # fmt: skip
    """Which of a run's checkpoints a mirror rule copies, each with its roles (best, latest, milestone, all)."""
    ok = selection.usable(entries)
    roles: dict[str, list[str]] = {}
    wanted = set(what)
    if "latest" in wanted and (newest := selection.latest(ok)) is not None:
        roles.setdefault(newest.path, []).append("latest")
    if "best" in wanted and metric and (top := selection.best(ok, metric, mode)) is not None:
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


def render_index(previous: Mapping[str, Any] | None, *, run: str, copy: Mapping[str, Any], roles: list[str],
                 keep_superseded: int, now: float) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The run's new index.json after `copy` (name, sha256, metrics, step) is proved on the target.

    Returns the index and the names of copies to delete from the target: superseded best/latest copies
    beyond the newest `keep_superseded`. A copy still named by a role is never among them.
    """
    index: dict[str, Any] = {
        "schema_version": INDEX_SCHEMA, "run": run, "best": None, "latest": None, "copies": {}, "superseded": [],
    }  # fmt: skip
    if previous:
        index.update({k: previous[k] for k in ("best", "latest", "copies", "superseded") if k in previous})
    index["copies"] = dict(index["copies"])
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    index["copies"][copy["name"]] = {**copy, "roles": sorted(set(roles)), "mirrored_at": stamp}
    superseded = [n for n in index["superseded"] if n != copy["name"]]
    for role in ("best", "latest"):
        if role in roles:
            old = index[role]
            index[role] = {k: copy[k] for k in ("name", "sha256", "step", "metrics") if k in copy}
            if old and old["name"] != copy["name"]:
                superseded.append(old["name"])
    current = {index[r]["name"] for r in ("best", "latest") if index[r]}
    superseded = [n for n in dict.fromkeys(superseded) if n not in current]
    doomed = superseded[: max(0, len(superseded) - keep_superseded)]
    index["superseded"] = superseded[len(doomed) :]
    for name in doomed:
        index["copies"].pop(name, None)
    index["updated_at"] = stamp
    return index, doomed


# ------------------------------------------------------------------------------------------------ queueing


def enqueue_run(catalog: Catalog, config: Config, watch: WatchConfig, run: str, now: float) -> int:
    """Queue the run's checkpoints that its mirror rule copies; drop queued ones it no longer wants."""
    if watch.mirror is None:
        return 0
    entries = [r.entry() for r in catalog.in_run(run) if r.kind != "link"]
    milestones = watch.retention.keep_every if watch.retention else 0
    wanted = roles_for(
        entries, watch.mirror.what, watch.metric.name if watch.metric else None,
        watch.metric.mode if watch.metric else "min", milestones,
    )  # fmt: skip
    by_path = {e.path: e for e in entries}
    queued = 0
    for target in watch.mirror.to:
        current = {path: (roles, by_path[path].sha256 or "") for path, roles in wanted.items()}
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


def targets_of(config: Config) -> dict[str, Target]:
    """Every configured target, built by URL scheme."""
    return {name: make_target(name, settings, config.source.parent) for name, settings in config.mirror.items()}


def _files_of(checkpoint: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of each file to copy: the file itself, or every file of a directory checkpoint."""
    if not checkpoint.is_dir():
        return [(checkpoint.name, checkpoint)]
    from ckptd.discover import directory_files

    return [(f"{checkpoint.name}/{rel}", checkpoint / rel) for rel in directory_files(checkpoint)]


def copy_checkpoint(target: Target, key_prefix: str, checkpoint: Path, found: sidecar.Sidecar) -> None:
    """Copy one checkpoint, then its sidecar, proving each file against the sidecar's hashes.

    Raises IntegrityError (a copy did not match, or the local file changed) or MirrorError.
    """
    record = found.verification
    # Fix: read the sidecar before the upload, and a missing one is a failed copy: read after it, a sidecar
    # removed meanwhile (the checkpoint deleted by save_top_k) raised FileNotFoundError out of mirror_pass and
    # left the uploaded checkpoint on the target without sidecar or index entry.
    try:
        sidecar_data = sidecar.sidecar_path(checkpoint).read_bytes()
        files = _files_of(checkpoint)
    except OSError as exc:
        raise MirrorError(f"{checkpoint}: {exc}") from exc
    if not files:  # a directory checkpoint removed meanwhile: never a sidecar without its checkpoint
        raise MirrorError(f"{checkpoint}: no files to copy (deleted?)")
    for name, path in files:
        expected = record.sha256 if not record.is_directory else (record.files or {}).get(name.split("/", 1)[1])
        if expected is None:
            raise IntegrityError(f"{path}: not in its sidecar; it changed since it was verified")
        _put_with_retries(target, f"{key_prefix}/{name}", path, expected)
    target.put_bytes(f"{key_prefix}/{checkpoint.name}{sidecar.SIDECAR_SUFFIX}", sidecar_data)


@retry(
    retry=retry_if_exception_type(IntegrityError),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.5, max=5),
    reraise=True,
)
def _put_with_retries(target: Target, key: str, path: Path, sha256: str) -> None:
    """A mismatch is retried at once a few times (a flaky link); target outages back off in the queue."""
    target.put_file(key, path, sha256=sha256)


def mirror_pass(config: Config, catalog: Catalog, targets: Mapping[str, Target], *, dry_run: bool = False,
                now: Callable[[], float] = time.time, due_only: bool = True,
                stop: Callable[[], bool] = lambda: False) -> MirrorReport:  # fmt: skip
    """Copy every queued checkpoint that is due, target by target; a failing target never stops the others.

    `stop` is asked between copies, so a daemon shutting down does not start another one.
    """
    logger = log.get("ckptd.mirror")
    report = MirrorReport()
    for item in catalog.mirror_due(now() if due_only else None):
        if stop():
            break
        watch = config.watch_named(item["watch"])
        target = targets.get(item["target"])
        path = Path(item["path"])
        if watch is None or target is None:
            continue
        found = sidecar.read(path)
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
            if not (item["copied"] and target.stat(f"{prefix}/{path.name}{sidecar.SIDECAR_SUFFIX}")):
                copy_checkpoint(target, prefix, path, found)
            doomed = _update_index(target, prefix, item, found, config, now())
        except MirrorError as exc:
            delay = min(MAX_BACKOFF, 5.0 * 2 ** min(int(item["attempts"]), 12))
            catalog.mirror_retry(item, error=str(exc), next_try=now() + delay)
            report.failed.append(f"{path} -> {target.name}: {exc}")
            logger.warning("mirror copy failed, will retry", path=str(path), target=target.name, error=str(exc),
                           retry_in=round(delay), attempts=int(item["attempts"]) + 1)  # fmt: skip
            continue
        catalog.mirror_finish(item, state="done", now=now())
        report.copied.append(f"{path} -> {target.name}")
        logger.info("checkpoint mirrored", path=str(path), run=item["run"], target=target.name, roles=item["role"],
                    bytes=found.verification.size_bytes, seconds=round(time.monotonic() - started, 3))  # fmt: skip
        for name in doomed:
            _delete_copy(target, prefix, name)
            logger.info("superseded copy removed", target=target.name, run=item["run"], name=name)
    return report


def _update_index(target: Target, prefix: str, item: Mapping[str, Any], found: sidecar.Sidecar, config: Config,
                  now: float) -> list[str]:  # fmt: skip
    try:
        previous = json.loads(target.get_bytes(f"{prefix}/{INDEX}"))
    except NotFound:
        previous = None
    except ValueError:
        previous = None  # an unreadable index is rebuilt from what is copied next
    record = found.verification
    copy = {"name": Path(record.path).name, "sha256": record.sha256, "step": record.global_step,
            "epoch": record.epoch, "metrics": record.metrics, "size_bytes": record.size_bytes}  # fmt: skip
    keep = config.mirror[item["target"]].keep_superseded
    index, doomed = render_index(previous, run=prefix, copy=copy, roles=str(item["role"]).split(","),
                                 keep_superseded=keep, now=now)  # fmt: skip
    target.put_bytes(f"{prefix}/{INDEX}", (json.dumps(index, indent=2) + "\n").encode())
    return doomed


def copy_keys(target: Target, prefix: str, name: str) -> list[str]:
    """The keys of one copied checkpoint: the file, or every file of a directory checkpoint (no sidecar)."""
    return [k for k in target.list(f"{prefix}/{name}") if k == f"{prefix}/{name}" or k.startswith(f"{prefix}/{name}/")]


def _delete_copy(target: Target, prefix: str, name: str) -> None:
    """Remove a superseded copy: its files first, then its sidecar."""
    for key in copy_keys(target, prefix, name):
        target.delete(key)
    target.delete(f"{prefix}/{name}{sidecar.SIDECAR_SUFFIX}")


# ------------------------------------------------------------------------------------ reading the targets


def indexes(target: Target, run: str | None = None) -> dict[str, dict[str, Any]]:
    """Every run's index.json on a target (or the one under `run`), keyed by run folder."""
    found = {}
    # Fix: list under "<run>/", not the bare string "<run>": S3-style prefixes are plain string matches, so
    # `ckptd ls TARGET runs/exp1` also showed runs/exp10's index.
    for key in target.list(run.strip("/") + "/" if run else ""):
        if key.endswith(f"/{INDEX}") or key == INDEX:
            try:
                found[key.removesuffix(INDEX).rstrip("/")] = json.loads(target.get_bytes(key))
            except (NotFound, ValueError):
                continue
    return found


def verify_target(config: Config, catalog: Catalog, target: Target, *, repair: bool = True) -> MirrorReport:
    """Read back every copy an index names, compare with its sha256, and repair from local copies that match."""
    logger = log.get("ckptd.mirror")
    report = MirrorReport()
    local = {row.sha256: row for row in catalog.present() if row.sha256}
    for prefix, index in indexes(target).items():
        for name, copy in index.get("copies", {}).items():
            report.checked += 1
            try:
                keys = copy_keys(target, prefix, name)
                stored = sidecar.parse(target.get_bytes(f"{prefix}/{name}{sidecar.SIDECAR_SUFFIX}"))
                bad = [k for k in keys if target.sha256(k) != _expected(stored, prefix, name, k)]
            except (MirrorError, sidecar.SidecarError) as exc:
                bad, stored = [f"{prefix}/{name}"], None
                logger.error("mirror copy unreadable", target=target.name, key=f"{prefix}/{name}", error=str(exc))
            if not bad and keys:
                continue
            report.failed.append(f"{target.name}:{prefix}/{name}")
            logger.error("mirror copy does not match its sidecar", target=target.name, key=f"{prefix}/{name}")
            row = local.get(copy.get("sha256"))
            if row is not None and Path(row.path).name != name:
                row = None  # renamed since (ckptd migrate): uploading it would not replace this copy
            if repair and row is not None and stored is not None:
                found = sidecar.read(Path(row.path))
                if found is not None and found.verification.sha256 == copy.get("sha256"):
                    # Fix: a repair that fails (the local file deleted by hand under its sidecar, the target
                    # going down) is reported as not repaired; it raised out of verify_target and ended
                    # `ckptd mirror --verify` with a traceback before the other copies were checked.
                    try:
                        copy_checkpoint(target, prefix, Path(row.path), found)
                    except (MirrorError, OSError) as exc:
                        logger.error("mirror copy repair failed", target=target.name, key=f"{prefix}/{name}",
                                     source=row.path, error=str(exc))  # fmt: skip
                        continue
                    report.repaired.append(f"{target.name}:{prefix}/{name}")
                    logger.info("mirror copy repaired", target=target.name, key=f"{prefix}/{name}", source=row.path)
    return report


def _expected(stored: sidecar.Sidecar, prefix: str, name: str, key: str) -> str | None:
    record = stored.verification
    if not record.is_directory:
        return record.sha256
    return (record.files or {}).get(key.removeprefix(f"{prefix}/{name}/"))


def restore(target: Target, run: str, role: str, destination: Path) -> tuple[Path, sidecar.Sidecar]:
    """Download a run's best or latest into `destination`, proving each file against the mirrored sidecar.

    Returns the restored path and its sidecar. Raises NotFound (no such run or role), IntegrityError.
    """
    try:
        index = json.loads(target.get_bytes(f"{run.strip('/')}/{INDEX}"))
    except NotFound:
        raise NotFound(f"{target.name}: no run {run!r} (no {run}/{INDEX}); see: ckptd ls {target.name}") from None
    chosen = index.get(role)
    if not chosen:
        raise NotFound(f"{target.name}:{run}: the index names no {role} checkpoint")
    prefix, name = run.strip("/"), chosen["name"]
    stored = sidecar.parse(target.get_bytes(f"{prefix}/{name}{sidecar.SIDECAR_SUFFIX}"))
    if stored.verification.sha256 != chosen["sha256"]:
        raise IntegrityError(f"{target.name}:{prefix}/{name}: sidecar and index disagree on the sha256")
    keys = copy_keys(target, prefix, name)
    if not keys:
        raise NotFound(f"{target.name}:{prefix}/{name}: the index names it but the target does not hold it")
    destination.mkdir(parents=True, exist_ok=True)
    restored = destination / name
    # Fix: download into a temp name beside the final one and move it into place only once its sha256 matches
    # the mirrored sidecar. Downloading straight to `restored` left a corrupted copy behind after the
    # IntegrityError (and could replace a good file already there with it).
    staging = temp_path_for(restored)
    try:
        for key in keys:
            local = staging if key == f"{prefix}/{name}" else staging / key.removeprefix(f"{prefix}/{name}/")
            local.parent.mkdir(parents=True, exist_ok=True)
            target.get_file(key, local)
        record = stored.verification
        if record.is_directory:
            files = {p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*"))
                     if p.is_file()}  # fmt: skip
            actual = directory_digest(files)
        else:
            actual = sha256_file(staging)
        if actual != record.sha256:
            raise IntegrityError(f"{restored}: sha256 {actual} does not match the mirrored sidecar's {record.sha256}")
        try:
            os.replace(staging, restored)
        except OSError as exc:
            raise MirrorError(f"{restored}: cannot move the restored copy into place: {exc}") from exc
        fsync_dir(destination)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
    return restored, stored
