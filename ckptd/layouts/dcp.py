"""torch.distributed.checkpoint folders, as torchtitan and plain DCP loops write them: `<folder>/step-<N>/`.

DCP writes `__<rank>_<n>.distcp` data files, then `.metadata` as `.metadata.tmp` renamed into place: the
folder is complete once `.metadata` is there. torchtitan names its folders `step-<N>` and purges them with
`keep_latest_k` by matching `step-(\\d+)` anywhere in every name of the folder, with no check that the entry is
a checkpoint: a sidecar named `step-40.ckptd.json` beside `step-40/` would take a keep slot (and under async
save get the only complete checkpoint deleted). So the sidecar of a folder whose name holds `step-<N>` lives in
the state folder. `dcp.load(state, checkpoint_id=<folder>)` resumes; torchtitan takes `--checkpoint.load_step N`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptd.layouts import Member, Reader, step_in
from ckptd.metadata import Extracted

MARKER = ".metadata"
TORCHTITAN = re.compile(r"step-(\d+)")  # torchtitan's own pattern, unanchored as it uses it
# DCP items are torch.save blobs; non-tensor state (a data loader's position, say) is often an io.BytesIO.
ITEMS = frozenset({"_io.BytesIO"})


class Dcp:
    """A torch.distributed.checkpoint folder."""

    name = "dcp"

    def sidecar_in_state(self, folder: Path) -> bool:
        """Where torchtitan's purge would see it: a folder whose name holds `step-<N>`."""
        return TORCHTITAN.search(folder.name) is not None

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        if MARKER in names:
            return True
        return TORCHTITAN.search(folder.name) is not None and any(n.endswith(".distcp") for n in names)

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        return MARKER in names

    def run_of(self, folder: Path) -> Path:
        return folder.parent

    def member(self, rel: str) -> Member:
        return Member("weights", ITEMS) if rel.endswith(".distcp") else Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        """The step a torchtitan folder name carries; the items' own step and epoch are read with the items."""
        return Extracted(global_step=step_in(folder.name, TORCHTITAN), producer="dcp")


LAYOUT = Dcp()
