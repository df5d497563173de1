"""Benchmark: `ckptd verify` against one read of the file (the floor) and against a naive load-then-hash.

Run as `.venv/bin/python benchmarks/verify.py [--size-gib 2] [--second-gib 0.5] [--repeats 5] [--trainer-folder]`.

With `--trainer-folder` the checkpoint is a Hugging Face Trainer `checkpoint-<step>/` folder of that size instead
(model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json): the floor reads every file
once, ckptd checks each member like a checkpoint of its own kind, and naive loads each `.pt`/`.safetensors`.

For each size, a torch checkpoint written by `torch.save` (a dict of 64 MiB float32 tensors, a few small ones,
an epoch and a global_step) is created once under /tmp/ckptd-bench and read once so that it is in the page
cache. Three commands then run as subprocesses, in alternating order, `--repeats` times after one untimed
warm-up round:

- floor: `python -c "import torch, hashlib; <hash the file once in 8 MiB chunks>"`;
- ckptd: `ckptd verify FILE --json` (its status must be ok);
- naive: `python -c "import torch, hashlib; torch.load(FILE, weights_only=True, map_location='cpu'); <hash>"`.

Each run's wall time is measured from start to exit, and a sampling thread reads RssAnon and RssFile from
/proc/<pid>/status for the process and all its descendants every ~5 ms. The table reports the median wall
time and its ratio to the floor's median measured in the same run, the median CPU time (user + system, from
getrusage of the waited-for children) and its ratio, the highest peak anonymous memory over the runs (the
target) and the highest peak total resident memory (anonymous + file-backed pages, which include mmap'd
checkpoint pages that live in the page cache anyway). The load average before and after each size is printed
too: on a shared machine it says how much the other tenants took.

The parent process never imports torch: the checkpoint is created in a subprocess too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import CREATE_CODE, process_tree

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CKPTD = str(VENV_BIN / "ckptd")
CACHE_DIR = Path("/tmp/ckptd-bench")

BIG_TENSOR = 64 << 20  # bytes per big tensor
SMALL_TENSORS = 16  # 4096-element float32 tensors (biases, norms)
SMALL_ELEMENTS = 4096
SAMPLE_INTERVAL = 0.005
TARGET_RATIO = 1.15
TARGET_ANON_MB = 400

# `files`: the checkpoint, or every file of a folder checkpoint, sorted. The floor reads each once.
FILES_SNIPPET = (
    "import os, sys\n"
    "root = sys.argv[1]\n"
    "files = sorted(os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns) if os.path.isdir(root) else [root]\n"
)
HASH_SNIPPET = (
    "for path in files:\n"
    "    h = hashlib.sha256()\n"
    "    with open(path, 'rb') as f:\n"
    "        while chunk := f.read(8 << 20):\n"
    "            h.update(chunk)\n"
    "    print(h.hexdigest())\n"
)
FLOOR_CODE = "import torch, hashlib\n" + FILES_SNIPPET + HASH_SNIPPET
NAIVE_CODE = (
    "import torch, hashlib\n"
    "from safetensors.torch import load_file\n" + FILES_SNIPPET + "for path in files:\n"
    "    if path.endswith('.safetensors'):\n"
    "        load_file(path)\n"
    "    elif path.endswith(('.pt', '.pth', '.bin')):\n"
    "        torch.load(path, weights_only=True, map_location='cpu')\n" + HASH_SNIPPET
)
# A Hugging Face Trainer `checkpoint-<step>/` (argv: folder total_bytes): the weights as safetensors (a third),
# AdamW's two moments in optimizer.pt (two thirds), scheduler.pt, rng_state.pth, trainer_state.json written last.
CREATE_FOLDER_CODE = """
import json, os, shutil, sys, torch
from safetensors.torch import save_file
folder, total = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
n = max(1, total // 3 // (64 << 20))
weights = {f"layers.{i}.weight": torch.randn(16 << 20).view(-1, 4096) for i in range(n)}
tmp = folder + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
save_file(weights, os.path.join(tmp, "model.safetensors"))
moments = {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)}
           for i, w in enumerate(weights.values())}
