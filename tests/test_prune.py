"""The retention executor over real torch checkpoints in tmp_path and a real catalog, and `ckptd prune/pin`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import checkpoints
import pytest

from ckptd import delete, sidecar
from ckptd.catalog import Catalog
from ckptd.config import Config, WatchConfig, load_config
from ckptd.discover import Candidate
from ckptd.prune import PruneReport, plan_watch, prune_watch
from ckptd.scan import reconcile, record, update_run
from ckptd.tables import human_bytes
from ckptd.verify import engine_versions, verify

CKPTD = Path(sys.executable).parent / "ckptd"
T0 = 1_700_000_000  # mtimes are T0 + step seconds, so "newer" never depends on the clock
LOSSES = {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.7, 5: 0.6}  # epoch -> val_loss: epoch 2 is the best
POLICY = "keep_last = 2\nkeep_best = 1\n"  # keeps epochs 5 (latest), 4 and 2 (best); deletes 1 and 3


@dataclass
class Env:
    """A watched folder `runs` with one run `exp1` of five verified checkpoints, its config and state folder."""

    root: Path
    config_path: Path

    @property
    def config(self) -> Config:
        """The config, read again (tests rewrite it)."""
        return load_config(self.config_path)

    @property
    def watch(self) -> WatchConfig:
        """The one watch, `runs`."""
        return self.config.watch[0]

    @property
    def runs(self) -> Path:
        """The watched folder."""
        return self.root / "runs"

    @property
    def state(self) -> Path:
        """The state folder."""
        return self.root / "state"

    def ckpt(self, epoch: int, run: str = "exp1") -> Path:
        """The path of an epoch's checkpoint."""
        return self.runs / run / f"epoch={epoch}.pt"

    def catalog(self) -> Catalog:
        """A connection to the catalog."""
        return Catalog(self.state)

    def finish_pending(self) -> int:
        """What the next retention pass does first: complete the journal intents a killed pass left."""
        with self.catalog() as catalog:
            return delete.finish_pending(catalog, {"runs": self.runs}, self.state)


def _write_config(root: Path, retention: str) -> Path:
    path = root / "config.toml"
    path.write_text(
        '[daemon]\nstate_dir = "state"\n\n[[watch]]\nname = "runs"\npath = "runs"\nsettle_seconds = 0\n\n'
        f'[watch.metric]\nname = "val_loss"\nmode = "min"\n\n[watch.retention]\n{retention}',
        encoding="utf-8",
    )
    return path


def _checkpoint(path: Path, epoch: int, loss: float) -> Path:
    """A real, small torch checkpoint of `epoch` (step 100 * epoch, mtime T0 + step)."""
    checkpoints.torch_zip(path, epoch=epoch, global_step=100 * epoch, metrics={"val_loss": loss}, size_floats=256)
    os.utime(path, (T0, T0 + 100 * epoch))
    return path


def scan(env: Env) -> None:
    """Verify and catalog everything new or changed in the watched folder, as `ckptd scan` does."""
    watch = env.watch
    with env.catalog() as catalog:
        report = reconcile(
            watch.path, watch=watch.name, patterns=watch.patterns, catalog=catalog, verifier=verify,
            engine=engine_versions,
        )  # fmt: skip
    assert not report.failed and not report.busy


def prune(env: Env, *, dry_run: bool = False) -> PruneReport:
    """One retention pass over the watch, as the daemon's job runs it."""
    watch = env.watch
    assert watch.retention is not None
    with env.catalog() as catalog:
        return prune_watch(
            watch, watch.retention, catalog=catalog, state_dir=env.state, dry_run=dry_run,
            awaiting_mirror=lambda: catalog.awaiting_mirror(watch.name),
        )  # fmt: skip


