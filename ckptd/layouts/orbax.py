"""Orbax (JAX) checkpoints: a folder holding `commit_success.txt`. Recognised so that its files are never taken
for checkpoints of their own, and reported `unsupported`: ckptd does not verify them yet."""

from __future__ import annotations

from pathlib import Path

from ckptd.layouts import Member, Reader
from ckptd.metadata import Extracted

MARKER = "commit_success.txt"


class Orbax:
    """An Orbax checkpoint folder."""

    name = "orbax"

    def sidecar_in_state(self, folder: Path) -> bool:
        return False

    def claims(self, folder: Path, names: frozenset[str]) -> bool:
        return MARKER in names

    def complete(self, folder: Path, names: frozenset[str]) -> bool:
        return MARKER in names

    def run_of(self, folder: Path) -> Path:
        return folder.parent

    def member(self, rel: str) -> Member:
        return Member("other")

    def metadata(self, folder: Path, read: Reader) -> Extracted:
        return Extracted(producer="orbax")


LAYOUT = Orbax()
