"""structlog set-up, once, at start: JSON lines under systemd, a readable console format on a terminal.

Events are short lowercase phrases with fields: `log.info("checkpoint verified", path=..., run=..., seconds=...)`.

One pipeline for everything: ckptd's own events, records from the standard logging module (watchdog,
apscheduler, botocore, urllib3...) and Python warnings (`warnings.warn`) all come out in the same format with
their level, so `journalctl -o cat -u ckptd | jq` never meets a plain-text line. Libraries are heard at
WARNING and above only, unless the level is debug.

- **json** is for machines: every field, absolute paths, floats as computed.
- **console** is for a person: the status right after the event, paths relative to their run (and the run
  relative to the current folder), no empty fields, floats rounded to three significant digits.

When the output stream is the journal (`$JOURNAL_STREAM` names its device and inode), each line starts with its
syslog priority `<N>`, which journald strips and stores as PRIORITY (the units' `SyslogLevelPrefix=yes`), so
`journalctl -p warning` works and what `-o cat` prints is still one JSON object per line. The stream, not
journald's native protocol: no library or socket of ckptd's own, lines stay in order with whatever else the
process writes to it (a crash's traceback), and the same output works without systemd.

File names come from disk and may hold anything: undecodable bytes and control characters in any field are
escaped (`untrusted.printable`), so a name can neither break a line of output nor forge another one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import structlog

from ckptd.untrusted import printable

# Libraries whose INFO and DEBUG records are dropped at their source unless the level is debug (the handler's
# filter drops any other library's too; this only saves formatting what would be thrown away).
_CHATTY = ("watchdog", "apscheduler", "botocore", "boto3", "s3transfer", "urllib3")
_OWN = "ckptd"  # loggers named ckptd or ckptd.* are ckptd's; every other logger is a library's

_VERBATIM = frozenset({"exc_info", "exception", "stack"})  # tracebacks keep their lines

# syslog priorities (sd-daemon(3)); ckptd's levels have no notice (5), alert (1) or emergency (0)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7

_SIGNIFICANT = 3  # digits a float keeps on the console


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(str(k)): _printable(v) for k, v in value.items()}
    return value


def _escape_names(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every string field safe to print (see the module docstring)."""
    return {key: value if key in _VERBATIM else _printable(value) for key, value in event.items()}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: critical 2, error 3, warning 4, info 6, debug 7."""
    for threshold, value in _PRIORITIES:
        if levelno >= threshold:
            return value
    return _DEBUG_PRIORITY


def is_journal(stream: TextIO) -> bool:
    """Whether `stream` writes to journald: its file's device and inode are the ones in $JOURNAL_STREAM.

    systemd sets $JOURNAL_STREAM to `<device>:<inode>` of the stream socket it connects stdout and stderr to.
    The variable alone is not enough: it is inherited by child processes whose output goes elsewhere (a pipe, a
    file), and `StandardOutput=file:` keeps it unset. A stream without a file (a StringIO) is never the journal.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):  # no fileno (io.UnsupportedOperation is both), or no variable
        return False


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """Starts every line of a record with its syslog priority, `<N>`, for journald (SyslogLevelPrefix=)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        # A JSON record is one line; a console record with a traceback is several, each its own journal entry.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class _OwnOrLoud(logging.Filter):
    """Passes ckptd's records, and a library's only at WARNING and above (the root level does the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return record.levelno >= logging.WARNING or name == _OWN or name.startswith(_OWN + ".")


def _round(value: Any) -> Any:
    """`value` with every float in it rounded to _SIGNIFICANT significant digits (integer digits all kept)."""
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return value
        digits = _SIGNIFICANT - 1 - math.floor(math.log10(abs(value)))
        return round(value, digits) if digits > 0 else round(value)
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | tuple | dict | set | frozenset) and not value)