def ckptd(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the installed `ckptd` with args; return the finished process."""
    wide = {**os.environ, "COLUMNS": "250"}  # rich wraps tables to the terminal; one row a line here
    return subprocess.run([CKPTD, *map(str, args)], capture_output=True, text=True, timeout=120, env=wide)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256 of the bytes, or the target of a link} for everything under folder."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"-> {path.readlink()}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def journal(env: Env) -> list[dict[str, Any]]:
    """Every journal row, read with sqlite3 as an operator would."""
    db = sqlite3.connect(env.state / "catalog.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM journal ORDER BY id")]
    finally:
        db.close()


def orphan_sidecars(folder: Path) -> list[Path]:
    """Sidecars under folder whose checkpoint is gone."""
    return [s for s in folder.rglob(f"*{sidecar.SIDECAR_SUFFIX}") if not sidecar.checkpoint_of(s).exists()]  # type: ignore[union-attr]


def trash(folder: Path) -> list[str]:
    """The executor's trash names left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(delete.TRASH_PREFIX))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    """Five verified checkpoints of runs/exp1 (epochs 1-5, val_loss in LOSSES) under keep_last 2, keep_best 1."""
    for epoch, loss in LOSSES.items():
        _checkpoint(tmp_path / "runs" / "exp1" / f"epoch={epoch}.pt", epoch, loss)
    made = Env(tmp_path, _write_config(tmp_path, POLICY))
    scan(made)
    return made


@pytest.fixture
def sha(env: Env) -> dict[int, str]:
    """epoch -> sha256 of its checkpoint's bytes, taken before any test acts."""
    return {e: hashlib.sha256(env.ckpt(e).read_bytes()).hexdigest() for e in LOSSES}


# ------------------------------------------------------------------------------------------- deleting


def test_prune_deletes_exactly_the_planned_checkpoints_with_their_sidecars(env: Env, sha: dict[int, str]) -> None:
    """The planned deletions go, checkpoint and sidecar; each is journaled done with reasons, sha256 and size."""
    sizes = {e: env.ckpt(e).stat().st_size for e in LOSSES}
    with env.catalog() as catalog:
        planned = plan_watch(env.watch, env.watch.retention, catalog, time.time(), frozenset())  # type: ignore[arg-type]
    actions = {Path(d.path).name: (d.action, d.reasons) for d in planned.decisions}
    assert actions == {
        "epoch=1.pt": ("delete", ("no keep rule applies",)),
        "epoch=2.pt": ("keep", ("best val_loss=0.3",)),
        "epoch=3.pt": ("delete", ("no keep rule applies",)),
        "epoch=4.pt": ("keep", ("keep_last 2/2",)),
        "epoch=5.pt": ("keep", ("latest", "keep_last 1/2")),
    }
    report = prune(env)
    assert sorted(Path(d.path).name for d in report.done) == ["epoch=1.pt", "epoch=3.pt"] and not report.skipped
    for epoch in (1, 3):
        assert not env.ckpt(epoch).exists() and not sidecar.sidecar_path(env.ckpt(epoch)).exists()
    for epoch in (2, 4, 5):
        assert env.ckpt(epoch).exists() and sidecar.sidecar_path(env.ckpt(epoch)).exists()
    rows = journal(env)
    assert [(r["path"], r["state"], r["action"], r["watch"]) for r in rows] == [
        (str(env.ckpt(1)), "done", "delete", "runs"),
        (str(env.ckpt(3)), "done", "delete", "runs"),
    ]
    for row, epoch in zip(rows, (1, 3), strict=True):
        assert (row["sha256"], row["size"]) == (sha[epoch], sizes[epoch])
        assert json.loads(row["reasons"]) == ["no keep rule applies"]
        assert row["run"] == str(env.runs / "exp1") and row["done_at"] >= row["planned_at"]
    with env.catalog() as catalog:
        assert sorted(Path(r.path).name for r in catalog.present(watch="runs")) == [
            "epoch=2.pt",
            "epoch=4.pt",
            "epoch=5.pt",
        ]
        assert catalog.get(str(env.ckpt(1))).gone_at is not None  # type: ignore[union-attr]
    assert prune(env).done == [], "a second pass finds nothing more to do"


def test_dry_run_deletes_nothing(env: Env) -> None:
    """--dry-run, or dry_run = true in the policy, plans the same deletions and changes no file and no journal."""
    before = snapshot(env.root / "runs")
    report = prune(env, dry_run=True)
    assert report.dry_run and report.done == [] and report.skipped == []
    assert sorted(Path(d.path).name for d in report.plan.decisions if d.action == "delete") == [
        "epoch=1.pt",
        "epoch=3.pt",
    ]
    _write_config(env.root, POLICY + "dry_run = true\n")
    by_policy = prune(env)
    assert by_policy.dry_run and by_policy.done == [] and by_policy.plan.freed() > 0
    listed = ckptd("prune", "--config", env.config_path, "--dry-run", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(Path(r["path"]).name for r in json.loads(listed.stdout) if r["action"] == "delete") == [
        "epoch=1.pt",
        "epoch=3.pt",
    ]
    assert snapshot(env.root / "runs") == before
    assert journal(env) == []
    with env.catalog() as catalog:
        assert len(list(catalog.present(watch="runs"))) == 5


def test_a_directory_checkpoint_is_deleted_whole_with_its_sidecar(env: Env) -> None:
    """An older sharded safetensors folder is deleted whole (no half-deleted folder or trash left), then its sidecar."""
    older, newer = env.runs / "exp2" / "model-a", env.runs / "exp2" / "model-b"
    for folder in (older, newer):
        checkpoints.safetensors_sharded(folder)
    for offset, folder in enumerate((older, newer)):
        for path in [folder, *folder.iterdir()]:
            os.utime(path, (T0, T0 + offset))
    _write_config(env.root, "keep_last = 1\nkeep_best = 0\n")
    scan(env)
    report = prune(env)
    assert str(older) in {d.path for d in report.done}
    assert not older.exists() and not sidecar.sidecar_path(older).exists()
    assert newer.is_dir() and sidecar.sidecar_path(newer).exists()
    assert sorted(p.name for p in (env.runs / "exp2").iterdir()) == ["model-b", "model-b.ckptd.json"]


# ------------------------------------------------------------------------------------------- corrupt


def test_a_corrupt_checkpoint_is_quarantined_with_a_note_and_its_sidecar(env: Env) -> None:
    """A checkpoint with a flipped tensor byte moves to <state>/quarantine/<watch>/<relative path>, with a note."""
    victim = env.ckpt(3)
    checkpoints.flip_tensor_byte(victim)  # a real write: a new mtime, so the next scan verifies it again
    scan(env)
    with env.catalog() as catalog:
        assert catalog.get(str(victim)).status == "corrupt"  # type: ignore[union-attr]
    corrupt_bytes = hashlib.sha256(victim.read_bytes()).hexdigest()
    report = prune(env)
    target = env.state / "quarantine" / "runs" / "exp1" / "epoch=3.pt"
    assert [(Path(d.path).name, d.action) for d in report.done] == [
        ("epoch=1.pt", "delete"),
        ("epoch=3.pt", "quarantine"),
    ]
    assert not victim.exists() and not sidecar.sidecar_path(victim).exists()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == corrupt_bytes
    moved = sidecar.read(target)
    assert moved is not None and moved.verification.status == "corrupt"
    note = json.loads(target.with_name("epoch=3.pt.quarantine.json").read_text())
    assert note["original_path"] == str(victim) and note["reasons"] == ["corrupt, on_corrupt=quarantine"]
    assert note["sha256"] == moved.verification.sha256 and note["size_bytes"] == target.stat().st_size
    assert any("CRC-32 mismatch" in p for p in note["problems"])
    row = next(r for r in journal(env) if r["path"] == str(victim))
    assert (row["action"], row["state"], row["detail"]) == ("quarantine", "done", str(target))
    assert json.loads(row["reasons"]) == ["corrupt, on_corrupt=quarantine"]


@pytest.mark.parametrize(("on_corrupt", "survives"), [("keep", True), ("delete", False)])
def test_on_corrupt_keep_or_delete(env: Env, on_corrupt: str, survives: bool) -> None:
    """on_corrupt = keep leaves a corrupt checkpoint in place; delete deletes it, journaled with why."""
    checkpoints.flip_tensor_byte(env.ckpt(3))
    scan(env)
    _write_config(env.root, POLICY + f'on_corrupt = "{on_corrupt}"\n')
    prune(env)
    assert env.ckpt(3).exists() is survives
    assert not (env.state / "quarantine").exists()
    rows = [r for r in journal(env) if r["path"] == str(env.ckpt(3))]
    if survives:
        assert rows == []
    else:
        assert [(r["action"], json.loads(r["reasons"])) for r in rows] == [("delete", ["corrupt, on_corrupt=delete"])]


# ------------------------------------------------------------------------------------------- refusals


def test_a_checkpoint_rewritten_after_verification_is_skipped(env: Env) -> None:
    """A planned deletion whose file changed since it was verified is skipped and left alone, unjournaled."""
    checkpoints.torch_zip(env.ckpt(1), epoch=1, global_step=100, metrics={"val_loss": 0.95}, size_floats=300)
    rewritten = snapshot(env.runs)
    report = prune(env)
    assert [(Path(d.path).name, why) for d, why in report.skipped] == [
        ("epoch=1.pt", "changed since it was planned (new bytes or another file under its name); planned again later")
    ]
    assert [Path(d.path).name for d in report.done] == ["epoch=3.pt"]
    assert snapshot(env.runs)["exp1/epoch=1.pt"] == rewritten["exp1/epoch=1.pt"]
    assert [Path(r["path"]).name for r in journal(env)] == ["epoch=3.pt"]
    scan(env)  # verified again, it is deletable once more
    assert [Path(d.path).name for d in prune(env).done] == ["epoch=1.pt"]


def test_the_target_of_a_link_is_kept_and_the_link_is_never_touched(env: Env) -> None:
    """A symbolic link inside the watch protects its target; the link itself is never planned or deleted."""
    link = env.runs / "exp1" / "chosen.pt"
    link.symlink_to("epoch=3.pt")
    scan(env)
    report = prune(env)
    kept = {Path(d.path).name: d.reasons for d in report.plan.decisions if d.action == "keep"}
    assert kept["epoch=3.pt"] == (f"target of link {link}",)
    assert str(link) not in {d.path for d in report.plan.decisions}
    assert link.is_symlink() and env.ckpt(3).exists() and not env.ckpt(1).exists()


def test_a_checkpoint_replaced_by_a_symlink_is_never_deleted(env: Env) -> None:
    """A cataloged checkpoint that became a link (to a file outside the watch) is refused: link and target stay."""
    outside = _checkpoint(env.root / "elsewhere" / "precious.pt", 1, 0.1)
    env.ckpt(1).unlink()
    env.ckpt(1).symlink_to(outside)
    report = prune(env)
    assert (str(env.ckpt(1)), "is a symbolic link") in {(d.path, why) for d, why in report.skipped}
    assert env.ckpt(1).is_symlink() and outside.exists()
    assert str(env.ckpt(1)) not in {r["path"] for r in journal(env)}


def test_nothing_outside_the_watched_folder_is_deleted(env: Env) -> None:
    """Rows that resolve outside the watch (a path elsewhere, a run folder linked out) are refused and left alone."""
    elsewhere = [_checkpoint(env.root / "elsewhere" / "exp9" / f"epoch={e}.pt", e, 0.5) for e in (1, 2, 3)]
    real_run = env.root / "outside-run"
    for e in (1, 2, 3):
        _checkpoint(real_run / f"epoch={e}.pt", e, 0.5)
    (env.runs / "linked").symlink_to(real_run, target_is_directory=True)
    linked = [env.runs / "linked" / f"epoch={e}.pt" for e in (1, 2, 3)]
    with env.catalog() as catalog:  # what a watch whose path changed, or a run folder that became a link, leaves
        for path in elsewhere + linked:
            candidate = Candidate(path, "file", path.parent)
            record(candidate, verify(path), watch="runs", catalog=catalog, engine={}, now=time.time(), root=path.parent)
    before = snapshot(env.root / "elsewhere") | snapshot(real_run)
    report = prune(env)
    refused = {Path(d.path).relative_to(env.root).as_posix(): why for d, why in report.skipped}
    assert refused == {
        "elsewhere/exp9/epoch=1.pt": f"lies outside the watched folder {env.runs}",
        "runs/linked/epoch=1.pt": "a folder on its path is now a symbolic link or no folder; not followed",
    }
    assert snapshot(env.root / "elsewhere") | snapshot(real_run) == before
    assert {Path(r["path"]).name for r in journal(env)} == {"epoch=1.pt", "epoch=3.pt"}
    assert all(r["path"].startswith(str(env.runs / "exp1")) for r in journal(env))


# ---------------------------------------------------------------------------------------- interruptions


def test_a_run_killed_between_checkpoint_and_sidecar_is_finished_by_the_next(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between unlinking a checkpoint and its sidecar: the next run removes the sidecar, closes the row."""
    real_unlink = os.unlink

    def killed(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(sidecar.SIDECAR_SUFFIX):
            raise KeyboardInterrupt  # what SIGINT does, and no `except OSError` catches it
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        prune(env)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert not env.ckpt(1).exists() and sidecar.sidecar_path(env.ckpt(1)).exists()
    assert trash(env.runs / "exp1") == []
    assert [(Path(r["path"]).name, r["state"]) for r in journal(env)] == [("epoch=1.pt", "pending")]
    assert env.finish_pending() == 1
    with env.catalog() as catalog:
        assert catalog.get(str(env.ckpt(1))).gone_at is not None  # type: ignore[union-attr]
        assert str(env.ckpt(1)) not in {r.path for r in catalog.present(watch="runs")}
    assert orphan_sidecars(env.runs) == []
    assert [(r["state"], r["detail"]) for r in journal(env)] == [("done", "completed after an interruption")]
    report = prune(env)  # the next run finishes the plan
    assert [Path(d.path).name for d in report.done] == ["epoch=3.pt"]
    assert sorted(p.name for p in (env.runs / "exp1").glob("*.pt")) == ["epoch=2.pt", "epoch=4.pt", "epoch=5.pt"]


def test_a_run_killed_after_the_move_to_trash_is_finished_by_the_next(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed once the checkpoint is under its trash name: the next run deletes exactly that, then the sidecar."""
    real_identity = delete.identity_at

    def killed(dir_fd: int, name: str) -> Any:
        if name.startswith(delete.TRASH_PREFIX):
            raise KeyboardInterrupt
        return real_identity(dir_fd, name)

    monkeypatch.setattr(delete, "identity_at", killed)
    with pytest.raises(KeyboardInterrupt):
        prune(env)
    monkeypatch.undo()
    assert not env.ckpt(1).exists() and len(trash(env.runs / "exp1")) == 1, "never seen half-gone under its name"
    [pending] = journal(env)
    assert (pending["state"], pending["trash"]) == ("pending", trash(env.runs / "exp1")[0])
    assert env.finish_pending() == 1
    assert trash(env.runs / "exp1") == [] and orphan_sidecars(env.runs) == []
    assert [r["state"] for r in journal(env)] == ["done"]


def test_a_pending_intent_whose_file_still_exists_is_closed_as_skipped(env: Env) -> None:
    """An intent written just before a kill, its file untouched: closed as skipped; the file, sidecar and row stay."""
    with env.catalog() as catalog:
        catalog.journal_intent(
            action="delete", watch="runs", run=str(env.runs / "exp1"), path=str(env.ckpt(4)), sha256=None, size=1,
            reasons=["no keep rule applies"], now=time.time(), folder=str(env.runs / "exp1"),
            trash=delete.TRASH_PREFIX + "0123456789abcdef",
        )  # fmt: skip
    assert env.finish_pending() == 0
    with env.catalog() as catalog:
        assert catalog.get(str(env.ckpt(4))).gone_at is None  # type: ignore[union-attr]
    assert env.ckpt(4).exists() and sidecar.sidecar_path(env.ckpt(4)).exists()
    assert [(r["state"], r["detail"]) for r in journal(env)] == [("skipped", "interrupted before acting")]
    assert env.ckpt(4).name not in {Path(d.path).name for d in prune(env).done}, "the next plan decides again"


def test_a_trash_holding_other_bytes_is_put_back_not_deleted(env: Env) -> None:
    """A pending intent whose trash name holds another file than the journaled one: it is put back, never deleted."""
    stranger = env.runs / "exp1" / (delete.TRASH_PREFIX + "0123456789abcdef")
    shutil.copyfile(env.ckpt(4), stranger)
    with env.catalog() as catalog:
        row = catalog.get(str(env.ckpt(1)))
        assert row is not None
        catalog.journal_intent(
            action="delete", watch="runs", run=row.run, path=row.path, sha256=row.sha256, size=row.size,
            reasons=["no keep rule applies"], now=time.time(), identity=row.entry().identity,
            folder=row.run, trash=stranger.name,
        )  # fmt: skip
    env.ckpt(1).unlink()  # its name is free: what is in the trash goes back under it
    assert env.finish_pending() == 0
    assert env.ckpt(1).read_bytes() == env.ckpt(4).read_bytes() and not stranger.exists()
    [row] = journal(env)
    assert row["state"] == "skipped" and "not what was planned: put back" in row["detail"]


def test_a_quarantine_killed_halfway_is_finished_by_the_next_run(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the sidecar moved to quarantine and before the checkpoint did: the next pass completes it."""
    victim = env.ckpt(3)
    checkpoints.flip_tensor_byte(victim)
    scan(env)
    corrupt = hashlib.sha256(victim.read_bytes()).hexdigest()
    real_move = delete._move
    calls: list[str] = []

    def move(src_fd: int, src: str, *args: Any, **kwargs: Any) -> None:
        calls.append(src)
        if src.startswith(delete.TRASH_PREFIX):
            raise KeyboardInterrupt
        real_move(src_fd, src, *args, **kwargs)

    monkeypatch.setattr(delete, "_move", move)
    with pytest.raises(KeyboardInterrupt):
        prune(env)
    monkeypatch.undo()
    assert calls == ["epoch=3.pt.ckptd.json", *trash(env.runs / "exp1")]
    assert not victim.exists(), "a checkpoint half quarantined is never seen under its name"
    report = prune(env)  # finishes the pending quarantine first
    target = env.state / "quarantine" / "runs" / "exp1" / "epoch=3.pt"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == corrupt and sidecar.sidecar_path(target).exists()
    assert trash(env.runs / "exp1") == [] and orphan_sidecars(env.runs) == []
    assert [r["state"] for r in journal(env) if r["path"] == str(victim)] == ["done"]
    assert str(victim) not in {d.path for d in report.plan.decisions}


def test_a_pending_quarantine_that_cannot_be_finished_is_put_back_never_left_hidden(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed with the checkpoint under its trash name, then the next run cannot finish the quarantine (the
    state folder full, faked here: the real room check is exercised on a tmpfs in test_faults_daemon): the
    checkpoint goes back under its name, never left hidden (it would read as a trainer's own deletion)."""
    victim = env.ckpt(3)
    checkpoints.flip_tensor_byte(victim)
    scan(env)
    before = victim.read_bytes()
    real_move = delete._move

    def move(src_fd: int, src: str, *args: Any, **kwargs: Any) -> None:
        if src.startswith(delete.TRASH_PREFIX):
            raise KeyboardInterrupt
        real_move(src_fd, src, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(delete, "_move", move)
        with pytest.raises(KeyboardInterrupt):
            prune(env)
    assert not victim.exists()

    def no_room(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(delete, "_check_room", no_room)
        assert env.finish_pending() == 0
    assert victim.read_bytes() == before and trash(env.runs / "exp1") == []
    (entry,) = [r for r in journal(env) if r["path"] == str(victim)]
    assert entry["state"] == "skipped" and "put back" in entry["detail"]


def test_an_interrupted_directory_deletion_is_finished_by_the_next_run(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while removing a directory checkpoint: it is already gone from its name; the next run clears the rest."""
    older, newer = env.runs / "exp2" / "model-a", env.runs / "exp2" / "model-b"
    for offset, folder in enumerate((older, newer)):
        checkpoints.safetensors_sharded(folder)
        for path in [folder, *folder.iterdir()]:
            os.utime(path, (T0, T0 + offset))
    _write_config(env.root, "keep_last = 1\nkeep_best = 0\n")
    scan(env)
    real_unlink = os.unlink

    def killed(path: Any, *args: Any, **kwargs: Any) -> None:  # rmtree removed one file, then the kill came
        real_unlink(path, *args, **kwargs)
        if str(path).endswith(".safetensors"):
            monkeypatch.setattr(os, "unlink", real_unlink)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        prune(env)
    monkeypatch.undo()
    assert not older.exists(), "a half-deleted checkpoint is never seen under its own name"
    assert len(trash(env.runs / "exp2")) == 1 and sidecar.sidecar_path(older).exists()
    assert [r["state"] for r in journal(env) if r["path"] == str(older)] == ["pending"]
    assert env.finish_pending() == 1
    assert sorted(p.name for p in (env.runs / "exp2").iterdir()) == ["model-b", "model-b.ckptd.json"]
    assert [r["state"] for r in journal(env) if r["path"] == str(older)] == ["done"]


def test_a_failed_deletion_is_reported_left_whole_and_retried(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while deleting is reported as skipped, leaves checkpoint and sidecar, and is retried next run."""
    real_unlink = os.unlink
    moved: list[str] = []

    def failing(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(delete.TRASH_PREFIX) and not moved:
            moved.append(str(path))
            raise OSError(5, "Input/output error")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing)
    report = prune(env)
    monkeypatch.undo()
    assert [(Path(d.path).name, why) for d, why in report.skipped] == [
        ("epoch=1.pt", "failed: [Errno 5] Input/output error")
    ]
    assert env.ckpt(1).exists() and sidecar.sidecar_path(env.ckpt(1)).exists() and not env.ckpt(3).exists()
    again = prune(env)
    assert [Path(d.path).name for d in again.done] == ["epoch=1.pt"] and not env.ckpt(1).exists()
    assert [r["state"] for r in journal(env) if r["path"] == str(env.ckpt(1))] == ["skipped", "done"]


def test_a_checkpoint_deleted_behind_its_back_is_skipped_as_already_gone(env: Env) -> None:
    """A planned checkpoint someone else removed is skipped as already gone, and nothing is journaled for it."""
    env.ckpt(1).unlink()
    report = prune(env)
    assert (str(env.ckpt(1)), "already gone") in {(d.path, why) for d, why in report.skipped}
    assert [Path(r["path"]).name for r in journal(env)] == ["epoch=3.pt"]


def test_a_second_quarantine_at_the_same_path_keeps_the_first(env: Env) -> None:
    """A corrupt checkpoint written again at a quarantined path goes beside the first one, never over it."""
    victim = env.ckpt(3)
    target = env.state / "quarantine" / "runs" / "exp1" / "epoch=3.pt"
    checkpoints.flip_tensor_byte(victim)
    scan(env)
    prune(env)
    first = hashlib.sha256(target.read_bytes()).hexdigest()
    _checkpoint(victim, 3, 0.8)
    checkpoints.flip_pickle_byte(victim)
    scan(env)
    second = hashlib.sha256(victim.read_bytes()).hexdigest()
    report = prune(env)
    [moved] = [r["detail"] for r in journal(env) if r["path"] == str(victim) and r["detail"] != str(target)]
    assert [d.action for d in report.done] == ["quarantine"] and Path(moved).parent == target.parent
    assert Path(moved).name.startswith("epoch=3.pt.") and hashlib.sha256(Path(moved).read_bytes()).hexdigest() == second
    assert hashlib.sha256(target.read_bytes()).hexdigest() == first


# ---------------------------------------------------------------------------------------- pins, mirrors, CLI


def test_ckptd_pin_keeps_a_checkpoint_and_unpin_lets_retention_decide(env: Env) -> None:
    """`ckptd pin` marks catalog and sidecar; prune keeps it as pinned; after `ckptd unpin` it is deleted."""
    done = ckptd("pin", env.ckpt(3), "--config", env.config_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"pinned: {env.ckpt(3)}"
    parsed = sidecar.read(env.ckpt(3))
    assert parsed is not None and parsed.pinned
    pruned = ckptd("prune", "--config", env.config_path, "--json")
    assert pruned.returncode == 0, pruned.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(pruned.stdout)}
    assert (rows["epoch=3.pt"]["action"], rows["epoch=3.pt"]["reasons"]) == ("keep", ["pinned"])
    assert env.ckpt(3).exists() and not env.ckpt(1).exists()
    assert ckptd("unpin", env.ckpt(3), "--config", env.config_path).returncode == 0
    assert not sidecar.read(env.ckpt(3)).pinned  # type: ignore[union-attr]
    assert ckptd("prune", "--config", env.config_path).returncode == 0
    assert not env.ckpt(3).exists()


def test_pin_refuses_a_checkpoint_the_catalog_does_not_know(env: Env) -> None:
    """`ckptd pin` on an unscanned file exits 1 and says to verify it first."""
    stranger = _checkpoint(env.runs / "exp1" / "epoch=9.pt", 9, 0.1)
    done = ckptd("pin", stranger, "--config", env.config_path)
    assert done.returncode == 1 and "not in the catalog yet" in done.stderr


def test_ckptd_prune_json_lists_every_checkpoint_and_applies_the_plan(env: Env) -> None:
    """`ckptd prune --json` prints one object per checkpoint with path, run, action, reasons, size_bytes; it applies."""
    sizes = {str(env.ckpt(e)): env.ckpt(e).stat().st_size for e in LOSSES}
    done = ckptd("prune", "--config", env.config_path, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert sorted(r["path"] for r in rows) == sorted(sizes)
    for row in rows:
        assert {"path", "run", "action", "reasons", "size_bytes"} <= row.keys()
        assert row["run"] == str(env.runs / "exp1") and row["size_bytes"] == sizes[row["path"]]
        assert row["action"] in ("keep", "delete") and row["reasons"] and isinstance(row["reasons"], list)
        assert Path(row["path"]).exists() is (row["action"] == "keep")


def test_ckptd_prune_prints_a_table_per_run_with_bytes_freed_and_budget_warnings(env: Env) -> None:
    """The table gives each checkpoint's action and reasons per run, the bytes freed, and an unmet max_size."""
    _write_config(env.root, POLICY + 'max_size = "1KB"\n')
    freed = sum(env.ckpt(e).stat().st_size for e in (1, 3, 4))
    done = ckptd("prune", "--config", env.config_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"runs: {env.runs / 'exp1'}" in lines[0]
    # piped: one tab-separated record per checkpoint (its full path, action, size in bytes, reasons)
    records = [line.split("\t") for line in lines if not line.startswith("#")]
    rows = {Path(path).name: [action, human_bytes(int(size)), reasons] for path, action, size, reasons in records}
    size = human_bytes(env.ckpt(2).stat().st_size)
    assert rows == {
        "epoch=1.pt": ["delete", size, "no keep rule applies"],
        "epoch=2.pt": ["keep", size, "best val_loss=0.3"],
        "epoch=3.pt": ["delete", size, "no keep rule applies"],
        "epoch=4.pt": [
            "delete",
            size,
            f"over max_size 1.0KB ({3 * env.ckpt(2).stat().st_size / 1000:.1f}KB kept), oldest first; keep_last 2/2",
        ],
        "epoch=5.pt": ["keep", size, "latest; keep_last 1/2"],
    }
    assert f"# runs: freed {human_bytes(freed)}" in lines
    assert any(line.startswith("# warning max_size 1.0KB cannot be met: ") for line in lines)
    assert "retention cannot meet its budget" in done.stderr, "and the log says so"
    assert sorted(p.name for p in (env.runs / "exp1").glob("*.pt")) == ["epoch=2.pt", "epoch=5.pt"]


def test_a_checkpoint_awaiting_a_mirror_is_kept_until_copied(env: Env) -> None:
    """A pending or failed row in mirror_queue keeps a checkpoint ('awaiting mirror'); done or dropped, it may go."""
    with env.catalog() as catalog:
        rows = {e: catalog.get(str(env.ckpt(e))) for e in (1, 3)}
    db = sqlite3.connect(env.state / "catalog.sqlite3")
    queue = (
        "INSERT INTO mirror_queue (target, path, watch, run, role, sha256, state, queued_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    with db:
        for epoch, state in ((1, "pending"), (3, "dropped")):  # dropped: no longer wanted before it was copied
            row = rows[epoch]
            assert row is not None and row.sha256
            db.execute(queue, ("backup", row.path, "runs", row.run, "latest", row.sha256, state, time.time()))
    report = prune(env)
    decision = next(d for d in report.plan.decisions if d.path == str(env.ckpt(1)))
    assert (decision.action, decision.reasons) == ("keep", ("awaiting mirror",))
    assert env.ckpt(1).exists() and not env.ckpt(3).exists()
    with db:
        db.execute("UPDATE mirror_queue SET state = 'failed', attempts = 1 WHERE path = ?", (str(env.ckpt(1)),))
    assert prune(env).done == [] and env.ckpt(1).exists(), "a failed copy is retried, so still awaited"
    with db:
        db.execute(
            "UPDATE mirror_queue SET state = 'done', done_at = ? WHERE path = ?", (time.time(), str(env.ckpt(1)))
        )
    db.close()
    assert [Path(d.path).name for d in prune(env).done] == ["epoch=1.pt"]


# ------------------------------------------------------------------------------------------- one run


def test_a_run_is_planned_from_its_own_rows(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a watch-wide budget each run is planned from its own rows only (`prune --run` then costs the
    same at a million checkpoints), and planning the watch run by run decides exactly what one plan would."""
    for epoch, loss in LOSSES.items():
        _checkpoint(env.ckpt(epoch, "exp2"), epoch, loss + 0.05)
    scan(env)
    with env.catalog() as catalog:
        whole = plan_watch(env.watch, env.watch.retention, catalog, T0 + 10_000, frozenset())  # type: ignore[arg-type]
        read: list[str] = []
        real = catalog.in_run
        monkeypatch.setattr(catalog, "in_run", lambda run: read.append(run) or real(run))
        monkeypatch.setattr(catalog, "present", lambda **_: pytest.fail("a run's plan read the whole watch"))
        exp2 = str(env.runs / "exp2")
        one = plan_watch(env.watch, env.watch.retention, catalog, T0 + 10_000, frozenset(), run=exp2)  # type: ignore[arg-type]
    assert read == [exp2]
    assert one.decisions == [d for d in whole.decisions if d.run == exp2] and len(one.decisions) == 5
    assert {d.run for d in whole.decisions} == {str(env.runs / "exp1"), exp2}


def test_ckptd_prune_run_applies_retention_to_that_run_only(env: Env) -> None:
    for epoch, loss in LOSSES.items():
        _checkpoint(env.ckpt(epoch, "exp2"), epoch, loss)
    scan(env)
    done = ckptd("prune", "--config", env.config_path, "--json", "--run", env.runs / "exp2")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert {r["run"] for r in rows} == {str(env.runs / "exp2")}
    assert sorted(Path(r["path"]).name for r in rows if r["action"] == "delete") == ["epoch=1.pt", "epoch=3.pt"]
    assert all(env.ckpt(e, "exp1").exists() for e in LOSSES)  # the other run untouched
    assert not env.ckpt(1, "exp2").exists() and env.ckpt(2, "exp2").exists()


def test_ckptd_prune_run_outside_every_watch_says_which_folders_are_watched(env: Env, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = ckptd("prune", "--config", env.config_path, "--dry-run", "--run", elsewhere)
    assert done.returncode == 2 and "not in a watched folder" in done.stderr and str(env.runs) in done.stderr


def test_ckptd_status_run_reports_that_run_only(env: Env) -> None:
    for epoch, loss in LOSSES.items():
        _checkpoint(env.ckpt(epoch, "exp2"), epoch, loss)
    checkpoints.truncate(env.ckpt(3, "exp2"))
    scan(env)
    with env.catalog() as catalog:  # runs' latest and best, as the daemon's record step stores them
        for run in ("exp1", "exp2"):
            update_run(catalog, watch="runs", run=str(env.runs / run), metric=env.watch.metric, now=T0)
    done = ckptd("status", "--config", env.config_path, "--json", "--run", env.runs / "exp2")
    assert done.returncode == 0, done.stderr
    watch = json.loads(done.stdout)["watches"]["runs"]
    assert watch["run"] == str(env.runs / "exp2")
    assert watch["checkpoints"] == {"ok": 4, "corrupt": 1}
    assert [r["run"] for r in watch["runs"]] == [str(env.runs / "exp2")]
    assert [Path(n["path"]).name for n in watch["not_ok"]] == ["epoch=3.pt"]
    assert watch["runs"][0]["best"] == str(env.ckpt(2, "exp2"))


def test_a_pin_made_through_another_boxs_catalog_is_kept_by_this_one(env: Env) -> None:
    """Two boxes share the folder; a person pins epoch 1 with `ckptd pin` on the box that stands by, which
    writes `pinned` into the shared sidecar and its own catalog only. This box's plan still deletes epoch 1
    (its catalog does not know the pin), so the one executor reads the sidecar before it removes anything: it
    refuses, learns the pin, and the next plan keeps epoch 1 as pinned."""
    sidecar.set_pinned(env.ckpt(1), True)  # what `ckptd pin` on the other box does to the shared folder
    dry = prune(env, dry_run=True)
    assert [(Path(d.path).name, why) for d, why in dry.skipped] == [
        ("epoch=1.pt", "pinned in its sidecar (a `ckptd pin`, perhaps on another box sharing the folder)")
    ]
    with env.catalog() as catalog:
        assert catalog.get(str(env.ckpt(1))).pinned is False  # type: ignore[union-attr]  # a dry run changes nothing
    report = prune(env)
    assert [Path(d.path).name for d, _why in report.skipped] == ["epoch=1.pt"]
    assert [Path(d.path).name for d in report.done] == ["epoch=3.pt"]
    assert env.ckpt(1).exists() and not env.ckpt(3).exists()
    again = prune(env, dry_run=True)
    kept = {Path(d.path).name: d for d in again.plan.decisions}
    assert kept["epoch=1.pt"].action == "keep" and not again.skipped


def test_ckptd_pin_on_a_standby_box_pins_through_the_shared_sidecar(env: Env, tmp_path: Path) -> None:
    """A standby box never verified the shared folder's checkpoints (its catalog has no row of them), yet
    `ckptd pin` there works: it writes `pinned` into the shared sidecar, which the owner honours."""
    standby = tmp_path / "standby.toml"
    standby.write_text(env.config_path.read_text().replace('state_dir = "state"', 'state_dir = "standby-state"'))
    done = ckptd("pin", env.ckpt(1), "--config", standby)
    assert done.returncode == 0, done.stderr
    found = sidecar.read(env.ckpt(1))
    assert found is not None and found.pinned
    report = prune(env)  # the owner's retention: its catalog never heard of the pin
    assert env.ckpt(1).exists() and [Path(d.path).name for d, _why in report.skipped] == ["epoch=1.pt"]
