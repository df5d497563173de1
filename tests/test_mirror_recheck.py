"""The mirror queue is derived, not remembered: a target that forgets is noticed.

Real verified checkpoints, a real catalog, a local folder and S3 on moto's server. A store emptied behind
ckptd's back (every object deleted with boto3 or the folder wiped), a deleted index.json, a deleted copy, a
pass killed between rewriting index.json and deleting superseded copies: `mirror.recheck` (what the daemon runs
after every reconciliation, and `ckptd mirror`) and `ckptd mirror --verify` bring every wanted copy and index
back, and remove orphans this machine left, never another machine's copy. The pure planners first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_mirror import EXPECTED_KEYS, Recording, Site, _enqueue, _local, _s3, _sha, ckptd
from test_mirror import local_site as local_site  # the fixture: exp1 and exp10/seed0 mirrored to ./backup
from test_mirror_history import _rot, _scrub_without_mirror

from ckptd.catalog import Catalog
from ckptd.config import default_node
from ckptd.daemon import MirrorService
from ckptd.fsutil import temp_name
from ckptd.mirror import (
    copy_label,
    held_copies,
    lost_copies,
    mirror_pass,
    orphans,
    read_index,
    rebuilt_index,
    recheck,
    targets_of,
)
from ckptd.mirrors import MirrorError, Target

NODE = default_node()  # this box's namespace on every target ([daemon] node left out)

if TYPE_CHECKING:
    from mirror_fixtures import Bucket


# ------------------------------------------------------------------------------------------ pure planning


def test_held_copies_are_files_or_folders_with_their_sidecar_beside_them() -> None:
    """A copy is held when the checkpoint (file, or folder of files) and its sidecar are both listed; a nested
    run's folder, a companion record, a hostile name and a checkpoint without its sidecar are no copies."""
    keys = ["r/a.pt", "r/a.pt.ckptd.json", "r/b.pt", "r/dir/x.bin", "r/dir/sub/y.bin", "r/dir.ckptd.json",
            "r/c.pt.ckptd.json", "r/index.json", "r/seed0/z.pt", "r/seed0/z.pt.ckptd.json", "r/..", "r/...ckptd.json",
            "r/a.metadata.json", "r2/q.pt", "r2/q.pt.ckptd.json"]  # fmt: skip
    assert held_copies(keys, "r") == {"a.pt", "dir"}
    assert held_copies(keys, "r/seed0") == {"z.pt"}


def test_lost_copies_are_missing_or_not_indexed_with_their_sha256() -> None:
    """A wanted, proved copy is lost when the folder does not hold it or the index does not name it with the
    sha256 this machine proved."""
    index = {"copies": {"a": {"sha256": "1"}, "b": {"sha256": "old"}}}
    assert lost_copies({"a": "1", "b": "2", "c": "3"}, {"a", "b"}, index) == ["b", "c"]
    assert lost_copies({"a": "1"}, {"a"}, None) == ["a"]
    assert lost_copies({"a": "1"}, set(), index) == ["a"]


def test_orphans_are_only_this_machines_superseded_released_copies_the_index_forgot() -> None:
    """Unlisted, made by this machine with these bytes, not wanted, local intact or gone, successors named:
    an orphan. A rotted local, another machine's copy, a milestone, a listed copy or a missing successor: not."""
    index = {"best": {"name": "new"}, "latest": {"name": "new"}, "copies": {"new": {}, "listed": {}}}
    held = {"new", "old", "rotted", "foreign", "mile", "listed", "forged"}
    proved = {"old": {"s1": ["best", "latest"]}, "rotted": {"s2": ["best"]}, "mile": {"s3": ["milestone"]},
              "listed": {"s4": ["latest"]}, "forged": {"s5": ["best"]}}  # fmt: skip
    stored = {"old": "s1", "rotted": "s2", "foreign": "x", "mile": "s3", "listed": "s4", "forged": "other"}
    local: dict[str, Any] = {"old": "intact", "rotted": "rotted", "mile": "gone", "listed": "gone", "forged": "gone"}
    assert orphans(held, index, proved=proved, wanted={"new"}, local=local, stored=stored) == ["old"]
    assert orphans(held, index, proved=proved, wanted={"new", "old"}, local=local, stored=stored) == []
    no_best = {**index, "best": None}
    assert orphans(held, no_best, proved=proved, wanted={"new"}, local=local, stored=stored) == []


