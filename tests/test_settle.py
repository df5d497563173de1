"""SettleTracker: when a checkpoint counts as completely written, driven by an explicit clock and stat."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.discover import Candidate
from ckptd.model import Identity
from ckptd.settle import UNCLOSED_GRACE, SettleTracker

SETTLE = 2.0


class FakeDisk:
    """The identity function the tracker is given: what `stat` would say of each path, set by the test."""

    def __init__(self) -> None:
        self.files: dict[str, Identity] = {}

    def write(self, candidate: Candidate, size: int, mtime_ns: int = 0, inode: int = 1) -> None:
        """Make `candidate` have this size, mtime and inode."""
        self.files[str(candidate.path)] = Identity(size, mtime_ns or size, inode)

    def delete(self, candidate: Candidate) -> None:
        """Make `candidate` vanish."""
        del self.files[str(candidate.path)]

    def __call__(self, candidate: Candidate) -> Identity | None:
        return self.files.get(str(candidate.path))


def _candidate(name: str = "a.pt") -> Candidate:
    return Candidate(Path("/runs/exp") / name, "file", Path("/runs/exp"))


@pytest.fixture
def disk() -> FakeDisk:
    """An empty fake disk."""
    return FakeDisk()


def _due_paths(tracker: SettleTracker, now: float, disk: FakeDisk) -> list[str]:
    return [str(c.path) for _w, c in tracker.due(now, disk)]


def test_closed_file_is_due_only_after_settle_seconds_of_stillness(disk: FakeDisk) -> None:
    """A closed, unchanging file becomes due once settle_seconds passed since it was first seen still."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=0.0)
    assert _due_paths(tracker, 0.0, disk) == []
    assert _due_paths(tracker, SETTLE - 0.01, disk) == []
    assert "/runs/exp/a.pt" in tracker
    assert tracker.due(SETTLE, disk) == [("runs", ckpt)]
    assert len(tracker) == 0
    assert _due_paths(tracker, SETTLE + 10, disk) == []  # handed out once, then forgotten


def test_change_of_size_or_mtime_restarts_the_wait(disk: FakeDisk) -> None:
    """Each change in size, then in mtime alone, restarts the settle wait from the time it was seen."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=0.0)
    assert _due_paths(tracker, 0.0, disk) == []
    disk.write(ckpt, 200)  # grew
    assert _due_paths(tracker, 1.5, disk) == []
    assert _due_paths(tracker, 3.0, disk) == []  # only 1.5 s still since the growth was seen
    disk.write(ckpt, 200, mtime_ns=999)  # rewritten to the same size
    assert _due_paths(tracker, 3.4, disk) == []
    assert _due_paths(tracker, 3.4 + SETTLE - 0.01, disk) == []
    assert _due_paths(tracker, 3.4 + SETTLE, disk) == [str(ckpt.path)]


def test_new_inode_restarts_the_wait(disk: FakeDisk) -> None:
    """A file replaced by another of the same size and mtime (a rename into place) waits again."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100, inode=1)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=0.0)
    tracker.due(0.0, disk)
    disk.write(ckpt, 100, inode=2)
    assert _due_paths(tracker, 1.9, disk) == []
    assert _due_paths(tracker, 3.8, disk) == []
    assert _due_paths(tracker, 3.9, disk) == [str(ckpt.path)]


def test_another_event_restarts_the_wait(disk: FakeDisk) -> None:
    """A new event on a waiting checkpoint restarts its wait even when stat shows no change yet."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=0.0)
    tracker.due(0.0, disk)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=1.5)
    assert _due_paths(tracker, 2.0, disk) == []
    assert _due_paths(tracker, 3.5, disk) == [str(ckpt.path)]
    assert len(tracker) == 0


def test_not_closed_waits_for_the_unclosed_grace(disk: FakeDisk) -> None:
    """A file written but never closed is due only after UNCLOSED_GRACE seconds of stillness, not settle."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=False, now=0.0)
    assert _due_paths(tracker, 0.0, disk) == []
    assert _due_paths(tracker, SETTLE, disk) == []
    assert _due_paths(tracker, UNCLOSED_GRACE - 0.01, disk) == []
    assert _due_paths(tracker, UNCLOSED_GRACE, disk) == [str(ckpt.path)]


def test_settle_longer_than_grace_still_applies_to_unclosed_files(disk: FakeDisk) -> None:
    """An unclosed file waits for the longer of settle_seconds and UNCLOSED_GRACE."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    settle = UNCLOSED_GRACE + 10
    tracker.touch(ckpt, watch="runs", settle=settle, closed=False, now=0.0)
    tracker.due(0.0, disk)
    assert _due_paths(tracker, UNCLOSED_GRACE, disk) == []
    assert _due_paths(tracker, settle, disk) == [str(ckpt.path)]


def test_close_after_writes_makes_it_due_after_settle(disk: FakeDisk) -> None:
    """Written (not closed), then closed: the close makes it due settle_seconds later, not after the grace."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=False, now=0.0)
    tracker.due(0.0, disk)
    disk.write(ckpt, 200)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=1.0)
    assert _due_paths(tracker, 1.0, disk) == []
    assert _due_paths(tracker, 1.0 + SETTLE, disk) == [str(ckpt.path)]


