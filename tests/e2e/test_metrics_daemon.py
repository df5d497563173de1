"""`ckptd run` with metrics on: a real daemon serving /metrics on a loopback port and writing a textfile, real
torch.save checkpoints (and a corrupt one), scraped over HTTP and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ckptd.fsutil import TEMP_MARK

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # `import checkpoints` whether or not pytest put tests/ on the path
    sys.path.insert(0, str(TESTS))

import checkpoints  # noqa: E402
from test_daemon import STARTUP, Daemon, small_checkpoint, wait_until, write_config  # noqa: E402

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """{(sample name, labels): value} of an exposition, read by prometheus_client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when the exposition lacks it."""
    return found.get((name, frozenset(labels.items())))


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    """GET /metrics from the daemon, parsed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return samples(answer.read().decode())


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[Path], Daemon]]:
    """Start a daemon of this test's own; each is stopped at the end of the test."""
    started: list[Daemon] = []

    def start(config: Path) -> Daemon:
        daemon = Daemon(config, tmp_path / "daemon.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def test_daemon_serves_and_writes_metrics_of_real_checkpoints(
    tmp_path: Path, start_daemon: Callable[[Path], Daemon]
) -> None:
    """Three good checkpoints and a corrupt one: the endpoint and the textfile count them by status, with their
    verify seconds, the bytes hashed, the run's latest step and best value (labelled by the run below the watch),
    the copies to a local mirror, and the reconciliation's success; a clean stop leaves ckptd_up 0 in the file."""
    runs, backup, textfile = tmp_path / "runs", tmp_path / "backup", tmp_path / "prom" / "ckptd.prom"
    runs.mkdir()
    backup.mkdir()
    textfile.parent.mkdir()
    port = free_port()
    config = write_config(
        tmp_path / "config.toml", state_dir=tmp_path / "state", watches=[{"name": "runs", "path": runs}]
    )
    text = config.read_text().replace(
        "[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\nmetrics_textfile = "{textfile}"\n', 1
    )
    config.write_text(text + f'[watch.mirror]\nto = ["backup"]\n\n[mirror.backup]\nurl = "{backup}"\n')
    daemon = start_daemon(config)
    daemon.wait_event("serving metrics", listen=f"127.0.0.1:{port}")

    run = runs / "exp" / "lightning_logs"
    good = [small_checkpoint(run / f"step={s}.pt", step=s, metrics={"val_loss": 1.0 / s}) for s in (100, 200, 300)]
    broken = small_checkpoint(tmp_path / "broken.pt", step=400)
    checkpoints.flip_tensor_byte(broken)
    broken = broken.rename(run / "broken.pt")
    for path in good:
        daemon.wait_verified(path, timeout=STARTUP)
    daemon.wait_verified(broken, status="corrupt")
    size = sum(p.stat().st_size for p in good)

    def counted() -> Samples | None:
        found = scrape(port)
        done = value(found, "ckptd_checkpoints_verified_total", watch="runs", status="ok") == 3
        return found if done and value(found, "ckptd_mirror_copies_total", target="backup") else None

    found = wait_until(counted, "3 ok verifications and a mirror copy in /metrics", on_fail=daemon.tail())
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="corrupt") == 1
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="unsafe") == 0
    assert value(found, "ckptd_verify_seconds_count") == 4
    assert 0 < (value(found, "ckptd_verify_seconds_sum") or 0) < 4 * STARTUP
    hashed = value(found, "ckptd_bytes_hashed_total", watch="runs") or 0
    assert size + broken.stat().st_size == hashed  # every byte of the four, once
    assert value(found, "ckptd_run_latest_step", watch="runs", run="exp/lightning_logs") == 300
    assert value(found, "ckptd_run_best_value", watch="runs", run="exp/lightning_logs", metric="val_loss") == (
        pytest.approx(1.0 / 300)
    )
    assert not [k for k in found if k[0].startswith("ckptd_run_") and str(runs) in dict(k[1])["run"]]
    assert value(found, "ckptd_mirror_failures_total", target="backup") == 0
    assert (value(found, "ckptd_last_success_timestamp_seconds", job="reconcile:runs") or 0) > 0
    assert value(found, "ckptd_up") == 1

    def written() -> Samples | None:
        try:
            on_disk = samples(textfile.read_text())
        except OSError:
            return None
        ok = value(on_disk, "ckptd_checkpoints_verified_total", watch="runs", status="ok") == 3
        return on_disk if ok and value(on_disk, "ckptd_checkpoints", watch="runs", status="corrupt") == 1 else None

    on_disk = wait_until(written, "the textfile with the same counts", on_fail=daemon.tail())
    assert value(on_disk, "ckptd_run_latest_step", watch="runs", run="exp/lightning_logs") == 300
    assert not [p for p in textfile.parent.iterdir() if TEMP_MARK in p.name]
    assert oct(textfile.stat().st_mode & 0o777) == oct(0o644)

    code, _seconds = daemon.stop()
    assert code == 0
    assert value(samples(textfile.read_text()), "ckptd_up") == 0
    assert not daemon.events("daemon step failed, going on"), daemon.tail()


def test_taken_metrics_port_is_reported_and_the_daemon_goes_on(
    tmp_path: Path, start_daemon: Callable[[Path], Daemon]
) -> None:
    """A metrics_listen port another process holds: logged as a failing step, and checkpoints are still verified."""
    runs = tmp_path / "runs"
    runs.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path / "config.toml", state_dir=tmp_path / "state",
                              watches=[{"name": "runs", "path": runs}])  # fmt: skip
        config.write_text(config.read_text().replace("[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n'))
        daemon = start_daemon(config)
        daemon.wait_event("daemon step failed, going on", step="metrics listen")
        daemon.wait_verified(small_checkpoint(runs / "exp" / "a.pt"), timeout=STARTUP)
