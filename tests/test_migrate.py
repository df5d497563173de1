"""`ckptd migrate`: the pure name parsing and rename planning, then the command over real torch checkpoints.

Each legacy naming scheme becomes `epoch-NN_step-SSSSSS<ext>`; `last.*`, `best*` and canonical names are
never touched; unparsable names and collisions are listed and left alone; sidecars and catalog rows follow a
rename; `--dry-run` changes nothing; `--delete-old --keep-min-epoch N` deletes only what the retention
invariants allow. The command runs in this process (`ckptd.cli.main`), in tmp_path, with no stray config.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import checkpoints
import pytest
from cli_fixtures import Ckptd

from ckptd import sidecar
from ckptd.catalog import Catalog
from ckptd.migrate import Parsed, apply_rename, canonical, parse_name, plan_renames, untouchable

T0 = 1_700_000_000  # a fixed mtime base (seconds), so "newer" never depends on the clock
LEGACY = {  # legacy name -> (epoch, step, canonical name)
    "epoch_epoch_03_step_step_000300_20240101-120000.ckpt": (3, 300, "epoch-03_step-000300.ckpt"),
    "epoch_04_step_000400.ckpt": (4, 400, "epoch-04_step-000400.ckpt"),
    "epoch=5-step=500.ckpt": (5, 500, "epoch-05_step-000500.ckpt"),
    "epoch_006_checkpoint.pt": (6, 600, "epoch-06_step-000600.pt"),
}


def make(path: Path, epoch: int, step: int, loss: float = 0.5, at: int | None = None) -> Path:
    """A small real torch checkpoint (epoch, global_step, val_loss) with mtime T0 + (at or step)."""
    checkpoints.torch_zip(path, epoch=epoch, global_step=step, metrics={"val_loss": loss}, size_floats=256)
    stamp = (T0 + (step if at is None else at)) * 10**9
    os.utime(path, ns=(stamp, stamp))
    return path


def write_config(tmp_path: Path, metric: bool = False) -> Path:
    """A config watching tmp_path/runs (state in tmp_path/state), with val_loss (min) as metric if asked."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    text = '[daemon]\nstate_dir = "state"\n\n[[watch]]\nname = "w"\npath = "runs"\n'
    if metric:
        text += '\n[watch.metric]\nname = "val_loss"\nmode = "min"\n'
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under folder: relative path -> (sha256 or link target, mtime_ns, inode)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            content = f"-> {path.readlink()}"
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "dir"
        found[path.relative_to(folder).as_posix()] = (content, st.st_mtime_ns, st.st_ino)
    return found


