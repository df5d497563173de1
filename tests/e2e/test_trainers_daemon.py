"""Real trainers under `ckptd run`: transformers' Trainer, accelerate, DCP in torchtitan's layout, DeepSpeed,
save_pretrained and nshtrainer write their checkpoints while the daemon verifies, retains (keep_last = 1, every
second) and mirrors them to a local folder. Then each run resumes with its trainer's own API from what `ckptd
latest` prints, and again from what `ckptd restore` brings back from the mirror.

What must hold for every trainer: it exits 0; no file of a save is ever deleted on its own (what is left is
whole and complete); ckptd writes nothing inside a save nor anything a trainer's discovery would count; and the
trainer's own rotation (save_total_limit, total_limit, keep_latest_k, top-k) never meets an error from ckptd.
The scripts are in tests/trainers/ (see its README). One daemon serves the module, each test in its own run.
Only Python 3.11 is on this machine: the rmtree races are run here on 3.11 alone.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_daemon import Daemon, ckptd, wait_until  # noqa: E402
from trainer_fixtures import Output, run_trainer  # noqa: E402

from ckptd import discover  # noqa: E402

pytestmark = pytest.mark.e2e

SETTLED = 90.0  # deadline for the daemon to verify, retain and mirror what a trainer left
PATTERNS = ["*.pt", "*.pth", "*.ckpt", "*.bin", "*.safetensors"]


@dataclass
class Site:
    """The module's daemon and its folders."""

    base: Path
    runs: Path
    config: Path
    daemon: Daemon
    count: Iterator[int]

    def cli(self, *args: object) -> str:
        """Run a ckptd command with the site's config; return its stdout, failing the test if it fails."""
        done = ckptd(*map(str, args), "--config", str(self.config), timeout=120)
        assert done.returncode == 0, f"ckptd {' '.join(map(str, args))}: {done.stderr}\n{self.daemon.tail()}"
        return done.stdout.strip()

    def fresh(self, name: str) -> Path:
        """A new folder outside the watched one (for resumed runs and restores)."""
        folder = self.base / "elsewhere" / f"{name}-{next(self.count)}"
        folder.mkdir(parents=True)
        return folder

    def restore_latest(self, key: str, expected: str) -> Path:
        """`ckptd restore backup KEY --latest`, retried until the mirror holds the save named `expected`."""

        def restored() -> Path | None:
            to = self.fresh("restore")
            done = ckptd("restore", "backup", key, "--latest", "--to", str(to), "--config", str(self.config))
            path = Path(done.stdout.strip()) if done.returncode == 0 else None
            return path if path is not None and path.name == expected else None

        return wait_until(restored, f"the mirror to hold {key}/{expected}", SETTLED, on_fail=self.daemon.tail())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One daemon watching base/runs: settle 0.5 s, metric eval_loss (min), retention every second (keep_last 1,
    keep_best 1), best and latest mirrored to base/backup."""
    base = tmp_path_factory.mktemp("trainers-daemon")
    runs = base / "runs"
    runs.mkdir()
    config = base / "config.toml"
    config.write_text("\n".join([
        "[daemon]", f'state_dir = "{base / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"',
        "workers = 1", "",
        "[[watch]]", 'name = "runs"', f'path = "{runs}"', "settle_seconds = 0.5",
        "[watch.metric]", 'name = "eval_loss"', 'mode = "min"',
        "[watch.retention]", 'interval = "1s"', "keep_last = 1", "keep_best = 1",
        "[watch.mirror]", 'to = ["backup"]', 'what = ["best", "latest"]', "",
        "[mirror.backup]", 'url = "backup"', "keep_superseded = 0", "",
    ]))  # fmt: skip
    daemon = Daemon(config, base / "daemon.log")
    try:
        yield Site(base, runs, config, daemon, itertools.count())
    finally:
        daemon.close()
    assert "Traceback" not in daemon.stderr.read_text(), daemon.tail()


def saves(run: Path) -> dict[str, Path]:
    """The saves under `run` as discovery sees them, by path relative to `run`."""
    return {c.path.relative_to(run).as_posix(): c.path for c in discover.discover(run, PATTERNS) if c.kind != "link"}


def settled(site: Site, run: Path, expected: set[str]) -> bool:
    """True when exactly `expected` saves are left under `run`, each verified ok as it is now."""
    found = saves(run)
    if set(found) != expected:
        return False
    for path in found.values():
        row = site.daemon.catalog.row(path)
        if row is None or row["status"] != "ok" or row["gone_at"] is not None:
            return False
        if row["size"] != discover.identity(path).size:
            return False
    return True


def assert_untouched(run: Path, counted: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Nothing of ckptd's inside a save, and nothing of ckptd's in a folder whose every entry a trainer counts;
    every save left is complete."""
    for path in saves(run).values():
        if path.is_dir():
            assert not [p for p in path.rglob("*") if ".ckptd" in p.name], path
            assert discover.directory_complete(path), path
    for folder in counted:
        assert all(not p.name.startswith(".ckptd") and ".ckptd" not in p.name for p in folder.iterdir()), folder


