"""The `ckptd` command line, run as a subprocess over real checkpoints in tmp_path."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import checkpoints
import pytest

from ckptd import __version__, sidecar
from ckptd.verify import engine_versions, verify

CKPTD = Path(sys.executable).parent / "ckptd"
T0 = 1_700_000_000  # a fixed mtime base (seconds), so "newer" never depends on the clock
REQUIRED_KEYS = {"path", "status", "format", "size_bytes", "sha256", "problems", "warnings", "unsafe_globals",
                 "epoch", "global_step", "metrics", "tensors"}  # fmt: skip
TENSOR_KEYS = {"count", "parameters", "bytes", "dtypes"}

# Runs `ckptd.cli.main(argv)` and reports, when the process exits, whether torch was ever imported.
NO_TORCH_PROBE = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules))
from ckptd.cli import main
main(sys.argv[1:])
"""


def ckptd(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `ckptd` with args, stdout piped; return the finished process (stdout, stderr as text)."""
    return subprocess.run([CKPTD, *map(str, args)], capture_output=True, text=True, timeout=240, cwd=cwd)


def _strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as jq, JavaScript and Go do."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def _touch(path: Path, seconds: float) -> None:
    """Set the mtime of path to T0 + seconds."""
    os.utime(path, ns=(T0 * 10**9, round((T0 + seconds) * 10**9)))


def verified(checkpoint: Path, at: float | None = None) -> Path:
    """Optionally set the checkpoint's mtime to T0 + at, then verify it for real and write its sidecar."""
    if at is not None:
        _touch(checkpoint, at)
    data = sidecar.render(verify(checkpoint), verified_at=datetime.now(UTC), host="test-host",
                          ckptd_version=__version__, engine=engine_versions())  # fmt: skip
    sidecar.write(checkpoint, data)
    return checkpoint


def rewrite(checkpoint: Path) -> None:
    """Rewrite a verified torch checkpoint in place (same size, new bytes, newer mtime): its sidecar is stale."""
    before = checkpoint.stat().st_mtime_ns
    checkpoints.torch_zip(checkpoint, global_step=999)
    os.utime(checkpoint, ns=(before, before + 10**9))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder with three verified ok checkpoints: steps 100, 200, 300 with val_loss 0.7, 0.4, 0.55."""
    folder = tmp_path / "runs" / "exp1"
    for step, loss in ((100, 0.7), (200, 0.4), (300, 0.55)):
        path = folder / f"epoch={step // 100}-step={step}.pt"
        checkpoints.torch_zip(path, epoch=step // 100, global_step=step, metrics={"val_loss": loss})
        verified(path, at=step)
    return folder


def _scan_config(tmp_path: Path) -> Path:
    """A config watching tmp_path/runs, with its state folder in tmp_path/state."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n\n[[watch]]\nname = "runs"\npath = "runs"\n')
    return config


# ------------------------------------------------------------------------------------------------ verify


def test_verify_json_prints_every_required_key_and_exits_0_when_all_ok(tmp_path: Path) -> None:
    """`verify --json` prints one object per path with the documented keys; exit 0 when every path is ok."""
    zipped = checkpoints.torch_zip(tmp_path / "epoch=3-step=300.pt")
    single = checkpoints.safetensors_file(tmp_path / "model.safetensors")
    sharded = checkpoints.safetensors_sharded(tmp_path / "hf").parent
    done = ckptd("verify", "--json", zipped, single, sharded)
    assert done.returncode == 0, done.stderr
    results = _strict_json(done.stdout)
    assert [r["path"] for r in results] == [str(zipped), str(single), str(sharded)]
    for result in results:
        assert result.keys() >= REQUIRED_KEYS
        assert result["tensors"].keys() >= TENSOR_KEYS
        assert result["status"] == "ok" and result["problems"] == [] and len(result["sha256"]) == 64
    first = results[0]
    assert (first["format"], first["epoch"], first["global_step"], first["metrics"]) == (
        "torch_zip", 3, 300, {"val_loss": 0.5}
    )  # fmt: skip
    assert first["size_bytes"] == zipped.stat().st_size
    assert first["tensors"]["count"] > 0 and first["tensors"]["dtypes"]["float32"] > 0
    assert [r["format"] for r in results[1:]] == ["safetensors", "safetensors_sharded"]


def test_verify_exits_1_when_any_path_is_corrupt(tmp_path: Path) -> None:
    """One corrupt checkpoint among ok ones makes `verify` exit 1 and report it corrupt with a problem."""
    good = checkpoints.torch_zip(tmp_path / "good.pt")
    bad = checkpoints.torch_zip(tmp_path / "bad.pt")
    checkpoints.truncate(bad)
    done = ckptd("verify", "--json", good, bad)
    assert done.returncode == 1
    results = {r["path"]: r for r in _strict_json(done.stdout)}
    assert results[str(good)]["status"] == "ok"
    assert results[str(bad)]["status"] == "corrupt" and results[str(bad)]["problems"]


def test_verify_exits_2_for_a_missing_path(tmp_path: Path) -> None:
    """A path that does not exist is a usage error: exit 2, the path named on stderr."""
    done = ckptd("verify", "--json", tmp_path / "absent.pt")
    assert done.returncode == 2
    assert "absent.pt" in done.stderr and done.stdout == ""


def test_verify_exits_2_for_an_unknown_option(tmp_path: Path) -> None:
    """An unknown option is a usage error: exit 2."""
    checkpoint = checkpoints.safetensors_file(tmp_path / "m.safetensors")
    done = ckptd("verify", "--no-such-option", checkpoint)
    assert done.returncode == 2
    assert "--no-such-option" in done.stderr


def test_verify_json_is_strict_json_when_a_metric_is_nan(tmp_path: Path) -> None:
    """`verify --json` stays parseable by strict JSON parsers when a checkpoint's metric is NaN."""
    diverged = checkpoints.torch_zip(tmp_path / "diverged.pt", metrics={"val_loss": float("nan")})
    done = ckptd("verify", "--json", diverged)
    assert done.returncode == 0, done.stderr
    (result,) = _strict_json(done.stdout)
    assert result["metrics"] == {"val_loss": "NaN"}


# -------------------------------------------------------------------------------------------------- scan


def test_scan_writes_sidecars_and_a_second_scan_hashes_nothing(tmp_path: Path) -> None:
    """`scan PATH --config` verifies and writes a sidecar per checkpoint; scanning again finds all unchanged."""
    config = _scan_config(tmp_path)
    root = tmp_path / "runs"
    made = [
        checkpoints.torch_zip(root / "exp1" / "epoch=1-step=100.pt"),
        checkpoints.torch_legacy(root / "exp1" / "legacy.pth"),
        checkpoints.safetensors_file(root / "exp2" / "model.safetensors"),
        checkpoints.safetensors_sharded(root / "exp2" / "hf").parent,
    ]
    first = ckptd("scan", root, "--config", config, "--json")
    assert first.returncode == 0, first.stderr
    summary = _strict_json(first.stdout)[str(root)]
    assert summary["verified"] == {"ok": 4} and summary["unchanged"] == 0
    written = {path: sidecar.sidecar_path(path).read_bytes() for path in made}
    assert all(sidecar.parse(data).verification.status == "ok" for data in written.values())
    assert (tmp_path / "state" / "catalog.sqlite3").is_file()

    second = ckptd("scan", root, "--config", config, "--json")
    assert second.returncode == 0, second.stderr
    summary = _strict_json(second.stdout)[str(root)]
    assert (summary["verified"], summary["unchanged"]) == ({}, 4)
    assert {path: sidecar.sidecar_path(path).read_bytes() for path in made} == written  # nothing rewritten


def test_scan_removes_the_sidecar_of_a_deleted_checkpoint(tmp_path: Path) -> None:
    """A corrupt checkpoint makes `scan` exit 1; once it is deleted, the next scan removes its sidecar."""
    config = _scan_config(tmp_path)
    root = tmp_path / "runs"
    good = checkpoints.safetensors_file(root / "exp1" / "good.safetensors")
    bad = checkpoints.torch_zip(root / "exp1" / "bad.pt")
    checkpoints.truncate(bad)
    first = ckptd("scan", root, "--config", config, "--json")
    assert first.returncode == 1
    summary = _strict_json(first.stdout)[str(root)]
    assert [item["path"] for item in summary["not_ok"]] == [str(bad)]
    assert sidecar.sidecar_path(bad).is_file() and sidecar.sidecar_path(good).is_file()

    bad.unlink()
    second = ckptd("scan", root, "--config", config, "--json")
    assert second.returncode == 0, second.stderr
    summary = _strict_json(second.stdout)[str(root)]
    assert summary["gone"] == [str(bad)]
    assert summary["removed_sidecars"] == [str(sidecar.sidecar_path(bad))]
    assert not sidecar.sidecar_path(bad).exists() and sidecar.sidecar_path(good).is_file()


def test_scan_rewrites_a_damaged_sidecar_of_an_unchanged_checkpoint(tmp_path: Path) -> None:
    """A sidecar that no longer parses is rewritten by the next scan, even though the checkpoint is unchanged."""
    config = _scan_config(tmp_path)
    root = tmp_path / "runs"
    checkpoint = checkpoints.safetensors_file(root / "exp1" / "model.safetensors")
    assert ckptd("scan", root, "--config", config).returncode == 0
    sidecar.sidecar_path(checkpoint).write_text("{damaged")
    assert ckptd("latest", root / "exp1", "--weights").returncode == 1  # readers ignore it: the checkpoint is invisible

    done = ckptd("scan", root, "--config", config, "--json")
    assert done.returncode == 0, done.stderr
    assert _strict_json(done.stdout)[str(root)]["verified"] == {"ok": 1}
    assert ckptd("latest", root / "exp1", "--weights").stdout == f"{checkpoint}\n"  # safetensors: weights only


# ------------------------------------------------------------------------------------------------ latest


def test_latest_prints_the_ok_checkpoint_with_the_highest_step(run: Path) -> None:
    """`latest RUN` prints the ok checkpoint with the highest step, even when another is modified later."""
    _touch(run / "epoch=1-step=100.pt", 1000)
    verified(run / "epoch=1-step=100.pt")
    done = ckptd("latest", run)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{run / 'epoch=3-step=300.pt'}\n"


def test_latest_breaks_equal_steps_by_mtime(run: Path) -> None:
    """Among ok checkpoints of the same step, `latest` prints the most recently modified."""
    last = checkpoints.torch_zip(run / "last.pt", epoch=3, global_step=300)
    verified(last, at=301)
    assert ckptd("latest", run).stdout == f"{last}\n"
    verified(last, at=299)
    assert ckptd("latest", run).stdout == f"{run / 'epoch=3-step=300.pt'}\n"


def test_latest_skips_a_newer_corrupt_checkpoint(run: Path) -> None:
    """A newer checkpoint whose sidecar says corrupt is never printed by `latest`."""
    broken = checkpoints.torch_zip(run / "epoch=4-step=400.pt", epoch=4, global_step=400)
    checkpoints.flip_tensor_byte(broken)
    verified(broken, at=400)
    assert sidecar.read(broken).verification.status == "corrupt"  # type: ignore[union-attr]
    done = ckptd("latest", run)
    assert done.returncode == 0 and done.stdout == f"{run / 'epoch=3-step=300.pt'}\n"


def test_latest_skips_a_checkpoint_rewritten_since_its_sidecar(run: Path) -> None:
    """A checkpoint whose size or mtime changed since it was verified is not trusted by `latest`."""
    rewrite(run / "epoch=3-step=300.pt")
    done = ckptd("latest", run)
    assert done.returncode == 0 and done.stdout == f"{run / 'epoch=2-step=200.pt'}\n"


def test_latest_exits_1_with_a_message_when_there_is_none(tmp_path: Path) -> None:
    """With no ok, current checkpoint, `latest` prints nothing on stdout, a hint on stderr, and exits 1."""
    folder = tmp_path / "run"
    bad = checkpoints.torch_zip(folder / "bad.pt")
    checkpoints.truncate(bad)
    verified(bad)
    checkpoints.torch_zip(folder / "unverified.pt")
    done = ckptd("latest", folder)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "no verified ok checkpoint" in done.stderr and "ckptd scan" in done.stderr


def test_latest_answers_what_training_can_resume_from(tmp_path: Path) -> None:
    """A loop's weights-only `best_model.pt`, newest of all by mtime, is never `latest`: the full-state
    `latest_checkpoint.pt` is. With weights only in the run, `latest` says so, and `--weights` accepts them."""
    import torch

    folder = tmp_path / "loop"
    full = checkpoints.torch_zip(folder / "latest_checkpoint.pt", epoch=12)  # holds optimizer_state_dict
    weights = folder / "best_model.pt"
    torch.save({"w": torch.ones(3)}, weights)
    verified(full, at=10)
    verified(weights, at=20)
    assert ckptd("latest", folder).stdout == f"{full}\n"
    full.unlink()
    done = ckptd("latest", folder)
    assert done.returncode == 1 and "weights only" in done.stderr and "--weights" in done.stderr
    assert ckptd("latest", folder, "--weights").stdout == f"{weights}\n"


def test_latest_and_show_answer_for_a_links_target(run: Path) -> None:
    """`show last.ckpt` and `latest` through a link to the run folder answer for what the link points to."""
    newest = run / "epoch=3-step=300.pt"
    (run / "last.ckpt").symlink_to(newest.name)
    done = ckptd("show", run / "last.ckpt", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(newest)
    (run.parent / "current").symlink_to(run)
    assert ckptd("latest", run.parent / "current").stdout == f"{newest}\n"


def test_latest_exits_2_for_a_missing_folder(tmp_path: Path) -> None:
    """`latest` on a folder that does not exist is a usage error."""
    done = ckptd("latest", tmp_path / "absent")
    assert done.returncode == 2 and "not a folder" in done.stderr


# -------------------------------------------------------------------------------------------------- best


@pytest.mark.parametrize(("mode", "expected"), [("min", "epoch=2-step=200.pt"), ("max", "epoch=1-step=100.pt")])
def test_best_prints_the_best_ok_checkpoint_by_metric_and_mode(run: Path, mode: str, expected: str) -> None:
    """`best RUN --metric val_loss --mode min|max` prints the checkpoint with the lowest/highest value."""
    done = ckptd("best", run, "--metric", "val_loss", "--mode", mode)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{run / expected}\n"


def test_best_defaults_to_min_and_skips_a_rewritten_checkpoint(run: Path) -> None:
    """Without --mode, `best` minimises; a checkpoint changed since its sidecar never wins."""
    assert ckptd("best", run, "--metric", "val_loss").stdout == f"{run / 'epoch=2-step=200.pt'}\n"
    rewrite(run / "epoch=2-step=200.pt")
    assert ckptd("best", run, "--metric", "val_loss").stdout == f"{run / 'epoch=3-step=300.pt'}\n"


def test_best_exits_1_when_no_checkpoint_has_the_metric(run: Path) -> None:
    """`best` with a metric no checkpoint logged exits 1 and names the metric."""
    done = ckptd("best", run, "--metric", "accuracy")
    assert done.returncode == 1 and done.stdout == "" and "'accuracy'" in done.stderr


def test_best_says_which_metrics_the_run_holds_and_falls_back_to_the_trainers_best(run: Path) -> None:
    """A metric no checkpoint holds: `best` lists the names the run does hold; with a `best_model.pt` in the run
    it answers with that (the trainer's own best) and says why on stderr."""
    done = ckptd("best", run, "--metric", "val_dice")
    assert done.returncode == 1 and "they hold: val_loss" in done.stderr
    trainer_best = verified(checkpoints.torch_zip(run / "best_model.pt", epoch=2), at=400)
    done = ckptd("best", run, "--metric", "val_dice")
    assert done.returncode == 0 and done.stdout == f"{trainer_best}\n"
    assert "no checkpoint of" in done.stderr and "trainer's own" in done.stderr


def test_best_takes_the_watchs_metric_from_the_config(run: Path, tmp_path: Path) -> None:
    """Without --metric, `best` ranks by the metric and mode of the watch holding the run."""
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[watch]]\nname = "runs"\n'
                      f'path = "{run.parent}"\n[watch.metric]\nname = "val_loss"\nmode = "max"\n')  # fmt: skip
    assert ckptd("best", run, "--config", config).stdout == f"{run / 'epoch=1-step=100.pt'}\n"
    assert ckptd("best", run, "--config", config, "--mode", "min").stdout == f"{run / 'epoch=2-step=200.pt'}\n"


