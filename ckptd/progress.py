"""Progress for a person at a terminal: the file being read, its bytes, the rate and the time left. The one place
rich.progress is used.

The long commands (`verify`, `scan`, `scrub`, `mirror`, `restore`, `export`, `migrate`) open `shown()` and pass
what it gives to the core functions, which never import rich: they take a `Tracker` (or a plain callback of the
bytes just read) and tell it what they read. When stderr is not a terminal, `shown()` gives None and imports
nothing, so a pipe, a log file and the daemon get no progress at all and pay nothing for it.

What is drawn, on stderr, and cleared at the end (the command's own output follows it): one line for the file
being read (its name, shortened at its start when the terminal is narrow, never in the middle), its bar, bytes
done and total, rate and time left; above it, for a command that reads several, the same for the whole job
("2 of 5 checkpoints"). The bytes callbacks run on worker threads (the verifier's hashing thread, boto3's
transfer threads): rich's Progress is thread-safe, and each call is two counter updates under its lock.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import ProgressColumn, Task, TaskID
    from rich.text import Text

Bytes = Callable[[int], None]
"""Told the number of bytes just read (or copied); called from any thread."""

# What the columns after the name take at most: bytes ("1023.9/1024.0 MB"), rate ("1023.9 MB/s"), the time left
# ("10:00:00") and the four spaces between the five columns. On a terminal narrower than _NARROW the rate and the
# time left are left out (their columns are empty). The bar takes what the width allows between its bounds, and the
# name the rest.
_FIXED = 16 + 11 + 8 + 4
_FIXED_NARROW = 16 + 4
_NARROW = 64
_BAR = (8, 30)
_NAME_SPARE = 40  # what the bar leaves to the name before it grows past its least width
_MIN_NAME = 12
_MIN_WITH_ACTION = 16  # the name's room under which the action before it is left out


def _fixed(width: int) -> int:
    return _FIXED if width >= _NARROW else _FIXED_NARROW


def _bar_width(width: int) -> int:
    return max(_BAR[0], min(_BAR[1], width - _fixed(width) - _NAME_SPARE))


def _name_room(width: int) -> int:
    return max(_MIN_NAME, width - _fixed(width) - _bar_width(width) - 1)


class Tracker(Protocol):
    """What a long job tells of its progress. Given only on a terminal: a core function given None skips even
    the stat calls that sizing its work would cost."""

    def plan(self, count: int, size: int, noun: str = "checkpoints") -> None:
        """`count` more items of `size` bytes in all are to be read (called again when more are found)."""
        ...

    def start(self, name: str, size: int, action: str = "") -> Bytes | None:
        """An item of `size` bytes starts (the one before it is done); returns the callback for its bytes."""
        ...


def size_of(path: Path) -> int:
    """The bytes a checkpoint holds: a file's size, or the sum of the regular files in a folder checkpoint (links
    not followed); 0 when it is gone or unreadable. Only ever called for a progress bar."""
    try:
        found = path.lstat()
        if not stat.S_ISDIR(found.st_mode):
            return found.st_size
        total = 0
        for folder, _dirs, names in os.walk(path):
            for name in names:
                with contextlib.suppress(OSError):
                    entry = (Path(folder) / name).lstat()
                    total += entry.st_size if stat.S_ISREG(entry.st_mode) else 0
        return total
    except OSError:
        return 0


@contextlib.contextmanager
def shown(enabled: bool = True) -> Iterator[Tracker | None]:
    """A Tracker drawing on stderr while the block runs, when `enabled` and stderr is a terminal; else None (and
    rich is not imported)."""
    if not enabled or not _is_terminal(sys.stderr):
        yield None
        return
    bars = _Bars()
    with bars.progress:
        try:
            yield bars
        finally:
            bars.finish()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by a test, or closed
        return False


def shorten(name: str, room: int) -> str:
    """`name` in at most `room` terminal cells: whole when it fits, else its end after an ellipsis, since the end
    of a checkpoint's name (its step, its extension) is what tells it from its neighbours."""
    from rich.cells import cell_len

    if cell_len(name) <= room:
        return name
    kept: list[str] = []
    width = 1  # the ellipsis
    for char in reversed(name):
        width += cell_len(char)
        if width > room:
            break
        kept.append(char)
    return "…" + "".join(reversed(kept))


