"""How much of a training job's cached dataset survives ckptd reading a checkpoint beside it (issue 13).

The experiment: a cgroup v1 memory cgroup (`--headroom-gib` above the dataset), a process in it that reads the
dataset twice (as a data loader's epochs would: its pages become hot), then one contender in the same cgroup
reads a cold checkpoint: `sha256sum`, a plain read dropping behind it (posix_fadvise DONTNEED), `ckptd
verify`, a local mirror copy (LocalTarget.put_file) and an S3 upload (S3Target.put_file, to moto's server on
loopback, which runs outside the cgroup). Each ckptd contender runs twice: `new` is the working tree,
`old` the commit given by --base (a `git worktree` of HEAD by default), in the same run. What is measured: the
share of the dataset still resident afterwards (mincore, through /usr/bin/fincore) and the wall time.

Run as root (cgroups, drop_caches):  .venv/bin/python benchmarks/pagecache.py --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CREATE_CODE

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
CGROUP = Path("/sys/fs/cgroup/memory/ckptd-pagecache")
GIB = 1 << 30
DATASET_FILES = 8
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
       "AWS_SHARED_CREDENTIALS_FILE": os.devnull}  # fmt: skip

DONTNEED_READ = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); at = 0
while piece := os.pread(fd, 8 << 20, at):
    os.posix_fadvise(fd, at, len(piece), os.POSIX_FADV_DONTNEED); at += len(piece)
"""
LOCAL_COPY = """
import sys
from pathlib import Path
from ckptd.mirrors.local import LocalTarget
LocalTarget("bench", Path(sys.argv[2])).put_file("run/ckpt.pt", Path(sys.argv[1]), sha256=sys.argv[3])
"""
S3_UPLOAD = """
import sys
from pathlib import Path
from types import SimpleNamespace
from ckptd.mirrors.s3 import S3Target
settings = SimpleNamespace(url="s3://bench/" + sys.argv[2], endpoint_url=sys.argv[4], region="us-east-1",
                           checksum="sha256", proof="auto", timeout=120, attempts=2, max_bandwidth=0)
S3Target("bench", settings).put_file("run/ckpt.pt", Path(sys.argv[1]), sha256=sys.argv[3])
"""
LOADER = """
import sys
for _ in range(2):
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
"""


def in_cgroup(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run `command` inside the cgroup (from /tmp: a checkout's ckptd/ must not shadow PYTHONPATH); wall seconds."""
    wrapped = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *command]
    started = time.monotonic()
    subprocess.run(wrapped, check=True, cwd="/tmp", env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def resident(paths: list[Path]) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *map(str, paths)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return sum(int(line) for line in out.split())


def drop_all_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def prepare(work: Path, dataset_gib: float, checkpoint_gib: float) -> tuple[list[Path], Path]:
    """The dataset's files (random bytes) and the checkpoint (torch.save), made once and reused."""
    work.mkdir(parents=True, exist_ok=True)
    per_file = int(dataset_gib * GIB) // DATASET_FILES
    files = [work / f"dataset-{i}.bin" for i in range(DATASET_FILES)]
    for path in files:
        if not path.exists() or path.stat().st_size != per_file:
            with open(path, "wb") as out:
                for _ in range(per_file // (16 << 20)):
                    out.write(os.urandom(16 << 20))
                out.write(os.urandom(per_file % (16 << 20)))
    big = 16 << 20  # float32 elements: 64 MiB tensors
    n_big = max(1, round(checkpoint_gib * GIB / (4 * big)))
    checkpoint = work / f"checkpoint-{n_big}x64MiB.pt"
    if not checkpoint.exists():
        subprocess.run([str(PYTHON), "-c", CREATE_CODE, str(checkpoint), str(n_big), str(big), "8", "4096"], check=True)
    return files, checkpoint


def baseline(base: Path | None) -> Path:
    """The unmodified ckptd to compare with: --base, else a detached worktree of HEAD (made once)."""
    if base is not None:
        return base
    path = Path("/tmp/ckptd-pagecache-base")
    if not (path / "ckptd").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), "HEAD"], check=True)
    return path


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = 18000 + os.getpid() % 1000
    command = [str(REPO / ".venv" / "bin" / "moto_server"), "-p", str(port)]
    env = {**os.environ, **AWS}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    code = f"import boto3; boto3.client('s3', endpoint_url='{endpoint}').create_bucket(Bucket='bench')"
    for _ in range(100):
        time.sleep(0.1)
        if subprocess.run([str(PYTHON), "-c", code], env={**os.environ, **AWS}, capture_output=True).returncode == 0:
            return server, endpoint
    raise RuntimeError("moto_server did not start")


