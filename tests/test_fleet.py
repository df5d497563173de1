"""Many boxes, one bucket: each box mirrors into its own namespace (`[daemon] node`), so two boxes with the same
watch and run names never write, rewrite or delete each other's keys; `ckptd ls s3://...` shows the fleet and
`ckptd restore s3://... BOX/RUN` brings any box's run back on a machine with no config.

Real components: a moto S3 server on loopback (mirror_fixtures), real torch checkpoints, the ckptd command line
in a subprocess for each box, as each box would run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import checkpoints
from mirror_fixtures import Bucket

from ckptd.config import default_node

CKPTD = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "ckptd")


def ckptd(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTD, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, **(env or {})})  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def box(root: Path, bucket: Bucket, node: str | None, losses: tuple[float, ...]) -> Path:
    """A box: its own folder, state and config; watch `runs` with run `exp1`, one checkpoint per loss (the same
    names on every box, different bytes); mirrored to s3://bucket/fleet with keep_superseded = 1."""
    root.mkdir()
    run = root / "runs" / "exp1"
    for epoch, loss in enumerate(losses, start=1):
        checkpoints.torch_zip(run / f"epoch={epoch}.ckpt", epoch=epoch, global_step=epoch * 100,
                              metrics={"val_loss": loss}, size_floats=64 + int(loss * 1000))  # fmt: skip
    config = root / "config.toml"
    node_line = f'node = "{node}"\n' if node else ""
    config.write_text(
        f'[daemon]\nstate_dir = "state"\n{node_line}\n[[watch]]\nname = "runs"\npath = "runs"\n'
        '[watch.metric]\nname = "val_loss"\n[watch.mirror]\nto = ["s3"]\n\n'
        f'[mirror.s3]\nurl = "s3://{bucket.name}/fleet"\nendpoint_url = "{bucket.endpoint}"\nkeep_superseded = 1\n'
    )  # fmt: skip
    return config


def test_two_boxes_with_the_same_run_names_never_touch_each_others_copies(tmp_path: Path, s3_bucket: Bucket) -> None:
    """Box A and box B mirror `runs/exp1` with the same file names into one bucket, five passes each: every key
    lies under its box's node, A's best is still A's bytes, both `mirror --verify` find nothing bad, and A's
    `restore --best` brings back A's own best."""
    a = box(tmp_path / "a", s3_bucket, "gpu-a", (0.1, 0.5, 0.4))  # A's best: epoch 1
    b = box(tmp_path / "b", s3_bucket, "gpu-b", (0.9, 0.2, 0.3))  # B's best: epoch 2, same names
    for _ in range(5):
        for config in (a, b):
            assert ckptd("scan", "--config", config, cwd=config.parent).returncode == 0
            done = ckptd("mirror", "--config", config, cwd=config.parent)
            assert done.returncode == 0, done.stderr
    keys = s3_bucket.keys("fleet/")
    assert keys and all(k.startswith(("fleet/gpu-a/runs/exp1/", "fleet/gpu-b/runs/exp1/")) for k in keys), keys
    for config in (a, b):
        done = ckptd("mirror", "--config", config, "--verify", cwd=config.parent)
        assert done.returncode == 0 and " 0 bad" in done.stdout, done.stdout + done.stderr
    best_a = a.parent / "runs" / "exp1" / "epoch=1.ckpt"
    done = ckptd("restore", "s3", "runs/exp1", "--best", "--to", tmp_path / "back-a", "--config", a, cwd=a.parent)
    assert done.returncode == 0, done.stderr
    assert sha(Path(done.stdout.strip())) == sha(best_a)


def test_the_fleet_is_listed_and_any_run_restored_on_a_machine_with_no_config(
    tmp_path: Path, s3_bucket: Bucket
) -> None:
    """`ckptd ls s3://bucket/fleet` on a fourth machine (no config, the AWS chain and $AWS_ENDPOINT_URL) shows
    every box, run and copy with its roles; `--json` too; `restore s3://... BOX/RUN --latest` brings B's latest
    back, proved by the target's sidecar, and a box without `node` set uses its host name."""
    boxes = {"gpu-a": (0.1, 0.5), "gpu-b": (0.9, 0.2), None: (0.3,)}
    for i, (node, losses) in enumerate(boxes.items()):
        config = box(tmp_path / f"box{i}", s3_bucket, node, losses)
        assert ckptd("scan", "--config", config, cwd=config.parent).returncode == 0
        assert ckptd("mirror", "--config", config, cwd=config.parent).returncode == 0
    elsewhere = tmp_path / "fourth"
    elsewhere.mkdir()
    env = {"AWS_ENDPOINT_URL": s3_bucket.endpoint, "CKPTD_CONFIG": ""}
    url = f"s3://{s3_bucket.name}/fleet"
    listed = ckptd("ls", url, cwd=elsewhere, env={**env, "COLUMNS": "300"})
    assert listed.returncode == 0, listed.stderr
    for node in ("gpu-a", "gpu-b", default_node()):
        assert node in listed.stdout
    found = json.loads(ckptd("ls", url, "--json", cwd=elsewhere, env=env).stdout)
    assert set(found) == {"gpu-a/runs/exp1", "gpu-b/runs/exp1", f"{default_node()}/runs/exp1"}
    assert found["gpu-b/runs/exp1"]["best"]["name"] == "epoch=2.ckpt"

    done = ckptd("restore", url, "gpu-b/runs/exp1", "--latest", "--to", elsewhere / "out", cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr
    assert sha(Path(done.stdout.strip())) == sha(tmp_path / "box1" / "runs" / "exp1" / "epoch=2.ckpt")
    bad = ckptd("restore", url, "exp1", "--latest", "--to", elsewhere / "x", cwd=elsewhere, env=env)
    assert bad.returncode == 2 and "<node>/<watch>/<run>" in bad.stderr
