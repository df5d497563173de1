"""A plain PyTorch loop under `ckptd run`, as most training guides write one (tests/trainers/plain_loop.py):
`latest_checkpoint.pt` rewritten every epoch with the full state, `epoch_NNN_checkpoint.pt` milestones, and the
weights alone in `best_model.pt` whenever validation improves; its metrics live in a `history`, not in the
file name. The daemon retains with keep_last = 1 and keep_best = 1 by `val_dice`, and mirrors to a local
folder. The loop crashes in the middle of a save, resumes from what `ckptd latest` prints, and resumes again
from what `ckptd restore` brings back.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_daemon import Daemon, ckptd, read_sidecar, sha256_of, wait_until  # noqa: E402
from trainer_fixtures import run_trainer  # noqa: E402

pytestmark = pytest.mark.e2e

SETTLED = 90.0
SLOTS = ("latest_checkpoint.pt", "best_model.pt")


@pytest.fixture
def loop_site(tmp_path: Path) -> Iterator[tuple[Path, Path, Daemon]]:
    """A daemon watching tmp/runs: settle 0.3 s, metric val_dice (max), retention every second (keep_last 1,
    keep_best 1), best and latest mirrored to tmp/backup."""
    runs = tmp_path / "runs"
    runs.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("\n".join([
        "[daemon]", f'state_dir = "{tmp_path / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"', "",
        "[[watch]]", 'name = "runs"', f'path = "{runs}"', "settle_seconds = 0.3",
        "[watch.metric]", 'name = "val_dice"', 'mode = "max"',
        "[watch.retention]", 'interval = "1s"', "keep_last = 1", "keep_best = 1",
        "[watch.mirror]", 'to = ["backup"]', 'what = ["best", "latest"]', "",
        "[mirror.backup]", 'url = "backup"', "keep_superseded = 0", "",
    ]))  # fmt: skip
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        yield runs / "loop", config, daemon
    finally:
        daemon.close()


class SlotWatcher(threading.Thread):
    """Looks every 20 ms whether a slot that appeared has disappeared (retention must never delete one)."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.seen, self.lost = run, set[str](), set[str]()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for name in SLOTS:
                if (self.folder / name).exists():
                    self.seen.add(name)
                elif name in self.seen:
                    self.lost.add(name)  # the loop rewrites in place: a slot never vanishes while it trains


def cli(config: Path, *args: object) -> str:
    done = ckptd(*map(str, args), "--config", str(config), timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def current_ok(daemon: Daemon, path: Path) -> bool:
    """The daemon verified `path` ok as it is now."""
    found = read_sidecar(path)
    return bool(found and found["status"] == "ok" and path.exists() and found["sha256"] == sha256_of(path))


def test_a_plain_loop_resumes_from_what_latest_prints_after_a_crash(
    loop_site: tuple[Path, Path, Daemon], tmp_path: Path
) -> None:
    """`latest` always names a checkpoint with optimizer state: never the weights-only `best_model.pt`, never the
    `latest_checkpoint.pt` a crash truncated. The loop's own names are never deleted; retention deletes the
    milestones no rule keeps; `best` answers by `val_dice` from the history; the mirror's latest resumes."""
    run, config, daemon = loop_site
    watcher = SlotWatcher(run)
    watcher.start()
    crashed = run_trainer("plain_loop", "--out", run, "--epochs", 6, "--crash-in-save", 5, "--epoch-sleep", 0.8,
                          check=False)  # fmt: skip
    assert crashed["returncode"] == 17, crashed["stderr"]
    milestone = run / "epoch_004_checkpoint.pt"
    wait_until(lambda: current_ok(daemon, milestone) and not (run / "epoch_002_checkpoint.pt").exists(),
               "epoch 4 verified and epoch 2 deleted", SETTLED, on_fail=daemon.tail())  # fmt: skip
    wait_until(lambda: (read_sidecar(run / "latest_checkpoint.pt") or {}).get("status") == "corrupt",
               "the truncated latest_checkpoint.pt found corrupt", SETTLED, on_fail=daemon.tail())  # fmt: skip
    latest = cli(config, "latest", run)
    assert latest == str(milestone)  # not best_model.pt (weights only), not the truncated latest_checkpoint.pt
    resumed = run_trainer("plain_loop", "--out", run, "--epochs", 6, "--resume", latest, "--epoch-sleep", 0.8)
    assert (resumed["resumed"]["epoch"], resumed["resumed"]["optimizer_state_restored"]) == (4, True)

    newest = run / "latest_checkpoint.pt"
    wait_until(lambda: current_ok(daemon, newest) and cli(config, "latest", run) in (str(newest),
               str(run / "epoch_006_checkpoint.pt")), "epoch 6 verified and latest", SETTLED,
               on_fail=daemon.tail())  # fmt: skip
    assert torch.load(cli(config, "latest", run), weights_only=True)["epoch"] == 6
    best = Path(cli(config, "best", run))
    assert read_sidecar(best)["metrics"]["val_dice"] == pytest.approx(max(resumed["history"]["val_dice"]))  # type: ignore[index]
    by_map = Path(cli(config, "best", run, "--metric", "best_map", "--mode", "max"))  # the best so far: asked for
    assert read_sidecar(by_map)["metrics"]["best_map"] == pytest.approx(resumed["best_map"])  # type: ignore[index]
    watcher.stop.set()
    watcher.join()
    assert watcher.lost == set() and all((run / name).exists() for name in SLOTS)

    def restored_latest() -> Path | None:
        to = tmp_path / f"restore-{len(list(tmp_path.glob('restore-*')))}"
        done = ckptd("restore", "backup", "runs/loop", "--latest", "--to", str(to), "--config", str(config))
        path = Path(done.stdout.strip()) if done.returncode == 0 else None
        return path if path is not None and torch.load(path, weights_only=True)["epoch"] == 6 else None

    restored = wait_until(restored_latest, "the mirror's latest at epoch 6", SETTLED, on_fail=daemon.tail())
    again = run_trainer("plain_loop", "--out", tmp_path / "elsewhere", "--epochs", 8, "--resume", restored)
    assert (again["resumed"]["epoch"], again["resumed"]["optimizer_state_restored"]) == (6, True)
    done = ckptd("restore", "backup", "runs/loop", "--best", "--to", str(tmp_path / "best"), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert sha256_of(Path(done.stdout.strip())) == sha256_of(best)