def test_best_exits_2_for_a_bad_mode(run: Path) -> None:
    """An unknown --mode is a usage error."""
    assert ckptd("best", run, "--metric", "val_loss", "--mode", "median").returncode == 2


# ------------------------------------------------------------------------------------------- list and show


def test_list_json_prints_every_sidecar_with_its_currency(run: Path) -> None:
    """`list RUN --json` prints one object per sidecar: the record, current, verified_at and pinned."""
    rewrite(run / "epoch=1-step=100.pt")
    done = ckptd("list", run, "--json")
    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in _strict_json(done.stdout)}
    assert sorted(rows) == ["epoch=1-step=100.pt", "epoch=2-step=200.pt", "epoch=3-step=300.pt"]
    for row in rows.values():
        assert REQUIRED_KEYS | {"current", "verified_at", "pinned"} <= row.keys()
        assert row["status"] == "ok" and row["pinned"] is False
    assert {name: row["current"] for name, row in rows.items()} == {
        "epoch=1-step=100.pt": False, "epoch=2-step=200.pt": True, "epoch=3-step=300.pt": True
    }  # fmt: skip
    assert rows["epoch=2-step=200.pt"]["metrics"] == {"val_loss": 0.4}


def test_list_json_is_strict_json_when_a_metric_is_nan(run: Path) -> None:
    """`list --json` stays parseable by strict JSON parsers when a sidecar holds a NaN metric."""
    verified(checkpoints.torch_zip(run / "diverged.pt", metrics={"val_loss": float("nan")}), at=500)
    done = ckptd("list", run, "--json")
    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in _strict_json(done.stdout)}
    assert rows["diverged.pt"]["metrics"] == {"val_loss": "NaN"}