def sha(path: Path) -> str:
    """SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def present(tmp_path: Path) -> set[str]:
    """Paths of the checkpoints the catalog says are on disk."""
    with Catalog(tmp_path / "state") as catalog:
        return {row.path for row in catalog.present()}


# ------------------------------------------------------------------------------------------ pure: names


@pytest.mark.parametrize(("name", "expected"), [(n, (e, s)) for n, (e, s, _c) in LEGACY.items()])
def test_parse_name_reads_every_legacy_scheme(name: str, expected: tuple[int, int]) -> None:
    """Each legacy scheme gives its epoch, its step (None for epoch_NNN_checkpoint) and its extension."""
    epoch, step = expected
    parsed = parse_name(name)
    assert parsed == Parsed(epoch, None if "checkpoint" in name else step, Path(name).suffix)


@pytest.mark.parametrize(
    "name",
    [
        "model.pt",
        "epoch=0-step=4-val_loss=0.4312.ckpt",  # Lightning's default with a metric: no known scheme
        "epoch_x_step_5.ckpt",
        "checkpoint_epoch_3.pt",
        "epoch_3.ckpt",
        "epoch=5-step=500",  # no extension
        "epoch_epoch_03_step_step_000300.ckpt",  # the timestamped scheme without its timestamp
    ],
)
def test_parse_name_refuses_names_of_no_known_scheme(name: str) -> None:
    """A name that matches no scheme is not parsed (it is listed, never guessed)."""
    assert parse_name(name) is None


def test_untouchable_names_are_last_best_and_canonical() -> None:
    """`last.*`, `best*` and canonical names are never renamed; legacy names are not untouchable."""
    for name in ("last.ckpt", "last.pt", "best.ckpt", "best-val_loss=0.1.pt", "epoch-03_step-000300.ckpt"):
        assert untouchable(name), name
    for name in LEGACY:
        assert not untouchable(name), name
    assert canonical(3, 300, ".ckpt") == "epoch-03_step-000300.ckpt"
    assert canonical(123, 4567890, ".pt") == "epoch-123_step-4567890.pt"


# ------------------------------------------------------------------------------ pure: plan_renames


def test_plan_renames_maps_each_legacy_name_and_asks_contents_only_without_a_step(tmp_path: Path) -> None:
    """Legacy names get canonical targets; step_of is asked only for names without a step."""
    run = tmp_path / "run"
    paths = [make(run / name, epoch, step) for name, (epoch, step, _c) in LEGACY.items()]
    paths += [make(run / "last.ckpt", 6, 600), make(run / "model.pt", 1, 100)]
    asked: list[str] = []

    def step_of(path: Path) -> int | None:
        asked.append(path.name)
        return 600

    plan = plan_renames(paths, step_of)
    assert sorted((s.name, t.name) for s, t in plan.renames) == sorted((n, c) for n, (_e, _s, c) in LEGACY.items())
    assert all(s.parent == t.parent == run for s, t in plan.renames)
    assert asked == ["epoch_006_checkpoint.pt"]
    assert [p.name for p in plan.untouched] == ["last.ckpt"]
    assert [(p.name, why) for p, why in plan.unparsable] == [("model.pt", "no known naming scheme")]
    assert plan.collisions == [] and plan.deletions == []


def test_plan_renames_leaves_both_sides_of_a_collision_alone(tmp_path: Path) -> None:
    """Two sources with one target, or a target another file already has, leave every source alone."""
    run = tmp_path / "run"
    twins = [make(run / "epoch_07_step_000700.ckpt", 7, 700), make(run / "epoch=7-step=700.ckpt", 7, 700)]
    taken = make(run / "epoch=8-step=800.ckpt", 8, 800)
    existing = make(run / "epoch-08_step-000800.ckpt", 8, 800)
    plan = plan_renames([*twins, taken, existing], lambda _p: None)
    assert plan.renames == []
    assert sorted((sorted(p.name for p in sources), target.name) for sources, target in plan.collisions) == [
        (["epoch=7-step=700.ckpt", "epoch_07_step_000700.ckpt"], "epoch-07_step-000700.ckpt"),
        (["epoch=8-step=800.ckpt"], "epoch-08_step-000800.ckpt"),
    ]
    assert plan.untouched == [existing]


def test_a_name_without_a_step_whose_contents_have_none_keeps_the_epoch_alone(tmp_path: Path) -> None:
    """epoch_NNN_checkpoint with no step known from its contents becomes epoch-NN.pt (never a guessed step),
    and that name is canonical: a second run leaves it alone."""
    path = make(tmp_path / "epoch_002_checkpoint.pt", 2, 200)
    plan = plan_renames([path], lambda _p: None)
    assert plan.renames == [(path, tmp_path / "epoch-02.pt")] and plan.unparsable == []
    again = plan_renames([tmp_path / "epoch-02.pt"], lambda _p: None)
    assert again.renames == [] and again.untouched == [tmp_path / "epoch-02.pt"]


# --------------------------------------------------------------------------------------------- command


def test_migrate_renames_every_legacy_name_and_sidecars_and_catalog_follow(tmp_path: Path, ckptd: Ckptd) -> None:
    """After `scan`, each legacy name is renamed; bytes, sidecars and catalog rows move with it; no re-verify."""
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "exp"
    made = {name: make(run / name, epoch, step) for name, (epoch, step, _c) in LEGACY.items()}
    hashes = {name: sha(path) for name, path in made.items()}
    assert ckptd("scan", "--config", config).code == 0

    done = ckptd("migrate", run, "--config", config)
    assert done.code == 0, done.err
    for name, (_epoch, step, new) in LEGACY.items():
        old, target = run / name, run / new
        assert f"renamed: {old} -> {new}" in done.out
        assert not old.exists() and not sidecar.sidecar_path(old).exists()
        assert sha(target) == hashes[name]
        moved = sidecar.read(target)
        assert moved is not None and moved.verification.global_step == step
        assert json.loads(sidecar.sidecar_path(target).read_bytes())["path"] == str(target)
    assert present(tmp_path) == {str(run / new) for _e, _s, new in LEGACY.values()}

    again = ckptd("scan", "--config", config, "--json")
    assert again.code == 0, again.err
    summary = json.loads(again.out)[str(tmp_path / "runs")]
    assert (summary["verified"], summary["unchanged"], summary["gone"]) == ({}, len(LEGACY), [])
    assert ckptd("latest", run).out.strip() == str(run / "epoch-06_step-000600.pt")


def test_migrate_reads_the_step_from_the_contents_when_there_is_no_sidecar(tmp_path: Path, ckptd: Ckptd) -> None:
    """Never scanned: epoch_NNN_checkpoint's step is read by verifying it; a corrupt one is listed, not renamed."""
    run = tmp_path / "exp"
    good = make(run / "epoch_006_checkpoint.pt", 6, 600)
    bad = make(run / "epoch_007_checkpoint.pt", 7, 700)
    checkpoints.truncate(bad)
    before = sha(good)
    done = ckptd("migrate", run)
    assert done.code == 0, done.err
    assert f"renamed: {good} -> epoch-06_step-000600.pt" in done.out
    assert sha(run / "epoch-06_step-000600.pt") == before
    assert f"unparsable: {bad} (no step in its name, and its contents are corrupt)" in done.out
    assert bad.exists()
    assert not list(run.glob("*.ckptd.json"))  # reading the step writes no sidecar


