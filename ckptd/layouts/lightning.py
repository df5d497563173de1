"""Lightning's sharded checkpoints (FSDP and ModelParallel strategies): a folder named like a checkpoint file,
`epoch=E-step=S.ckpt/` (and `last.ckpt/`), holding DCP files and `meta.pt`.

Lightning writes the DCP files, `.metadata` (renamed into place), then `meta.pt` (the checkpoint dict without
weights and optimizer states: epoch, global_step, loops, callbacks, hyper-parameters), last, from rank 0. The
folder is complete once both are there. `last.ckpt/` is rewritten in place at every save: settling, and the
identity check after verifying, catch a rewrite. The run is ModelCheckpoint's `dirpath`;
`trainer.fit(model, ckpt_path=<the .ckpt folder>)` resumes. Lightning finds `last` by the suffix `.ckpt`, so a
sidecar `last.ckpt.ckptd.json` beside it is never taken for one.
"""

from __future__ import annotations

from pathlib import Path

from ckptd.layouts import Member, Reader
from ckptd.layouts.dcp import ITEMS, MARKER
from ckptd.metadata import Extracted, extract

META = "meta.pt"


class LightningSharded:
    """A Lightning sharded `.ckpt` folder."""

    name = "lightning_sharded"

    def sidecar_in_state(self, folder: Path) -> bool:
        return False

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        return folder.name.endswith(".ckpt") and (
            MARKER in names or META in names or any(n.endswith(".distcp") for n in names)
        )

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        return MARKER in names and META in names

    def run_of(self, folder: Path) -> Path:
        return folder.parent

    def member(self, rel: str) -> Member:
        if rel == META:
            return Member("record")
        return Member("weights", ITEMS) if rel.endswith(".distcp") else Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        """Epoch, global_step and ModelCheckpoint's score from meta.pt, loaded weights-only."""
        found = read.loaded(META)
        return extract(found if isinstance(found, dict) else {}, folder.name, producer="lightning")


LAYOUT = LightningSharded()
