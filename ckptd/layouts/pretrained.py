"""Hugging Face `save_pretrained` folders with sharded weights: `model-00001-of-00003.safetensors` ... and
`model.safetensors.index.json` (or `pytorch_model-0000k-of-0000n.bin` and `pytorch_model.bin.index.json`).

save_pretrained writes every shard, then the index: the folder is complete once the index names shards that
are all there. A shard is never a checkpoint of its own, whatever order its files arrive in: a folder holding
a shard-named file is claimed (in progress) before the index exists. A folder that holds other folder
checkpoints (a Trainer's output_dir after its final `save_model`) is a run, never one checkpoint.
`from_pretrained(<folder>)` loads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptd.formats.safetensors import SafetensorsError, parse_index
from ckptd.layouts import Member, Reader, holds_units
from ckptd.metadata import Extracted

SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
INDEX = re.compile(r"\.(safetensors|bin)\.index\.json$")


class Pretrained:
    """A sharded save_pretrained folder."""

    name = "pretrained"

    def sidecar_in_state(self, folder: Path) -> bool:
        return False

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        if not any(INDEX.search(n) or SHARD.search(n) for n in names):
            return False
        return not holds_units(folder, names)

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        indexes = [n for n in names if INDEX.search(n)]
        if not indexes:
            return False
        for index in indexes:
            try:
                shards = set(parse_index(folder / index).values())
            except SafetensorsError:
                return False
            if not shards <= names:
                return False
        return True

    def run_of(self, folder: Path) -> Path:
        return folder.parent

    def member(self, rel: str) -> Member:
        name = rel.rsplit("/", 1)[-1]
        if SHARD.search(name) or name in ("model.safetensors", "pytorch_model.bin"):
            return Member("weights")
        if name.endswith((".bin", ".pt", ".pth", ".safetensors")):
            return Member("state")
        return Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        return Extracted(producer="huggingface")


LAYOUT = Pretrained()