def test_migrate_never_touches_last_best_or_canonical_names(tmp_path: Path, ckptd: Ckptd) -> None:
    """`last.*`, `best*` and canonical names stay exactly as they are (same bytes, mtime and inode)."""
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "exp"
    for name, step in (("last.ckpt", 900), ("best.ckpt", 200), ("best-val_loss=0.12.pt", 300)):
        make(run / name, step // 100, step)
    make(run / "epoch-09_step-000900.ckpt", 9, 900)
    assert ckptd("scan", "--config", config).code == 0
    before = snapshot(run)
    done = ckptd("migrate", run, "--config", config, "--verbose")
    assert done.code == 0, done.err
    assert snapshot(run) == before
    assert "renamed:" not in done.out
    for name in ("last.ckpt", "best.ckpt", "best-val_loss=0.12.pt", "epoch-09_step-000900.ckpt"):
        assert f"unchanged: {run / name}" in done.out


def test_migrate_lists_unparsable_names_and_leaves_them(tmp_path: Path, ckptd: Ckptd) -> None:
    """Names of no known scheme are printed as unparsable and stay; the legacy one beside them is renamed."""
    run = tmp_path / "exp"
    odd = [make(run / "model.pt", 1, 100), make(run / "epoch=0-step=4-val_loss=0.4312.ckpt", 0, 4)]
    make(run / "epoch_02_step_000200.ckpt", 2, 200)
    before = {p: sha(p) for p in odd}
    done = ckptd("migrate", run)
    assert done.code == 0, done.err
    for path in odd:
        assert f"unparsable: {path} (no known naming scheme)" in done.out
        assert sha(path) == before[path]
    assert (run / "epoch-02_step-000200.ckpt").is_file()


def test_migrate_leaves_both_files_of_a_collision_alone_and_reports_them(tmp_path: Path, ckptd: Ckptd) -> None:
    """Two files that would get one name are both left alone and reported; so is one whose name is taken."""
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "exp"
    make(run / "epoch_07_step_000700.ckpt", 7, 700)
    make(run / "epoch=7-step=700.ckpt", 7, 700, at=701)
    make(run / "epoch=8-step=800.ckpt", 8, 800)
    make(run / "epoch-08_step-000800.ckpt", 8, 800, at=801)
    assert ckptd("scan", "--config", config).code == 0
    before = snapshot(run)
    done = ckptd("migrate", run, "--config", config)
    assert done.code == 0, done.err
    assert snapshot(run) == before
    assert "collision: epoch=7-step=700.ckpt, epoch_07_step_000700.ckpt -> epoch-07_step-000700.ckpt" in done.out
    assert "collision: epoch=8-step=800.ckpt -> epoch-08_step-000800.ckpt" in done.out
    assert "renamed:" not in done.out


def test_migrate_renames_a_directory_checkpoint_with_its_sidecar(tmp_path: Path, ckptd: Ckptd) -> None:
    """A DCP folder with a legacy name is renamed whole; its sidecar and catalog row follow."""
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "exp"
    folder = checkpoints.dcp_checkpoint(run / "epoch=2-step=7.dcp")
    files = {p.name: sha(p) for p in folder.iterdir()}
    assert ckptd("scan", "--config", config).code == 0
    done = ckptd("migrate", run, "--config", config)
    assert done.code == 0, done.err
    target = run / "epoch-02_step-000007.dcp"
    assert f"renamed: {folder} -> {target.name}" in done.out
    assert not folder.exists() and {p.name: sha(p) for p in target.iterdir()} == files
    moved = sidecar.read(target)
    assert moved is not None and moved.verification.is_directory
    assert present(tmp_path) == {str(target)}


def test_apply_rename_never_replaces_an_existing_checkpoint(tmp_path: Path) -> None:
    """A rename whose target appeared after planning fails, and both checkpoints keep their bytes."""
    source = make(tmp_path / "epoch_01_step_000100.ckpt", 1, 100)
    target = make(tmp_path / "epoch-01_step-000100.ckpt", 1, 100, loss=0.25)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError):
        apply_rename(source, target, None)
    assert snapshot(tmp_path) == before
    folder = checkpoints.dcp_checkpoint(tmp_path / "a.dcp")
    taken = checkpoints.dcp_checkpoint(tmp_path / "b.dcp")
    with pytest.raises(FileExistsError):
        apply_rename(folder, taken, None)
    assert folder.is_dir() and taken.is_dir()


