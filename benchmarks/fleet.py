"""Benchmark: many boxes, one bucket. Three daemons mirror runs with the same names into one S3 prefix, then a
fourth machine lists the fleet and restores one box's run.

Run as `.venv/bin/python benchmarks/fleet.py [--checkpoints 3] [--size-mb 4] [--repeats 5] [--json FILE]`.

Everything happens under /tmp/ckptd-bench-fleet (wiped at the start). One moto standalone server (`moto_server`,
in its own process on a free loopback port, as benchmarks/mirror.py starts it) stands for the store; werkzeug
writes one line per HTTP request to its stderr, which is how requests are counted. Three boxes, each with its own
folder, config, state_dir and `[daemon] node` ("gpu-a", "gpu-b", "gpu-c": the per-box namespace on a target),
watch a folder named `runs` holding the same runs (`exp1`, `exp2`) and mirror `what = ["best", "latest", "all"]` to
the same `s3://ckptd-fleet/fleet` (`all`, so that what the bucket must end up holding does not depend on timing;
best and latest too, because `all` alone sets no best or latest in index.json and `restore --latest` then finds
none). Each is a
real `.venv/bin/ckptd run --config FILE` subprocess with JSON logs; a second, unmirrored watch takes one small
checkpoint per box first, so that every worker has imported torch before anything is timed.

1. Mirroring. The benchmark process writes `--checkpoints` real `torch.save` checkpoints per run (about
   `--size-mb` MB each: model weights and Adam state, a `val_loss` in `metrics`), round-robin over the boxes, the
   same file names on every box (`epoch=K-step=S.ckpt`) with different bytes and losses, so that each box's best
   is a different epoch. Each is written outside the watched folder and renamed into place. Measured per box, from
   the time the box's last rename returned: its last "checkpoint verified" and its last "checkpoint mirrored" log
   line (the daemon's own timestamps; the second is written after the run's index.json, so then every copy is in
   the bucket), once `ckptd status --json` says its backlog is empty and the bucket holds what it should. Also
   the requests each box made meanwhile (those naming its node; the benchmark's own are left out), and every
   upload: each key must lie under its box's node, and each checkpoint be uploaded once.
2. The fourth machine: a fresh empty HOME and working folder, no config (CKPTD_CONFIG empty), only the AWS
   variables and AWS_ENDPOINT_URL. Timed as subprocesses, after one untimed warm-up each, `--repeats` rounds in
   alternating order; medians, and the requests each call made:
   - `ckptd ls s3://ckptd-fleet/fleet` (the table) and `ckptd ls ... --json`;
   - baselines: a `python -c` that lists the prefix with boto3's `list_objects_v2` paginator, and one that also
     GETs every `index.json` (what `ls` has to read at least); and `ckptd --version`, the command line's own
     start (no request);
   - `ckptd restore s3://ckptd-fleet/fleet gpu-b/runs/exp1 --latest --to DIR` (a new DIR each time).
3. Checks (the script exits 1 when one fails): the listing shows every box, run and copy with its roles, step,
   val_loss and size; every copy in the bucket has the sha256 of its own box's source file (the boxes' files
   share names, not bytes); the restored checkpoint is gpu-b's latest, not gpu-a's file of the same name, and
   loads with `torch.load(weights_only=True)`; every key in the bucket lies under one node; each daemon stops
   on SIGTERM with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import torch

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CKPTD = str(VENV_BIN / "ckptd")
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
BASE = Path("/tmp/ckptd-bench-fleet")
BUCKET, PREFIX = "ckptd-fleet", "fleet"
URL = f"s3://{BUCKET}/{PREFIX}"
NODES = ("gpu-a", "gpu-b", "gpu-c")
RUNS = ("exp1", "exp2")
RESTORE_NODE, RESTORE_RUN = "gpu-b", "exp1"
OWN_TAG = "ckptd-bench-check"  # marks the benchmark's own reads of a box's keys in moto's request log
DEADLINE = 120.0  # for a daemon to start, and for the fleet to mirror everything
AWS_ENV = {  # dummies for moto; like tests/mirror_fixtures.py, the developer's ~/.aws must not leak in
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# One werkzeug request line: `127.0.0.1 - - [date] "GET /path?query HTTP/1.1" 200 -`; the request part may be
# wrapped in ANSI colours (werkzeug colours 4xx and 5xx answers).
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d{3})')

# A baseline for `ckptd ls`: list the prefix with boto3 (argv: bucket prefix get), and with get=1 also read every
# index.json, as `ls` must; a subprocess, so that it pays the same interpreter start and boto3 import as ckptd.
LIST_CODE = """
import sys, boto3
bucket, prefix, get = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
client = boto3.client("s3")
pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
if get:
    for key in keys:
        if key.endswith("/index.json"):
            client.get_object(Bucket=bucket, Key=key)["Body"].read()
