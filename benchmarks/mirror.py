"""Benchmark: mirroring one checkpoint with ckptd against a plain copy of the same file.

Run as `.venv/bin/python benchmarks/mirror.py [--size-gib 2] [--s3-size-gib 0.5] [--repeats 3]`.

The checkpoint is a torch.save file (64 MiB float32 tensors plus a few small ones), reused from /tmp/ckptd-bench
(benchmarks/verify.py writes the same files) when one of the right size is there, else created once under
/tmp/ckptd-bench-mirror in a subprocess (the parent never imports torch). It is read once first, so every
contender starts from the page cache. Its SHA-256 is computed once, untimed: ckptd takes it from the sidecar.

Local folder (same filesystem, /tmp/ckptd-bench-mirror/dst), each round in alternating order after one untimed
warm-up round, the folder emptied and `sync`ed (untimed) before each run:

- cp: `cp SRC DST` (coreutils; the data may still be in the page cache when it exits);
- cp+sync: `cp SRC DST && sync DST` (the same, durable: what ckptd promises);
- ckptd: `LocalTarget.put_file` = copy_file_range into a temp file, fsync, a second thread reading the temp file
  back and hashing it as it is written, compare with the sidecar's sha256, rename, fsync the folder.

S3 (moto's standalone server, `moto_server`, in its own process on a loopback port):

- boto3: a default `boto3.client("s3").upload_file(...)` with the same TransferConfig ckptd uses
  (64 MiB parts, 4 threads);
- ckptd: `S3Target.put_file` = the same multipart upload with per-part SHA-256 checksums, the parts hashed
  locally alongside, then the composite checksum S3 reports compared with the local one (no read-back).

moto is a Python server (about 25-50 MB/s here), so the S3 size defaults to 0.5 GiB (--s3-size-gib); on loopback
the server's own work (it stores every part, and computes the SHA-256 ckptd asks for) is part of the time.
Reported: the median wall time of each contender, MB/s, the median CPU time (user + system, this process's threads
and the waited-for cp/sh; moto's own CPU is not in it), and each ckptd median's ratio to its baseline's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common import CREATE_CODE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CACHE_DIR = Path("/tmp/ckptd-bench-mirror")
SHARED_CACHE = Path("/tmp/ckptd-bench")  # benchmarks/verify.py's checkpoints, same recipe
TARGET_RATIO = 1.2
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def checkpoint(size_gib: float) -> Path:
    """A torch checkpoint of about `size_gib` GiB: benchmarks/verify.py's if it has one, else made once here."""
    mib = round(size_gib * 1024)
    name = f"checkpoint-{mib}MiB.pt"
    for folder in (SHARED_CACHE, CACHE_DIR):
        if (folder / name).is_file():
            return folder / name
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / name
    big = 64 << 20
    n_big = max(1, (mib << 20) // big)
    print(f"creating {path} ({n_big} x 64 MiB tensors)...", flush=True)
    subprocess.run([PYTHON, "-c", CREATE_CODE, str(path), str(n_big), str(big // 4), "16", "4096"], check=True)
    return path


def sha256_of(path: Path) -> str:
    """Hash the file once (this also puts it in the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(8 << 20):
            digest.update(piece)
    return digest.hexdigest()


def cpu_seconds() -> float:
    """User + system CPU of this process (all its threads) and of its waited-for children (cp, sh)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(action: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    cpu, started = cpu_seconds(), time.perf_counter()
    action()
    return time.perf_counter() - started, cpu_seconds() - cpu


def rounds(
    contenders: dict[str, Callable[[], Any]], prepare: Callable[[], None], repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """One untimed warm-up of each, then `repeats` rounds in alternating order; `prepare` (untimed) before each."""
    names = list(contenders)
    for name in names:
        prepare()
        contenders[name]()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            prepare()
            times[name].append(timed(contenders[name]))
    return times


def local_bench(source: Path, digest: str, repeats: int) -> dict[str, list[tuple[float, float]]]:
    from ckptd.mirrors.local import LocalTarget

    destination = CACHE_DIR / "dst"
    target = LocalTarget("bench", destination)

    def prepare() -> None:
        shutil.rmtree(destination, ignore_errors=True)
        destination.mkdir(parents=True)
        subprocess.run(["sync"], check=True)

    copy = destination / source.name
    return rounds(
        {
            "cp": lambda: subprocess.run(["cp", str(source), str(copy)], check=True),
            "cp+sync": lambda: subprocess.run(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "-", source, copy], check=True),
            "ckptd": lambda: target.put_file(f"runs/exp/{source.name}", source, sha256=digest),
        },
        prepare,
        repeats,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def s3_bench(source: Path, digest: str, repeats: int) -> dict[str, list[tuple[float, float]]]:
    import boto3

    from ckptd.mirrors.s3 import S3Target

    os.environ.update(ENV)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ckptd = S3Target("bench", SimpleNamespace(url="s3://bench/mirror", endpoint_url=endpoint, checksum="sha256"))
        plain = boto3.client("s3", endpoint_url=endpoint)
        plain.create_bucket(Bucket="bench")

        def prepare() -> None:  # moto holds objects in memory: drop the previous copy
            for key in (f"mirror/runs/exp/{source.name}", f"plain/{source.name}"):
                plain.delete_object(Bucket="bench", Key=key)

        return rounds(
            {
                "boto3": lambda: plain.upload_file(str(source), "bench", f"plain/{source.name}", Config=ckptd.transfer),
                "ckptd": lambda: ckptd.put_file(f"runs/exp/{source.name}", source, sha256=digest),
            },
            prepare,
            repeats,
        )
    finally:
        server.terminate()
        server.wait(10)


def report(title: str, size: int, times: dict[str, list[tuple[float, float]]], baseline: str) -> dict[str, Any]:
    medians = {name: statistics.median(wall for wall, _cpu in values) for name, values in times.items()}
    cpus = {name: statistics.median(cpu for _wall, cpu in values) for name, values in times.items()}
    print(f"\n{title}: {size / 2**30:.2f} GiB, {len(next(iter(times.values())))} runs each")
    print(f"  {'':10} {'median s':>9} {'MB/s':>8} {'CPU s':>6}  {'runs (wall s)':<30}")
    for name, values in times.items():
        runs = ", ".join(f"{wall:.2f}" for wall, _cpu in values)
        print(f"  {name:10} {medians[name]:9.2f} {size / 1e6 / medians[name]:8.0f} {cpus[name]:6.2f}  {runs}")
    ratios = {name: medians["ckptd"] / medians[name] for name in medians if name != "ckptd"}
    for name, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        note = f" (the target: {verdict} {TARGET_RATIO}x)" if name == baseline else ""
        print(f"  ckptd / {name}: {ratio:.2f}x{note}")
    return {"size_bytes": size, "medians_s": medians, "cpu_medians_s": cpus, "runs_wall_cpu_s": times, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size for the local folder")
    parser.add_argument("--s3-size-gib", type=float, default=0.5, help="checkpoint size for S3 (moto is slow)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", choices=["local", "s3"], action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    results: dict[str, Any] = {}
    if "local" not in args.skip:
        source = checkpoint(args.size_gib)
        digest = sha256_of(source)
        results["local"] = report("local folder", source.stat().st_size, local_bench(source, digest, args.repeats),
                                  baseline="cp")  # fmt: skip
        shutil.rmtree(CACHE_DIR / "dst", ignore_errors=True)
    if "s3" not in args.skip:
        source = checkpoint(args.s3_size_gib)
        digest = sha256_of(source)
        results["s3"] = report("S3 (moto on loopback)", source.stat().st_size, s3_bench(source, digest, args.repeats),
                               baseline="boto3")  # fmt: skip
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