Command = tuple[list[str], dict[str, str]]


def contenders(checkpoint: Path, work: Path, base: Path, sha: str, endpoint: str) -> dict[str, Command]:
    py = str(PYTHON)
    trees = {"new": str(REPO), "old": str(base)}
    found: dict[str, Command] = {
        "sha256sum": (["sha256sum", str(checkpoint)], {}),
        "read+DONTNEED": ([py, "-c", DONTNEED_READ, str(checkpoint)], {}),
    }
    for tree, root in trees.items():
        env = {"PYTHONPATH": root}
        found[f"verify {tree}"] = ([py, "-m", "ckptd", "verify", str(checkpoint), "--json"], env)
        found[f"local copy {tree}"] = ([py, "-c", LOCAL_COPY, str(checkpoint), str(work / "mirror"), sha], env)
        found[f"S3 upload {tree}"] = ([py, "-c", S3_UPLOAD, str(checkpoint), f"{tree}-{time.time_ns()}", sha, endpoint],
                                      {**env, **AWS})  # fmt: skip
    return found


def trial(name: str, command: list[str], env: dict[str, str], dataset: list[Path], work: Path) -> tuple[float, float]:
    """One run: cold caches, the loader's two epochs in the cgroup, then the contender; (seconds, share kept)."""
    shutil.rmtree(work / "mirror", ignore_errors=True)
    drop_all_caches()
    # Warm the interpreter, torch and ckptd outside the cgroup: their pages are not what is measured.
    subprocess.run([str(PYTHON), "-c", "import torch, boto3, ckptd.verify"], check=True, cwd="/tmp")
    in_cgroup([str(PYTHON), "-c", LOADER, *map(str, dataset)])
    before = resident(dataset)
    seconds = in_cgroup(command, {**os.environ, **env})
    return seconds, resident(dataset) / before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-gib", type=float, default=1.0)
    parser.add_argument("--checkpoint-gib", type=float, default=1.0)
    parser.add_argument("--headroom-gib", type=float, default=0.5, help="the cgroup's limit above the dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ckptd-pagecache"))
    parser.add_argument("--base", type=Path, default=None, help="a checkout of the ckptd to compare with")
    parser.add_argument("--only", nargs="*", default=None, help="contenders to run (names as printed)")
    args = parser.parse_args()
    dataset, checkpoint = prepare(args.work, args.dataset_gib, args.checkpoint_gib)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    CGROUP.mkdir(exist_ok=True)
    limit = int((args.dataset_gib + args.headroom_gib) * GIB)
    (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
    base = baseline(args.base)
    server, endpoint = start_moto()
    load_before = os.getloadavg()
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        runs = contenders(checkpoint, args.work, base, sha, endpoint)
        names = [n for n in runs if args.only is None or n in args.only]
        for round_ in range(args.repeats):
            for name in names if round_ % 2 == 0 else reversed(names):
                command, env = runs[name]
                results.setdefault(name, []).append(trial(name, command, env, dataset, args.work))
                print(f"  {name}: {results[name][-1][0]:.2f} s, {100 * results[name][-1][1]:.1f}% kept", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    load_after = os.getloadavg()
    print(f"\ncheckpoint {checkpoint.stat().st_size:,} bytes, dataset {sum(p.stat().st_size for p in dataset):,} bytes,"
          f" cgroup limit {limit:,} bytes; medians of {args.repeats}; load average {load_before[0]:.2f} before,"
          f" {load_after[0]:.2f} after")  # fmt: skip
    print("| contender | wall s | dataset kept |\n|---|---:|---:|")
    for name in names:
        seconds = statistics.median(r[0] for r in results[name])
        kept = statistics.median(r[1] for r in results[name])
        print(f"| {name} | {seconds:.2f} | {100 * kept:.1f}% |")
    if "verify new" in results and "verify old" in results:
        ratio = statistics.median(r[0] for r in results["verify new"]) / statistics.median(
            r[0] for r in results["verify old"]
        )
        print(f"\nverify time, new / old: {ratio:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
