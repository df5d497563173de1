"""watchdog observers -> a queue of file-system events, one observer per watched folder.

Event handlers only put `Change`s on a queue; the daemon's main loop decides what they mean. The inotify
observer is the default; `poll = true` (or an exhausted inotify watch limit) uses watchdog's polling
observer. The only watchdog import.
"""

from __future__ import annotations

import errno
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ckptd import log


def _native_observer() -> Any:
    """The platform's observer; on Linux one that reports a file renamed in from outside the watched folder
    as a move, not as a bare creation.

    Fix: watchdog's default inotify emitter turns an unmatched IN_MOVED_TO into FileCreatedEvent, which
    reads as "written, wait for a close" -- a close that never comes for a rename, so such checkpoints
    (every Lightning checkpoint: fsspec writes a temp file in $TMPDIR and moves it in) waited
    UNCLOSED_GRACE (30 s) instead of settle_seconds. With full events it is FileMovedEvent("", dest).
    """
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return Observer()
    return InotifyObserver(generate_full_events=True)


ChangeKind = Literal["created", "written", "complete", "deleted", "new_folder"]
WATCH_LIMIT_SYSCTL = "fs.inotify.max_user_watches"


@dataclass(frozen=True)
class Change:
    """Something happened at `path` in the watch called `watch`.

    created: a new file (or one that was there before its folder's watch), data may follow;
    written: data went in, more may follow; complete: closed after writing or renamed into place;
    deleted: gone (or renamed away); new_folder: a folder appeared, whose contents may predate its watch.
    """

    watch: str
    kind: ChangeKind
    path: Path


_WANTED = [
    FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent,
    DirDeletedEvent, DirMovedEvent, DirCreatedEvent,
]  # fmt: skip


class _Handler(FileSystemEventHandler):
    def __init__(self, watch: str, sink: queue.Queue[Change]) -> None:
        self._watch, self._sink = watch, sink

    def _put(self, kind: ChangeKind, path: str | bytes) -> None:
        self._sink.put(Change(self._watch, kind, Path(path.decode() if isinstance(path, bytes) else path)))

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):
            self._put("complete", event.src_path)
        elif isinstance(event, FileCreatedEvent):
            # Its own kind (it was "written"): watchdog also reports files that predate a new folder's watch
            # as created, with no close to follow; the daemon must not let that undo a close it knows of.
            self._put("created", event.src_path)
        elif isinstance(event, FileModifiedEvent):
            self._put("written", event.src_path)
        elif isinstance(event, FileMovedEvent):
            # With full events an unmatched move has an empty side: "" -> dest was renamed in from outside
            # the watched folder (Lightning/fsspec write to a temp file in /tmp, then move it into place).
            if event.src_path:
                self._put("deleted", event.src_path)
            if event.dest_path:
                self._put("complete", event.dest_path)
        elif isinstance(event, FileDeletedEvent | DirDeletedEvent):
            self._put("deleted", event.src_path)
        elif isinstance(event, DirMovedEvent):
            if event.src_path:
                self._put("deleted", event.src_path)
            if event.dest_path:
                self._put("new_folder", event.dest_path)
        elif isinstance(event, DirCreatedEvent):
            self._put("new_folder", event.src_path)


class FolderWatcher:
    """Watches one folder recursively; falls back to polling when inotify cannot watch it."""

    def __init__(self, watch: str, path: Path, *, poll: bool, poll_interval: float, sink: queue.Queue[Change]):
        self.watch, self.path, self.poll, self.poll_interval = watch, path, poll, poll_interval
        self._sink = sink
        self._observer: Any = None
        self._log = log.get("ckptd.watch")

    @property
    def polling(self) -> bool:
        """True when this folder is polled rather than watched with inotify."""
        return self.poll

    def start(self) -> None:
        """Start observing. An exhausted inotify watch limit switches this folder to polling, with a log line."""
        try:
            self._observer = self._make(self.poll)
        except OSError as exc:
            if self.poll or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            self._log.warning(
                "inotify limit reached, polling instead",
                watch=self.watch, folder=str(self.path), interval=self.poll_interval, error=str(exc),
                fix=f"raise the limit: sysctl -w {WATCH_LIMIT_SYSCTL}=524288 (and in /etc/sysctl.d/)",
            )  # fmt: skip
            self.poll = True
            self._observer = self._make(True)

    def _make(self, poll: bool) -> Any:
        observer = PollingObserver(timeout=self.poll_interval) if poll else _native_observer()
        # Only the events _Handler uses: without a filter every open and read-only close (each sidecar a rescan
        # reads) also crosses watchdog's threads, which doubled the time of a rescan of 10,000 checkpoints.
        observer.schedule(_Handler(self.watch, self._sink), str(self.path), recursive=True, event_filter=_WANTED)
        observer.daemon = True
        observer.start()
        return observer

    def healthy(self) -> bool:
        """True while the observer thread runs."""
        return self._observer is not None and self._observer.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the observer and wait up to `timeout` seconds for its thread."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