# ------------------------------------------------------------------------------------------------- trainers


def test_hf_trainer_runs_resumes_and_keeps_its_best(site: Site) -> None:
    """transformers.Trainer with load_best_model_at_end: ckptd deletes whole checkpoint-<step> folders only,
    keeps the Trainer's best (its eval_loss is best, and trainer_state.json names it), `best --metric eval_loss`
    agrees with best_model_checkpoint, and `train(resume_from_checkpoint=...)` resumes from `latest` and from
    the mirror."""
    run = site.runs / "hf"
    report = run_trainer("hf_trainer", "--output-dir", run, "--max-steps", 6, "--save-steps", 2, "--load-best",
                         "--step-sleep", 0.3)  # fmt: skip
    best = Path(report["best_model_checkpoint"]).name
    assert best == "checkpoint-2" and report["returncode"] == 0
    wait_until(lambda: settled(site, run, {best, "checkpoint-6"}), "checkpoint-4 deleted, best and latest kept",
               SETTLED, on_fail=site.daemon.tail())  # fmt: skip
    assert_untouched(run)
    assert site.cli("best", run, "--metric", "eval_loss") == str(run / best)
    latest = site.cli("latest", run)
    assert latest == str(run / "checkpoint-6")
    resumed = run_trainer("hf_trainer", "--output-dir", site.fresh("hf"), "--max-steps", 8, "--save-steps", 2,
                          "--resume", latest)  # fmt: skip
    assert (resumed["start_global_step"], resumed["optimizer_state_restored"]) == (6, True)
    restored = site.restore_latest("runs/hf", "checkpoint-6")
    again = run_trainer("hf_trainer", "--output-dir", site.fresh("hf"), "--max-steps", 8, "--save-steps", 2,
                        "--resume", restored)  # fmt: skip
    assert (again["start_global_step"], again["optimizer_state_restored"]) == (6, True)
    assert again["losses"] == resumed["losses"]


def test_accelerate_with_total_limit_never_trips_over_ckptd(site: Site) -> None:
    """accelerate's save_state(total_limit=2) lists checkpoints/ and rmtrees the oldest without ignoring errors:
    with ckptd verifying and mirroring beside it (sidecars in the state folder), it never fails; ckptd sees it
    rotate and leaves retention of that run to it; load_state resumes from `latest` and from the mirror."""
    run = site.runs / "acc"
    go = site.base / "acc.go"
    # The trainer holds after its first save until ckptd has verified it; its next saves follow within
    # milliseconds, well inside the settle time, so the trainer's third save rotates checkpoint_0 before ckptd's
    # keep_last = 1 could take it: ckptd sees the rotation on any machine, however slow.
    with ThreadPoolExecutor(1) as pool:
        trainer = pool.submit(run_trainer, "accelerate_state", "--project-dir", run, "--saves", 5,
                              "--total-limit", 2, "--hold-after-first-save", go)  # fmt: skip
        try:
            wait_until(lambda: settled(site, run, {"checkpoints/checkpoint_0"}), "checkpoint_0 verified", SETTLED,
                       on_fail=site.daemon.tail())  # fmt: skip
        finally:
            go.touch()  # a failed wait must not leave the trainer holding
        report = trainer.result()
    last = Path(report["saves"][-1]["path"]).name
    kept = {f"checkpoints/{Path(p).name}" for p in report["checkpoints"]}  # the trainer's two
    assert len(kept) == 2
    wait_until(lambda: settled(site, run, kept), "the trainer's last two saves verified", SETTLED,
               on_fail=site.daemon.tail())  # fmt: skip
    site.daemon.wait_event("trainer rotates its checkpoints", run=str(run))  # and ckptd leaves the run to it
    assert_untouched(run, [run / "checkpoints"])
    latest = site.cli("latest", run)
    assert latest == str(run / "checkpoints" / last)
    resumed = run_trainer("accelerate_state", "--project-dir", site.fresh("acc"), "--saves", 1, "--resume", latest)
    assert resumed["resumed"]["weights_match_checkpoint"] and resumed["resumed"]["optimizer_state_restored"]
    restored = site.restore_latest("runs/acc", last)
    again = run_trainer("accelerate_state", "--project-dir", site.fresh("acc"), "--saves", 1, "--resume", restored)
    assert again["resumed"]["weights_match_checkpoint"] and again["resumed"]["optimizer_state_restored"]