print(len(keys))
"""


# ------------------------------------------------------------------------------------------------- the store


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Moto:
    """moto_server in its own process; its stderr (one line per request) goes to a file that count() reads."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.2)

    def requests(self) -> list[tuple[str, str, int]]:
        """Every request so far: (method, unquoted path with its query, status)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            match = REQUEST.search(line)
            if match:
                found.append((match[1], urllib.parse.unquote(match[2]), int(match[3])))
        return found

    def count(self) -> int:
        """How many requests so far. werkzeug writes a request's line as it starts its answer, so once a client
        has its answers their lines are in the file; the short wait is for the line-buffered stderr."""
        time.sleep(0.05)
        return len(self.requests())

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------------------------------------- the boxes


@dataclass
class Source:
    """One checkpoint a box saved: what the bucket and the listing must say about it."""

    node: str
    run: str
    name: str
    step: int
    epoch: int
    loss: float
    size: int
    sha256: str


@dataclass
class Box:
    """One training box: its folder, config, daemon, and what it saved."""

    node: str
    root: Path
    endpoint: str
    settle: float
    proc: subprocess.Popen[bytes] | None = None
    saved: dict[tuple[str, str], Source] = field(default_factory=dict)  # (run, name) -> source
    last_save: float = 0.0
    _offset: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    def write_config(self) -> None:
        """Watch `runs` (mirrored: best, latest, all) and `warm` (not mirrored: it only makes the worker import
        torch)."""
        for folder in ("runs", "warm", ".staging"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "[daemon]\n"
            f'node = "{self.node}"\n'
            f'state_dir = "{self.root / "state"}"\n'
            'log_format = "json"\n'
            'log_level = "info"\n'
            "\n[[watch]]\n"
            'name = "runs"\n'
            f'path = "{self.root / "runs"}"\n'
            f"settle_seconds = {self.settle}\n"
            "[watch.metric]\n"
            'name = "val_loss"\n'
            'mode = "min"\n'
            "[watch.mirror]\n"
            'to = ["s3"]\n'
            'what = ["best", "latest", "all"]\n'
            "\n[[watch]]\n"
            'name = "warm"\n'
            f'path = "{self.root / "warm"}"\n'
            f"settle_seconds = {self.settle}\n"
            "\n[mirror.s3]\n"
            f'url = "{URL}"\n'
            f'endpoint_url = "{self.endpoint}"\n'
        )

    def start(self) -> None:
        env = {**os.environ, **AWS_ENV}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CKPTD_CONFIG"):  # not under systemd here
            env.pop(key, None)
        with open(self.log, "wb") as out, open(self.log.with_suffix(".stderr"), "wb") as err:
            self.proc = subprocess.Popen([CKPTD, "run", "--config", str(self.config)], stdout=out, stderr=err,
                                         env=env, cwd=self.root)  # fmt: skip

    def read_events(self) -> list[dict[str, Any]]:
        """Parse the log lines written since the last call (a line still being written is left for the next)."""
        with open(self.log, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
        return self.events

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.read_events() if e.get("event") == event]

    def wait_event(self, event: str, timeout: float = DEADLINE, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for found in self.named(event):
                if all(found.get(k) == v for k, v in fields.items()):
                    return found
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.node}: ckptd run exited with {self.proc.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node}: no {event!r} {fields} within {timeout} s\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 20) -> str:
        text = []
        for path in (self.log, self.log.with_suffix(".stderr")):
            with contextlib.suppress(OSError):
                text.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(text)

    def status(self) -> dict[str, Any]:
        done = subprocess.run([CKPTD, "status", "--json", "--config", str(self.config)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **AWS_ENV})  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{self.node}: ckptd status failed: {done.stderr}")
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds to exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = -9
        return code, time.monotonic() - started


def loss_of(box: int, run: int, k: int, count: int) -> float:
    """val_loss of checkpoint k: lowest at a different k on each box (gpu-a the first, gpu-c the last), so each
    box's best is a different file name, and never a tie."""
    best_k = (box * (count - 1)) // 2
    return round(0.3 + 0.1 * abs(k - best_k) + 0.01 * run + 0.001 * box, 4)


