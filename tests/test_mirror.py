"""Mirroring: the pure planning (roles_for, render_index), then mirror passes over a real catalog of real,
verified checkpoints into a local folder and into S3 (moto's server), and the `mirror`, `ls`, `restore` and
`status` commands.

The watched folder `runs` holds two runs: `exp1` (val_loss 0.7, 0.4, 0.55 at steps 100, 200, 300: best is
step 200, latest step 300) and the nested `exp10/seed0` (one checkpoint; its name also shares a prefix with
exp1, which `ls` must not confuse).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import checkpoints
import pytest
from trainer_fixtures import CopyOutput

from ckptd import mirror, sidecar
from ckptd.catalog import Catalog, Row
from ckptd.cli import main
from ckptd.config import Config, default_node, load_config
from ckptd.mirror import (
    choose_copy,
    clean_index,
    enqueue_run,
    local_state,
    mirror_pass,
    ranked_copies,
    render_index,
    roles_for,
    targets_of,
)
from ckptd.mirrors import NotFound, Target
from ckptd.model import Entry
from ckptd.prune import prune_watch
from ckptd.scan import reconcile
from ckptd.verify import engine_versions, verify

NODE = default_node()  # this box's namespace on every target ([daemon] node left out)

if TYPE_CHECKING:
    from mirror_fixtures import Bucket, MotoS3


CKPTD = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ckptd")
EXP1 = {100: 0.7, 200: 0.4, 300: 0.55}  # step -> val_loss


# ------------------------------------------------------------------------------------------ pure planning


def _entry(step: int, loss: float | None = None, status: str | None = "ok", verified: bool = True) -> Entry:
    return Entry(
        path=f"/r/step={step}.pt", run="/r", status=status, size=1, mtime=float(step), sha256=f"{step:064d}",
        epoch=step // 100, step=step, metrics={} if loss is None else {"val_loss": loss}, verified=verified,
    )  # fmt: skip


def test_roles_for_names_the_best_and_latest_ok_checkpoints() -> None:
    """best and latest come from the usable (verified, ok) entries only; one checkpoint can hold both roles."""
    entries = [_entry(100, 0.7), _entry(200, 0.4), _entry(300, 0.55), _entry(400, 0.1, status="corrupt"),
               _entry(500, 0.05, verified=False)]  # fmt: skip
    assert roles_for(entries, ["best", "latest"], "val_loss", "min") == {
        "/r/step=300.pt": ["latest"], "/r/step=200.pt": ["best"],
    }  # fmt: skip
    assert roles_for(entries, ["best", "latest"], "val_loss", "max") == {"/r/step=300.pt": ["latest"],
                                                                         "/r/step=100.pt": ["best"]}  # fmt: skip
    only = [_entry(100, 0.7)]
    assert roles_for(only, ["best", "latest"], "val_loss", "min") == {"/r/step=100.pt": ["latest", "best"]}


def test_roles_for_without_a_metric_copies_latest_only_and_knows_milestones_and_all() -> None:
    """No metric means no best; milestones follow keep_every epochs; "all" takes every usable checkpoint."""
    entries = [_entry(100), _entry(200), _entry(300), _entry(400, status="corrupt")]
    assert roles_for(entries, ["best", "latest"], None, "min") == {"/r/step=300.pt": ["latest"]}
    assert roles_for(entries, ["milestones"], None, "min", milestone_every=2) == {"/r/step=200.pt": ["milestone"]}
    assert roles_for(entries, ["milestones"], None, "min", milestone_every=0) == {}
    assert roles_for(entries, ["all"], None, "min") == {  # all includes latest: the index names it for restore
        "/r/step=100.pt": ["all"], "/r/step=200.pt": ["all"], "/r/step=300.pt": ["latest", "all"],
    }  # fmt: skip
    assert roles_for([], ["best", "latest", "all"], "val_loss", "min") == {}


def _copy(name: str) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), "step": 1, "metrics": {}}


def test_render_index_names_best_and_latest_and_records_each_copy() -> None:
    """The first copy of a run becomes both best and latest; the index carries its sha256 and the run."""
    index, doomed = render_index(None, run="runs/exp1", copy=_copy("a.pt"), roles=["best", "latest"],
                                 keep_superseded=1, now=0.0)  # fmt: skip
    assert doomed == []
    assert index["run"] == "runs/exp1" and index["schema_version"] == 2
    assert index["best"]["name"] == index["latest"]["name"] == "a.pt"
    assert index["best"]["sha256"] == _copy("a.pt")["sha256"]
    assert index["copies"]["a.pt"]["roles"] == ["best", "latest"]
    assert index["superseded"] == [] and index["updated_at"] == "1970-01-01T00:00:00Z"


def test_render_index_keeps_keep_superseded_older_copies_and_drops_the_oldest() -> None:
    """Superseded copies stay up to keep_superseded, newest kept; older ones are named for deletion."""
    index, doomed = render_index(None, run="r", copy=_copy("a"), roles=["best", "latest"], keep_superseded=1, now=1)
    index, doomed = render_index(index, run="r", copy=_copy("b"), roles=["best", "latest"], keep_superseded=1, now=2)
    assert (doomed, index["superseded"]) == ([], ["a"])
    assert sorted(index["copies"]) == ["a", "b"]
    index, doomed = render_index(index, run="r", copy=_copy("c"), roles=["best", "latest"], keep_superseded=1, now=3)
    assert (doomed, index["superseded"]) == (["a"], ["b"])
    assert sorted(index["copies"]) == ["b", "c"]
    index, doomed = render_index(index, run="r", copy=_copy("d"), roles=["latest", "best"], keep_superseded=0, now=4)
    assert (sorted(doomed), index["superseded"]) == (["b", "c"], [])
    assert sorted(index["copies"]) == ["d"]


def test_render_index_never_deletes_a_copy_that_is_still_best_or_latest() -> None:
    """A copy that loses one role but keeps the other is not superseded, even with keep_superseded = 0."""
    index, _ = render_index(None, run="r", copy=_copy("a"), roles=["best", "latest"], keep_superseded=0, now=1)
    index, doomed = render_index(index, run="r", copy=_copy("b"), roles=["latest"], keep_superseded=0, now=2)
    assert doomed == [] and index["best"]["name"] == "a" and index["latest"]["name"] == "b"
    index, doomed = render_index(index, run="r", copy=_copy("c"), roles=["latest"], keep_superseded=0, now=3)
    assert doomed == ["b"] and index["best"]["name"] == "a"
    index, doomed = render_index(index, run="r", copy=_copy("d"), roles=["best"], keep_superseded=0, now=4)
    assert doomed == ["a"] and {index["best"]["name"], index["latest"]["name"]} == {"d", "c"}


def test_render_index_rewriting_the_same_name_supersedes_nothing() -> None:
    """A new version of last.ckpt replaces the entry of the same name; nothing is named for deletion."""
    index, _ = render_index(None, run="r", copy=_copy("last.ckpt"), roles=["latest"], keep_superseded=0, now=1)
    newer = {**_copy("last.ckpt"), "sha256": "f" * 64}
    index, doomed = render_index(index, run="r", copy=newer, roles=["latest"], keep_superseded=0, now=2)
    assert doomed == [] and index["latest"]["sha256"] == "f" * 64 and list(index["copies"]) == ["last.ckpt"]


def test_render_index_brings_a_superseded_copy_back_when_it_regains_a_role() -> None:
    """A superseded copy that becomes best again leaves the superseded list instead of being deleted later."""
    index, _ = render_index(None, run="r", copy=_copy("a"), roles=["best", "latest"], keep_superseded=2, now=1)
    index, _ = render_index(index, run="r", copy=_copy("b"), roles=["best", "latest"], keep_superseded=2, now=2)
    assert index["superseded"] == ["a"]
    index, doomed = render_index(index, run="r", copy=_copy("a"), roles=["best"], keep_superseded=2, now=3)
    assert doomed == [] and index["superseded"] == [] and index["best"]["name"] == "a"


# ------------------------------------------------------------------------------------------ mirror history


def _ckpt(name: str, step: int, loss: float | None = None) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), "step": step, "epoch": step // 100,
            "metrics": {} if loss is None else {"val_loss": loss}, "size_bytes": 1}  # fmt: skip


def _mirror(index: dict[str, Any] | None, copy: dict[str, Any], roles: list[str], now: float,
            local: dict[str, Any] | None = None, keep: int = 0) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """One proved copy through render_index, as mirror_pass calls it (metric val_loss, min)."""
    return render_index(index, run="runs/exp1", copy=copy, roles=roles, keep_superseded=keep, now=now,
                        local=local or {}, metric="val_loss", mode="min")  # fmt: skip


def test_a_best_whose_local_checkpoint_rotted_keeps_its_good_copy_and_its_role() -> None:
    """The local best rots: local selection moves best to a worse checkpoint, whose copy is added, but the mirror's
    best stays the good copy of the true best and nothing is deleted (keep_superseded = 0). A better checkpoint
    takes best later; the rotted one's copy is still held, while an intact superseded one leaves."""
    index, doomed = _mirror(None, _ckpt("s200", 200, 0.4), ["best", "latest"], 1)
    index, doomed = _mirror(index, _ckpt("s300", 300, 0.55), ["latest"], 2)
    assert doomed == [] and (index["best"]["name"], index["latest"]["name"]) == ("s200", "s300")
    index, doomed = _mirror(index, _ckpt("s300", 300, 0.55), ["best", "latest"], 3, local={"s200": "rotted"})
    assert doomed == [] and index["best"]["name"] == "s200" and index["best"]["metrics"] == {"val_loss": 0.4}
    assert sorted(index["copies"]) == ["s200", "s300"] and index["copies"]["s200"]["local"] == "rotted"
    index, doomed = _mirror(index, _ckpt("s400", 400, 0.5), ["latest"], 4, local={"s200": "rotted"})
    assert doomed == [] and (index["best"]["name"], index["latest"]["name"]) == ("s200", "s400")
    index, doomed = _mirror(index, _ckpt("s500", 500, 0.1), ["best", "latest"], 5, local={"s200": "rotted"})
    assert (index["best"]["name"], index["latest"]["name"]) == ("s500", "s500")
    assert sorted(doomed) == ["s300", "s400"] and sorted(index["copies"]) == ["s200", "s500"]
    assert index["superseded"] == ["s200"]  # superseded, held: its local checkpoint rotted
    index, doomed = _mirror(index, _ckpt("s600", 600, 0.2), ["latest"], 6, local={"s200": "intact"})
    assert doomed == ["s200"]  # scrub repaired the local checkpoint from the mirror: the copy is released