torch.save({"state": moments, "param_groups": [{"lr": 1e-4, "params": list(range(n))}]},
           os.path.join(tmp, "optimizer.pt"))
torch.save({"last_epoch": 100, "_step_count": 101}, os.path.join(tmp, "scheduler.pt"))
torch.save({"python": 1, "cpu": torch.get_rng_state()}, os.path.join(tmp, "rng_state.pth"))
with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
    json.dump({"global_step": 100, "epoch": 1.0, "log_history": [{"step": 100, "eval_loss": 0.5}]}, f)
os.replace(tmp, folder)
"""

# ---------------------------------------------------------------------------------------------- checkpoint


def _expected_payload(size_gib: float) -> tuple[int, int]:
    n_big = max(1, round(size_gib * (1 << 30) / BIG_TENSOR))
    payload = n_big * BIG_TENSOR + SMALL_TENSORS * SMALL_ELEMENTS * 4
    return n_big, payload


def _cache(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def ensure_folder(size_gib: float) -> Path:
    """Create the Trainer-like checkpoint folder once (reused while it exists); read it into the cache."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    folder = CACHE_DIR / f"hf-{round(size_gib * 1024)}MiB" / "checkpoint-100"
    if not (folder / "trainer_state.json").exists():
        print(f"creating {folder} ...", flush=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([PYTHON, "-c", CREATE_FOLDER_CODE, str(folder), str(int(size_gib * (1 << 30)))], check=True)
    _cache(sorted(p for p in folder.iterdir()))
    return folder


def ensure_checkpoint(size_gib: float) -> Path:
    """Create the checkpoint once; reuse it when it exists with the right size. Then read it into the cache."""
    n_big, payload = _expected_payload(size_gib)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"checkpoint-{n_big * BIG_TENSOR >> 20}MiB.pt"
    # torch.save adds zip headers and a small pickle: a few hundred KiB at most beyond the tensor bytes.
    size = path.stat().st_size if path.exists() else -1
    if not payload <= size < payload + (4 << 20):
        print(f"creating {path} ({n_big} x 64 MiB float32 tensors + {SMALL_TENSORS} small ones) ...", flush=True)
        started = time.monotonic()
        args = [str(path), str(n_big), str(BIG_TENSOR // 4), str(SMALL_TENSORS), str(SMALL_ELEMENTS)]
        subprocess.run([PYTHON, "-c", CREATE_CODE, *args], check=True)
        print(f"  created in {time.monotonic() - started:.1f} s", flush=True)
    _cache([path])
    return path


# ---------------------------------------------------------------------------------------------- memory sampling


def _rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of one process in KiB; zeros once it has gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return anon, file


@dataclass
class Sampler:
    """Samples a process tree's anonymous and total resident memory every ~5 ms; keeps the maxima."""

    pid: int
    peak_anon_kib: int = 0
    peak_total_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            anon = total = 0
            for p in process_tree(self.pid):
                a, f = _rss_kib(p)
                anon += a
                total += a + f
            self.peak_anon_kib = max(self.peak_anon_kib, anon)
            self.peak_total_kib = max(self.peak_total_kib, total)
            self.samples += 1
            self._stop.wait(SAMPLE_INTERVAL)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_anon_mb: float
    peak_total_mb: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def commands(path: Path) -> dict[str, list[str]]:
    return {
        "floor": [PYTHON, "-c", FLOOR_CODE, str(path)],
        "ckptd": [CKPTD, "verify", str(path), "--json"],
        "naive": [PYTHON, "-c", NAIVE_CODE, str(path)],
    }


def run_once(name: str, argv: list[str]) -> Run:
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    cpu_seconds = _children_cpu() - cpu_before
    sampler.stop()
    if name == "ckptd":
        try:
            statuses = [r["status"] for r in json.loads(out)]
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"ckptd verify printed unreadable JSON ({exc}):\n{out}\n{err}") from exc
        if proc.returncode != 0 or statuses != ["ok"]:
            raise SystemExit(f"ckptd verify did not report ok (rc={proc.returncode}, {statuses}):\n{err}")
    elif proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc={proc.returncode}):\n{err}")
    return Run(seconds, cpu_seconds, sampler.peak_anon_kib * 1024 / 1e6, sampler.peak_total_kib * 1024 / 1e6)


def bench(path: Path, repeats: int) -> dict[str, list[Run]]:
    cmds = commands(path)
    names = list(cmds)
    print(f"warm-up round on {path.name} ...", flush=True)
    for name in names:
        run_once(name, cmds[name])
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            r = run_once(name, cmds[name])
            runs[name].append(r)
            print(
                f"  [{i + 1}/{repeats}] {name:5s} {r.seconds:6.2f} s  cpu {r.cpu_seconds:6.2f} s"
                f"  anon {r.peak_anon_mb:7.0f} MB  rss {r.peak_total_mb:7.0f} MB",
                flush=True,
            )
    return runs


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def table(size_label: str, size_bytes: int, runs: dict[str, list[Run]], load: str) -> str:
    floor = statistics.median(r.seconds for r in runs["floor"])
    floor_cpu = statistics.median(r.cpu_seconds for r in runs["floor"])
    lines = [
        f"Checkpoint: {size_label} ({size_bytes / (1 << 30):.2f} GiB, {size_bytes:,} bytes), "
        f"{len(runs['floor'])} timed runs each; load average (1, 5, 15 min) {load}",
        "",
        "| command | median wall s | min–max s | × floor | median CPU s | × floor | peak anon MB | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        secs = [r.seconds for r in rs]
        med = statistics.median(secs)
        cpu = statistics.median(r.cpu_seconds for r in rs)
        lines.append(
            f"| {name} | {med:.2f} | {min(secs):.2f}–{max(secs):.2f} | {med / floor:.2f} | "
            f"{cpu:.2f} | {cpu / floor_cpu:.2f} | "
            f"{max(r.peak_anon_mb for r in rs):.0f} | {max(r.peak_total_mb for r in rs):.0f} |"
        )
    ckptd_med = statistics.median(r.seconds for r in runs["ckptd"])
    ckptd_anon = max(r.peak_anon_mb for r in runs["ckptd"])
    ratio_ok = ckptd_med / floor <= TARGET_RATIO
    mem_ok = ckptd_anon < TARGET_ANON_MB
    lines += [
        "",
        f"Targets: ckptd ≤ {TARGET_RATIO}× floor: {'met' if ratio_ok else 'MISSED'} ({ckptd_med / floor:.2f}×); "
        f"ckptd peak anonymous memory < {TARGET_ANON_MB} MB: {'met' if mem_ok else 'MISSED'} ({ckptd_anon:.0f} MB)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    parser.add_argument(
        "--second-gib",
        type=float,
        default=0.5,
        help="a second size, to show memory does not grow with size (default 0.5; 0 skips it)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command and size (default 5)")
    parser.add_argument(
        "--trainer-folder", action="store_true", help="verify a Trainer checkpoint-<step>/ folder instead of one file"
    )
    args = parser.parse_args()
    if not Path(CKPTD).exists():
        raise SystemExit(f"{CKPTD} not found: run `make` (or install the package into .venv) first")

    sizes = [args.size_gib] + ([args.second_gib] if args.second_gib > 0 else [])
    reports = []
    for size in sizes:
        path = ensure_folder(size) if args.trainer_folder else ensure_checkpoint(size)
        load_before = loadavg()
        runs = bench(path, args.repeats)
        load = f"{load_before} before, {loadavg()} after"
        total = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
        reports.append(table(f"{size:g} GiB target{' folder' if path.is_dir() else ''}", total, runs, load))

    print()
    print(f"Machine: {machine()}")
    print(f"Command: {Path(sys.executable).name} benchmarks/verify.py " + " ".join(sys.argv[1:]))
    for report in reports:
        print()
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
