"""The deletion executor under a changing disk: what was planned is deleted, or nothing is.

Each race runs deterministically: a plan is made, the disk is changed the way a trainer or another local user
would change it (rewriting a file in place, swapping a run folder for a link), then the plan is applied. The
same races under the real daemon are in tests/e2e/test_hostile_daemon.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from test_prune import LOSSES, Env, _checkpoint, journal, prune, scan, snapshot, trash
from test_prune import env as env  # the fixture: five verified checkpoints of runs/exp1
from trainer_fixtures import CopyOutput

from ckptd import delete
from ckptd.catalog import Catalog
from ckptd.config import load_config
from ckptd.model import Identity
from ckptd.prune import plan_watch
from ckptd.retention import Decision, Plan
from ckptd.verify import verify


def planned(env: Env) -> Plan:
    """The plan the next retention pass would make, made now."""
    with env.catalog() as catalog:
        return plan_watch(env.watch, env.watch.retention, catalog, time.time(), frozenset())  # type: ignore[arg-type]


def apply(env: Env, decisions: list[Decision]) -> dict[str, str]:
    """Apply planned decisions through the executor, as prune_watch does; {name: why} of those refused."""
    refused = {}
    with env.catalog() as catalog:
        for decision in decisions:
            if decision.action == "keep":
                continue
            try:
                removal = delete.Removal.planned(decision, env.watch.name, env.watch.path)
                delete.execute(removal, catalog, env.state, now=time.time())
            except delete.Refused as exc:
                refused[Path(decision.path).name] = str(exc)
    return refused


def test_a_checkpoint_rewritten_and_reverified_after_the_plan_is_not_deleted(env: Env) -> None:
    """The trainer rewrites a planned name (now its newest and best) and the daemon re-verifies it before the
    executor runs: the executor compares with the plan's identity, not the row's, and refuses."""
    decisions = planned(env).decisions
    assert {Path(d.path).name for d in decisions if d.action == "delete"} == {"epoch=1.pt", "epoch=3.pt"}
    _checkpoint(env.ckpt(1), 9, 0.01)  # written in place, as torch.save does: same inode, new bytes
    os.utime(env.ckpt(1), (time.time(), time.time()))
    scan(env)  # the daemon verified the new bytes: the row now agrees with the disk
    newest = hashlib.sha256(env.ckpt(1).read_bytes()).hexdigest()
    refused = apply(env, decisions)
    assert refused == {
        "epoch=1.pt": "changed since it was planned (new bytes or another file under its name); planned again later"
    }
    assert hashlib.sha256(env.ckpt(1).read_bytes()).hexdigest() == newest
    assert not env.ckpt(3).exists()
    [done] = journal(env)
    assert (Path(done["path"]).name, done["state"]) == ("epoch=3.pt", "done")
    next_plan = {Path(d.path).name: d.reasons for d in planned(env).decisions}
    assert "latest" in next_plan["epoch=1.pt"] and any(r.startswith("best ") for r in next_plan["epoch=1.pt"])


def test_a_checkpoint_replaced_by_another_file_after_the_plan_is_not_deleted(env: Env) -> None:
    """A planned name replaced by rename (a new inode) with the same size and mtime is still another file."""
    decisions = planned(env).decisions
    replacement = env.root / "replacement.pt"
    shutil.copy2(env.ckpt(1), replacement)
    stat = env.ckpt(1).stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(env.ckpt(1))
    assert "changed since it was planned" in apply(env, decisions)["epoch=1.pt"]
    assert env.ckpt(1).exists()


def test_a_run_folder_swapped_for_a_link_after_the_plan_deletes_nothing_outside(env: Env) -> None:
    """A local user swaps runs/exp1 for a link to a folder elsewhere holding the same names: nothing outside the
    watched folder is deleted, and nothing inside is either (the real folder is no longer on that path)."""
    decisions = planned(env).decisions
    outside = env.root / "precious"
    for epoch, loss in LOSSES.items():
        _checkpoint(outside / f"epoch={epoch}.pt", epoch, loss)
    before = snapshot(outside)
    (env.runs / "exp1").rename(env.runs / "exp1-real")
    (env.runs / "exp1").symlink_to(outside, target_is_directory=True)
    refused = apply(env, decisions)
    assert refused == dict.fromkeys(
        ["epoch=1.pt", "epoch=3.pt"], "a folder on its path is now a symbolic link or no folder; not followed"
    )
    assert snapshot(outside) == before
    assert len(list((env.runs / "exp1-real").glob("*.pt"))) == 5
    assert journal(env) == []


def test_a_swap_inside_the_executor_is_put_back(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another file takes the planned name in the instant between the identity check and the move to trash: what
    was moved is checked again, found to be the stranger, and put back under its name; nothing is deleted."""
    decisions = [d for d in planned(env).decisions if Path(d.path).name == "epoch=1.pt"]
    stranger = env.root / "stranger.pt"
    _checkpoint(stranger, 7, 0.2)
    stranger_bytes = stranger.read_bytes()
    real_rename = os.rename

    def swap_then_rename(src: str, dst: str, **kwargs: object) -> None:
        if str(dst).startswith(delete.TRASH_PREFIX):
            stranger.replace(env.ckpt(1))  # the swap lands just before the executor's rename
        real_rename(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", swap_then_rename)
    refused = apply(env, decisions)
    monkeypatch.undo()
    assert refused["epoch=1.pt"].startswith("another file took its name in the instant before the move; put back")
    assert env.ckpt(1).read_bytes() == stranger_bytes and trash(env.runs / "exp1") == []
    [row] = journal(env)
    assert row["state"] == "skipped" and row["detail"].endswith("put back")


def test_the_journal_records_the_identity_that_was_deleted(env: Env) -> None:
    """Each done entry names the device, inode, size and mtime_ns of the bytes removed, and their SHA-256."""
    expected = {e: (env.ckpt(e).stat(), hashlib.sha256(env.ckpt(e).read_bytes()).hexdigest()) for e in (1, 3)}
    prune(env)
    rows = {Path(r["path"]).name: r for r in journal(env)}
    for epoch, (stat, sha) in expected.items():
        row = rows[f"epoch={epoch}.pt"]
        assert (row["device"], row["inode"], row["size"], row["mtime_ns"], row["sha256"]) == (
            stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, sha,
        )  # fmt: skip
        assert row["trash"].startswith(delete.TRASH_PREFIX) and row["folder"] == str(env.runs / "exp1")


def test_trash_names_hold_nothing_a_trainer_would_match(env: Env) -> None:
    """The executor's trash name has no step number and no prefix a trainer globs for (checkpoint-*, step-N)."""
    import re

    name = delete.TRASH_PREFIX + "0123456789abcdef"
    assert name.startswith(".") and not re.search(r"step-\d+", name) and not name.startswith("checkpoint")


def test_a_link_in_one_watch_protects_its_target_in_another(tmp_path: Path) -> None:
    """runs-b/pinned.pt links to a checkpoint of the watch runs-a: runs-a's retention keeps it as a link target."""
    for epoch in (1, 2, 3):
        _checkpoint(tmp_path / "runs-a" / "exp" / f"epoch={epoch}.pt", epoch, 0.5)
    (tmp_path / "runs-b").mkdir()
    (tmp_path / "runs-b" / "pinned.pt").symlink_to(tmp_path / "runs-a" / "exp" / "epoch=1.pt")
    config = tmp_path / "config.toml"
    config.write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[[watch]]\nname = "a"\npath = "runs-a"\n[watch.retention]\nkeep_last = 1\nkeep_best = 0\n'
        '[[watch]]\nname = "b"\npath = "runs-b"\n'
    )
    from ckptd.scan import reconcile
    from ckptd.verify import engine_versions, verify

    loaded = load_config(config)
    roots = [w.path for w in loaded.watch]
    with Catalog(tmp_path / "state") as catalog:
        for watch in loaded.watch:
            reconcile(watch.path, watch=watch.name, patterns=watch.patterns, catalog=catalog, verifier=verify,
                      engine=engine_versions, boundaries=roots)  # fmt: skip
        from ckptd.prune import prune_watch

        watch = loaded.watch[0]
        assert watch.retention is not None
        report = prune_watch(watch, watch.retention, catalog=catalog, state_dir=tmp_path / "state", dry_run=False)
    kept = {Path(d.path).name: d.reasons for d in report.plan.decisions if d.action == "keep"}
    assert kept["epoch=1.pt"] == (f"target of link {tmp_path / 'runs-b' / 'pinned.pt'}",)
    assert (tmp_path / "runs-a" / "exp" / "epoch=1.pt").exists() and not (
        tmp_path / "runs-a" / "exp" / "epoch=2.pt"
    ).exists()