def test_list_without_sidecars_says_so(tmp_path: Path) -> None:
    """`list` of a folder without sidecars exits 0 and says there is nothing verified; --json prints []."""
    assert ckptd("list", tmp_path).returncode == 0
    assert _strict_json(ckptd("list", tmp_path, "--json").stdout) == []


def test_show_json_prints_the_sidecar_and_exits_0_for_an_ok_current_checkpoint(run: Path) -> None:
    """`show CKPT --json` prints the sidecar file itself; exit 0 when ok and unchanged."""
    checkpoint = run / "epoch=2-step=200.pt"
    done = ckptd("show", checkpoint, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout == sidecar.sidecar_path(checkpoint).read_text()
    assert _strict_json(done.stdout)["global_step"] == 200


def test_show_exits_1_for_a_corrupt_or_changed_checkpoint(run: Path) -> None:
    """`show` exits 1 when the sidecar says not ok, or when the checkpoint changed since."""
    bad = checkpoints.torch_zip(run / "bad.pt")
    checkpoints.truncate(bad)
    verified(bad)
    assert ckptd("show", bad).returncode == 1
    rewrite(run / "epoch=2-step=200.pt")
    changed = ckptd("show", run / "epoch=2-step=200.pt")
    assert changed.returncode == 1 and "changed since" in changed.stdout


def test_show_exits_1_for_a_checkpoint_without_sidecar(tmp_path: Path) -> None:
    """`show` of a checkpoint never verified exits 1 and says how to verify it."""
    checkpoint = checkpoints.safetensors_file(tmp_path / "m.safetensors")
    done = ckptd("show", checkpoint)
    assert done.returncode == 1 and "not verified yet" in done.stderr


# ------------------------------------------------------------------------------------------ never torch


@pytest.mark.parametrize(
    "argv",
    [
        ["latest", "{run}"],
        ["best", "{run}", "--metric", "val_loss"],
        ["list", "{run}"],
        ["list", "{run}", "--json"],
        ["show", "{run}/epoch=2-step=200.pt"],
        ["show", "{run}/epoch=2-step=200.pt", "--json"],
    ],
)
def test_read_only_commands_never_import_torch(run: Path, argv: list[str]) -> None:
    """latest, best, list and show answer from sidecars without ever importing torch."""
    args = [a.format(run=run) for a in argv]
    done = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "torch imported: False"


def test_scan_reads_a_metric_at_the_watchs_key(tmp_path: Path) -> None:
    """`[watch.metric] key` reaches a metric kept deep inside a checkpoint; `best` then ranks by it."""
    import torch

    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n[[watch]]\nname = "runs"\npath = "runs"\n'
                      '[watch.metric]\nname = "map50"\nmode = "max"\nkey = "eval.scores[-1].map50"\n')  # fmt: skip
    run = tmp_path / "runs" / "det"
    run.mkdir(parents=True)
    for epoch, score in ((1, 0.3), (2, 0.6), (3, 0.5)):
        state = {"epoch": epoch, "optimizer": {"lr": 0.1}, "eval": {"scores": [{"map50": 0.0}, {"map50": score}]}}
        torch.save(state, run / f"epoch_{epoch}.pt")
    assert ckptd("scan", "--config", config).returncode == 0
    assert sidecar.read(run / "epoch_2.pt").verification.metrics["map50"] == 0.6  # type: ignore[union-attr]
    assert ckptd("best", run, "--config", config).stdout == f"{run / 'epoch_2.pt'}\n"
    # the one record step: scan stores the run's latest and best as the daemon would, so status shows the run
    (listed,) = json.loads(ckptd("status", "--config", config, "--json").stdout)["watches"]["runs"]["runs"]
    assert (listed["latest"], listed["best"], listed["best_value"]) == (str(run / "epoch_3.pt"),
                                                                         str(run / "epoch_2.pt"), 0.6)  # fmt: skip
    (run / "epoch_3.pt").unlink()
    assert ckptd("scan", "--config", config).returncode == 0
    (listed,) = json.loads(ckptd("status", "--config", config, "--json").stdout)["watches"]["runs"]["runs"]
    assert listed["latest"] == str(run / "epoch_2.pt")  # a checkpoint gone: its run's latest follows


