"""DeepSpeed's `engine.save_checkpoint(save_dir, tag)`: `<save_dir>/global_step<N>/` and `<save_dir>/latest`.

What one save writes (DeepSpeed 0.19, in this order): `<tag>/mp_rank_<mp>_model_states.pt` (ZeRO 0 to 2; stage
3: `zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt`), `<tag>/[bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt`
per data-parallel rank (ZeRO 1 and up), zero_to_fp32.py beside the tag folders, then `latest`, holding the
tag, last and by rank 0 only. DeepSpeed never deletes tags.

A tag folder is complete once `latest` names it, or names a later `global_step<M>`, or was written after it.
The run is `save_dir`; `engine.load_checkpoint(save_dir, tag=<tag>)` resumes from one (with tag=None
DeepSpeed reads `latest`). `ckptd latest` prints the tag folder: pass its parent and its name.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptd.layouts import Member, Reader, step_in
from ckptd.metadata import Extracted, extract, scalar

NAME = re.compile(r"^global_step(\d+)$")
LATEST = "latest"
# The optimizer files pickle DeepSpeed's loss scaler, ZeRO stage and fragment addresses (0.19; fp16 dynamic
# scaling pickles DynamicLossScaler): plain classes, listed here so that a fresh DeepSpeed checkpoint is ok.
STATE = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip
_FILES = re.compile(r"(mp_rank_\d+_model_states|_optim_states)\.pt$")


class DeepSpeed:
    """A DeepSpeed tag folder."""

    name = "deepspeed"

    def sidecar_in_state(self, folder: Path) -> bool:
        return False

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        return NAME.match(folder.name) is not None or any(_FILES.search(n) for n in names)

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        latest = folder.parent / LATEST
        try:
            tag = latest.read_text(encoding="utf-8", errors="replace")[:256].strip()
            written = latest.stat().st_mtime_ns
        except OSError:
            return False
        if tag == folder.name:
            return True
        own, named = step_in(folder.name, NAME), step_in(tag, NAME)
        if own is not None and named is not None:
            return named >= own
        newest = max(((folder / n).stat().st_mtime_ns for n in names if (folder / n).is_file()), default=0)
        return written >= newest

    def run_of(self, folder: Path) -> Path:
        return folder.parent

    def member(self, rel: str) -> Member:
        name = rel.rsplit("/", 1)[-1]
        if name.endswith("_model_states.pt"):
            return Member("weights", STATE)
        if name.endswith("_optim_states.pt"):
            return Member("optimizer", STATE)
        if name.endswith(".pt"):
            return Member("state", STATE)
        return Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        """global_steps (and what the client state adds: epoch, metrics) from the first model states file."""
        step = step_in(folder.name, NAME)
        for rel in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            found = read.plain(rel)
            if isinstance(found, dict):
                result = extract(found, folder.name, producer="deepspeed")
                steps = scalar(found.get("global_steps"))
                return Extracted(
                    epoch=result.epoch, global_step=int(steps) if steps is not None else (result.global_step or step),
                    metrics=result.metrics, producer="deepspeed", keys=result.keys, notes=result.notes,
                )  # fmt: skip
        return Extracted(global_step=step, producer="deepspeed")


LAYOUT = DeepSpeed()