def test_an_accelerate_save_is_trashed_beside_checkpoints_never_in_it(
    copy_output: CopyOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accelerate counts every entry of its checkpoints/ folder (total_limit parses a number out of each name):
    a save being deleted is moved to its trash name in the project folder above, never beside its siblings,
    and an interrupted deletion is completed from there."""
    out = copy_output("accelerate")
    unit = out.root / "checkpoints" / "checkpoint_0"
    verification = verify(unit)
    seen: list[tuple[list[str], list[str]]] = []

    def interrupted(folder: int, name: str) -> None:
        seen.append((os.listdir(out.root / "checkpoints"), os.listdir(out.root)))
        raise KeyboardInterrupt  # killed between the move and the removal

    with Catalog(tmp_path / "state") as catalog:
        catalog.record_verified(watch="w", run=str(out.root), verification=verification,
                                mtime_ns=verification.mtime_ns, now=1.0)  # fmt: skip
        removal = delete.Removal(
            action="delete", watch="w", root=out.root.parent, path=str(unit), run=str(out.root),
            identity=Identity(verification.size_bytes, verification.mtime_ns, verification.inode, verification.device),
            sha256=verification.sha256, reasons=("keep_last",),
        )  # fmt: skip
        monkeypatch.setattr(delete, "remove_at", interrupted)
        with pytest.raises(KeyboardInterrupt):
            delete.execute(removal, catalog, tmp_path / "state", now=2.0)
        monkeypatch.undo()
        [(in_checkpoints, in_project)] = seen
        assert sorted(in_checkpoints) == ["checkpoint_1"]
        assert [n for n in in_project if n.startswith(delete.TRASH_PREFIX)] != []
        [pending] = catalog.journal(state="pending")
        assert pending["trash_folder"] == str(out.root)
        assert delete.finish_pending(catalog, {"w": out.root.parent}, tmp_path / "state") == 1
    assert sorted(os.listdir(out.root)) == ["checkpoints"] and not unit.exists()


def test_a_producers_record_of_a_checkpoint_goes_with_it(copy_output: CopyOutput, tmp_path: Path) -> None:
    """Deleting an nshtrainer checkpoint removes its `<stem>.metadata.json` too: left behind, nshtrainer keeps a
    ghost in its top-k and warns "Checkpoint file not found" at every save. Nothing else is touched."""
    out = copy_output("nshtrainer")
    folder = next(out.root.rglob("checkpoint"))
    doomed = next((folder / "last").glob("*.ckpt"))
    record = doomed.with_name(doomed.name.removesuffix(".ckpt") + ".metadata.json")
    assert record.is_file()
    before = sorted(p.relative_to(out.root) for p in out.root.rglob("*") if p != doomed and p != record)
    verification = verify(doomed)
    with Catalog(tmp_path / "state") as catalog:
        catalog.record_verified(watch="w", run=str(folder), verification=verification,
                                mtime_ns=verification.mtime_ns, now=1.0)  # fmt: skip
        removal = delete.Removal(
            action="delete", watch="w", root=out.root, path=str(doomed), run=str(folder),
            identity=Identity(verification.size_bytes, verification.mtime_ns, verification.inode, verification.device),
            sha256=verification.sha256, reasons=("keep_last",),
        )  # fmt: skip
        delete.execute(removal, catalog, tmp_path / "state", now=2.0)
    assert not doomed.exists() and not record.exists()
    after = sorted(p.relative_to(out.root) for p in out.root.rglob("*"))
    assert after == before  # the last.ckpt links dangle now: that is why retention never deletes a link's target
