"""FolderWatcher on a real folder: real inotify (and watchdog's polling observer) -> Changes on a queue."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.watch import Change, ChangeKind, FolderWatcher

DEADLINE = 10.0


class Recorder:
    """The sink queue plus everything taken from it so far."""

    def __init__(self) -> None:
        self.sink: queue.Queue[Change] = queue.Queue()
        self.seen: list[Change] = []

    def wait_for(self, kind: ChangeKind, path: Path, timeout: float = DEADLINE) -> Change:
        """Return the first Change of `kind` at `path`, reading the queue until it comes or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            for change in self.seen:
                if change.kind == kind and change.path == path:
                    return change
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} change for {path} within {timeout} s; saw {self.seen}")
            try:
                self.seen.append(self.sink.get(timeout=min(left, 0.1)))
            except queue.Empty:
                continue

    def drain(self, quiet: float = 0.3) -> list[Change]:
        """Read until the queue has been empty for `quiet` seconds; return everything seen."""
        while True:
            try:
                self.seen.append(self.sink.get(timeout=quiet))
            except queue.Empty:
                return self.seen

    def kinds_at(self, path: Path) -> list[ChangeKind]:
        """The kinds of every change seen at `path`, in order."""
        return [c.kind for c in self.seen if c.path == path]


WatcherFactory = Callable[..., tuple[FolderWatcher, Recorder]]


@pytest.fixture
def start_watcher(tmp_path: Path) -> Iterator[WatcherFactory]:
    """Start FolderWatchers on folders under tmp_path; all are stopped when the test ends."""
    started: list[FolderWatcher] = []

    def start(folder: Path, *, poll: bool = False, poll_interval: float = 0.2) -> tuple[FolderWatcher, Recorder]:
        folder.mkdir(parents=True, exist_ok=True)
        recorder = Recorder()
        watcher = FolderWatcher("runs", folder, poll=poll, poll_interval=poll_interval, sink=recorder.sink)
        watcher.start()
        started.append(watcher)
        if poll:
            time.sleep(poll_interval * 2)  # the first snapshot must predate the files the test writes
        return watcher, recorder

    yield start
    for watcher in started:
        watcher.stop()