def test_the_same_history_with_an_intact_best_supersedes_as_before() -> None:
    """Without rot, a better best and a newer latest supersede the old copies, which leave beyond keep_superseded."""
    index, _ = _mirror(None, _ckpt("s200", 200, 0.4), ["best", "latest"], 1)
    index, doomed = _mirror(index, _ckpt("s300", 300, 0.3), ["best", "latest"], 2, local={"s200": "intact"})
    assert doomed == ["s200"] and list(index["copies"]) == ["s300"]
    index, doomed = _mirror(index, _ckpt("s400", 400, 0.6), ["latest"], 3, local={"s300": "intact"}, keep=1)
    assert doomed == [] and index["superseded"] == [] and index["best"]["name"] == "s300"


def test_the_mirrors_latest_never_moves_back_after_a_crash_mid_save() -> None:
    """A save that crashes while rewriting the newest checkpoint in place truncates it: local selection falls back
    to epoch 11, but the target still holds epoch 12's good copy, which stays the mirror's latest until a newer
    one is proved; then it is superseded but held, since its local checkpoint is corrupt."""
    index, _ = _mirror(None, _ckpt("e11", 1100), ["latest"], 1)
    index, doomed = _mirror(index, _ckpt("e12", 1200), ["latest"], 2, local={"e11": "intact"}, keep=1)
    assert doomed == [] and index["latest"]["name"] == "e12" and index["superseded"] == ["e11"]
    crashed = {"e12": "rotted", "e11": "intact"}
    index, doomed = _mirror(index, _ckpt("e11", 1100), ["latest"], 3, local=crashed)
    assert doomed == [] and index["latest"]["name"] == "e12" and index["latest"]["step"] == 1200
    assert choose_copy(index, role="latest")[0] == "e12"
    index, doomed = _mirror(index, _ckpt("e13", 1300), ["latest"], 4, local=crashed)
    assert index["latest"]["name"] == "e13" and doomed == ["e11"] and index["superseded"] == ["e12"]


