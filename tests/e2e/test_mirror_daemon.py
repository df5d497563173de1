"""`ckptd run` mirroring end to end: the real daemon, a real Lightning run, a local folder and moto's S3 server.

The daemon helpers (`Daemon`, `wait_until`, ...) come from test_daemon.py. The S3 server runs in this process
(tests/mirror_fixtures.py); the daemon reaches it over loopback HTTP with dummy credentials from the
environment, as it would reach any S3-compatible store.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # mirror_fixtures lives in tests/
    sys.path.insert(0, str(TESTS))

from test_daemon import CKPTD, Daemon, read_sidecar, sha256_of, torch_bytes, wait_until  # noqa: E402

from ckptd.config import default_node, load_config  # noqa: E402
from ckptd.mirror import targets_of  # noqa: E402
from ckptd.mirrors import Target  # noqa: E402

if TYPE_CHECKING:
    from mirror_fixtures import Bucket, MotoS3

pytestmark = pytest.mark.e2e

MIRRORED = 90.0  # deadline for the mirror to catch up with the run (copies, retries, backoff)
SAME = ("sha256", "size_bytes", "status", "format", "epoch", "global_step", "metrics", "tensors")  # sidecar fields


def ckptd(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ckptd CLI in a subprocess; capture its output."""
    return subprocess.run([str(CKPTD), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def write_config(base: Path, targets: dict[str, dict[str, Any]], *, mode: str = "min") -> Path:
    """A daemon config watching base/runs (settle 0.3 s, JSON logs) that mirrors best and latest to `targets`."""
    lines = [
        "[daemon]", f'state_dir = "{base / "state"}"', 'log_format = "json"', 'rescan_interval = "1h"', "",
        "[[watch]]", 'name = "runs"', f'path = "{base / "runs"}"', "settle_seconds = 0.3",
        "[watch.metric]", 'name = "val_loss"', f'mode = "{mode}"',
        "[watch.mirror]", f"to = {json.dumps(sorted(targets))}", 'what = ["best", "latest"]', "",
    ]  # fmt: skip
    for name, settings in targets.items():
        lines += [f"[mirror.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items()), ""]
    (base / "runs").mkdir(exist_ok=True)
    path = base / "config.toml"
    path.write_text("\n".join(lines))
    return path


def s3_settings(bucket: Bucket) -> dict[str, Any]:
    """A [mirror.s3] section for `bucket`: endpoint, region, keep_superseded = 0; no credentials."""
    return {"url": f"s3://{bucket.name}/mirror", "endpoint_url": bucket.endpoint, "region": "us-east-1",
            "keep_superseded": 0}  # fmt: skip


def holds_exactly(target: Target, run_key: str, local: dict[str, Path]) -> bool:
    """True when `target` holds under run_key exactly the checkpoints `local` names ({role: path}), their sidecars
    and an index.json naming them with the local sha256."""
    wanted = {p.name for p in local.values()}
    expected = sorted([f"{run_key}/index.json", *(f"{run_key}/{n}" for n in wanted),
                       *(f"{run_key}/{n}.ckptd.json" for n in wanted)])  # fmt: skip
    if sorted(target.list(run_key + "/")) != expected:
        return False
    index = json.loads(target.get_bytes(f"{run_key}/index.json"))
    return all(
        index.get(role) and index[role]["name"] == path.name and index[role]["sha256"] == sha256_of(path)
        for role, path in local.items()
    )


def test_daemon_mirrors_a_lightning_run_to_a_folder_and_s3_and_restore_brings_it_back(
    tmp_path: Path, s3_bucket: Bucket, daemons: list[Daemon]
) -> None:
    """While Lightning trains (save_top_k 2), the daemon keeps exactly best and latest on both targets; restore works.

    mode = "max" on val_loss makes the best an older epoch (moved as top-k deletes files) and the latest last.ckpt
    (rewritten each epoch), so both roles, supersession and same-name rewrites all happen.
    """
    config = write_config(tmp_path, {"local": {"url": "backup", "keep_superseded": 0}, "s3": s3_settings(s3_bucket)},
                          mode="max")  # fmt: skip
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    warmup = tmp_path / "runs" / "warmup" / "w.pt"  # a first verification imports torch in the worker
    warmup.parent.mkdir()
    warmup.write_bytes(torch_bytes(size_floats=1000, step=1))
    daemon.wait_verified(warmup, timeout=60)
    run = tmp_path / "runs" / "exp"
    trained = subprocess.run(
        [sys.executable, str(TESTS / "lightning_train.py"), "--dir", str(run), "--epochs", "4", "--save-top-k", "2",
         "--epoch-sleep", "1"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    trained_at = datetime.now(UTC)
    survivors = sorted(run.glob("*.ckpt"))
    assert len(survivors) == 3  # two top-k checkpoints and last.ckpt
    for checkpoint in survivors:
        daemon.wait_verified(checkpoint, timeout=60)
    sidecars = {p: read_sidecar(p) or {} for p in survivors}
    epochs = [p for p in survivors if p.name != "last.ckpt"]
    best = max(epochs, key=lambda p: sidecars[p]["metrics"]["val_loss"])
    local = {"best": best, "latest": run / "last.ckpt"}

    targets = targets_of(load_config(config))
    for name, target in targets.items():
        wait_until(functools.partial(holds_exactly, target, "runs/exp", local), f"{name} to hold exactly {local}",
                   MIRRORED, on_fail=daemon.tail())  # fmt: skip
        for path in local.values():
            assert target.sha256(f"runs/exp/{path.name}") == sha256_of(path)
            # The sidecar beside the copy describes the same bytes. It may be an earlier verification's: Lightning
            # rewrites last.ckpt with the same bytes at the end, and a new mtime alone is not a new copy.
            mirrored = json.loads(target.get_bytes(f"runs/exp/{path.name}.ckptd.json"))
            assert {k: mirrored[k] for k in SAME} == {k: sidecars[path][k] for k in SAME}

    def drained() -> dict[str, Any] | None:  # a copy that failed while Lightning rewrote last.ckpt is retried
        mirrors = json.loads(ckptd("status", "--config", config, "--json").stdout)["mirrors"]
        return mirrors if all(m["pending"] == m["failed"] == 0 for m in mirrors.values()) else None

    mirrors = wait_until(drained, "an empty mirror backlog", MIRRORED, on_fail=daemon.tail())
    assert all(m["done"] >= 3 and m["last_error"] is None for m in mirrors.values())  # warm-up, best, latest
    assert not [e for e in daemon.events() if e.get("level") in ("error", "critical")]
    copies = [e for e in daemon.events("checkpoint mirrored") if e["run"] == str(run)]
    assert datetime.fromisoformat(copies[0]["timestamp"]) < trained_at, "mirrored while the run trained"

    for name in targets:
        for role, path in local.items():
            out = tmp_path / f"restored-{name}-{role}"
            done = ckptd("restore", name, "runs/exp", f"--{role}", "--to", out, "--config", config)
            assert done.returncode == 0, done.stderr
            assert Path(done.stdout.strip()) == out / path.name
            assert (out / path.name).read_bytes() == path.read_bytes()
            assert (read_sidecar(out / path.name) or {}).get("status") == "ok"


class Observer(threading.Thread):
    """Lists the bucket every few ms while the server is up, recording the size of every `key` it ever sees."""

    def __init__(self, server: MotoS3, bucket: str, key: str) -> None:
        super().__init__(daemon=True)
        self.server, self.bucket, self.key = server, bucket, key
        self.sizes: list[int] = []
        self.looks = 0
        self.done = threading.Event()

    def run(self) -> None:
        client = self.server.client()
        while not self.done.is_set():
            if self.server.running:
                try:
                    listed = client.list_objects_v2(Bucket=self.bucket, Prefix=self.key)
                    self.looks += 1
                    self.sizes += [int(o["Size"]) for o in listed.get("Contents", []) if o["Key"] == self.key]
                except Exception:  # the server just went down: look again
                    pass
            time.sleep(0.01)


def test_s3_outage_mid_upload_shows_no_partial_object_and_the_copy_completes_later(
    tmp_path: Path, aws_env: None, daemons: list[Daemon]
) -> None:
    """moto goes down during a ~100 MB multipart upload and comes back on the same port: no partial object is ever
    listed, verification goes on meanwhile, status shows the backlog and error, and the copy completes later."""
    from mirror_fixtures import MotoS3, new_bucket

    server = MotoS3()
    server.start()
    try:
        bucket = new_bucket(server)
        config = write_config(tmp_path, {"s3": s3_settings(bucket)})
        daemon = Daemon(config, tmp_path / "daemon.log")
        daemons.append(daemon)
        key = f"mirror/{default_node()}/runs/big/model.pt"  # this box's namespace
        observer = Observer(server, bucket.name, key)
        observer.start()
        data = torch_bytes(size_floats=8_500_000, step=100)  # ~102 MB: two 64 MiB parts
        big = tmp_path / "runs" / "big" / "model.pt"
        big.parent.mkdir()
        staging = tmp_path / "model.pt.incoming"
        staging.write_bytes(data)
        staging.rename(big)

        client = server.client()
        wait_until(lambda: client.list_multipart_uploads(Bucket=bucket.name).get("Uploads"),
                   "the multipart upload to start", 90, on_fail=daemon.tail())  # fmt: skip
        server.stop()
        failed = daemon.wait_event("mirror copy failed, will retry", timeout=60)
        assert failed[0]["target"] == "s3" and failed[0]["path"] == str(big)

        other = tmp_path / "runs" / "other" / "small.pt"  # verification does not wait for the mirror
        other.parent.mkdir()
        other.write_bytes(torch_bytes(size_floats=1000, step=5))
        daemon.wait_verified(other)
        status = ckptd("status", "--config", config, "--json")
        backlog = json.loads(status.stdout)["mirrors"]["s3"]
        assert backlog["failed"] >= 1 and backlog["done"] == 0 and backlog["last_error"]
        assert not server.running

        server.start()
        target = targets_of(load_config(config))["s3"]
        wait_until(lambda: holds_exactly(target, "runs/big", {"best": big, "latest": big}),
                   "the copy to complete after the outage", MIRRORED, on_fail=daemon.tail())  # fmt: skip
        wait_until(lambda: holds_exactly(target, "runs/other", {"best": other, "latest": other}),
                   "the small checkpoint's copy", MIRRORED, on_fail=daemon.tail())  # fmt: skip
        observer.done.set()
        observer.join()
        assert observer.looks > 10
        assert set(observer.sizes) <= {len(data)}, f"a partial object was listed: sizes {set(observer.sizes)}"
        assert target.sha256("runs/big/model.pt") == sha256_of(big)
        status = ckptd("status", "--config", config, "--json")
        assert json.loads(status.stdout)["mirrors"]["s3"] == {"pending": 0, "failed": 0, "done": 2, "last_error": None,
                                                              "failing_since": None}  # fmt: skip
    finally:
        server.stop()


def test_a_store_emptied_while_the_daemon_runs_is_filled_again_within_one_reconciliation(
    tmp_path: Path, s3_bucket: Bucket, daemons: list[Daemon]
) -> None:
    """Both targets forget everything behind the daemon's back (every S3 object deleted with boto3, the backup
    folder wiped); the next reconciliation (here SIGHUP's) notices, and every wanted copy, sidecar and index is
    back on both, while status shows an empty backlog again."""
    config = write_config(tmp_path, {"local": {"url": "backup", "keep_superseded": 0}, "s3": s3_settings(s3_bucket)})
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    first, second = tmp_path / "runs" / "exp" / "a.pt", tmp_path / "runs" / "exp" / "b.pt"
    first.parent.mkdir()
    first.write_bytes(torch_bytes(size_floats=1000, step=100, metrics={"val_loss": 0.3}))
    daemon.wait_verified(first, timeout=60)
    second.write_bytes(torch_bytes(size_floats=1000, step=200, metrics={"val_loss": 0.5}))
    daemon.wait_verified(second)
    wanted = {"best": first, "latest": second}
    targets = targets_of(load_config(config))
    for name, target in targets.items():
        wait_until(functools.partial(holds_exactly, target, "runs/exp", wanted), f"{name} to hold {wanted}",
                   MIRRORED, on_fail=daemon.tail())  # fmt: skip

    client = s3_bucket.server.client()
    held = s3_bucket.keys()  # a list (Bucket.keys), not a dict's
    for key in held:
        client.delete_object(Bucket=s3_bucket.name, Key=key)
    shutil.rmtree(tmp_path / "backup")
    daemon.send(signal.SIGHUP)
    for name, target in targets.items():
        wait_until(functools.partial(holds_exactly, target, "runs/exp", wanted), f"{name} to hold {wanted} again",
                   30, on_fail=daemon.tail())  # fmt: skip
        for path in wanted.values():
            assert target.sha256(f"runs/exp/{path.name}") == sha256_of(path)
    lost = daemon.events("mirror copies lost by their target")
    assert lost and sum(e["count"] for e in lost) == 4, daemon.tail()
    mirrors = json.loads(ckptd("status", "--config", config, "--json").stdout)["mirrors"]
    assert all(m["pending"] == m["failed"] == 0 and m["done"] == 2 for m in mirrors.values()), mirrors