def save(box: Box, box_i: int, run_i: int, k: int, count: int, size_mb: float) -> None:
    """torch.save a training checkpoint (weights, Adam state, metrics) of about size_mb MB into box's run, by a
    rename into place, as a careful trainer does (the daemon then waits settle_seconds, not for a close)."""
    run = RUNS[run_i]
    step = (k + 1) * 100
    name = f"epoch={k}-step={step}.ckpt"
    n = max(1, int(size_mb * 1e6 / 12))  # three float32 tensors of n elements
    generator = torch.Generator().manual_seed(1_000_000 * box_i + 1000 * run_i + k)  # other bytes on each box
    loss = loss_of(box_i, run_i, k, count)
    state = {
        "epoch": k,
        "global_step": step,
        "model_state_dict": {"w": torch.randn(n, generator=generator)},
        "optimizer_state_dict": {
            "state": {
                0: {
                    "step": torch.tensor(float(step)),
                    "exp_avg": torch.randn(n, generator=generator),
                    "exp_avg_sq": torch.rand(n, generator=generator),
                }
            },
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "metrics": {"val_loss": loss},
    }
    staging = box.root / ".staging" / name
    torch.save(state, staging)
    data = staging.read_bytes()
    destination = box.root / "runs" / run / name
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, destination)
    box.last_save = time.time()
    box.saved[(run, name)] = Source(box.node, run, name, step, k, loss, len(data), hashlib.sha256(data).hexdigest())


def expected_roles(box: Box, run: str) -> tuple[str, str]:
    """(best, latest) file names of a box's run: lowest val_loss; highest step."""
    sources = [s for (r, _n), s in box.saved.items() if r == run]
    best = min(sources, key=lambda s: (s.loss, -s.step)).name
    latest = max(sources, key=lambda s: s.step).name
    return best, latest


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


# ------------------------------------------------------------------------------------------------- checks


