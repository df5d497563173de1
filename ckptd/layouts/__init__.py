"""How trainers lay out one checkpoint: one small protocol, one module per trainer.

A checkpoint is whatever one save of a trainer produced. A single file (`torch.save`, a Lightning `.ckpt`, a
safetensors file) is one; so is a folder that a trainer writes as one save: a Hugging Face Trainer
`checkpoint-<step>/`, an accelerate `save_state` folder, a DeepSpeed `global_step<N>/`, a DCP step folder, a
Lightning sharded `epoch=E-step=S.ckpt/`, a sharded `save_pretrained` folder. A `Layout` recognises such a
folder (by its name or its files, while it is still being written, so that none of its files is ever taken
for a checkpoint of its own), says when the trainer has finished it, which folder is its run, what role each
file plays, which pickle globals are normal in which file, and where the trainer keeps step, epoch and
metrics. Everything here reads names and small files; nothing imports torch.

`detect(folder)` tries the layouts in order; the first that claims the folder wins. tests/test_layouts.py runs
one contract suite against real output of every trainer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from ckptd.metadata import Extracted

Role = Literal["weights", "optimizer", "state", "record", "other"]
"""What a file of a folder checkpoint is: the model's weights (loaded, tensors counted, NaN scanned), an
optimizer's state (what makes the save resumable) or other training state (scheduler, RNG; both: CRCs checked
and pickle scanned), the trainer's own record of the save (read for step, epoch and metrics), or anything else
(hashed)."""

# numpy's RNG state, as torch.get_rng_state-like savers pickle it (HF rng_state.pth, accelerate random_states):
# reconstructing an array calls nothing but numpy's own constructors. numpy < 2 spells the module numpy.core.
NUMPY_ARRAYS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
})  # fmt: skip


@dataclass(frozen=True)
class Member:
    """One file of a folder checkpoint: its role and the pickle globals that are normal in it (beyond torch's
    weights-only allow-list and the user's trusted_globals). Globals that run code are never among them."""

    role: Role
    allowed: frozenset[str] = frozenset()


class Reader(Protocol):
    """Bounded, safe reads of a folder checkpoint's files, for a layout's `metadata` (the verify engine provides
    it; every method returns None when the file is missing, too large or not what it should be)."""

    def json(self, rel: str) -> Any: ...

    def plain(self, rel: str) -> Any:
        """The plain values of a torch file's pickle (see formats.pickles.plain_values)."""
        ...

    def loaded(self, rel: str) -> Any:
        """The object a torch file holds, loaded with weights_only (only when its pickle passed the scan)."""
        ...

    def text(self, rel: str) -> str | None: ...


class Layout(Protocol):
    """One trainer's way of writing a checkpoint as a folder. Every method takes the folder's entries as read
    once (`names`: the names directly inside it) so that a decision never reads the folder twice."""

    name: str

    def sidecar_in_state(self, folder: Path) -> bool:
        """True when a sidecar beside `folder` would trip the trainer's own bookkeeping (accelerate counts every
        entry of its checkpoints folder; torchtitan counts any name holding `step-<N>`): it then goes to the
        state folder instead."""
        ...

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        """True when `folder` is one checkpoint of this layout, complete or still being written."""
        ...

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        """True when the trainer has finished writing it (its last file is in place)."""
        ...

    def run_of(self, folder: Path) -> Path:
        """The run: the folder the trainer writes its checkpoints into."""
        ...

    def member(self, rel: str) -> Member:
        """The role of the file `rel` (a '/'-joined path inside the folder) and its normal pickle globals."""
        ...

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        """Step, epoch and metrics from the trainer's own records, never executing anything."""
        ...


# Hidden names of writers in progress: safetensors writes `.tmpXXXXXX` and renames it, DCP `.metadata.tmp`.
_IN_PROGRESS = re.compile(r"^\.tmp|\.tmp$")


def writing(names: frozenset[str]) -> bool:
    """True while a writer's temp file is in the folder."""
    return any(_IN_PROGRESS.search(n) for n in names)


def entries(folder: Path) -> frozenset[str]:
    """The names directly inside `folder` (empty when it is gone or no folder)."""
    try:
        return frozenset(os.listdir(folder))
    except OSError:
        return frozenset()


def step_in(name: str, pattern: re.Pattern[str]) -> int | None:
    """The step a folder name carries (`checkpoint-40`, `global_step40`, `step-40`), or None."""
    match = pattern.search(name)
    return int(match[1]) if match else None


def layouts() -> Sequence[Layout]:
    """Every layout, in the order `detect` tries them (a trainer's own folder before the formats inside it)."""
    from ckptd.layouts import accelerate, dcp, deepspeed, hf_trainer, lightning, orbax, pretrained

    return (hf_trainer.LAYOUT, accelerate.LAYOUT, deepspeed.LAYOUT, lightning.LAYOUT, dcp.LAYOUT, pretrained.LAYOUT,
            orbax.LAYOUT)  # fmt: skip


def detect(folder: Path, names: frozenset[str] | None = None) -> Layout | None:
    """The layout of the folder checkpoint `folder`, or None when it is no checkpoint (a run folder, say)."""
    found = entries(folder) if names is None else names
    return next((layout for layout in layouts() if layout.claims(folder, found)), None)


def run_of(checkpoint: Path, layout: str | None) -> Path:
    """The run of a checkpoint: for a folder checkpoint its layout's; for a file, the folder holding it (or,
    for nshtrainer's `checkpoint/last/` and `checkpoint/best_<metric>/`, that `checkpoint/` folder)."""
    from ckptd.layouts import nshtrainer

    if layout is not None:
        found = next((each for each in layouts() if each.name == layout), None)
        if found is not None:
            return found.run_of(checkpoint)
    return nshtrainer.run_of_file(checkpoint) or checkpoint.parent


def companions(checkpoint: Path) -> list[str]:
    """Names of a producer's own files beside a file checkpoint that belong to it (nshtrainer's
    `<stem>.metadata.json`): they follow it when it is deleted, quarantined, renamed or mirrored."""
    from ckptd.layouts import nshtrainer

    return nshtrainer.companions(checkpoint)


def holds_units(folder: Path, names: frozenset[str]) -> bool:
    """True when a folder holds folder checkpoints of its own (then it is a run, never a checkpoint itself)."""
    for name in names:
        sub = folder / name
        if not name.startswith(".") and sub.is_dir() and not sub.is_symlink() and detect(sub) is not None:
            return True
    return False