def test_torchtitan_purge_counts_only_its_own_step_folders(site: Site) -> None:
    """DCP step folders with torchtitan's keep_latest_k purge (a `step-(\\d+)` search over every name): it never
    sees a ckptd file, ckptd leaves the run's retention to it, and dcp.load resumes from `latest` and from the
    mirror."""
    run = site.runs / "titan"
    report = run_trainer("dcp_steps", "--folder", run, "--steps", 8, "--save-every", 2, "--keep-latest-k", 2,
                         "--step-sleep", 0.2)  # fmt: skip
    assert not [p for p in report["purged"] if "ckptd" in p], report["purged"]
    assert [Path(p).name for p in report["checkpoints"]] == ["step-6", "step-8"]  # keep_latest_k = 2
    wait_until(lambda: settled(site, run, {"step-6", "step-8"}), "the trainer's two verified", SETTLED,
               on_fail=site.daemon.tail())  # fmt: skip
    site.daemon.wait_event("trainer rotates its checkpoints", run=str(run))
    assert_untouched(run, [run])
    latest = site.cli("latest", run)
    assert latest == str(run / "step-8")
    resumed = run_trainer("dcp_steps", "--folder", site.fresh("titan"), "--steps", 10, "--resume", latest)
    assert (resumed["resumed"]["step"], resumed["resumed"]["optimizer_state_restored"]) == (8, True)
    restored = site.restore_latest("runs/titan", "step-8")
    again = run_trainer("dcp_steps", "--folder", site.fresh("titan"), "--steps", 10, "--resume", restored)
    assert (again["resumed"]["step"], again["losses"]) == (8, resumed["losses"])


def test_deepspeed_resumes_from_the_tag_latest_prints(site: Site) -> None:
    """DeepSpeed's global_step<N>/ folders and its `latest` file: `ckptd latest` prints the tag folder, and
    engine.load_checkpoint(its parent, tag=its name) resumes, from the run and from the mirror."""
    run = site.runs / "ds"
    run_trainer("deepspeed_engine", "--save-dir", run, "--steps", 6, "--save-every", 2, "--step-sleep", 0.2)
    wait_until(lambda: settled(site, run, {"global_step6"}), "only global_step6 left", SETTLED,
               on_fail=site.daemon.tail())  # fmt: skip
    assert_untouched(run)
    assert (run / "latest").read_text().strip() == "global_step6"
    # The watch ranks by eval_loss, which DeepSpeed's saves do not hold: said once in the log, and in status.
    site.daemon.wait_event("metric missing", run=str(run), metric="eval_loss")
    [line] = [r for r in json.loads(site.cli("status", "--json"))["watches"]["runs"]["runs"] if r["run"] == str(run)]
    assert line["metric_missing"]["metric"] == "eval_loss" and "eval_loss" not in line["metric_missing"]["held"]
    assert len(site.daemon.events("metric missing", run=str(run))) == 1
    latest = Path(site.cli("latest", run))
    assert latest == run / "global_step6"
    resumed = run_trainer("deepspeed_engine", "--save-dir", site.fresh("ds"), "--steps", 8,
                          "--resume-dir", latest.parent, "--resume-tag", latest.name)  # fmt: skip
    assert (resumed["resumed"]["global_steps"], resumed["resumed"]["optimizer_state_restored"]) == (6, True)
    restored = site.restore_latest("runs/ds", "global_step6")
    again = run_trainer("deepspeed_engine", "--save-dir", site.fresh("ds"), "--steps", 8,
                        "--resume-dir", restored.parent, "--resume-tag", restored.name)  # fmt: skip
    assert (again["resumed"]["global_steps"], again["losses"]) == (6, resumed["losses"])


def test_a_sharded_save_pretrained_folder_is_one_checkpoint_restored_whole(site: Site) -> None:
    """A sharded save_pretrained folder is verified, kept and mirrored as one checkpoint; from_pretrained loads
    what `ckptd restore` brings back, tensor for tensor."""
    run = site.runs / "pretrained"
    run.mkdir()
    saved = run_trainer("save_pretrained", "--out", run / "model", "--max-shard-size", "40KB")
    wait_until(lambda: settled(site, run, {"model"}), "the folder verified", SETTLED, on_fail=site.daemon.tail())
    assert site.cli("latest", run, "--weights") == str(run / "model")  # weights only: never a resume point
    restored = site.restore_latest("runs/pretrained", "model")
    assert run_trainer("save_pretrained", "--load", restored)["checksum"] == saved["checksum"]