class Checks:
    """Named checks; each failure is printed and makes the script exit 1."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def __call__(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
            print(f"CHECK FAILED: {what}", flush=True)
        return ok


def bucket_keys(moto: Moto) -> list[str]:
    pages = moto.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/")
    return sorted(str(item["Key"]) for page in pages for item in page.get("Contents", []))


def bucket_lacks(moto: Moto, box: Box) -> str | None:
    """What the bucket lacks of the box (None when nothing): exactly every copy, its sidecar and each run's
    index.json naming them all, with the best and latest the box's losses and steps make."""
    client = moto.client()
    keys = set(bucket_keys(moto))
    for run in RUNS:
        prefix = f"{PREFIX}/{box.node}/runs/{run}"
        names = [n for (r, n) in box.saved if r == run]
        wanted = {f"{prefix}/index.json", *(f"{prefix}/{n}" for n in names)}
        wanted |= {f"{prefix}/{n}.ckptd.json" for n in names}
        held = {k for k in keys if k.startswith(prefix + "/")}
        if held != wanted:
            return f"{prefix}: lacks {sorted(wanted - held)}, and holds {sorted(held - wanted)} besides"
        # Tagged, so that this read is not counted as the box's (the tag is a query parameter of the request line).
        got = client.get_object(Bucket=BUCKET, Key=f"{prefix}/index.json", ResponseCacheControl=OWN_TAG)
        index = json.loads(got["Body"].read())
        roles = {role: (index.get(role) or {}).get("name") for role in ("best", "latest")}
        if roles != dict(zip(("best", "latest"), expected_roles(box, run), strict=True)):
            return f"{prefix}/index.json names {roles}, not {expected_roles(box, run)}"
        if set(index.get("copies", {})) != set(names):
            return f"{prefix}/index.json lists {sorted(index.get('copies', {}))}"
    return None


def check_listing(check: Checks, boxes: list[Box], found: dict[str, Any], table: str) -> None:
    """`ls --json` names every box's runs with every copy's roles, step, val_loss, size and sha256 (its own box's
    source); the table shows each copy of each box and run on one row with its step."""
    wanted = {f"{b.node}/runs/{r}" for b in boxes for r in RUNS}
    check(set(found) == wanted, f"ls --json runs {sorted(found)} == {sorted(wanted)}")
    rows = [line.split() for line in table.splitlines()]
    for box in boxes:
        for run in RUNS:
            index = found.get(f"{box.node}/runs/{run}", {})
            best, latest = expected_roles(box, run)
            check((index.get("best") or {}).get("name") == best, f"ls: {box.node}/{run} best is {best}")
            check((index.get("latest") or {}).get("name") == latest, f"ls: {box.node}/{run} latest is {latest}")
            copies = index.get("copies", {})
            names = {n for (r, n) in box.saved if r == run}
            check(set(copies) == names, f"ls: {box.node}/{run} copies {sorted(copies)} == {sorted(names)}")
            for name in names & set(copies):
                src, copy = box.saved[(run, name)], copies[name]
                what = f"ls: {box.node}/runs/{run}/{name}"
                check(copy.get("sha256") == src.sha256, f"{what} sha256 is {box.node}'s own")
                check(copy.get("step") == src.step and copy.get("epoch") == src.epoch, f"{what} step and epoch")
                check((copy.get("metrics") or {}).get("val_loss") == src.loss, f"{what} val_loss {src.loss}")
                check(copy.get("size_bytes") == src.size, f"{what} size {src.size}")
                roles = {role for role, holder in (("best", best), ("latest", latest)) if holder == name}
                row = [cells for cells in rows if box.node in cells and f"runs/{run}" in cells and name in cells]
                shown = len(row) == 1 and str(src.step) in row[0] and all(r in " ".join(row[0]) for r in roles)
                check(shown, f"ls table: one row for {what}, with step {src.step} and roles {sorted(roles)}")


# ------------------------------------------------------------------------------------------------- timing