def test_inotify_is_the_default_and_observer_is_healthy(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """Without poll the watcher uses inotify; healthy() is true while it runs and false once stopped."""
    watcher, _ = start_watcher(tmp_path / "w")
    assert watcher.polling is False
    assert watcher.healthy()
    watcher.stop()
    assert not watcher.healthy()


def test_written_and_closed_file_is_complete(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """A file created, written in several writes and closed yields created/written changes, then complete."""
    _, changes = start_watcher(tmp_path / "w")
    target = tmp_path / "w" / "model.pt"
    with open(target, "wb") as handle:
        for _ in range(3):
            handle.write(b"x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        changes.wait_for("written", target)
        assert "complete" not in changes.kinds_at(target)  # not complete while still open
    changes.wait_for("complete", target)
    kinds = changes.kinds_at(target)
    assert kinds[0] == "created"
    assert kinds.index("complete") > kinds.index("written")


def test_rename_into_place_is_complete_for_the_target(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """x.pt.tmp renamed to x.pt: `deleted` for the temp name and `complete` for x.pt."""
    _, changes = start_watcher(tmp_path / "w")
    temp, final = tmp_path / "w" / "x.pt.tmp", tmp_path / "w" / "x.pt"
    temp.write_bytes(b"checkpoint")
    changes.wait_for("complete", temp)
    temp.rename(final)
    changes.wait_for("complete", final)
    changes.wait_for("deleted", temp)
    assert changes.kinds_at(final) == ["complete"]


def test_rename_in_from_outside_the_watched_folder_is_complete(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """A file written elsewhere and moved in (as Lightning's fsspec writer does via /tmp) is `complete`."""
    _, changes = start_watcher(tmp_path / "w")
    outside = tmp_path / "elsewhere" / "last.ckpt"
    outside.parent.mkdir()
    outside.write_bytes(b"checkpoint")
    final = tmp_path / "w" / "last.ckpt"
    outside.rename(final)
    changes.wait_for("complete", final)
    changes.drain()
    assert changes.kinds_at(final) == ["complete"]
    assert not [c for c in changes.seen if c.path == Path()]  # no empty-path changes


def test_rename_out_of_the_watched_folder_is_deleted(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """A file moved out of the watched folder is `deleted`."""
    _, changes = start_watcher(tmp_path / "w")
    inside = tmp_path / "w" / "a.pt"
    inside.write_bytes(b"x")
    changes.wait_for("complete", inside)
    (tmp_path / "elsewhere").mkdir()
    inside.rename(tmp_path / "elsewhere" / "a.pt")
    changes.wait_for("deleted", inside)


def test_deleted_file_is_deleted(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """Unlinking a file yields `deleted` for it."""
    target = tmp_path / "w" / "old.ckpt"
    target.parent.mkdir()
    target.write_bytes(b"x")
    _, changes = start_watcher(tmp_path / "w")
    target.unlink()
    changes.wait_for("deleted", target)


def test_deleted_folder_is_deleted(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """Removing a sub-folder yields `deleted` for the folder."""
    sub = tmp_path / "w" / "run1"
    sub.mkdir(parents=True)
    _, changes = start_watcher(tmp_path / "w")
    sub.rmdir()
    changes.wait_for("deleted", sub)


# watchdog itself may warn that it watched a folder of a `mkdir -p` twice (its own race, harmless).
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_new_folder_and_files_written_before_its_watch(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """mkdir -p a/b/c and an immediate write: `new_folder` for each level, and the file is reported."""
    root = tmp_path / "w"
    _, changes = start_watcher(root)
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "model.pt").write_bytes(b"x" * 1000)
    for folder in (root / "a", root / "a" / "b", deep):
        changes.wait_for("new_folder", folder)
    changes.drain()
    assert {"created", "complete"} & set(changes.kinds_at(deep / "model.pt"))


def test_folder_moved_in_is_a_new_folder(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """A whole run folder moved in from outside is a `new_folder` (its content predates the watch)."""
    _, changes = start_watcher(tmp_path / "w")
    outside = tmp_path / "elsewhere" / "run7"
    outside.mkdir(parents=True)
    (outside / "a.pt").write_bytes(b"x")
    outside.rename(tmp_path / "w" / "run7")
    changes.wait_for("new_folder", tmp_path / "w" / "run7")


def test_recursive_watch_sees_files_in_existing_sub_folders(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """A sub-folder present at start is watched too: a file closed in it is `complete`."""
    sub = tmp_path / "w" / "exp" / "run1"
    sub.mkdir(parents=True)
    _, changes = start_watcher(tmp_path / "w")
    (sub / "epoch=1.ckpt").write_bytes(b"x")
    changes.wait_for("complete", sub / "epoch=1.ckpt")


def test_polling_watcher_sees_a_new_file(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """With poll = true (poll_interval 0.2 s) a new file is reported by the polling observer."""
    watcher, changes = start_watcher(tmp_path / "w", poll=True, poll_interval=0.2)
    assert watcher.polling is True
    assert watcher.healthy()
    target = tmp_path / "w" / "sub" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"x" * 100)
    changes.wait_for("created", target, timeout=5)
    changes.wait_for("new_folder", target.parent, timeout=5)


def test_polling_watcher_sees_growth_and_deletion(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """The polling observer reports a file that grows as written and a removed file as deleted."""
    target = tmp_path / "w" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"x")
    _, changes = start_watcher(tmp_path / "w", poll=True, poll_interval=0.2)
    with open(target, "ab") as handle:
        handle.write(b"y" * 1000)
    changes.wait_for("written", target, timeout=5)
    target.unlink()
    changes.wait_for("deleted", target, timeout=5)


def test_each_change_names_its_watch(start_watcher: WatcherFactory, tmp_path: Path) -> None:
    """Every Change carries the watch name the FolderWatcher was given."""
    _, changes = start_watcher(tmp_path / "w")
    (tmp_path / "w" / "a.pt").write_bytes(b"x")
    changes.wait_for("complete", tmp_path / "w" / "a.pt")
    assert {c.watch for c in changes.seen} == {"runs"}


def test_start_falls_back_to_polling_when_the_inotify_watch_limit_is_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC from inotify (fs.inotify.max_user_watches used up) switches the folder to polling, with a log line
    naming the sysctl. The limit is faked: lowering the real sysctl would hit every process on this shared host."""
    import errno

    from ckptd import log, watch

    def exhausted() -> object:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watch, "_native_observer", exhausted)
    log.configure("json", "info")  # to the captured stderr
    sink: queue.Queue[Change] = queue.Queue()
    watcher = FolderWatcher("runs", tmp_path, poll=False, poll_interval=0.2, sink=sink)
    watcher.start()
    try:
        assert watcher.polling and watcher.healthy()
        logged = capsys.readouterr().err
        assert "inotify limit reached, polling instead" in logged and "fs.inotify.max_user_watches" in logged
        (tmp_path / "a.pt").write_bytes(b"x")
        deadline = time.monotonic() + DEADLINE
        seen: list[Change] = []
        while not any(c.path == tmp_path / "a.pt" for c in seen):
            assert time.monotonic() < deadline, f"the polling fallback saw nothing: {seen}"
            try:
                seen.append(sink.get(timeout=0.1))
            except queue.Empty:
                continue
    finally:
        watcher.stop()