def test_a_slot_saved_again_replaces_its_copy_and_a_weights_only_copy_is_not_the_latest() -> None:
    """last.ckpt saved again is one copy (the target key is rewritten); until its new version is copied, the old
    one (its only good copy) keeps latest over an older checkpoint; a newer weights-only copy never becomes the
    latest while one training can resume from is there."""
    index, _ = _mirror(None, _ckpt("last.ckpt", 100), ["latest"], 1)
    index, doomed = _mirror(index, _ckpt("epoch=0.pt", 50), ["latest"], 2, local={"last.ckpt": "replaced"})
    assert doomed == [] and index["latest"]["name"] == "last.ckpt"
    index, doomed = _mirror(index, {**_ckpt("last.ckpt", 200), "sha256": "f" * 64}, ["latest"], 3,
                            local={"last.ckpt": "intact"})  # fmt: skip
    assert doomed == ["epoch=0.pt"] and list(index["copies"]) == ["last.ckpt"]
    assert index["latest"]["sha256"] == "f" * 64
    weights = {**_ckpt("best_model.pt", 300, 0.1), "resumable": False}
    index, doomed = _mirror(index, weights, ["best"], 4)
    assert doomed == [] and index["latest"]["name"] == "last.ckpt" and index["best"]["name"] == "best_model.pt"


def test_the_index_lists_every_copy_with_its_roles_history_and_local_state() -> None:
    """Each copy keeps its step, epoch, sha256, when it was copied, the roles local selection gives it now, every
    role it was mirrored for, and what became of its local checkpoint; re-indexing it keeps `mirrored_at`."""
    index, _ = _mirror(None, _ckpt("s200", 200, 0.4), ["best", "latest"], 1)
    index, _ = _mirror(index, _ckpt("s300", 300, 0.5), ["latest"], 2, local={"s200": "intact"})
    assert index["schema_version"] == 2 and index["updated_at"] == "1970-01-01T00:00:02Z"
    assert index["copies"]["s200"] == {**_ckpt("s200", 200, 0.4), "roles": ["best"], "was": ["best", "latest"],
                                       "mirrored_at": "1970-01-01T00:00:01Z", "local": "intact"}  # fmt: skip
    assert index["copies"]["s300"]["roles"] == ["latest"] and index["copies"]["s300"]["local"] == "intact"
    assert index["latest"] == {k: _ckpt("s300", 300, 0.5)[k] for k in ("name", "sha256", "step", "epoch", "metrics")}
    again, _ = _mirror(index, _ckpt("s200", 200, 0.4), ["best"], 3)
    assert again["copies"]["s200"]["mirrored_at"] == "1970-01-01T00:00:01Z"
    assert json.loads(json.dumps(again)) == again  # what is written is plain JSON


def test_an_index_written_before_mirror_history_is_still_read() -> None:
    """A schema 1 index (copies without `was`; `roles` the roles each was copied for) is read as one: superseded
    copies hold no role; where that index had moved latest back from a copy whose local checkpoint rotted since,
    the next mirror pass gives the role back to it; hostile field types are left out."""
    old = {
        "schema_version": 1, "run": "runs/exp1", "updated_at": "2026-01-01T00:00:00Z",
        "best": {"name": "s200", "sha256": "a" * 64, "step": 20, "metrics": {"val_loss": 0.4}},
        "latest": {"name": "e11", "sha256": "b" * 64, "step": 110, "metrics": {}},
        "copies": {
            "s200": {"name": "s200", "sha256": "a" * 64, "step": 20, "epoch": 2, "metrics": {"val_loss": 0.4},
                     "size_bytes": 5, "roles": ["best", "latest"], "mirrored_at": "2026-01-01T00:00:00Z"},
            "e11": {"name": "e11", "sha256": "b" * 64, "step": 110, "epoch": 11, "metrics": {}, "size_bytes": 5,
                    "roles": ["latest"], "mirrored_at": "2026-01-02T00:00:00Z"},
            "e12": {"name": "e12", "sha256": "c" * 64, "step": 120, "epoch": 12, "metrics": {}, "size_bytes": 5,
                    "roles": ["latest"], "mirrored_at": "2026-01-01T12:00:00Z"},
        },
        "superseded": ["e12"],
    }  # fmt: skip
    index, refused = clean_index(json.loads(json.dumps(old)))
    assert refused == []
    assert index["copies"]["s200"]["roles"] == ["best"] and index["copies"]["s200"]["was"] == ["best", "latest"]
    assert index["copies"]["e12"]["roles"] == [] and index["copies"]["e12"]["was"] == ["latest"]
    assert index["best"] == old["best"] | {"epoch": None} and index["superseded"] == ["e12"]
    assert choose_copy(index, role="latest")[0] == "e11" and choose_copy(index, role="best")[0] == "s200"
    assert choose_copy(index, step=120)[0] == "e12"
    healed, doomed = _mirror(index, _ckpt("e11", 110), ["latest"], 9, local={"e12": "rotted", "e11": "intact"})
    assert doomed == [] and healed["latest"]["name"] == "e12" and healed["best"]["name"] == "s200"
    after, doomed = _mirror(healed, _ckpt("e13", 130), ["latest"], 10, local={"e12": "intact", "e11": "intact"})
    assert sorted(doomed) == ["e11", "e12"] and after["latest"]["name"] == "e13" and after["best"]["name"] == "s200"
    hostile, refused = clean_index({"copies": {"x": {"step": "9" * 400, "metrics": [], "roles": "best", "was": 3}}})
    assert hostile["copies"]["x"] == {"name": "x", "step": None, "epoch": None, "metrics": {}, "was": [], "roles": []}


def test_choose_copy_by_role_step_or_sha256_prefix() -> None:
    """--step and --sha256 pick any copy the index lists; ambiguity and absence are said, not guessed."""
    index, _ = _mirror(None, _ckpt("s200", 200, 0.4), ["best", "latest"], 1)
    index, _ = _mirror(index, _ckpt("s300", 300, 0.5), ["latest"], 2, keep=5)
    index, _ = _mirror(index, {**_ckpt("best.pt", 300, 0.5), "resumable": False}, ["best"], 3, keep=5)
    sha = index["copies"]["s200"]["sha256"]
    assert choose_copy(index, step=200)[0] == "s200" and choose_copy(index, sha256=sha[:6].upper())[0] == "s200"
    assert choose_copy(index, role="latest")[0] == "s300" and choose_copy(index, role="best")[0] == "best.pt"
    with pytest.raises(NotFound, match=r"several copies at step 300: .*choose one with --sha256"):
        choose_copy(index, step=300)
    with pytest.raises(NotFound, match="no copy at step 7"):
        choose_copy(index, step=7)
    with pytest.raises(NotFound, match="hex prefix"):
        choose_copy(index, sha256="../x")
    with pytest.raises(NotFound, match="names no best"):
        choose_copy({"copies": {}, "best": None}, role="best")
    assert ranked_copies(index["copies"], "best", "val_loss") == ["best.pt"]  # s200 is intact: selection decides