def _legacy_run(tmp_path: Path) -> Path:
    """runs/exp: every legacy name (epochs 3 to 6), an old one at epoch 1, an unparsable one and last.ckpt."""
    run = tmp_path / "runs" / "exp"
    for name, (epoch, step, _c) in LEGACY.items():
        make(run / name, epoch, step)
    make(run / "epoch=1-step=100.ckpt", 1, 100)
    make(run / "notes.pt", 2, 250)
    make(run / "last.ckpt", 6, 600, at=650)
    return run


def test_dry_run_prints_every_rename_and_deletion_and_changes_nothing(tmp_path: Path, ckptd: Ckptd) -> None:
    """--dry-run lists the same renames and deletions the real run then does; folder and catalog stay identical."""
    config = write_config(tmp_path)
    run = _legacy_run(tmp_path)
    assert ckptd("scan", "--config", config).code == 0
    folder, state = snapshot(tmp_path / "runs"), snapshot(tmp_path / "state")
    args = ("migrate", run, "--config", config, "--delete-old", "--keep-min-epoch", 4)

    dry = ckptd(*args, "--dry-run")
    assert dry.code == 0, dry.err
    assert snapshot(tmp_path / "runs") == folder and snapshot(tmp_path / "state") == state
    planned = sorted(line for line in dry.out.splitlines() if line.startswith(("renamed: ", "deleted: ")))
    assert planned == sorted(
        [
            f"deleted: {run / 'epoch=1-step=100.ckpt'} (epoch < 4)",
            f"deleted: {run / 'epoch_epoch_03_step_step_000300_20240101-120000.ckpt'} (epoch < 4)",
            f"deleted: {run / 'notes.pt'} (epoch < 4)",
            f"renamed: {run / 'epoch_04_step_000400.ckpt'} -> epoch-04_step-000400.ckpt",
            f"renamed: {run / 'epoch=5-step=500.ckpt'} -> epoch-05_step-000500.ckpt",
            f"renamed: {run / 'epoch_006_checkpoint.pt'} -> epoch-06_step-000600.pt",
        ]
    )
    assert "dry run: nothing was changed" in dry.out

    real = ckptd(*args)
    assert real.code == 0, real.err
    assert sorted(line for line in real.out.splitlines() if line.startswith(("renamed: ", "deleted: "))) == planned
    assert sorted(p.name for p in run.iterdir() if not p.name.endswith(sidecar.SIDECAR_SUFFIX)) == [
        "epoch-04_step-000400.ckpt", "epoch-05_step-000500.ckpt", "epoch-06_step-000600.pt", "last.ckpt",
    ]  # fmt: skip
    assert present(tmp_path) == {str(run / n) for n in ("epoch-04_step-000400.ckpt", "epoch-05_step-000500.ckpt",
                                                        "epoch-06_step-000600.pt", "last.ckpt")}  # fmt: skip