def test_an_unexpected_error_exits_70_with_one_line_and_the_traceback_only_under_debug(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug of ours (here a selection that raises, faked: a real bug cannot be summoned on purpose) exits 70
    with one line naming it; `--debug` or CKPTD_DEBUG=1 add the traceback. Exit 1 stays "a check failed"."""
    from ckptd import cli as cli_module
    from ckptd import selection

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("selection broke")

    monkeypatch.setattr(selection, "latest", broken)
    monkeypatch.setattr(cli_module, "_debug", False)
    monkeypatch.delenv("CKPTD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["latest", str(run)])
    err = capsys.readouterr().err
    assert exited.value.code == 70
    assert err.strip().splitlines() == [
        "ckptd: unexpected error: RuntimeError: selection broke (run with --debug for the traceback)"
    ]
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["--debug", "latest", str(run)])
    err = capsys.readouterr().err
    assert exited.value.code == 70 and "Traceback (most recent call last)" in err and "selection broke" in err
    monkeypatch.setattr(cli_module, "_debug", False)
    monkeypatch.setenv("CKPTD_DEBUG", "1")
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["latest", str(run)])
    assert exited.value.code == 70 and "Traceback" in capsys.readouterr().err


def test_status_shows_a_run_ranked_by_the_trainers_own_best_file(tmp_path: Path) -> None:
    """No checkpoint holds the watch's metric: best is the trainer's `best_model.pt`, and the status table
    says so, and which metrics the run holds (it once crashed formatting the missing value)."""
    import torch

    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n[[watch]]\nname = "runs"\npath = "runs"\n'
                      '[watch.metric]\nname = "val_loss"\n')  # fmt: skip
    run = tmp_path / "runs" / "loop"
    run.mkdir(parents=True)
    weights = {"w": torch.ones(2)}
    torch.save({"epoch": 2, "model": weights, "optimizer": {"lr": 0.1}, "val_dice": 0.4}, run / "epoch_002.pt")
    torch.save(weights, run / "best_model.pt")
    assert ckptd("scan", "--config", config).returncode == 0
    done = subprocess.run([CKPTD, "status", "--config", str(config)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # piped: `run latest best by notes`, one record per run
    (record,) = [line.split("\t") for line in done.stdout.splitlines() if not line.startswith("#")]
    assert record[2:] == [str(run / "best_model.pt"), "-", "the trainer's own best; val_loss missing; held: val_dice"]


def test_a_state_folder_the_file_system_refuses_exits_74_naming_it(tmp_path: Path) -> None:
    """Not a bug of ours (70): the file system refused. One line names the path, no traceback, exit 74."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "runs").mkdir()
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nstate_dir = "afile/state"\n[[watch]]\nname = "w"\npath = "runs"\n')
    done = ckptd("status", "--config", config)
    assert done.returncode == 74, done.stderr
    assert done.stderr.count("\n") == 1 and str(tmp_path / "afile" / "state") in done.stderr


def test_status_check_fails_when_the_daemon_stopped_writing_its_status() -> None:
    """A daemon whose status.json is minutes old (a full state folder, a stuck loop) is news for a probe."""
    from ckptd.cli import _attention

    report: dict[str, Any] = {
        "running": True, "updated_at": "2026-01-01T00:00:00Z", "broken_targets": {}, "unreachable_targets": {},
        "unhealthy_watches": [], "scrub_problems": [], "mirrors": {}, "quarantined": [], "failing_checkpoints": {},
        "failing_steps": {}, "below_min_free": {}, "config_rejected": None,
    }  # fmt: skip
    fresh = datetime(2026, 1, 1, 0, 1, tzinfo=UTC).timestamp()
    assert _attention(report, now=fresh, failing_for=3600) == []
    stale = datetime(2026, 1, 1, 0, 10, tzinfo=UTC).timestamp()
    (line,) = _attention(report, now=stale, failing_for=3600)
    assert line.startswith("the daemon has not written its status since 2026-01-01T00:00:00Z")


def test_status_text_prints_brackets_from_names_and_problems_as_they_are(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[mirror.bakup]` in a problem and `[x]` in a run's name are text, never rich markup eaten away."""
    from ckptd import tables

    monkeypatch.setenv("COLUMNS", "300")
    report: dict[str, Any] = {
        "running": True, "pid": 1, "queue": 0, "mirrors": {}, "scrub_problems": [],
        "config_rejected": {"at": "now", "problems": ["at 'watch[0].mirror.to[0]': no [mirror.bakup] table"]},
        "watches": {"w": {"folder": "/runs", "polling": False, "last_reconciliation": None, "checkpoints": {"ok": 1},
                          "runs": [{"run": "/runs/[x]", "latest": "/runs/[x]/a[1].pt", "best": None,
                                    "best_metric": None, "best_value": None}]}},
    }  # fmt: skip
    tables.print_status(report)
    out = capsys.readouterr().out
    assert "no [mirror.bakup] table" in out and "[x]" in out and "a[1].pt" in out


# ------------------------------------------------------------------------------- tables never fold a name

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG_RUN = "a-run-with-a-rather-long-name-lr=0.001-bs=64"  # wider than a narrow terminal with its file names


def _long_runs(tmp_path: Path) -> tuple[Path, Path]:
    """A watched folder whose run holds epoch=N-step=N00 checkpoints with long names, verified by `ckptd scan`;
    returns the config and the step-400 checkpoint."""
    config = _scan_config(tmp_path)
    config.write_text(config.read_text() + '[watch.metric]\nname = "val_loss"\n')
    for epoch, loss in ((1, 0.9), (2, 0.5), (3, 0.4)):
        path = tmp_path / "runs" / LONG_RUN / f"epoch={epoch}-step={epoch}00-val_loss={loss}.ckpt"
        checkpoints.torch_zip(path, epoch=epoch, global_step=epoch * 100, metrics={"val_loss": loss})
    wanted = checkpoints.torch_zip(tmp_path / "runs" / LONG_RUN / "epoch=3-step=400-val_loss=0.3512.ckpt",
                                   epoch=3, global_step=400, metrics={"val_loss": 0.3512})  # fmt: skip
    done = ckptd("scan", "--config", config)
    assert done.returncode == 0, done.stderr
    return config, wanted


def _on_a_terminal(argv: list[object], columns: int, cwd: Path) -> str:
    """Run ckptd on a pseudo-terminal `columns` wide (TIOCSWINSZ; COLUMNS unset); return what it drew, without
    colours and with the terminal's CRLF as LF."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")}
    process = subprocess.Popen([CKPTD, *map(str, argv)], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                               env={**env, "TERM": "xterm-256color"})  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=240) in (0, 1)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


@pytest.mark.parametrize("columns", ["40", "80", "250"])
def test_list_piped_prints_one_record_per_checkpoint_whatever_columns_says(tmp_path: Path, columns: str) -> None:
    """`ckptd list runs | grep epoch=3-step=400` finds the checkpoint's line at any COLUMNS: piped, `list`
    prints a `#` header, then one tab-separated record per checkpoint, its full path the first field, no colour."""
    _config, wanted = _long_runs(tmp_path)
    done = subprocess.run([CKPTD, "list", "runs"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "COLUMNS": columns})  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "# checkpoint\tstatus\tepoch\tstep\tsize_bytes\tmodified\tmetrics"
    (line,) = [line for line in lines if "epoch=3-step=400" in line]  # what grep finds
    path, status, epoch, step, size, modified, metrics = line.split("\t")
    assert (path, status, epoch, step, size, metrics) == (str(wanted), "ok", "3", "400", str(wanted.stat().st_size),
                                                          "val_loss=0.3512")  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", modified)
    assert len(lines) == 5 and "\x1b" not in done.stdout


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_tables_on_a_terminal_never_break_a_name_at_any_width(tmp_path: Path, columns: int) -> None:
    """On a terminal 40, 80 or 200 columns wide, `list`, `status`, `show` and `verify` print every name whole on
    one line: a narrow table drops columns, never folds a path (the terminal may wrap the line it prints)."""
    config, wanted = _long_runs(tmp_path)
    relative = f"{LONG_RUN}/{wanted.name}"
    listed = _on_a_terminal(["list", "runs"], columns, tmp_path)
    assert any(relative in line for line in listed.splitlines()), listed
    assert any("ok" in line for line in listed.splitlines() if relative in line)  # its row, not only its name
    if columns == 200:  # wide enough for every column
        assert "modified" in listed and "val_loss=0.3512" in listed
    drawn = _on_a_terminal(["status", "--config", config], columns, tmp_path)
    assert any(LONG_RUN in line and wanted.name in line for line in drawn.splitlines()), drawn  # run, latest
    drawn = _on_a_terminal(["show", wanted], columns, tmp_path)
    assert any(str(wanted) in line for line in drawn.splitlines()), drawn
    drawn = _on_a_terminal(["verify", wanted], columns, tmp_path)
    assert any(str(wanted) in line for line in drawn.splitlines()), drawn


def test_status_and_scan_piped_keep_each_record_on_one_line(tmp_path: Path) -> None:
    """Piped at COLUMNS=40, `status` prints each run as one record (run, latest, best in full) and `scan` each
    checkpoint that is not ok as one record (status, path, problems); their notes start with `#`."""
    config, wanted = _long_runs(tmp_path)
    bad = checkpoints.torch_zip(tmp_path / "runs" / LONG_RUN / "epoch=9-step=900-val_loss=0.1.ckpt")
    checkpoints.truncate(bad)
    narrow = {**os.environ, "COLUMNS": "40"}
    scanned = subprocess.run([CKPTD, "scan", "--config", config], capture_output=True, text=True, env=narrow,
                             timeout=120)  # fmt: skip
    assert scanned.returncode == 1
    (record,) = [line.split("\t") for line in scanned.stdout.splitlines() if not line.startswith("#")]
    assert record[:2] == ["corrupt", str(bad)] and record[2]
    status = subprocess.run([CKPTD, "status", "--config", config], capture_output=True, text=True, env=narrow,
                            timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    (run,) = [line.split("\t") for line in status.stdout.splitlines() if not line.startswith("#")]
    assert run[:3] == [str(tmp_path / "runs" / LONG_RUN), str(wanted), str(wanted)]
    assert run[3] == "val_loss=0.3512"
    assert any(line.startswith("# corrupt ") and str(bad) in line for line in status.stdout.splitlines())


# ---------------------------------------------------------------------------------------- --json everywhere


def _mirrored_site(tmp_path: Path) -> Path:
    """runs/exp1 (three verified checkpoints) and runs/exp10, watched and mirrored by `ckptd mirror` to the local
    folder target `backup`; returns the config."""
    for step, loss in ((100, 0.7), (200, 0.4), (300, 0.55)):
        checkpoints.torch_zip(tmp_path / "runs" / "exp1" / f"epoch={step // 100}-step={step}.pt", epoch=step // 100,
                              global_step=step, metrics={"val_loss": loss})  # fmt: skip
    checkpoints.torch_zip(tmp_path / "runs" / "exp10" / "epoch=1-step=50.pt", global_step=50)
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nstate_dir = "state"\nnode = "box1"\n[[watch]]\nname = "runs"\npath = "runs"\n'
                      '[watch.metric]\nname = "val_loss"\n[watch.mirror]\nto = ["backup"]\n'
                      f'[mirror.backup]\nurl = "{(tmp_path / "backup").as_uri()}"\n')  # fmt: skip
    assert ckptd("scan", "--config", config).returncode == 0
    return config


def test_mirror_json_says_what_the_pass_copied(tmp_path: Path) -> None:
    """`mirror --json` prints one strict JSON document: what was copied, nothing failed, `ok`; a second
    `--verify --json` pass counts the copies it read back."""
    config = _mirrored_site(tmp_path)
    done = ckptd("mirror", "--config", config, "--json")
    assert done.returncode == 0, done.stderr
    first = _strict_json(done.stdout)
    assert first["ok"] is True and first["dry_run"] is False and first["failed"] == [] and first["unusable"] == {}
    assert sorted(first["copied"]) == sorted([
        f"{tmp_path}/runs/exp1/epoch=2-step=200.pt -> backup", f"{tmp_path}/runs/exp1/epoch=3-step=300.pt -> backup",
        f"{tmp_path}/runs/exp10/epoch=1-step=50.pt -> backup",
    ])  # fmt: skip
    checked = _strict_json(ckptd("mirror", "--config", config, "--verify", "--json").stdout)
    assert checked["verified"] == {"backup": {"checked": 3, "bad": [], "repaired": [], "error": None}}


def test_ls_names_each_run_as_restore_takes_it_and_restore_suggests_near_misses(tmp_path: Path) -> None:
    """Every run `ls` lists (first field of its records) is a RUN `restore` accepts; `restore backup exp1`
    exits 1 naming `runs/exp1`, and a misspelt run names the closest; with a store's URL, the box comes first."""
    config = _mirrored_site(tmp_path)
    assert ckptd("mirror", "--config", config).returncode == 0
    listed = ckptd("ls", "backup", "--config", config)
    assert listed.returncode == 0, listed.stderr
    runs = sorted({line.split("\t")[0] for line in listed.stdout.splitlines() if not line.startswith("#")})
    assert runs == ["runs/exp1", "runs/exp10"]
    for i, run in enumerate(runs):
        done = ckptd("restore", "backup", run, "--latest", "--to", tmp_path / f"out{i}", "--config", config)
        assert done.returncode == 0, done.stderr
    done = ckptd("restore", "backup", "exp1", "--latest", "--to", tmp_path / "x", "--config", config)
    assert done.returncode == 1 and done.stdout == ""
    assert "no run 'exp1'; did you mean runs/exp1?" in done.stderr and "ckptd ls backup" in done.stderr
    done = ckptd("restore", "backup", "runs/exp2", "--latest", "--to", tmp_path / "x", "--config", config)
    assert done.returncode == 1 and "did you mean runs/exp1" in done.stderr
    url = (tmp_path / "backup").as_uri()
    fleet = ckptd("ls", url, cwd=tmp_path)
    (first, *_rest) = [line.split("\t") for line in fleet.stdout.splitlines() if not line.startswith("#")]
    assert first[0] == "box1/runs/exp1"
    done = ckptd("restore", url, "box1/runs/exp1", "--best", "--to", tmp_path / "fleet", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    restored = _strict_json(done.stdout)
    assert restored["path"] == str(tmp_path / "fleet" / "epoch=2-step=200.pt") and restored["status"] == "ok"
    assert restored["run"] == "box1/runs/exp1" and restored["step"] == 200 and len(restored["sha256"]) == 64
    done = ckptd("restore", url, "runs/exp1", "--best", "--to", tmp_path / "x", cwd=tmp_path)
    assert done.returncode == 1 and "did you mean box1/runs/exp1?" in done.stderr


def test_migrate_json_lists_renames_and_what_it_left(tmp_path: Path) -> None:
    """`migrate --dry-run --json` lists each planned rename (from, to) and each unparsable name, in one document."""
    run = tmp_path / "old"
    checkpoints.torch_zip(run / "epoch=5-step=500.ckpt", epoch=5, global_step=500)
    checkpoints.torch_zip(run / "weird.ckpt")
    done = ckptd("migrate", run, "--dry-run", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = _strict_json(done.stdout)
    assert result["dry_run"] is True and result["failed"] == [] and result["deleted"] == []
    assert result["renamed"] == [{"from": str(run / "epoch=5-step=500.ckpt"),
                                  "to": str(run / "epoch-05_step-000500.ckpt")}]  # fmt: skip
    assert [u["path"] for u in result["unparsable"]] == [str(run / "weird.ckpt")]
    assert (run / "epoch=5-step=500.ckpt").exists()


def test_export_json_describes_the_exported_file(tmp_path: Path) -> None:
    """`export --json` prints the exported file's path, sizes, tensor count and its verification record."""
    source = checkpoints.torch_zip(tmp_path / "epoch=1-step=100.pt", epoch=1, global_step=100)
    out = tmp_path / "model.safetensors"
    done = ckptd("export", source, "--to", out, "--json")
    assert done.returncode == 0, done.stderr
    result = _strict_json(done.stdout)
    assert (result["path"], result["format"], result["size_bytes"]) == (str(out), "safetensors", out.stat().st_size)
    assert result["source_bytes"] == source.stat().st_size and result["tensors"] > 0
    assert result["verification"]["status"] == "ok" and result["sha256"] == result["verification"]["sha256"]


def test_check_config_json_gives_the_verdict_and_every_problem(tmp_path: Path) -> None:
    """`check-config --json` prints `ok` and what the config sets up; an invalid config prints ok false with
    every problem on stdout, still says them on stderr, and exits 78."""
    good = _scan_config(tmp_path)
    done = ckptd("check-config", good, "--json")
    assert done.returncode == 0, done.stderr
    result = _strict_json(done.stdout)
    assert result["ok"] is True and result["problems"] == [] and result["watches"] == ["runs"]
    assert result["state_dir"] == str(tmp_path / "state")
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nworkers = "three"\n[[watch]]\nname = "runs"\npath = "runs"\n')
    done = ckptd("check-config", bad, "--json")
    assert done.returncode == 78
    result = _strict_json(done.stdout)
    assert result["ok"] is False and any("workers" in p for p in result["problems"]) and "workers" in done.stderr


def test_json_answers_stay_strict_when_a_metric_is_nan(tmp_path: Path) -> None:
    """`status --json` and `ls --json` stay strict JSON when a run's metric is NaN (the string "NaN")."""
    config = _mirrored_site(tmp_path)
    verified(checkpoints.torch_zip(tmp_path / "runs" / "exp10" / "epoch=2-step=60.pt", epoch=2, global_step=60,
                                   metrics={"val_loss": float("nan")}))  # fmt: skip
    assert ckptd("scan", "--config", config).returncode == 0
    assert ckptd("mirror", "--config", config).returncode == 0
    _strict_json(ckptd("status", "--config", config, "--json").stdout)
    found = _strict_json(ckptd("ls", "backup", "--config", config, "--json").stdout)
    copy = found["runs/exp10"]["copies"]["epoch=2-step=60.pt"]
    assert copy["metrics"] == {"val_loss": "NaN"}