def test_local_state_says_what_became_of_the_local_checkpoint() -> None:
    """intact, gone (deleted while ok), replaced (the name saved again), rotted (corrupt, even once quarantined)."""
    row = Row(path="/r/a.pt", watch="w", run="/r", kind="file", link_target=None, format="torch_zip", status="ok",
              size=1, mtime_ns=1, inode=1, sha256="a" * 64, epoch=1, step=1, metrics={}, problems=[], first_seen=0.0,
              verified_at=0.0, gone_at=None, pinned=False)  # fmt: skip
    assert local_state(row, "a" * 64) == "intact"
    assert local_state(dataclasses.replace(row, gone_at=5.0), "a" * 64) == "gone"
    assert local_state(None, "a" * 64) == "gone"
    assert local_state(dataclasses.replace(row, sha256="b" * 64), "a" * 64) == "replaced"
    assert local_state(dataclasses.replace(row, status="corrupt"), "a" * 64) == "rotted"
    assert local_state(dataclasses.replace(row, status="corrupt", gone_at=5.0), "a" * 64) == "rotted"
    assert local_state(dataclasses.replace(row, status="corrupt", sha256="b" * 64), "a" * 64) == "rotted"


# ---------------------------------------------------------------------------------------- real checkpoints


def _checkpoint(path: Path, step: int, loss: float) -> Path:
    checkpoints.torch_zip(path, epoch=step // 100, global_step=step, metrics={"val_loss": loss})
    os.utime(path, (1_700_000_000 + step, 1_700_000_000 + step))
    return path


def _write_config(root: Path, targets: dict[str, dict[str, Any]], *, what: str = '["best", "latest"]',
                  retention: str = "") -> Path:  # fmt: skip
    lines = ['[daemon]\nstate_dir = "state"\n', '[[watch]]\nname = "runs"\npath = "runs"\nsettle_seconds = 0.3\n',
             '[watch.metric]\nname = "val_loss"\nmode = "min"\n',
             f"[watch.mirror]\nto = {json.dumps(sorted(targets))}\nwhat = {what}\n", retention]  # fmt: skip
    for name, settings in targets.items():
        lines.append(f"[mirror.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    path = root / "config.toml"
    path.write_text("\n".join(lines))
    return path


def _scan(config: Config) -> None:
    with Catalog(config.daemon.state_dir) as catalog:
        for watch in config.watch:
            reconcile(watch.path, watch=watch.name, patterns=watch.patterns, catalog=catalog,
                      verifier=verify, engine=engine_versions)  # fmt: skip


def _enqueue(catalog: Catalog, config: Config, now: float | None = None) -> None:
    for watch in config.watch:
        for run in sorted({r.run for r in catalog.present(watch=watch.name)}):
            enqueue_run(catalog, config, watch, run, now=time.time() if now is None else now)


class Site:
    """A watched folder with real verified checkpoints, a config naming the targets, and its catalog."""

    def __init__(self, root: Path, targets: dict[str, dict[str, Any]], **options: str) -> None:
        self.root = root
        self.exp1 = root / "runs" / "exp1"
        self.seed0 = root / "runs" / "exp10" / "seed0"
        for step, loss in EXP1.items():
            _checkpoint(self.exp1 / f"epoch={step // 100}-step={step}.pt", step, loss)
        _checkpoint(self.seed0 / "epoch=1-step=50.pt", 50, 0.9)
        self.config_path = _write_config(root, targets, **options)
        self.config = load_config(self.config_path)
        _scan(self.config)

    @property
    def best(self) -> Path:
        return self.exp1 / "epoch=2-step=200.pt"

    @property
    def latest(self) -> Path:
        return self.exp1 / "epoch=3-step=300.pt"

    def catalog(self) -> Catalog:
        return Catalog(self.config.daemon.state_dir)

    def add(self, step: int, loss: float) -> Path:
        """A new checkpoint in exp1, verified and cataloged."""
        path = _checkpoint(self.exp1 / f"epoch={step // 100}-step={step}.pt", step, loss)
        _scan(self.config)
        return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _local(root: Path) -> dict[str, Any]:
    return {"url": str(root.relative_to(root.parent)), "keep_superseded": 0}


def _s3(bucket: Bucket) -> dict[str, Any]:
    return {"url": f"s3://{bucket.name}/ckpts", "endpoint_url": bucket.endpoint, "region": "us-east-1",
            "keep_superseded": 0}  # fmt: skip


@pytest.fixture
def site(tmp_path: Path, s3_bucket: Bucket) -> Site:
    """exp1 and exp10/seed0, verified, mirrored by rule to a local folder `backup` and to S3 (keep_superseded 0)."""
    return Site(tmp_path, {"local": _local(tmp_path / "backup"), "s3": _s3(s3_bucket)})


@pytest.fixture
def local_site(tmp_path: Path) -> Site:
    """The same runs, mirrored to the local folder `backup` only."""
    return Site(tmp_path, {"local": _local(tmp_path / "backup")})


def ckptd(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run the ckptd command line in this process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


class Recording:
    """A Target that records each write and delete (in order) and passes it on to the real target."""

    def __init__(self, real: Target) -> None:
        self.real = real
        self.name, self.url = real.name, real.url
        self.ops: list[tuple[str, str]] = []

    def put_file(self, key: str, source: Path, *, sha256: str, progress: Any = None) -> None:
        self.real.put_file(key, source, sha256=sha256, progress=progress)
        self.ops.append(("put_file", key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.real.put_bytes(key, data)
        self.ops.append(("put_bytes", key))

    def delete(self, key: str) -> None:
        self.real.delete(key)
        self.ops.append(("delete", key))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


EXPECTED_KEYS = [
    "runs/exp1/epoch=2-step=200.pt", "runs/exp1/epoch=2-step=200.pt.ckptd.json",
    "runs/exp1/epoch=3-step=300.pt", "runs/exp1/epoch=3-step=300.pt.ckptd.json", "runs/exp1/index.json",
    "runs/exp10/seed0/epoch=1-step=50.pt", "runs/exp10/seed0/epoch=1-step=50.pt.ckptd.json",
    "runs/exp10/seed0/index.json",
]  # fmt: skip


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_mirror_pass_copies_best_and_latest_with_sidecars_and_index_in_order(site: Site, backend: str) -> None:
    """Each run's best and latest land at <watch>/<run>/<name> with their sidecars, then index.json, in that order."""
    targets = targets_of(site.config)
    recording = Recording(targets[backend])
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        report = mirror_pass(site.config, catalog, {backend: recording})
        assert report.failed == [] and len(report.copied) == 3
        # the other target has not been copied to yet: retention must still keep all three
        assert catalog.awaiting_mirror("runs") == {
            str(site.best),
            str(site.latest),
            str(site.seed0 / "epoch=1-step=50.pt"),
        }
    target = targets[backend]
    assert list(target.list()) == EXPECTED_KEYS
    # every write of a checkpoint is followed by its sidecar, then the run's index.json
    writes = recording.ops
    assert len(writes) == 9 and all(op != "delete" for op, _key in writes)
    for i in range(0, 9, 3):
        (op1, ckpt), (op2, side), (op3, index) = writes[i : i + 3]
        assert (op1, op2, op3) == ("put_file", "put_bytes", "put_bytes")
        assert side == ckpt + ".ckptd.json" and index == ckpt.rsplit("/", 1)[0] + "/index.json"
    for local in (site.best, site.latest, site.seed0 / "epoch=1-step=50.pt"):
        key = local.relative_to(site.root).as_posix()
        assert target.sha256(key) == _sha(local)
        assert target.get_bytes(key + ".ckptd.json") == sidecar.sidecar_path(local).read_bytes()
    index = json.loads(target.get_bytes("runs/exp1/index.json"))
    assert index["run"] == "runs/exp1"
    assert (index["best"]["name"], index["best"]["sha256"]) == (site.best.name, _sha(site.best))
    assert (index["latest"]["name"], index["latest"]["sha256"]) == (site.latest.name, _sha(site.latest))
    assert index["best"]["metrics"] == {"val_loss": 0.4} and index["latest"]["step"] == 300
    seed0 = json.loads(target.get_bytes("runs/exp10/seed0/index.json"))
    assert seed0["best"]["name"] == seed0["latest"]["name"] == "epoch=1-step=50.pt"


def test_a_superseded_copy_leaves_only_after_its_successor_is_proved(local_site: Site, tmp_path: Path) -> None:
    """A new best and latest are copied and indexed first; only then are the old copies deleted (keep_superseded=1)."""
    config = load_config(_write_config(tmp_path, {"local": {"url": "backup", "keep_superseded": 1}}))
    target = targets_of(config)["local"]
    with local_site.catalog() as catalog:
        _enqueue(catalog, config)
        mirror_pass(config, catalog, {"local": target})
        newest = local_site.add(400, 0.1)
        _enqueue(catalog, config)
        recording = Recording(target)
        report = mirror_pass(config, catalog, {"local": recording})
    assert report.copied == [f"{newest} -> local"]
    ops = [(op, key.rsplit("/", 1)[1]) for op, key in recording.ops]
    assert ops == [("put_file", newest.name), ("put_bytes", newest.name + ".ckptd.json"), ("put_bytes", "index.json"),
                   ("delete", local_site.best.name), ("delete", local_site.best.name + ".ckptd.json")]  # fmt: skip
    assert [k.rsplit("/", 1)[1] for k in target.list("runs/exp1/")] == [
        local_site.latest.name, local_site.latest.name + ".ckptd.json", newest.name, newest.name + ".ckptd.json",
        "index.json",
    ]  # fmt: skip
    index = json.loads(target.get_bytes("runs/exp1/index.json"))
    assert index["best"]["name"] == index["latest"]["name"] == newest.name
    assert index["superseded"] == [local_site.latest.name]


@pytest.mark.parametrize("broken", ["local root is a file", "s3 bucket refused"])
def test_a_failing_target_keeps_the_copy_queued_with_backoff_and_status_shows_it(
    tmp_path: Path, moto_s3: MotoS3, broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing target leaves every copy queued with growing backoff and its error in `ckptd status`; it drains later.

    Two real failures: a local target whose root is a file, and an S3 store that refuses the bucket (NoSuchBucket,
    what S3 answers like wrong credentials: a refusal, not an outage).
    """
    bucket = f"ckptd-test-later-{os.getpid()}-{len(broken)}"
    if broken.startswith("local"):
        name, settings, clue = "local", _local(tmp_path / "backup"), "backup"
        (tmp_path / "backup").write_text("not a folder")
    else:
        name, clue = "s3", "NoSuchBucket"
        settings = {"url": f"s3://{bucket}/ckpts", "endpoint_url": moto_s3.endpoint, "region": "us-east-1"}
    site = Site(tmp_path, {name: settings})
    config = site.config
    clock = [1_000_000.0]
    with site.catalog() as catalog:
        _enqueue(catalog, config, now=clock[0])
        report = mirror_pass(config, catalog, targets_of(config), now=lambda: clock[0])
        assert report.copied == [] and len(report.failed) == 3
        queued = catalog.mirror_due(None)
        assert {q["state"] for q in queued} == {"failed"} and {q["attempts"] for q in queued} == {1}
        assert {q["next_try"] for q in queued} == {clock[0] + 5.0}
        assert all(clue in q["last_error"] for q in queued)
        assert catalog.awaiting_mirror("runs") == {q["path"] for q in queued}  # retention keeps them
        assert mirror_pass(config, catalog, targets_of(config), now=lambda: clock[0] + 4).failed == []  # not due yet
        clock[0] += 5
        mirror_pass(config, catalog, targets_of(config), now=lambda: clock[0])
        assert {q["next_try"] for q in catalog.mirror_due(None)} == {clock[0] + 10.0}  # backoff doubles
    code, out, _err = ckptd(capsys, "status", "--config", site.config_path, "--json")
    assert code == 0
    backlog = json.loads(out)["mirrors"][name]
    assert backlog["failed"] == 3 and backlog["pending"] == 0 and backlog["done"] == 0 and clue in backlog["last_error"]
    if broken.startswith("local"):  # the target comes back: the queue drains once the backoff has passed
        (tmp_path / "backup").unlink()
    else:
        moto_s3.client().create_bucket(Bucket=bucket)
    with site.catalog() as catalog:
        report = mirror_pass(config, catalog, targets_of(config), now=lambda: clock[0] + 10)
        assert len(report.copied) == 3 and catalog.mirror_due(None) == []
    code, out, _err = ckptd(capsys, "status", "--config", site.config_path, "--json")
    assert json.loads(out)["mirrors"][name] == {
        "pending": 0,
        "failed": 0,
        "done": 3,
        "last_error": None,
        "failing_since": None,
    }
    assert targets_of(config)[name].stat(f"runs/exp1/{site.best.name}") is not None


def test_retention_keeps_a_checkpoint_until_its_copy_is_done(tmp_path: Path) -> None:
    """With what = ["all"] and keep_last = 1, prune keeps every checkpoint while its copy is pending, then deletes."""
    retention = "[watch.retention]\nkeep_last = 1\nkeep_best = 0\n"
    site = Site(tmp_path, {"local": _local(tmp_path / "backup")}, what='["all"]', retention=retention)
    watch = site.config.watch[0]
    assert watch.retention is not None
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)

        def prune() -> list[str]:
            report = prune_watch(watch, watch.retention, catalog=catalog, state_dir=site.config.daemon.state_dir,
                                 dry_run=False, awaiting_mirror=lambda: catalog.awaiting_mirror("runs"))  # fmt: skip
            return sorted(Path(d.path).name for d in report.done)

        assert prune() == []
        assert all(p.exists() for p in site.exp1.glob("*.pt")) and len(list(site.exp1.glob("*.pt"))) == 3
        assert len(mirror_pass(site.config, catalog, targets_of(site.config)).copied) == 4
        assert prune() == ["epoch=1-step=100.pt"]  # copied now; step 200 stays as the best, 300 as the latest
    assert sorted(p.name for p in site.exp1.glob("*.pt")) == ["epoch=2-step=200.pt", "epoch=3-step=300.pt"]
    assert targets_of(site.config)["local"].stat("runs/exp1/epoch=1-step=100.pt") is not None


class DeletesTheSource(Recording):
    """A target during whose put_file of `victim` the trainer deletes it (save_top_k) and ckptd its sidecar."""

    def __init__(self, real: Target, victim: Path) -> None:
        super().__init__(real)
        self.victim = victim

    def put_file(self, key: str, source: Path, *, sha256: str, progress: Any = None) -> None:
        if source.readlink() == self.victim:  # source is /proc/self/fd/N: the file ckptd opened
            self.victim.unlink()
            sidecar.sidecar_path(self.victim).unlink()
        super().put_file(key, source, sha256=sha256, progress=progress)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_checkpoint_deleted_while_it_is_copied_is_copied_whole_from_the_file_opened(site: Site, backend: str) -> None:
    """A checkpoint the trainer deletes mid-copy is still copied whole and proved: the copy reads the file ckptd
    opened (and verified), never whatever the name holds later; the next pass has nothing left to do."""
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        victim = Path(next(q for q in catalog.mirror_due(None) if q["target"] == backend)["path"])
        expected = hashlib.sha256(victim.read_bytes()).hexdigest()
        target = DeletesTheSource(targets_of(site.config)[backend], victim)
        report = mirror_pass(site.config, catalog, {backend: target})
        assert report.failed == [] and len(report.copied) == 3 and not victim.exists()
        assert mirror_pass(site.config, catalog, {backend: target}, due_only=False).copied == []
    real = targets_of(site.config)[backend]
    run_key = victim.parent.relative_to(site.root).as_posix()
    assert real.sha256(f"{run_key}/{victim.name}") == expected
    assert real.stat(f"{run_key}/{victim.name}.ckptd.json") is not None


def test_a_copy_dropped_while_it_was_being_made_stays_dropped_when_it_fails(tmp_path: Path) -> None:
    """A copy that fails after its checkpoint was superseded stays dropped: no failure in status, nothing held back."""
    with Catalog(tmp_path) as catalog:
        old = {"/w/r/last.ckpt": (["latest"], "a" * 64)}
        catalog.sync_mirror_queue(target="t", watch="w", run="/w/r", wanted=old, now=1.0)
        (item,) = catalog.mirror_due(None)  # the mirror thread starts copying it...
        new = {"/w/r/last.ckpt": (["latest"], "b" * 64)}
        catalog.sync_mirror_queue(target="t", watch="w", run="/w/r", wanted=new, now=2.0)  # ...a new one lands
        catalog.mirror_retry(item, error="changed while being copied", next_try=10.0, now=2.5)  # ...and the copy fails
        assert [(q["sha256"], q["state"]) for q in catalog.mirror_due(None)] == [("b" * 64, "pending")]
        assert catalog.mirror_backlog()["t"] == {
            "pending": 1,
            "failed": 0,
            "done": 0,
            "last_error": None,
            "failing_since": None,
        }
        assert catalog.awaiting_mirror("w") == {"/w/r/last.ckpt"}
        catalog.mirror_finish(catalog.mirror_due(None)[0], state="done", now=3.0)
        assert catalog.awaiting_mirror("w") == frozenset()


def test_a_copy_superseded_before_it_was_made_no_longer_holds_back_retention(tmp_path: Path) -> None:
    """Queued copies a newer best and latest replace before they are made are dropped; prune may then delete them."""
    retention = "[watch.retention]\nkeep_last = 1\nkeep_best = 0\n"
    site = Site(tmp_path, {"local": _local(tmp_path / "backup")}, retention=retention)
    watch = site.config.watch[0]
    assert watch.retention is not None
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        assert {site.best.name, site.latest.name} <= {Path(p).name for p in catalog.awaiting_mirror("runs")}
        newest = site.add(400, 0.1)  # the new best and latest, before any copy was made
        _enqueue(catalog, site.config)
        assert {Path(p).name for p in catalog.awaiting_mirror("runs")} == {newest.name, "epoch=1-step=50.pt"}
        report = prune_watch(watch, watch.retention, catalog=catalog, state_dir=site.config.daemon.state_dir,
                             dry_run=False, awaiting_mirror=lambda: catalog.awaiting_mirror("runs"))  # fmt: skip
    assert sorted(Path(d.path).name for d in report.done) == sorted(
        ["epoch=1-step=100.pt", site.best.name, site.latest.name]
    )
    assert sorted(p.name for p in site.exp1.glob("*.pt")) == [newest.name]


def test_mirror_verify_finds_corrupted_copies_and_repairs_them(site: Site, s3_bucket: Bucket,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`ckptd mirror --verify` reads every copy back; a flipped byte (local) or a replaced S3 object is repaired."""
    code, out, err = ckptd(capsys, "mirror", "--config", site.config_path)
    assert code == 0, err
    assert out.count("copied: ") == 6
    copy = site.root / "backup" / NODE / "runs" / "exp1" / site.best.name
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    s3_key = f"ckpts/{NODE}/runs/exp1/{site.latest.name}"
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key=s3_key, Body=b"not the checkpoint")
    s3_bucket.server.client().delete_object(
        Bucket=s3_bucket.name, Key=f"ckpts/{NODE}/runs/exp10/seed0/epoch=1-step=50.pt"
    )
    code, out, err = ckptd(capsys, "mirror", "--config", site.config_path, "--verify")
    assert code == 0, err
    assert "local: 3 copies checked, 1 bad, 1 repaired" in out and "s3: 3 copies checked, 2 bad, 2 repaired" in out
    targets = targets_of(site.config)
    assert targets["local"].sha256(f"runs/exp1/{site.best.name}") == _sha(site.best)
    assert targets["s3"].sha256(f"runs/exp1/{site.latest.name}") == _sha(site.latest)
    assert targets["s3"].sha256("runs/exp10/seed0/epoch=1-step=50.pt") == _sha(site.seed0 / "epoch=1-step=50.pt")
    code, out, _err = ckptd(capsys, "mirror", "--config", site.config_path, "--verify")
    assert code == 0 and "local: 3 copies checked, 0 bad, 0 repaired" in out and "s3: 3 copies checked, 0 bad" in out
    copy.write_bytes(bytes(data))  # bad again, and this time no good local original is left to repair it from
    site.best.unlink()
    code, out, _err = ckptd(capsys, "mirror", "--config", site.config_path, "--verify")
    assert code == 1 and "local: 3 copies checked, 1 bad, 0 repaired" in out


def test_a_checkpoint_deleted_before_its_copy_is_dropped_not_copied(local_site: Site) -> None:
    """A queued checkpoint deleted (with its sidecar) before the mirror gets to it is dropped, not retried forever."""
    with local_site.catalog() as catalog:
        _enqueue(catalog, local_site.config)
        local_site.best.unlink()
        sidecar.sidecar_path(local_site.best).unlink()
        report = mirror_pass(local_site.config, catalog, targets_of(local_site.config))
        assert report.dropped == [str(local_site.best)] and len(report.copied) == 2
        assert catalog.mirror_due(None) == [] and str(local_site.best) not in catalog.awaiting_mirror("runs")
    assert targets_of(local_site.config)["local"].stat(f"runs/exp1/{local_site.best.name}") is None


def test_mirror_dry_run_copies_nothing(local_site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptd mirror --dry-run` prints what it would copy and leaves the target empty and the queue pending."""
    code, out, _err = ckptd(capsys, "mirror", "--config", local_site.config_path, "--dry-run")
    assert code == 0 and out.count("would copy: ") == 3 and f"{local_site.best} -> local" in out
    assert not (local_site.root / "backup").exists()
    with local_site.catalog() as catalog:
        assert len(catalog.mirror_due(None)) == 3


def test_ls_lists_runs_and_their_best_and_latest(local_site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """`ckptd ls TARGET` shows each run's copies with roles; `ls TARGET RUN` only that run (not runs/exp10)."""
    assert ckptd(capsys, "mirror", "--config", local_site.config_path)[0] == 0
    code, out, _err = ckptd(capsys, "ls", "local", "--config", local_site.config_path)
    assert code == 0
    # piped: one record per copy, `run copy roles ...` (the run as `restore` takes it)
    roles = {tuple(line.split("\t")[:2]): line.split("\t")[2] for line in out.splitlines() if line[:1] != "#"}
    assert {run for run, _name in roles} == {"runs/exp1", "runs/exp10/seed0"}
    assert roles["runs/exp1", local_site.best.name] == "best"
    assert roles["runs/exp1", local_site.latest.name] == "latest"
    assert roles["runs/exp10/seed0", "epoch=1-step=50.pt"] in ("best,latest", "latest,best")
    code, out, _err = ckptd(capsys, "ls", "local", "runs/exp1", "--config", local_site.config_path, "--json")
    assert code == 0 and list(json.loads(out)) == ["runs/exp1"]
    code, _out, err = ckptd(capsys, "ls", "local", "runs/nothing", "--config", local_site.config_path)
    assert code == 1 and "holds no run" in err
    code, _out, err = ckptd(capsys, "ls", "nowhere", "--config", local_site.config_path)
    assert code == 2 and "unknown mirror target" in err


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_restore_brings_best_and_latest_back_byte_for_byte(site: Site, backend: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`ckptd restore TARGET RUN --best|--latest --to DIR` prints the restored path; bytes match; it verifies ok."""
    assert ckptd(capsys, "mirror", "--config", site.config_path)[0] == 0
    for flag, original in (("--best", site.best), ("--latest", site.latest)):
        out_dir = tmp_path / f"restored-{backend}{flag}"
        code, out, err = ckptd(capsys, "restore", backend, "runs/exp1", flag, "--to", out_dir, "--config",
                               site.config_path)  # fmt: skip
        assert code == 0, err
        restored = Path(out.strip())
        assert restored == out_dir / original.name
        assert restored.read_bytes() == original.read_bytes()
        fresh = sidecar.read(restored)
        assert fresh is not None and fresh.verification.status == "ok"
        assert fresh.verification.sha256 == _sha(original)
        assert sorted(p.name for p in out_dir.iterdir()) == [original.name, original.name + ".ckptd.json"]


def test_restore_works_on_a_fresh_machine_with_only_config_toml(site: Site, tmp_path: Path) -> None:
    """In an empty folder holding only config.toml (no watched folder, no state), `ckptd restore` from S3 works."""
    assert subprocess.run([CKPTD, "mirror", "--config", site.config_path], capture_output=True).returncode == 0
    fresh = tmp_path / "fresh-machine"
    fresh.mkdir()
    shutil.copy(site.config_path, fresh / "config.toml")
    done = subprocess.run([CKPTD, "restore", "s3", "runs/exp1", "--latest", "--to", "ckpt"], cwd=fresh,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    restored = Path(done.stdout.strip())
    assert restored == fresh / "ckpt" / site.latest.name
    assert restored.read_bytes() == site.latest.read_bytes()
    assert sorted(p.name for p in fresh.iterdir()) == ["ckpt", "config.toml"]


def test_restore_of_a_corrupted_copy_fails_and_leaves_no_file(local_site: Site, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A copy whose bytes do not match the mirrored sidecar is not restored: exit 1, nothing left in --to."""
    assert ckptd(capsys, "mirror", "--config", local_site.config_path)[0] == 0
    copy = local_site.root / "backup" / NODE / "runs" / "exp1" / local_site.best.name
    data = bytearray(copy.read_bytes())
    data[100] ^= 0x01
    copy.write_bytes(bytes(data))
    out_dir = tmp_path / "restored"
    code, out, err = ckptd(capsys, "restore", "local", "runs/exp1", "--best", "--to", out_dir, "--config",
                           local_site.config_path)  # fmt: skip
    assert code == 1 and out == ""
    assert "does not match" in err
    assert not out_dir.exists() or [p for p in out_dir.rglob("*")] == []
    code, _out, err = ckptd(capsys, "restore", "local", "runs/nothing", "--best", "--to", out_dir, "--config",
                            local_site.config_path)  # fmt: skip
    assert code == 1 and "no run" in err


def test_a_checkpoint_changed_after_verification_is_retried_then_reported_never_mirrored(local_site: Site) -> None:
    """A checkpoint rewritten under a stale sidecar fails its proof: retried, reported, queued, and never indexed."""
    with local_site.catalog() as catalog:
        _enqueue(catalog, local_site.config)
        checkpoints.torch_zip(local_site.best, global_step=999)
        report = mirror_pass(local_site.config, catalog, targets_of(local_site.config))
        assert [line.split(":")[0] for line in report.failed] == [f"{local_site.best} -> local"]
        assert "does not match" in report.failed[0] or "expected" in report.failed[0]
        failed = [q for q in catalog.mirror_due(None) if q["path"] == str(local_site.best)]
        assert len(failed) == 1 and failed[0]["state"] == "failed" and failed[0]["copied"] == 0
    target = targets_of(local_site.config)["local"]
    assert target.stat(f"runs/exp1/{local_site.best.name}") is None
    assert target.stat(f"runs/exp1/{local_site.best.name}.ckptd.json") is None
    index = json.loads(target.get_bytes("runs/exp1/index.json"))
    assert index["best"] is None and local_site.best.name not in index["copies"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_directory_checkpoint_is_mirrored_file_by_file_and_restored_whole(
    tmp_path: Path, s3_bucket: Bucket, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sharded safetensors folder goes up file by file; restore rebuilds it exactly, and refuses a corrupted one."""
    folder = tmp_path / "runs" / "hf" / "model-100"
    checkpoints.safetensors_sharded(folder, shards=2)
    settings = _local(tmp_path / "backup") if backend == "local" else _s3(s3_bucket)
    config_path = _write_config(tmp_path, {backend: settings})
    _scan(load_config(config_path))
    assert ckptd(capsys, "mirror", "--config", config_path)[0] == 0
    target = targets_of(load_config(config_path))[backend]
    names = sorted(p.name for p in folder.iterdir())
    assert list(target.list("runs/hf/")) == sorted(
        [*(f"runs/hf/model-100/{n}" for n in names), "runs/hf/model-100.ckptd.json", "runs/hf/index.json"]
    )
    code, out, err = ckptd(capsys, "restore", backend, "runs/hf", "--latest", "--to", tmp_path / "back",
                           "--config", config_path)  # fmt: skip
    assert code == 0, err
    restored = Path(out.strip())
    assert restored == tmp_path / "back" / "model-100"
    assert sorted(p.name for p in restored.iterdir()) == names
    assert all((restored / n).read_bytes() == (folder / n).read_bytes() for n in names)
    target.put_bytes(f"runs/hf/model-100/{names[0]}", b"not a shard")
    code, _out, err = ckptd(capsys, "restore", backend, "runs/hf", "--latest", "--to", tmp_path / "again",
                            "--config", config_path)  # fmt: skip
    assert code == 1 and "does not match" in err
    assert [p for p in (tmp_path / "again").rglob("*")] == []
    code, _out, err = ckptd(capsys, "restore", backend, "runs/hf", "--best", "--to", tmp_path / "best",
                            "--config", config_path)  # fmt: skip
    assert code == 1 and "names no best" in err  # safetensors carry no val_loss: the run has a latest only


def test_an_nshtrainer_checkpoint_is_mirrored_with_its_record(
    tmp_path: Path, copy_output: CopyOutput, capsys: pytest.CaptureFixture[str]
) -> None:
    """nshtrainer's `<stem>.metadata.json` goes to the target with its checkpoint (the best is chosen by the
    val_loss it records), and leaves with it when the copy is superseded."""
    out = copy_output("nshtrainer")
    shutil.copytree(out.root, tmp_path / "runs", symlinks=True)
    config_path = _write_config(tmp_path, {"local": _local(tmp_path / "backup")})
    config = load_config(config_path)
    _scan(config)
    assert ckptd(capsys, "mirror", "--config", config_path)[0] == 0
    target = targets_of(config)["local"]
    keys = list(target.list(""))
    for checkpoint in (tmp_path / "runs").rglob("*.ckpt"):
        if checkpoint.is_symlink():
            continue
        record = checkpoint.name.removesuffix(".ckpt") + ".metadata.json"
        assert any(k.endswith(f"/{checkpoint.name}") for k in keys), checkpoint
        assert any(k.endswith(f"/{record}") for k in keys), record
    prefix = next(k for k in keys if k.endswith("/index.json")).removesuffix("/index.json")
    best_name = next(p.name for p in (tmp_path / "runs").rglob("best_val_loss/*.ckpt"))
    mirror._delete_copy(target, prefix, best_name)
    assert not [k for k in target.list("") if best_name.removesuffix(".ckpt") in k]


def test_a_target_fails_since_its_first_failure_whatever_rows_come_and_go(tmp_path: Path) -> None:
    """`failing_since` is the target's first failed copy since the last proved one: a new save that re-queues
    its row does not reset it, and one proved copy clears it (`status --check --failing-for` reads it)."""
    with Catalog(tmp_path) as catalog:
        first = {"/w/r/a.pt": (["latest"], "a" * 64)}
        catalog.sync_mirror_queue(target="t", watch="w", run="/w/r", wanted=first, now=1.0)
        (item,) = catalog.mirror_due(None)
        catalog.mirror_retry(item, error="down", next_try=50.0, now=10.0)
        second = {"/w/r/b.pt": (["latest"], "b" * 64)}
        catalog.sync_mirror_queue(target="t", watch="w", run="/w/r", wanted=second, now=100.0)  # a new save
        (newer,) = [q for q in catalog.mirror_due(None) if q["path"] == "/w/r/b.pt"]
        catalog.mirror_retry(newer, error="still down", next_try=200.0, now=150.0)
        assert catalog.mirror_backlog()["t"]["failing_since"] == 10.0
        catalog.mirror_finish(newer, state="done", now=300.0)
        assert catalog.mirror_backlog()["t"]["failing_since"] is None