def test_nshtrainer_rotates_its_own_checkpoints_and_ckptd_follows(site: Site) -> None:
    """nshtrainer keeps one best and one last checkpoint, unlinking the old ones itself: ckptd sees its run as the
    `checkpoint/` folder (one run), learns that its trainer rotates it (and leaves retention to it), ranks by the
    val_loss of nshtrainer's records, leaves no record without its checkpoint, answers for `last.ckpt`, and
    Lightning's fit resumes from `latest`."""
    report = run_trainer("nshtrainer_run", "--root", site.runs / "nsh", "--epochs", 4, "--lr", 0.3,
                         "--step-sleep", 0.4)  # fmt: skip
    run = Path(report["checkpoint_dir"])
    best, last = Path(report["best"]), Path(report["last"])
    expected = {p.relative_to(run).as_posix() for p in (best, last)}
    wait_until(lambda: settled(site, run, expected), "nshtrainer's best and last verified", SETTLED,
               on_fail=site.daemon.tail())  # fmt: skip
    site.daemon.wait_event("trainer rotates its checkpoints", run=str(run))
    assert site.cli("latest", run) == str(last)
    assert site.cli("best", run, "--metric", "val_loss") == str(best)  # from nshtrainer's .metadata.json
    assert json.loads(site.cli("show", run / "last.ckpt", "--json"))["path"] == str(last)  # a link answers
    status = json.loads(site.cli("status", "--json"))["watches"]["runs"]["runs"]
    assert [r["run"] for r in status if r["run"].startswith(str(run))] == [str(run)]  # one run, not three
    records = [p for p in run.rglob("*.metadata.json") if not p.is_symlink()]
    assert sorted(p.with_name(p.name.replace(".metadata.json", ".ckpt")) for p in records) == sorted([best, last])
    assert "Checkpoint file not found" not in report["stderr"]
    resumed = run_trainer("nshtrainer_run", "--root", site.fresh("nsh"), "--epochs", 5, "--resume", last)
    assert resumed["resumed"]["ckpt_global_step"] == report["global_step"]


# ------------------------------------------------------------------------------------------------- races


def test_a_trainer_rmtrees_its_checkpoint_folders_while_the_daemon_works(
    site: Site, trainer_outputs: dict[str, Output]
) -> None:
    """50 rounds of a real checkpoint-<step> folder appearing and being rmtree'd (no ignore_errors) at every
    moment of the daemon's work on it: settling, verifying, recording, retaining. Zero errors."""
    run = site.runs / "race"
    run.mkdir()
    source = trainer_outputs["hf"].root / "checkpoint-4"
    rng = random.Random(0)
    errors: list[str] = []
    for step in range(1, 51):
        folder = run / f"checkpoint-{step}"
        shutil.copytree(source, folder)
        time.sleep(rng.uniform(0.0, 1.2))
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            errors.append(f"round {step}: {exc!r}")
    assert errors == []
    wait_until(lambda: not site.daemon.catalog.query("SELECT 1 FROM checkpoints WHERE run = ? AND gone_at IS NULL",
                                                     str(run)) or None,
               "every folder marked gone", SETTLED, on_fail=site.daemon.tail())  # fmt: skip
    assert list(run.iterdir()) == []


def test_accelerate_rotating_fifty_saves_under_the_daemon(site: Site) -> None:
    """accelerate saves 50 times, 0.3 s apart, with total_limit = 2 while ckptd settles, verifies, mirrors and
    retains the same folder: its own rotation, which often deletes a save while ckptd is at work on it, never
    fails."""
    run = site.runs / "acc50"
    report: dict[str, Any] = run_trainer("accelerate_state", "--project-dir", run, "--saves", 50,
                                         "--total-limit", 2, "--steps-per-save", 1, "--step-sleep", 0.3)  # fmt: skip
    assert report["returncode"] == 0 and len(report["saves"]) == 50
    assert_untouched(run, [run / "checkpoints"])
    last = Path(report["saves"][-1]["path"]).name
    wait_until(lambda: Path(site.cli("latest", run)).name == last or None, "the last save verified", SETTLED,
               on_fail=site.daemon.tail())  # fmt: skip