def test_a_rebuilt_index_gives_roles_by_the_catalog_and_keeps_a_rotted_best() -> None:
    """Rebuilt from the sidecars held: the mirror's best stays the copy of the rotted best (was best, local
    rotted) although local selection names another; copies that hold no role are superseded, oldest first."""
    copies = {"e2": {"sha256": "a", "step": 200, "metrics": {"val_loss": 0.4}},
              "e3": {"sha256": "b", "step": 300, "metrics": {"val_loss": 0.55}},
              "e5": {"sha256": "c", "step": 500, "metrics": {"val_loss": 0.5}},
              "e1": {"sha256": "d", "step": 100, "metrics": {"val_loss": 0.9}}}  # fmt: skip
    index = rebuilt_index("runs/exp1", copies, roles={"e5": ["best", "latest"]},
                          was={"e2": ["best"], "e3": ["latest"], "e1": ["milestone"]},
                          local={"e2": "rotted", "e3": "intact", "e5": "intact", "e1": "gone"}, now=0.0,
                          metric="val_loss", mode="min")  # fmt: skip
    assert (index["best"]["name"], index["latest"]["name"]) == ("e2", "e5")
    assert index["superseded"] == ["e3"] and index["copies"]["e1"]["roles"] == ["milestone"]
    held = index["copies"]["e2"]
    assert (held["roles"], held["was"], held["local"], held["sha256"]) == ([], ["best"], "rotted", "a")
    assert copy_label(index, "e2") == "best" and copy_label(index, "e5") == "latest,run's best"
    assert copy_label(index, "e3") == "superseded" and copy_label(index, "e1") == "milestone"


# ---------------------------------------------------------------------------------------------- recheck


