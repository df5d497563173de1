"""A byte-rate limit (for mirror copies and scrubs), so the training job keeps its disk and network."""

from __future__ import annotations

import threading
import time


class Throttle:
    """Blocks callers so that at most `rate` bytes per second pass on average; rate 0 means no limit."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        """Account for `nbytes` just moved; sleep as long as the limit requires."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + nbytes / self.rate
            delay = self._next - now
        if delay > 0:
            time.sleep(delay)