def test_delete_old_keeps_best_latest_pinned_and_the_only_checkpoint(tmp_path: Path, ckptd: Ckptd) -> None:
    """--delete-old removes checkpoints below the epoch except the best, the latest, a pinned one, a run's only one."""
    config = write_config(tmp_path, metric=True)
    runs = tmp_path / "runs"
    losses = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5}  # epoch -> val_loss: epoch 2 is the best
    exp = {e: make(runs / "exp" / f"epoch_{e:02d}_step_{e * 100:06d}.ckpt", e, e * 100, loss)
           for e, loss in losses.items()}  # fmt: skip
    alone = make(runs / "alone" / "epoch_01_step_000100.ckpt", 1, 100)  # the run's only checkpoint
    early = {e: make(runs / "early" / f"epoch_{e:02d}_step_{e * 100:06d}.ckpt", e, e * 100) for e in (1, 2)}
    assert ckptd("scan", "--config", config).code == 0
    assert ckptd("pin", exp[3], "--config", config).code == 0

    done = ckptd("migrate", runs, "--config", config, "--delete-old", "--keep-min-epoch", 5)
    assert done.code == 0, done.err
    deleted = sorted(line for line in done.out.splitlines() if line.startswith("deleted: "))
    assert deleted == sorted([f"deleted: {exp[1]} (epoch < 5)", f"deleted: {exp[4]} (epoch < 5)",
                              f"deleted: {early[1]} (epoch < 5)"])  # fmt: skip
    for path in (exp[1], exp[4], early[1]):
        assert not path.exists() and not sidecar.sidecar_path(path).exists()
        assert str(path) not in present(tmp_path)
    assert (runs / "exp" / "epoch-02_step-000200.ckpt").is_file()  # best, renamed
    assert (runs / "exp" / "epoch-03_step-000300.ckpt").is_file()  # pinned, renamed
    pinned = sidecar.read(runs / "exp" / "epoch-03_step-000300.ckpt")
    assert pinned is not None and pinned.pinned
    assert (runs / "exp" / "epoch-06_step-000600.ckpt").is_file()  # latest
    assert (runs / "alone" / "epoch-01_step-000100.ckpt").is_file() and not alone.exists()  # only one, renamed
    assert (runs / "early" / "epoch-02_step-000200.ckpt").is_file()  # latest of a run all below the epoch


def test_delete_old_without_a_metric_keeps_best_by_name_and_link_targets(tmp_path: Path, ckptd: Ckptd) -> None:
    """With no metric configured, best.ckpt and the target of a link are kept below the epoch; others go."""
    run = tmp_path / "exp"
    best = make(run / "best.ckpt", 1, 150)
    linked = make(run / "epoch_02_step_000200.ckpt", 2, 200)
    (run / "top.ckpt").symlink_to(linked.name)
    old = make(run / "epoch_03_step_000300.ckpt", 3, 300)
    make(run / "epoch_08_step_000800.ckpt", 8, 800)
    assert ckptd("scan", run).code == 0  # sidecars, so the epochs are known (no config: no catalog kept here)

    done = ckptd("migrate", run, "--delete-old", "--keep-min-epoch", 5, "--dry-run")
    assert done.code == 0, done.err
    assert [line for line in done.out.splitlines() if line.startswith("deleted: ")] == [f"deleted: {old} (epoch < 5)"]
    assert best.exists() and linked.exists() and old.exists()


