"""accelerate's `Accelerator.save_state`: `<project_dir>/checkpoints/checkpoint_<i>/` with automatic naming.

What one save writes (accelerate 1.x, in this order): the weights (model.safetensors, model_<k>.safetensors;
pytorch_model.bin with safe_serialization off; DCP folders under FSDP), optimizer.bin / optimizer_<k>.bin,
scheduler.bin / scheduler_<k>.bin, sampler.bin or dl_state_dict.bin (some data loaders), scaler.pt (AMP),
random_states_<rank>.pkl, then custom_checkpoint_<k>.pkl for each registered object. There is no completion
marker: a folder is complete once it holds its RNG state and has been still for `settle_seconds`.

`<i>` counts saves, not training steps; the step, if any, is what a registered object records
(`custom_checkpoint_<k>.pkl` holding `step` or `global_step`); `random_states_<rank>.pkl`'s `step` is a
gradient-accumulation counter that restarts every epoch, so it is not used. The run is `project_dir`, the
parent of `checkpoints/`. `accelerator.load_state(<checkpoint_i folder>)` resumes.

`total_limit` lists every entry of `checkpoints/`, sorts them by the first number in their name and rmtrees
the oldest, without ignoring errors: a sidecar file there makes `save_state` crash (NotADirectoryError), one
without a number too (IndexError). So the sidecar of an accelerate checkpoint lives in the state folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptd.layouts import NUMPY_ARRAYS, Member, Reader
from ckptd.metadata import Extracted, extract

NAME = re.compile(r"^checkpoint_(\d+)$")
_STATE_FILES = re.compile(
    r"^(random_states_\d+\.pkl|optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|custom_checkpoint_\d+\.pkl)$"
)
_WEIGHTS = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model(_\d+)?\.bin|pytorch_model_fsdp(_\d+)?\.bin)$")
_CUSTOM = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")


class Accelerate:
    """accelerate's save_state folder."""

    name = "accelerate"

    def sidecar_in_state(self, folder: Path) -> bool:
        return True

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        if NAME.match(folder.name) and folder.parent.name == "checkpoints":
            return True  # automatic naming: known before the first file lands
        return any(n.startswith("random_states_") and n.endswith(".pkl") for n in names) or (
            any(_STATE_FILES.match(n) for n in names) and any(_WEIGHTS.match(n) for n in names)
        )

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        """Its RNG state (written after weights, optimizer and scheduler) is there; settling covers the rest."""
        return any(n.startswith("random_states_") and n.endswith(".pkl") for n in names)

    def run_of(self, folder: Path) -> Path:
        return folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent

    def member(self, rel: str) -> Member:
        name = rel.rsplit("/", 1)[-1]
        if "/" not in rel and _WEIGHTS.match(name):
            return Member("weights")
        if name.startswith("random_states_"):
            return Member("state", NUMPY_ARRAYS)
        if _CUSTOM.match(name):
            return Member("record", NUMPY_ARRAYS)
        if re.match(r"^optimizer(_\d+)?\.(bin|safetensors)$", name):
            return Member("optimizer")
        if name.endswith((".bin", ".pkl", ".pt", ".pth", ".safetensors")):
            return Member("state")
        return Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        """Step, epoch and metrics that a registered object records (custom_checkpoint_<k>.pkl), first one first."""
        for index in range(16):
            found = read.plain(f"custom_checkpoint_{index}.pkl")
            if isinstance(found, dict):
                result = extract(found, folder.name, producer="accelerate")
                if result.global_step is not None or result.epoch is not None or result.metrics:
                    return result
        return Extracted(producer="accelerate")


LAYOUT = Accelerate()
