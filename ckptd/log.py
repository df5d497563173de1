"""structlog set-up, once, at start: JSON lines under systemd, a readable console format on a terminal.

Records from the standard logging module (watchdog, apscheduler, boto3) pass through the same pipeline, so
journalctl shows one format. Events are short lowercase phrases with fields:
`log.info("checkpoint verified", path=..., run=..., seconds=...)`.

File names come from disk and may hold anything: undecodable bytes and control characters in any field are
escaped (`untrusted.printable`), so a name can neither break a line of output nor forge another one.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from ckptd.untrusted import printable

_CHATTY = {"watchdog": logging.WARNING, "apscheduler": logging.WARNING, "botocore": logging.WARNING,
           "boto3": logging.WARNING, "s3transfer": logging.WARNING, "urllib3": logging.WARNING}  # fmt: skip


_VERBATIM = frozenset({"exc_info", "exception", "stack"})  # tracebacks keep their lines


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


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (stderr by default) in `fmt` ("console" or "json")."""
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    shared.append(_escape_names)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name, quiet in _CHATTY.items():
        logging.getLogger(name).setLevel(max(quiet, root.level))


def get(name: str = "ckptd") -> Any:
    """A structlog logger."""
    return structlog.get_logger(name)
