"""The byte buffers the format readers work on: whole files mapped with mmap, or bytes in tests; and `Sweep`, which
finds the parts of a file (zip records, tensors) that each piece of one sequential read of it holds."""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from typing import Generic, TypeVar

Buffer = bytes | bytearray | memoryview | mmap.mmap

T = TypeVar("T")


class Sweep(Generic[T]):
    """Items laid on a file as byte spans [start, end), met by a read of the file front to back in pieces.

    `overlaps` gives, for each piece in turn, every item whose span it overlaps with the bytes of the overlap, in
    file order: a running checksum or scan fed these sees each item's bytes exactly once, in order, whatever the
    piece size. Spans may overlap one another (a hostile zip's records do); empty spans are never given.
    """

    def __init__(self, spans: Iterable[tuple[int, int, T]]) -> None:
        self._todo = sorted((s for s in spans if s[1] > s[0]), key=lambda s: s[0])
        self._next = 0
        self._open: list[tuple[int, int, T]] = []

    def overlaps(self, at: int, piece: memoryview) -> list[tuple[T, memoryview]]:
        """The items that the piece of the file at offset `at` overlaps, each with its bytes in the piece. The
        pieces must come in file order, each starting where the previous one ended."""
        end = at + len(piece)
        while self._next < len(self._todo) and self._todo[self._next][0] < end:
            self._open.append(self._todo[self._next])
            self._next += 1
        found = [(item, piece[max(start, at) - at : min(stop, end) - at]) for start, stop, item in self._open]
        self._open = [span for span in self._open if span[1] > end]
        return found