def test_write_after_close_waits_for_the_next_close(disk: FakeDisk) -> None:
    """A write after a close takes the checkpoint back to waiting for a close (or the grace)."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=0.0)
    tracker.due(0.0, disk)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=False, now=0.5)
    assert _due_paths(tracker, 0.5 + SETTLE + 1, disk) == []
    assert _due_paths(tracker, 0.5 + UNCLOSED_GRACE, disk) == [str(ckpt.path)]


def test_forget_drops_a_waiting_checkpoint(disk: FakeDisk) -> None:
    """forget(path) removes it: it is never due; forgetting an unknown path is harmless."""
    tracker, a, b = SettleTracker(), _candidate("a.pt"), _candidate("b.pt")
    disk.write(a, 1)
    disk.write(b, 2)
    tracker.touch(a, watch="runs", settle=SETTLE, closed=True, now=0.0)
    tracker.touch(b, watch="runs", settle=SETTLE, closed=True, now=0.0)
    tracker.forget(str(a.path))
    tracker.forget("/not/tracked.pt")
    assert str(a.path) not in tracker
    assert len(tracker) == 1
    tracker.due(0.0, disk)
    assert _due_paths(tracker, SETTLE, disk) == [str(b.path)]


def test_vanished_checkpoint_is_dropped(disk: FakeDisk) -> None:
    """When the identity function says a checkpoint is gone, the tracker drops it without returning it."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=SETTLE, closed=True, now=0.0)
    tracker.due(0.0, disk)
    disk.delete(ckpt)
    assert _due_paths(tracker, 1.0, disk) == []
    assert len(tracker) == 0
    disk.write(ckpt, 100)
    assert _due_paths(tracker, 100.0, disk) == []  # not tracked again without a new touch


def test_each_checkpoint_settles_on_its_own_clock_and_watch(disk: FakeDisk) -> None:
    """Checkpoints of different watches, settle times and arrival times become due independently."""
    tracker, a, b = SettleTracker(), _candidate("a.pt"), _candidate("b.pt")
    disk.write(a, 1)
    disk.write(b, 2)
    tracker.touch(a, watch="fast", settle=0.5, closed=True, now=0.0)
    tracker.touch(b, watch="slow", settle=5.0, closed=True, now=0.2)
    tracker.due(0.0, disk)  # both first seen still at t=0
    assert tracker.due(0.5, disk) == [("fast", a)]
    assert tracker.due(4.9, disk) == []
    assert tracker.due(5.0, disk) == [("slow", b)]


def test_zero_settle_closed_file_is_due_on_first_look(disk: FakeDisk) -> None:
    """settle_seconds = 0 and closed: due the first time the tracker looks."""
    tracker, ckpt = SettleTracker(), _candidate()
    disk.write(ckpt, 100)
    tracker.touch(ckpt, watch="runs", settle=0.0, closed=True, now=0.0)
    assert _due_paths(tracker, 0.0, disk) == [str(ckpt.path)]


def test_folder_checkpoint_waits_for_its_layout_to_call_it_complete(disk: FakeDisk) -> None:
    """A still folder checkpoint is handed out only once its layout says the trainer finished it (DeepSpeed's
    `latest` lands after the folder went still), however long past UNCLOSED_GRACE that takes; while it waits it
    is looked at once a second, not at every tick."""
    folder = Candidate(Path("/runs/exp/global_step4"), "directory", Path("/runs/exp"))
    finished = {"yes": False}
    asked: list[float] = []

    def complete(candidate: Candidate) -> bool:
        asked.append(now)
        return finished["yes"]

    tracker = SettleTracker()
    disk.write(folder, 100)
    tracker.touch(folder, watch="runs", settle=SETTLE, closed=True, now=0.0)
    for now in (0.0, SETTLE, SETTLE + 0.1, SETTLE + 0.5, UNCLOSED_GRACE * 3):
        assert tracker.due(now, disk, complete=complete) == []
    assert asked == [SETTLE, UNCLOSED_GRACE * 3]  # not again within the second after an unfinished look
    finished["yes"] = True
    now = UNCLOSED_GRACE * 3 + 0.5
    assert tracker.due(now, disk, complete=complete) == []  # the next look is a second after the last
    now = UNCLOSED_GRACE * 3 + 1.0
    assert tracker.due(now, disk, complete=complete) == [("runs", folder)]
    assert len(tracker) == 0
