"""Waiting until a checkpoint is completely written. Pure bookkeeping: the clock and stat are passed in.

A checkpoint becomes due once it is complete: its writer closed it or renamed it into place (or the
folder is polled, or it was found by a scan, where no such signal exists), and in every case its size and
mtime have held still for `settle_seconds`. A change seen meanwhile restarts the wait. A file written to
after its last close waits for the next close; should that never come (a writer using mmap, a stray
attribute change), it is taken once it has been still for `UNCLOSED_GRACE` seconds.

A folder checkpoint has no close of its own: it is complete when its layout says the trainer finished it
(`trainer_state.json` written, DeepSpeed's `latest` naming it...), asked again at each look, and it waits for
that however long it takes. A save that crashed half-way is never taken: it is the trainer's to clean up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckptd.discover import Candidate
from ckptd.model import Identity

UNCLOSED_GRACE = 30.0
UNFINISHED_LOOK = 1.0  # seconds between looks at a still folder that is not complete (a crashed save may stay)


@dataclass
class _Waiting:
    candidate: Candidate
    watch: str
    settle: float
    closed: bool
    identity: Identity | None
    stable_since: float
    next_look: float = 0.0


class SettleTracker:
    """Checkpoints waiting to be verified, keyed by path."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, path: str) -> bool:
        return path in self._waiting

    def touch(self, candidate: Candidate, *, watch: str, settle: float, closed: bool, now: float) -> None:
        """Note an event on `candidate`: written to (closed=False), or closed/renamed into place (closed=True).

        A later write after a close makes it wait for the next close again.
        """
        key = str(candidate.path)
        entry = self._waiting.get(key)
        if entry is None:
            self._waiting[key] = _Waiting(candidate, watch, settle, closed, None, now)
        else:
            entry.candidate, entry.closed, entry.stable_since, entry.next_look = candidate, closed, now, 0.0

    def forget(self, path: str) -> None:
        """Stop waiting for `path` (it was deleted)."""
        self._waiting.pop(path, None)

    def forget_watch(self, watch: str) -> None:
        """Stop waiting for every checkpoint of `watch` (another daemon owns its folder now)."""
        for key in [k for k, w in self._waiting.items() if w.watch == watch]:
            del self._waiting[key]

    def due(
        self,
        now: float,
        identity_of: Callable[[Candidate], Identity | None],
        limit: int | None = None,
        complete: Callable[[Candidate], bool] = lambda _candidate: True,
    ) -> list[tuple[str, Candidate]]:
        """Remove and return the (watch, candidate) pairs that are complete and have settled, at most `limit`
        (the others stay, still due at the next call).

        `identity_of` stats a candidate; None means it vanished, which drops it. `complete` tells whether a
        folder checkpoint is finished; it is asked only once the folder has held still.
        """
        ready: list[tuple[str, Candidate]] = []
        for key, entry in list(self._waiting.items()):
            if limit is not None and len(ready) >= limit:
                break
            if now < entry.next_look:
                continue
            current = identity_of(entry.candidate)
            if current is None:
                del self._waiting[key]
                continue
            if current != entry.identity:
                entry.identity, entry.stable_since = current, now
            still = now - entry.stable_since
            if still < entry.settle:
                continue
            if entry.candidate.kind == "directory":
                finished = complete(entry.candidate)
            else:
                finished = entry.closed or still >= max(UNCLOSED_GRACE, entry.settle)
            if finished:
                ready.append((entry.watch, entry.candidate))
                del self._waiting[key]
            else:
                entry.next_look = now + UNFINISHED_LOOK if entry.candidate.kind == "directory" else 0.0
        return ready