def _empty(backend: str, site: Site, bucket: Bucket | None) -> None:
    """The store forgets everything, behind ckptd's back."""
    if backend == "local":
        shutil.rmtree(site.root / "backup")
        return
    assert bucket is not None
    client = bucket.server.client()
    held = bucket.keys()  # a list (Bucket.keys), not a dict's
    for key in held:
        client.delete_object(Bucket=bucket.name, Key=key)
    assert bucket.keys() == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_store_emptied_behind_ckptds_back_is_filled_again_by_one_recheck(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Every copy done, then every object deleted: a pass alone copies nothing (the queue says done); after one
    recheck, the next pass puts every wanted copy, sidecar and index back, byte for byte."""
    bucket: Bucket | None = request.getfixturevalue("s3_bucket") if backend == "s3" else None
    site = Site(tmp_path, {backend: _local(tmp_path / "backup") if bucket is None else _s3(bucket)})
    target = targets_of(site.config)[backend]
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        assert len(mirror_pass(site.config, catalog, {backend: target}).copied) == 3
        _empty(backend, site, bucket)
        assert mirror_pass(site.config, catalog, {backend: target}).copied == []  # what it did before
        found = recheck(catalog, site.config, {backend: target})
        assert sorted(found.lost) == sorted(f"{backend}:{k}" for k in EXPECTED_KEYS if not k.endswith(".json"))
        assert found.rebuilt == [] and found.unreachable == {}
        assert {i["path"] for i in catalog.mirror_due(None)} == {str(site.best), str(site.latest),
                                                                 str(site.seed0 / "epoch=1-step=50.pt")}  # fmt: skip
        assert str(site.best) in catalog.awaiting_mirror("runs")  # retention keeps it: the only copy is local
        assert len(mirror_pass(site.config, catalog, {backend: target}).copied) == 3
        assert recheck(catalog, site.config, {backend: target}).lost == []
    assert list(target.list()) == EXPECTED_KEYS
    for local in (site.best, site.latest):
        assert target.sha256(f"runs/exp1/{local.name}") == _sha(local)
    index = read_index(target, "runs/exp1")
    assert index is not None
    assert (index["best"]["name"], index["latest"]["name"]) == (site.best.name, site.latest.name)


def test_a_lost_index_is_rebuilt_from_the_copies_held_and_the_rotted_best_keeps_its_role(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The local best rotted, so the target's copy of it is the mirror's best; index.json is then deleted.
    One recheck rebuilds it from the copies held: the same copies, best and latest; `ls` shows one best."""
    site = Site(tmp_path, {"local": {**_local(tmp_path / "backup"), "keep_superseded": 1}})
    assert ckptd(capsys, "mirror", "--config", site.config_path)[0] == 0
    _rot(site.best)
    assert _scrub_without_mirror(site.config).quarantined == [str(site.best)]
    newer = site.add(500, 0.5)  # the run's best and latest now; 0.4's copy stays the mirror's best
    assert ckptd(capsys, "mirror", "--config", site.config_path)[0] == 0
    target = targets_of(site.config)["local"]
    before = read_index(target, "runs/exp1")
    assert before is not None and before["best"]["name"] == site.best.name
    code, out, _err = ckptd(capsys, "ls", "local", "runs/exp1", "--config", site.config_path)
    records = [line.split("\t") for line in out.splitlines() if not line.startswith("#")]  # run, copy, roles...
    assert code == 0 and [r[2].split(",")[0] for r in records].count("best") == 1, out
    roles, local = {r[1]: r[2] for r in records}, {r[1]: r[8] for r in records}
    assert roles[site.best.name] == "best" and roles[newer.name] == "latest,run's best"
    assert local[site.best.name] == "rotted" and local[newer.name] == "intact"
    (site.root / "backup" / NODE / "runs" / "exp1" / "index.json").unlink()
    with site.catalog() as catalog:
        found = recheck(catalog, site.config, {"local": target})
    assert found.rebuilt == ["local:runs/exp1/index.json"] and found.lost == []
    after = read_index(target, "runs/exp1")
    assert after is not None
    assert (after["best"]["name"], after["latest"]["name"]) == (site.best.name, newer.name)
    assert sorted(after["copies"]) == sorted(before["copies"]) and after["superseded"] == before["superseded"]
    for name, copy in after["copies"].items():
        assert {k: copy.get(k) for k in ("sha256", "roles", "local", "step")} == {
            k: before["copies"][name].get(k) for k in ("sha256", "roles", "local", "step")
        }  # fmt: skip
    code, out, _err = ckptd(capsys, "restore", "local", "runs/exp1", "--best", "--to", tmp_path / "back",
                            "--config", site.config_path)  # fmt: skip
    assert code == 0 and _sha(Path(out.strip())) == before["best"]["sha256"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_mirror_verify_rebuilds_a_deleted_index_and_copies_a_deleted_copy_again(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ckptd mirror --verify` checks what the catalog says the target holds, not only what its indexes name: a
    deleted index.json and a deleted copy are bad; --dry-run says so (exit 1) and writes nothing; without it
    both are repaired (exit 0), and the next --verify finds nothing bad."""
    bucket: Bucket | None = request.getfixturevalue("s3_bucket") if backend == "s3" else None
    site = Site(tmp_path, {backend: _local(tmp_path / "backup") if bucket is None else _s3(bucket)})
    config = site.config_path
    assert ckptd(capsys, "mirror", "--config", config)[0] == 0
    target = targets_of(site.config)[backend]
    target.delete("runs/exp1/index.json")
    target.delete(f"runs/exp1/{site.latest.name}")
    held = sorted(target.list())
    code, out, err = ckptd(capsys, "mirror", "--verify", "--dry-run", "--config", config)
    assert code == 1 and f"{backend}: 3 copies checked, 2 bad, 0 repaired" in out, out + err
    assert f"bad: {backend}:runs/exp1/index.json" in err and f"bad: {backend}:runs/exp1/{site.latest.name}" in err
    assert sorted(target.list()) == held
    code, out, err = ckptd(capsys, "mirror", "--verify", "--config", config)
    assert code == 0 and f"{backend}: 3 copies checked, 2 bad, 2 repaired" in out, out + err
    assert f"repaired: {backend}:runs/exp1/index.json" in out
    assert list(target.list()) == EXPECTED_KEYS
    assert target.sha256(f"runs/exp1/{site.latest.name}") == _sha(site.latest)
    index = read_index(target, "runs/exp1")
    assert index is not None
    assert (index["best"]["name"], index["latest"]["name"]) == (site.best.name, site.latest.name)
    code, out, _err = ckptd(capsys, "mirror", "--verify", "--config", config)
    assert code == 0 and f"{backend}: 3 copies checked, 0 bad, 0 repaired" in out


def test_plain_mirror_copies_what_the_target_lost_again(local_site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptd mirror` rechecks first: a wiped backup folder is filled again by the same command."""
    config = local_site.config_path
    assert ckptd(capsys, "mirror", "--config", config)[0] == 0
    shutil.rmtree(local_site.root / "backup")
    code, out, _err = ckptd(capsys, "mirror", "--config", config, "--dry-run")
    assert code == 0 and out.count("lost: ") == 3 and out.count("would copy: ") == 3
    assert not (local_site.root / "backup").exists()
    code, out, _err = ckptd(capsys, "mirror", "--config", config)
    assert code == 0 and out.count("lost: ") == 3 and out.count("copied: ") == 3
    assert list(targets_of(local_site.config)["local"].list()) == EXPECTED_KEYS


# ----------------------------------------------------------------------------------------------- orphans


class FailingDeletes(Recording):
    """A target whose deletes fail, as when a pass is killed between rewriting index.json and deleting."""

    def delete(self, key: str) -> None:
        raise MirrorError(f"{key}: the pass was killed here")


def test_an_interrupted_deletion_leaves_orphans_that_recheck_removes_but_never_another_machines_copy(
    local_site: Site,
) -> None:
    """A new best and latest supersede the old copies (keep_superseded 0), but deleting them fails after the
    index was rewritten: the pass still succeeds, and the next recheck removes the two orphans. Another
    machine's copies in the same run folder, listed in the index or not, stay."""
    site = local_site
    target: Target = targets_of(site.config)["local"]
    folder = site.root / "backup" / NODE / "runs" / "exp1"
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        mirror_pass(site.config, catalog, {"local": target})
        for name in ("theirs-listed.pt", "theirs-unlisted.pt"):  # another machine's copies, with sidecars
            shutil.copy(site.latest, folder / name)
            shutil.copy(folder / f"{site.latest.name}.ckptd.json", folder / f"{name}.ckptd.json")
        index = json.loads((folder / "index.json").read_text())
        index["copies"]["theirs-listed.pt"] = {**index["copies"][site.latest.name], "roles": [], "was": ["latest"]}
        (folder / "index.json").write_text(json.dumps(index))
        newest = site.add(400, 0.1)
        _enqueue(catalog, site.config)
        report = mirror_pass(site.config, catalog, {"local": FailingDeletes(target)})
        assert report.copied == [f"{newest} -> local"] and report.failed == []
        left = json.loads((folder / "index.json").read_text())
        assert site.best.name not in left["copies"] and site.latest.name not in left["copies"]
        assert (folder / site.best.name).exists() and (folder / site.latest.name).exists()
        dry = recheck(catalog, site.config, {"local": target}, dry_run=True)
        assert sorted(dry.orphans) == sorted(f"local:runs/exp1/{p.name}" for p in (site.best, site.latest))
        assert (folder / site.best.name).exists()
        found = recheck(catalog, site.config, {"local": target})
        assert found.orphans == dry.orphans and found.lost == []
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        newest.name, f"{newest.name}.ckptd.json", "index.json", "theirs-listed.pt", "theirs-listed.pt.ckptd.json",
        "theirs-unlisted.pt", "theirs-unlisted.pt.ckptd.json",
    ])  # fmt: skip


def test_a_target_down_is_reported_and_the_others_are_rechecked(tmp_path: Path, s3_bucket: Bucket) -> None:
    """One target that cannot be listed is `unreachable`; the copies another target lost are still queued."""
    site = Site(tmp_path, {"local": _local(tmp_path / "backup"), "s3": _s3(s3_bucket)})
    targets = targets_of(site.config)
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        mirror_pass(site.config, catalog, targets)
        shutil.rmtree(site.root / "backup")
        (site.root / "backup").write_text("a file where the folder was")
        s3_bucket.server.client().delete_object(Bucket=s3_bucket.name, Key=f"ckpts/{NODE}/runs/exp1/{site.best.name}")
        found = recheck(catalog, site.config, targets)
    assert list(found.unreachable) == ["local"] and found.lost == [f"s3:runs/exp1/{site.best.name}"]


def test_recheck_needs_no_catalog_rows_for_runs_never_mirrored(tmp_path: Path) -> None:
    """A fresh catalog and an empty target: nothing lost, nothing rebuilt, nothing written."""
    site = Site(tmp_path, {"local": _local(tmp_path / "backup")})
    with Catalog(site.config.daemon.state_dir) as catalog:
        found = recheck(catalog, site.config, targets_of(site.config))
    assert (found.lost, found.rebuilt, found.orphans, found.unreachable) == ([], [], [], {})
    assert not (site.root / "backup").exists()


def test_the_mirror_thread_rechecks_at_its_start_and_when_the_daemon_asks(local_site: Site) -> None:
    """MirrorService (the daemon's mirror thread): at its start it rechecks and copies what is wanted; after the
    backup folder is wiped, one request_recheck (what the daemon sends after every reconciliation) brings every
    copy back, and a temp file a killed copy left an hour ago is swept."""
    backup = local_site.root / "backup"
    with local_site.catalog() as catalog:
        _enqueue(catalog, local_site.config)

    def holds_all() -> bool:
        return list(targets_of(local_site.config)["local"].list()) == EXPECTED_KEYS

    service = MirrorService(local_site.config)
    service.start()
    try:
        _wait(holds_all, "the first copies")
        shutil.rmtree(backup)
        (backup / NODE / "runs").mkdir(parents=True)
        dead = backup / NODE / "runs" / temp_name("killed.pt")
        dead.write_bytes(b"half")
        os.utime(dead, (time.time() - 7200, time.time() - 7200))
        service.request_recheck()
        _wait(holds_all, "every copy back after one recheck")
        _wait(lambda: not dead.exists(), "the dead copy's temp file swept")
    finally:
        service.stop(timeout=10)
    assert not service.is_alive()


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