def _inside(path: str, folder: str) -> str | None:
    """`path` relative to `folder` when it lies strictly inside it (by name: nothing on disk is looked at)."""
    folder = folder.rstrip("/")
    if folder and path.startswith(folder + "/") and len(path) > len(folder) + 1:
        return path[len(folder) + 1 :]
    return None


def _cwd() -> str | None:
    """The current folder, when paths relative to it say more than absolute ones (not `/`, as under systemd)."""
    try:
        cwd = str(Path.cwd())
    except OSError:  # deleted under us
        return None
    return cwd if cwd != "/" else None


def _text(value: Any) -> str | None:
    """A path field's text (a str or an os.PathLike of str), else None."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    return text if isinstance(text, str) else None


def _relative(path: str, cwd: str | None) -> str:
    if cwd is None:
        return path
    return "." if path == cwd else _inside(path, cwd) or path


def _for_a_person(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor for the console: no empty fields, rounded floats, paths relative to their run.

    A `path` inside the event's `run` is shown relative to the run; `run`, and a `path` outside it, relative
    to the current folder when below it. `status` leads the fields. Private keys (`_record`...), the event
    and tracebacks pass untouched.
    """
    tidy = {
        key: value if key.startswith("_") or key in _VERBATIM or key == "event" else _round(value)
        for key, value in event.items()
        if key.startswith("_") or key == "event" or not _empty(value)
    }
    cwd = _cwd()
    run, path = _text(tidy.get("run")), _text(tidy.get("path"))
    if path is not None:
        tidy["path"] = (_inside(path, run) if run is not None else None) or _relative(path, cwd)
    if run is not None:
        tidy["run"] = _relative(run, cwd)
    if "status" in tidy:
        tidy = {"status": tidy.pop("status"), **tidy}
    return tidy


def _console_renderer(colors: bool) -> structlog.dev.ConsoleRenderer:
    """structlog's console renderer with `status` as a column right after the event, other fields as logged."""
    renderer = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)
    try:
        columns = renderer.columns  # structlog >= 25.5; on older ones status leads the fields instead
    except AttributeError:  # pragma: no cover - depends on the installed structlog
        return renderer
    default = next(column.formatter for column in columns if column.key == "")
    at = next((i for i, column in enumerate(columns) if column.key == "event"), len(columns) - 1) + 1
    renderer.columns = [*columns[:at], structlog.dev.Column("status", default), *columns[at:]]
    return renderer


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` replacement: a warning is a log event (logger `py.warnings`, level warning).

    What `logging.captureWarnings(True)` does, with the category and source as fields instead of a two-line text.
    A warning shown to an explicit file (a caller of `showwarning(..., file=f)`) still goes to that file.
    """
    if file is not None:
        with contextlib.suppress(OSError):  # as the standard implementation: a broken file loses the warning
            file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    structlog.get_logger("py.warnings").warning(
        f"{category.__name__}: {message}", category=category.__name__, source=f"{filename}:{lineno}"
    )


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog, stdlib logging and Python warnings to `stream` (stderr by default) in `fmt`.

    `fmt` is "console" or "json"; `level` one of debug, info, warning, error. Libraries' records below WARNING
    are dropped unless `level` is debug. Lines start with their syslog priority when `stream` is the journal
    (`is_journal`). Calling it again replaces the previous set-up.
    """
    out = stream or sys.stderr
    journal = is_journal(out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared += [structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info]
    else:
        renderer = _console_renderer(colors=out.isatty())
        shared += [structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False), _for_a_person]
    shared.append(_escape_names)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    formatter = _JournalFormatter if journal else structlog.stdlib.ProcessorFormatter
    handler.setFormatter(
        formatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    debug = level.lower() == "debug"
    if not debug:
        handler.addFilter(_OwnOrLoud())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else max(logging.WARNING, root.level))
    warnings.showwarning = _show_warning


def get(name: str = "ckptd") -> Any:
    """A structlog logger."""
    return structlog.get_logger(name)
