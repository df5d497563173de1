"""A pytest plugin (registered in conftest.py): real trainers' checkpoint folders, written once per session.

The scripts in tests/trainers/ run transformers, accelerate, torch.distributed.checkpoint (torchtitan's layout),
DeepSpeed and nshtrainer for real, on CPU, with tiny models built from configs (see tests/trainers/README.md). The
session fixture `trainer_outputs` runs each once, two at a time (the machine has two cores), into a read-only
session folder; a test that changes one copies it first with `copy_output`.

Lightning's sharded `.ckpt/` folder is the one output not written by its trainer here: Lightning writes it only
under its FSDP or ModelParallel strategies, which need several processes on GPUs. `lightning_sharded` writes it
with Lightning's own code for that strategy (`_distributed_checkpoint_save`, then the checkpoint's other keys as
`meta.pt`, as `FSDPStrategy.save_checkpoint` does) from a real Lightning training's checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TRAINERS = Path(__file__).resolve().parent / "trainers"
TRAINER_TIMEOUT = 300  # seconds; one run takes 3 to 4 s here, most of it imports


def run_trainer(script: str, *args: object, check: bool = True, timeout: float = TRAINER_TIMEOUT) -> dict[str, Any]:
    """Run tests/trainers/<script>.py with `args`; return its JSON line (with `returncode` and `stderr` added).

    `check`: fail the test with the trainer's stderr when it exits non-zero.
    """
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(TRAINERS / f"{script}.py"), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip
    if check and done.returncode != 0:
        pytest.fail(f"{script} {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    result.update(returncode=done.returncode, stderr=done.stderr[-4000:])
    return result


@dataclass(frozen=True)
class Output:
    """One trainer's output: the folder it wrote into and its JSON report."""

    root: Path
    report: dict[str, Any]


# name -> (script, arguments with {dir} for the output folder, expected exit status)
_RUNS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "hf": ("hf_trainer", ("--output-dir", "{dir}", "--max-steps", "4", "--save-steps", "2", "--load-best"), 0),
    "hf_sharded": ("hf_trainer", ("--output-dir", "{dir}", "--max-steps", "2", "--save-steps", "2",
                                  "--max-shard-size", "40KB"), 0),
    "hf_crashed": ("hf_trainer", ("--output-dir", "{dir}", "--max-steps", "2", "--save-steps", "2",
                                  "--crash-in-save", "2"), 17),
    "pretrained": ("save_pretrained", ("--out", "{dir}", "--max-shard-size", "40KB"), 0),
    "pretrained_bin": ("save_pretrained", ("--out", "{dir}", "--max-shard-size", "40KB", "--bin"), 0),
    "accelerate": ("accelerate_state", ("--project-dir", "{dir}", "--saves", "2"), 0),
    "dcp": ("dcp_steps", ("--folder", "{dir}", "--steps", "4", "--save-every", "2"), 0),
    "dcp_crashed": ("dcp_steps", ("--folder", "{dir}", "--steps", "2", "--save-every", "2", "--crash-in-save", "2"),
                    17),
    "deepspeed": ("deepspeed_engine", ("--save-dir", "{dir}", "--steps", "4", "--save-every", "2"), 0),
    "nshtrainer": ("nshtrainer_run", ("--root", "{dir}", "--epochs", "3", "--lr", "0.3"), 0),
}  # fmt: skip


def _run_one(base: Path, name: str) -> Output:
    script, args, status = _RUNS[name]
    folder = base / name
    report = run_trainer(script, *(a.format(dir=folder) for a in args), check=False)
    if report["returncode"] != status:
        raise AssertionError(f"{script} exited {report['returncode']}, not {status}:\n{report['stderr']}")
    return Output(folder, report)


def lightning_sharded(folder: Path) -> Path:
    """A Lightning sharded checkpoint `epoch=E-step=S.ckpt/`, written with Lightning's FSDP save code from the
    checkpoint of a real Lightning training (see the module docstring for why not by FSDP itself)."""
    import torch
    from checkpoints import lightning_run
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    trained = folder / "trained"
    full = [p for p in lightning_run(trained, max_epochs=2, save_top_k=-1) if p.name != "last.ckpt"][-1]
    checkpoint = torch.load(full, weights_only=False)  # our own file, just written by Lightning
    target = folder / Path(full).name
    target.mkdir()
    state = {"model": checkpoint.pop("state_dict"), "optimizer_states": checkpoint.pop("optimizer_states")}
    _distributed_checkpoint_save(state, target)
    torch.save(checkpoint, target / "meta.pt")
    shutil.rmtree(trained)
    return target


@pytest.fixture(scope="session")
def trainer_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Output]:
    """Every trainer's output, by name (see _RUNS), plus `lightning_sharded`. Read-only: copy before changing."""
    base = tmp_path_factory.mktemp("trainers")
    with ThreadPoolExecutor(2) as pool:
        outputs = dict(zip(_RUNS, pool.map(lambda name: _run_one(base, name), _RUNS), strict=True))
    sharded = base / "lightning_sharded"
    sharded.mkdir()
    outputs["lightning_sharded"] = Output(sharded, {"checkpoint": str(lightning_sharded(sharded))})
    return outputs


CopyOutput = Callable[[str], Output]


@pytest.fixture
def copy_output(trainer_outputs: dict[str, Output], tmp_path: Path) -> CopyOutput:
    """copy_output(name): a private copy of a trainer's output under tmp_path, links kept as links."""

    def copy(name: str) -> Output:
        original = trainer_outputs[name]
        target = tmp_path / "copies" / name
        shutil.copytree(original.root, target, symlinks=True)
        return Output(target, original.report)

    return copy
