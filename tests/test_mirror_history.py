"""Mirror history, end to end: real verified checkpoints, a real catalog, mirror passes into a local folder (and
S3 on moto's server), local checkpoints that rot or are truncated by a save that crashed half-way, and restore.

The rules (ckptd.mirror.render_index): a target's copy of a checkpoint whose local copy rotted is never deleted;
the mirror's best is the best copy the target holds and its latest the newest, so neither moves back; each
target's index lists every copy it holds, and `restore` fetches any of them (--latest, --best, --step, --sha256).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mirror import Site, _checkpoint, _enqueue, _local, _s3, _scan, _write_config, ckptd

from ckptd import mirror as mirroring
from ckptd import scrub as scrubbing
from ckptd.catalog import Catalog
from ckptd.config import Config, load_config
from ckptd.mirror import mirror_pass, roles_for, targets_of
from ckptd.mirrors import Target


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _crash_mid_save(path: Path) -> None:
    """A save that rewrites `path` in place and dies half-way: the file is left truncated."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def _rot(path: Path) -> None:
    """Bit rot: one byte flipped, size and mtime unchanged (only a scrub can tell)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _scrub_without_mirror(config: Config) -> scrubbing.ScrubReport:
    """A scrub while the target is out of reach: rot is quarantined, not repaired from the mirror."""
    with Catalog(config.daemon.state_dir) as catalog:
        return scrubbing.scrub(config, catalog, {})


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_rot_and_a_crash_mid_save_lose_no_good_copy_and_restore_fetches_any(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """The local latest is truncated by a crash mid-save and the local best rots: the target keeps both good
    copies, its latest stays the newer step and its best the better loss; `restore --latest`, `--best`, `--step`
    and `--sha256` fetch them, and `ls` lists every copy."""
    settings = _local(tmp_path / "backup") if backend == "local" else _s3(request.getfixturevalue("s3_bucket"))
    site = Site(tmp_path, {backend: {**settings, "keep_superseded": 1}})  # exp1: 100 (0.7), 200 (0.4), 300 (0.55)
    config, best, third = site.config_path, site.best, site.latest
    assert ckptd(capsys, "mirror", "--config", config)[0] == 0
    fourth = site.add(400, 0.6)
    assert ckptd(capsys, "mirror", "--config", config)[0] == 0
    good = {p.name: _sha(p) for p in (best, third, fourth)}
    _crash_mid_save(fourth)  # the local latest falls back to step 300
    _scan(site.config)
    _rot(best)  # and the local best rots, caught while the target is down: quarantined
    assert _scrub_without_mirror(site.config).quarantined == [str(best)]
    _scan(site.config)
    fifth = site.add(500, 0.5)  # the local best and latest now (0.4 is gone, 0.5 beats 0.55 and 0.7)
    good[fifth.name] = _sha(fifth)
    code, out, err = ckptd(capsys, "mirror", "--config", config)
    assert code == 0 and out.count("copied: ") == 1, out + err
    target = targets_of(site.config)[backend]
    index = json.loads(target.get_bytes("runs/exp1/index.json"))
    assert (index["best"]["name"], index["latest"]["name"]) == (best.name, fifth.name)
    assert sorted(index["copies"]) == sorted(good)  # 300 is superseded and kept (keep_superseded = 1)
    assert index["superseded"] == [fourth.name, third.name] or index["superseded"] == [third.name, fourth.name]
    assert {n: c["local"] for n, c in index["copies"].items()} == {
        best.name: "rotted", third.name: "intact", fourth.name: "rotted", fifth.name: "intact",
    }  # fmt: skip
    for name, sha in good.items():
        assert target.sha256(f"runs/exp1/{name}") == sha
    code, out, _err = ckptd(capsys, "ls", backend, "runs/exp1", "--config", config)
    assert code == 0 and all(name in out for name in good)

    def restore(*which: object) -> Path:
        code, out, err = ckptd(capsys, "restore", backend, "runs/exp1", *which, "--to",
                               tmp_path / "back" / "-".join(map(str, which)), "--config", config)  # fmt: skip
        assert code == 0, err
        return Path(out.strip())

    assert _sha(restored := restore("--best")) == good[best.name] and restored.name == best.name
    assert _sha(restored := restore("--latest")) == good[fifth.name] and restored.name == fifth.name
    assert _sha(restore("--step", 400)) == good[fourth.name]  # the good copy of the checkpoint that crashed
    assert _sha(restore("--sha256", good[third.name][:10])) == good[third.name]
    code, _out, err = ckptd(capsys, "restore", backend, "runs/exp1", "--step", 999, "--to", tmp_path / "x",
                            "--config", config)  # fmt: skip
    assert code == 1 and "no copy at step 999" in err and not (tmp_path / "x").exists()
    code, _out, err = ckptd(capsys, "restore", backend, "runs/exp1", "--best", "--step", 400, "--to", tmp_path / "x",
                            "--config", config)  # fmt: skip
    assert code == 2 and "--step N or --sha256 PREFIX" in err
    sixth = site.add(600, 0.3)  # a better best and a newer latest: intact superseded copies leave, rotted ones stay
    assert ckptd(capsys, "mirror", "--config", config)[0] == 0
    index = json.loads(target.get_bytes("runs/exp1/index.json"))
    assert index["best"]["name"] == index["latest"]["name"] == sixth.name
    assert sorted(index["copies"]) == sorted([best.name, fourth.name, fifth.name, sixth.name])
    assert target.stat(f"runs/exp1/{third.name}") is None and target.sha256(f"runs/exp1/{best.name}") == good[best.name]


# ------------------------------------------------------------------------------------------------- property

SAVE = st.tuples(st.just("save"), st.sampled_from([0.9, 0.7, 0.5, 0.4, 0.3, 0.2]), st.booleans())
ROT = st.tuples(st.just("rot"), st.integers(0, 7), st.booleans())  # bit rot, found by a scrub
CRASH = st.tuples(st.just("crash"), st.just(0), st.booleans())  # the newest checkpoint truncated mid-save
DELETE = st.tuples(st.just("delete"), st.integers(0, 7), st.booleans())  # the user deletes one
OPS = st.lists(st.one_of(SAVE, SAVE, ROT, CRASH, DELETE), min_size=1, max_size=12)


class Training:
    """One run folder, its catalog and a local target; which checkpoints the target held as the run's best or
    latest, and which of those copies it held when their local checkpoint rotted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / "runs" / "exp1"
        self.run.mkdir(parents=True)
        self.config = load_config(_write_config(root, {"local": {"url": "backup", "keep_superseded": 0}}))
        self.catalog = Catalog(self.config.daemon.state_dir)
        self.target: Target = targets_of(self.config)["local"]
        self.steps = itertools.count(100, 100)
        self.restores = itertools.count()
        self.roles: dict[str, set[str]] = {}  # name: the roles it held locally while the target held its copy
        self.held: dict[str, tuple[str, int, float]] = {}  # name: (sha256, step, loss) of copies held at rot time

    def present(self) -> list[Path]:
        return sorted(self.run.glob("*.pt"), key=lambda p: int(p.stem.rpartition("=")[2]))

    def ok(self, name: str) -> bool:
        row = self.catalog.get(str(self.run / name))
        return row is not None and row.status == "ok" and row.gone_at is None

    def copy_of(self, name: str) -> str | None:
        key = f"runs/exp1/{name}"
        return self.target.sha256(key) if self.target.stat(key) is not None else None

    def apply(self, op: str, arg: float) -> None:
        files = self.present()
        if op == "save":
            step = next(self.steps)
            _checkpoint(self.run / f"epoch={step // 100}-step={step}.pt", step, arg)
        elif op == "crash" and files:
            self._rotting(files[-1], _crash_mid_save)
        elif op == "rot" and (healthy := [p for p in files if self.ok(p.name)]):
            self._rotting(healthy[int(arg) % len(healthy)], _rot)
            scrubbing.scrub(self.config, self.catalog, {})
        elif op == "delete" and files:
            files[int(arg) % len(files)].unlink()
        _scan(self.config)

    def _rotting(self, path: Path, how: Any) -> None:
        row = self.catalog.get(str(path))
        if row is not None and row.status == "ok" and row.sha256 and self.copy_of(path.name) == row.sha256:
            self.held[path.name] = (row.sha256, row.step or 0, row.metrics["val_loss"])  # that copy must stay
        how(path)

    def local(self) -> dict[str, list[str]]:
        """{name: roles} of the run's local best and latest whose good copy the target holds."""
        entries = [r.entry() for r in self.catalog.in_run(str(self.run))]
        chosen = roles_for(entries, ["best", "latest"], "val_loss", "min")
        rows = {Path(path).name: (roles, self.catalog.get(path)) for path, roles in chosen.items()}
        return {name: roles for name, (roles, row) in rows.items() if row and self.copy_of(name) == row.sha256}

    def mirror(self) -> None:
        _enqueue(self.catalog, self.config)
        assert mirror_pass(self.config, self.catalog, {"local": self.target}).failed == []
        for name, roles in self.local().items():
            self.roles.setdefault(name, set()).update(roles)

    def check(self) -> None:
        for name, (sha, _step, _loss) in self.held.items():  # never deleted because the local copy rotted
            assert self.copy_of(name) == sha, f"the good copy of {name} was lost"
        if self.target.stat("runs/exp1/index.json") is None:
            return
        index = json.loads(self.target.get_bytes("runs/exp1/index.json"))
        for name, copy in index["copies"].items():  # every copy listed is there, and good
            assert self.copy_of(name) == copy["sha256"]
        local = self.local()
        rows = {n: self.catalog.get(str(self.run / n)) for n in local}
        steps = [step for n, (_sha, step, _loss) in self.held.items() if "latest" in self.roles.get(n, ())]
        steps += [row.step or 0 for n, row in rows.items() if row and "latest" in local[n]]
        if steps:  # never older than the local latest, nor than a copy held since its local checkpoint rotted
            assert index["latest"]["step"] >= max(steps)
            assert self.copy_of(index["latest"]["name"]) == index["latest"]["sha256"]
        losses = [loss for n, (_sha, _step, loss) in self.held.items() if "best" in self.roles.get(n, ())]
        losses += [row.metrics["val_loss"] for n, row in rows.items() if row and "best" in local[n]]
        if losses:  # never worse than the local best, nor than a copy held since its local checkpoint rotted
            assert index["best"]["metrics"]["val_loss"] <= min(losses)
            assert self.copy_of(index["best"]["name"]) == index["best"]["sha256"]
        to = self.root / "restored" / str(next(self.restores))
        found = mirroring.restore(self.target, "runs/exp1", "latest", to,
                                  known=lambda n: self.catalog.mirrored_sha(target="local", run=str(self.run),
                                                                            name=n))  # fmt: skip
        assert found.path.name == index["latest"]["name"] and _sha(found.path) == index["latest"]["sha256"]


@given(ops=OPS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_sequence_of_saves_rots_and_crashes_loses_the_good_copy_of_a_best_or_latest(
    tmp_path: Path, ops: list[tuple[str, float, bool]]
) -> None:
    """Whatever the order of saves, bit rot (scrubbed while the target is out of reach), crashes mid-save,
    deletions, and mirror passes that run or not: the target keeps the good copy of every checkpoint whose
    local copy rotted while it held it as best or latest; its latest is never older than the local latest nor
    than such a held copy once latest, its best never worse than the local best nor than such a copy once best
    (each a good copy), and `restore --latest` returns the mirror's latest byte for byte."""
    training = Training(Path(tempfile.mkdtemp(dir=tmp_path, prefix="run-")))
    try:
        for op, arg, online in [*ops, ("save", 0.95, True)]:
            training.apply(op, arg)
            if online:
                training.mirror()
                training.check()
    finally:
        training.catalog.close()