class _Bars:
    """The Tracker on a terminal: a rich Progress with an overall task (once there are several items) and one task
    for the item being read, reset for each."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(stderr=True, highlight=False)
        self.progress: RichProgress = Progress(
            *_columns(console), console=console, transient=True,
            # What the command prints meanwhile goes above the bars; stdout only when it is this terminal too.
            redirect_stdout=_is_terminal(sys.stdout), redirect_stderr=True,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._overall: TaskID | None = None
        self._current: TaskID | None = None
        self._count = 0  # items planned
        self._total = 0  # their bytes
        self._noun = "checkpoints"
        self._started = 0  # items started
        self._open = False  # an item is being read
        self._size = 0  # its planned bytes
        self._generation = 0  # a callback of an item that is over no longer counts

    def plan(self, count: int, size: int, noun: str = "checkpoints") -> None:
        self._count += count
        self._total += size
        self._noun = noun
        if self._overall is None and self._count > 1:
            done = self._done_before()
            self._end_item()
            self._overall = self.progress.add_task(self._describe(), total=self._total, completed=done)
            if self._current is not None:  # below the overall line
                self.progress.remove_task(self._current)
                self._current = None
        elif self._overall is not None:
            self.progress.update(self._overall, total=self._total, description=self._describe())

    def start(self, name: str, size: int, action: str = "") -> Bytes | None:
        self._end_item()
        self._started += 1
        self._open, self._size = True, size
        from ckptd.untrusted import printable

        shown = printable(name)
        if self._current is None:
            self._current = self.progress.add_task(shown, total=size, action=action)
        else:
            self.progress.reset(self._current, total=size, description=shown, action=action)
        self.progress.advance(self._current, 0)  # a sample at the start: the rate is bytes over the whole time
        if self._overall is not None:
            self.progress.update(self._overall, description=self._describe())
        self.progress.refresh()
        with self._lock:
            self._generation += 1
            generation = self._generation
        progress, current, overall = self.progress, self._current, self._overall

        def read(count: int) -> None:
            if generation != self._generation:
                return
            progress.advance(current, count)
            if overall is not None:
                progress.advance(overall, count)

        return read

    def finish(self) -> None:
        """The last item is done (rich draws it once more, complete, before clearing the bars)."""
        self._end_item()

    def _end_item(self) -> None:
        """The item being read is over: its callback stops counting, and the overall total takes the bytes it
        really read in place of those planned (a file skipped, or grown), so the rate and time left stay true."""
        if not self._open or self._current is None:
            return
        with self._lock:
            self._generation += 1
        read = int(self._task(self._current).completed)
        if self._overall is not None:
            self._total += read - self._size
            self.progress.update(self._overall, total=max(self._total, 0))
        self._open, self._size = False, 0

    def _done_before(self) -> int:
        if self._current is None:
            return 0
        return int(self._task(self._current).completed)

    def _describe(self) -> str:
        return f"{min(max(self._started, 1), self._count)} of {self._count} {self._noun}"

    def _task(self, task: TaskID) -> Task:
        return next(t for t in self.progress.tasks if t.id == task)


def _columns(console: Console) -> list[ProgressColumn]:
    """The columns: the item's name (after its action, when there is room) shortened at its start to what the
    terminal leaves, a bar as wide as the terminal allows, bytes, rate and time left (these two not on a terminal
    narrower than _NARROW). Built here, on a terminal
    only: classes of the module would import rich with it."""
    from rich.cells import cell_len
    from rich.progress import BarColumn, DownloadColumn, ProgressColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.text import Text

    class NameColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            room = _name_room(console.width)
            action = str(task.fields.get("action", ""))
            text = Text(no_wrap=True, overflow="crop")
            if action and room - cell_len(action) - 1 >= _MIN_WITH_ACTION:
                text.append(action + " ", style="dim")
                room -= cell_len(action) + 1
            text.append(shorten(task.description, room))
            return text

    class Bar(BarColumn):
        def render(self, task: Task) -> Any:
            self.bar_width = _bar_width(console.width)
            return super().render(task)

    class Rate(TransferSpeedColumn):
        def render(self, task: Task) -> Text:
            return super().render(task) if console.width >= _NARROW else Text()

    class TimeLeft(TimeRemainingColumn):
        def render(self, task: Task) -> Text:
            return super().render(task) if console.width >= _NARROW else Text()

    return [NameColumn(), Bar(), DownloadColumn(), Rate(), TimeLeft()]