def test_a_delete_old_killed_half_way_is_finished_by_the_next_migrate(
    tmp_path: Path, ckptd: Ckptd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed once the doomed checkpoint is under its trash name (a folder no watch holds, so no prune pass will
    ever look): the next `migrate` of that folder deletes exactly that, through the journal, before anything
    else. Deletions in other folders are left pending for their own next run."""
    from ckptd import delete

    run = tmp_path / "exp"
    old = make(run / "epoch_03_step_000300.ckpt", 3, 300)
    make(run / "epoch_08_step_000800.ckpt", 8, 800)
    assert ckptd("scan", run).code == 0
    real_identity = delete.identity_at

    def killed(dir_fd: int, name: str) -> object:
        if name.startswith(delete.TRASH_PREFIX):
            raise KeyboardInterrupt
        return real_identity(dir_fd, name)

    with monkeypatch.context() as patched:
        patched.setattr(delete, "identity_at", killed)
        assert ckptd("migrate", run, "--delete-old", "--keep-min-epoch", 5).code == 130  # as Ctrl-C or a kill
    trash = [p for p in run.iterdir() if p.name.startswith(delete.TRASH_PREFIX)]
    assert not old.exists() and len(trash) == 1  # never seen half-gone under its own name
    state = Path.home() / ".local/state/ckptd"
    with Catalog(state) as catalog:
        (pending,) = catalog.journal(state="pending")
        assert pending["watch"] == delete.migrate_watch(run)
        catalog.journal_intent(  # another folder's intent: not this migrate's to finish
            action="delete", watch=delete.migrate_watch(tmp_path / "other"), run=str(tmp_path / "other"),
            path=str(tmp_path / "other" / "a.pt"), sha256=None, size=1, reasons=["epoch < 5"], now=1.0,
            folder=str(tmp_path / "other"), trash=delete.TRASH_PREFIX + "0123456789abcdef",
        )  # fmt: skip

    done = ckptd("migrate", run)
    assert done.code == 0, done.err
    assert [p.name for p in run.iterdir() if p.name.startswith(delete.TRASH_PREFIX)] == []
    with Catalog(state) as catalog:
        states = {e["path"]: e["state"] for e in catalog.journal()}
    assert states == {str(old): "done", str(tmp_path / "other" / "a.pt"): "pending"}


def test_delete_old_needs_keep_min_epoch(tmp_path: Path, ckptd: Ckptd) -> None:
    """--delete-old without --keep-min-epoch is a usage error (exit 2) and changes nothing."""
    run = tmp_path / "exp"
    make(run / "epoch_01_step_000100.ckpt", 1, 100)
    before = snapshot(run)
    done = ckptd("migrate", run, "--delete-old")
    assert done.code == 2
    assert "--keep-min-epoch" in done.err
    assert snapshot(run) == before


def test_migrate_points_lightnings_last_link_at_the_renamed_checkpoint(tmp_path: Path, ckptd: Ckptd) -> None:
    """Lightning with save_last="link" and save_top_k: `last.ckpt` links to the newest epoch's file. migrate
    renames that file and points the link at its new name (never leaving it dangling): `last.ckpt` still loads
    and verifies."""
    import lightning as L  # noqa: F401  # the real Trainer writes the run

    run = tmp_path / "runs" / "exp"
    checkpoints.lightning_run(run, max_epochs=3, save_top_k=2, save_last="link", filename="{epoch}-{step}")
    last = run / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "epoch=2-step=12.ckpt"
    done = ckptd("migrate", run)
    assert done.code == 0, done.err
    assert f"link re-pointed: {last} -> epoch-02_step-000012.ckpt" in done.out
    assert last.is_symlink() and not last.readlink().is_absolute()  # a relative link stays relative
    assert last.resolve() == run / "epoch-02_step-000012.ckpt"
    state = torch_load(last)
    assert (state["epoch"], state["global_step"]) == (2, 12)
    assert ckptd("verify", last).code == 0


def torch_load(path: Path) -> dict[str, object]:
    """A checkpoint Lightning wrote here (trusted: this test made it)."""
    import torch

    loaded: dict[str, object] = torch.load(path, weights_only=False)
    return loaded