def timed_rounds(
    contenders: dict[str, Callable[[int], list[str]]], run: Callable[[list[str]], subprocess.CompletedProcess[str]],
    moto: Moto, repeats: int,
) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, subprocess.CompletedProcess[str]]]:  # fmt: skip
    """One untimed warm-up of each (its output kept for the checks), then `repeats` rounds in alternating order:
    wall seconds and requests of each call."""
    names = list(contenders)
    first = {}
    for name in names:
        first[name] = run(contenders[name](0))
    times: dict[str, list[float]] = {n: [] for n in names}
    requests: dict[str, list[int]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else list(reversed(names)):
            before = moto.count()
            started = time.perf_counter()
            done = run(contenders[name](i + 1))
            times[name].append(time.perf_counter() - started)
            requests[name].append(moto.count() - before)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr}")
    return times, requests, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run (each box has 2 runs)")
    parser.add_argument("--size-mb", type=float, default=4.0, help="size of each checkpoint, MB")
    parser.add_argument("--settle", type=float, default=2.0, help="settle_seconds of the watches (ckptd's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    load_before = os.getloadavg()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}; load average {load_before[0]:.2f} {load_before[1]:.2f} at start")  # fmt: skip
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    os.environ.update(AWS_ENV)
    check = Checks()
    moto = Moto(BASE / "moto.stderr")
    boxes = [Box(node, BASE / node, moto.endpoint, args.settle) for node in NODES]
    results: dict[str, Any] = {"checkpoints_per_run": args.checkpoints, "size_mb": args.size_mb, "nodes": NODES,
                               "runs": RUNS, "settle_seconds": args.settle}  # fmt: skip
    try:
        moto.client().create_bucket(Bucket=BUCKET)
        for box in boxes:
            box.write_config()
            box.start()
        for box in boxes:
            box.wait_event("daemon ready")
        # Warm every worker (it imports torch) with a checkpoint outside the mirrored watch, so that what is timed
        # below is a running fleet's work, not three torch imports.
        for box in boxes:
            torch.save({"w": torch.zeros(4)}, box.root / ".staging" / "w.pt")
            os.replace(box.root / ".staging" / "w.pt", box.root / "warm" / "w.pt")
        for box in boxes:
            box.wait_event("checkpoint verified", path=str(box.root / "warm" / "w.pt"))
        print(f"3 daemons ready and warm; saving {len(RUNS)} runs x {args.checkpoints} checkpoints of "
              f"{args.size_mb:g} MB on each box", flush=True)  # fmt: skip

        # 1. The fleet saves, verifies and mirrors.
        requests_before = moto.count()
        first_save = time.time()
        for k in range(args.checkpoints):
            for run_i in range(len(RUNS)):
                for box_i, box in enumerate(boxes):
                    save(box, box_i, run_i, k, args.checkpoints, args.size_mb)
        deadline = time.monotonic() + DEADLINE
        waiting = {box.node: "no copy mirrored yet" for box in boxes}
        while waiting:
            for box in boxes:
                if box.node not in waiting:
                    continue
                mirrored = {e.get("path") for e in box.named("checkpoint mirrored")}
                if not {str(box.root / "runs" / r / n) for (r, n) in box.saved} <= mirrored:
                    continue
                # Its log names every copy: now ask what a person would (the backlog), and look at the bucket.
                backlog = box.status()["mirrors"]["s3"]
                lacks = bucket_lacks(moto, box)
                waiting[box.node] = f"backlog {backlog}; bucket: {lacks}"
                if backlog["pending"] == 0 and backlog["failed"] == 0 and lacks is None:
                    del waiting[box.node]
            if time.monotonic() > deadline:
                raise RuntimeError(f"not mirrored within {DEADLINE} s: {waiting}")
            time.sleep(0.2)
        mirror_requests = moto.requests()[requests_before:]
        results["boxes"] = {}
        for box in boxes:
            verified = [stamp(e) for e in box.named("checkpoint verified") if "/runs/" in str(e.get("path"))]
            mirrored_at = [stamp(e) for e in box.named("checkpoint mirrored")]
            # A box's requests name its node: in an object's path, or in a listing's prefix= (unquoted). The
            # benchmark's own listings are of the whole prefix, and its reads of index.json are tagged.
            own = f"{PREFIX}/{box.node}/"
            results["boxes"][box.node] = {
                "last_save_to_verified_s": max(verified) - box.last_save,
                "last_save_to_mirrored_s": max(mirrored_at) - box.last_save,
                "first_save_to_mirrored_s": max(mirrored_at) - first_save,
                "mirrored_events": len(mirrored_at),
                "requests": sum(1 for _m, path, _s in mirror_requests if own in path and OWN_TAG not in path),
            }
            failures = box.named("mirror copy failed, will retry")
            check(not failures, f"{box.node}: no mirror copy failed ({len(failures)} did)")
            errors = [e for e in box.read_events() if e.get("level") in ("error", "critical")]
            check(not errors, f"{box.node}: no error logged ({errors[:3]})")
        results["mirror_phase_requests"] = len(mirror_requests)

        # Uploads: a PUT of a key (not a part of a multipart upload) or the POST that completes one.
        uploads = Counter(path.split("?", 1)[0] for method, path, status in mirror_requests
                          if status < 300 and ((method == "PUT" and "partNumber=" not in path)
                                               or (method == "POST" and "uploadId=" in path)))  # fmt: skip
        outside = [p for p in uploads if not any(p.startswith(f"/{BUCKET}/{PREFIX}/{n}/") for n in NODES)]
        check(not outside, f"every upload lies under its node's prefix (outside: {outside[:5]})")
        twice = {p: n for p, n in uploads.items() if p.endswith(".ckpt") and n != 1}
        check(not twice, f"each checkpoint key is uploaded exactly once ({twice})")
        results["checkpoint_uploads"] = sum(n for p, n in uploads.items() if p.endswith(".ckpt"))
        deletes = [p for m, p, _s in mirror_requests if m == "DELETE"]
        results["deletes"] = len(deletes)

        # 6. No key written twice: every key lies under exactly one box's node, and each copy has its own box's bytes.
        keys = bucket_keys(moto)
        client = moto.client()
        by_node = Counter(k.split("/")[1] if k.count("/") >= 2 else "" for k in keys)
        check(set(by_node) == set(NODES), f"keys lie under the nodes only: {dict(by_node)}")
        for box in boxes:
            for (run, name), src in box.saved.items():
                key = f"{PREFIX}/{box.node}/runs/{run}/{name}"
                body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                check(hashlib.sha256(body).hexdigest() == src.sha256, f"s3://{BUCKET}/{key} holds {box.node}'s bytes")
        results["keys"] = len(keys)
        results["keys_by_node"] = dict(by_node)

        # 2. The fourth machine: nothing of the boxes, only the AWS chain and the endpoint.
        fourth = BASE / "fourth"
        (fourth / "home").mkdir(parents=True)
        env4 = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(fourth / "home"), "LANG": "C.UTF-8",
                "COLUMNS": "300", "CKPTD_CONFIG": "", "AWS_ENDPOINT_URL": moto.endpoint, **AWS_ENV}  # fmt: skip
        if "PYTHONPATH" in os.environ:  # a run against a snapshot of the source runs that ckptd here too
            env4["PYTHONPATH"] = os.environ["PYTHONPATH"]

        def on_fourth(argv: list[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=fourth, env=env4)

        restore_run = f"{RESTORE_NODE}/runs/{RESTORE_RUN}"
        contenders: dict[str, Callable[[int], list[str]]] = {
            "boto3 list": lambda _i: [PYTHON, "-c", LIST_CODE, BUCKET, PREFIX + "/", "0"],
            "boto3 list + get index.json": lambda _i: [PYTHON, "-c", LIST_CODE, BUCKET, PREFIX + "/", "1"],
            "ckptd --version": lambda _i: [CKPTD, "--version"],  # the command line's own start, no request
            "ckptd ls": lambda _i: [CKPTD, "ls", URL],
            "ckptd ls --json": lambda _i: [CKPTD, "ls", URL, "--json"],
            "ckptd restore --latest": lambda i: [
                CKPTD,
                "restore",
                URL,
                restore_run,
                "--latest",
                "--to",
                str(fourth / f"r{i}"),
            ],
        }
        times, requests, first = timed_rounds(contenders, on_fourth, moto, args.repeats)
        for name, result in first.items():
            check(result.returncode == 0, f"{name} exits 0 on the fourth machine: {result.stderr.strip()[-300:]}")
        check_listing(check, boxes, json.loads(first["ckptd ls --json"].stdout or "{}"), first["ckptd ls"].stdout)

        # 5. What came back is gpu-b's latest, not gpu-a's file of the same name, and it loads.
        restore_box = boxes[NODES.index(RESTORE_NODE)]
        _best, latest = expected_roles(restore_box, RESTORE_RUN)
        restored = Path(first["ckptd restore --latest"].stdout.strip())
        check(restored.name == latest, f"restore --latest brought {restored.name}, the latest is {latest}")
        if restored.is_file():
            digest = hashlib.sha256(restored.read_bytes()).hexdigest()
            other = boxes[0].saved[(RESTORE_RUN, latest)].sha256
            check(other != restore_box.saved[(RESTORE_RUN, latest)].sha256, "gpu-a's file of that name differs")
            check(digest == restore_box.saved[(RESTORE_RUN, latest)].sha256, "the restored file is gpu-b's")
            loaded = torch.load(restored, weights_only=True, map_location="cpu")
            check(loaded["global_step"] == restore_box.saved[(RESTORE_RUN, latest)].step, "it loads, weights_only")
        else:
            check(False, f"restore printed a file: {restored}")

        medians = {n: statistics.median(t) for n, t in times.items()}
        results["fourth_machine"] = {n: {"median_s": medians[n], "runs_s": times[n],
                                         "requests": statistics.median(requests[n])} for n in times}  # fmt: skip
    finally:
        stops = {}
        for box in boxes:
            if box.proc is not None and box.proc.poll() is None:
                stops[box.node] = box.stop()
        moto.close()
    for node, (code, seconds) in stops.items():
        check(code == 0, f"{node}: ckptd run exits 0 on SIGTERM (it exited {code})")
        results["boxes"][node]["stop_s"] = seconds
    load_after = os.getloadavg()
    results["loadavg"] = {"before": load_before, "after": load_after}

    total = sum(s.size for b in boxes for s in b.saved.values())
    print(f"\nfleet: {len(NODES)} boxes x {len(RUNS)} runs x {args.checkpoints} checkpoints, "
          f"{total / 1e6:.0f} MB in all, settle_seconds {args.settle:g}; one moto_server on loopback")  # fmt: skip
    print("\n| box | last save → verified | last save → all copies in the bucket | first save → all copies |"
          " S3 requests | stop (SIGTERM) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for node, b in results["boxes"].items():
        stop = b.get("stop_s", float("nan"))
        print(f"| {node} | {b['last_save_to_verified_s']:.2f} s | {b['last_save_to_mirrored_s']:.2f} s |"
              f" {b['first_save_to_mirrored_s']:.2f} s | {b['requests']} | {stop:.2f} s |")  # fmt: skip
    print(f"\nmirror phase: {results['mirror_phase_requests']} requests, {results['checkpoint_uploads']}"
          f" checkpoint uploads, {results['deletes']} deletes; bucket: {results['keys']} keys"
          f" {results['keys_by_node']}")  # fmt: skip
    fourth_figures = results["fourth_machine"]
    base_list = fourth_figures["boto3 list"]["median_s"]
    base_get = fourth_figures["boto3 list + get index.json"]["median_s"]
    print(f"\nfourth machine (no config, fresh HOME), median of {args.repeats}:\n")
    print("| command | median | runs | requests | × boto3 list | × boto3 list + get |")
    print("|---|---:|---|---:|---:|---:|")
    for name, f in fourth_figures.items():
        runs = ", ".join(f"{t:.2f}" for t in f["runs_s"])
        print(f"| {name} | {f['median_s']:.2f} s | {runs} | {f['requests']:g} | {f['median_s'] / base_list:.2f} |"
              f" {f['median_s'] / base_get:.2f} |")  # fmt: skip
    print(f"\nload average {load_after[0]:.2f} {load_after[1]:.2f} at the end")
    print(f"checks: {check.passed} passed, {len(check.failed)} failed")
    results["checks"] = {"passed": check.passed, "failed": check.failed}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
