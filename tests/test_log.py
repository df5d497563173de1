"""ckptd.log: one pipeline for ckptd's events, library records and Python warnings; journald priorities; console
lines made for a person; every field escaped so that a file name cannot break a line.

The journal tests run ckptd's logging in a child process whose stderr is a real pipe or a real journald stream,
so what is checked is the bytes a journal would read, not a formatter called by hand.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from ckptd import log

# The child logs at every level, a traceback, a Python warning and a library's records, as the daemon would.
CHILD = """
import logging, os, sys, warnings

if "JOURNAL_STREAM" not in os.environ:  # as systemd would set it: the device and inode of the stream it reads
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"

from ckptd import log

log.configure("json", sys.argv[1])
logger = log.get("ckptd.test")
logger.debug("at debug", step=1)
logger.info("at info", path="/data/runs/exp1/evil\\n<2>{\\"event\\": \\"forged\\"}.ckpt")
logger.warning("at warning")
logger.error("at error")
logger.critical("at critical")
try:
    raise ValueError("boom")
except ValueError:
    logger.exception("at exception")
warnings.warn(RuntimeWarning("inotify watch limit reached"))
logging.getLogger("watchdog.observers").warning("library warning")
logging.getLogger("watchdog.observers").info("library info")
"""

# (syslog priority, level, event) of every line CHILD writes at level debug, in order
EXPECTED = [
    (7, "debug", "at debug"),
    (6, "info", "at info"),
    (4, "warning", "at warning"),
    (3, "error", "at error"),
    (2, "critical", "at critical"),
    (3, "error", "at exception"),
    (4, "warning", "RuntimeWarning: inotify watch limit reached"),
    (4, "warning", "library warning"),
    (6, "info", "library info"),
]

PREFIXED = re.compile(r"<(\d)>(\{.*\})")


@pytest.fixture
def child(tmp_path: Path) -> Path:
    """CHILD as a script in a temporary folder."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back what log.configure changes in this process: root handlers and level, library levels, structlog,
    warnings.showwarning."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in ("watchdog", "apscheduler", "botocore", "urllib3")}
    config = structlog.get_config()
    show = warnings.showwarning
    yield
    root.handlers, root.level = handlers, level
    for name, was in libraries.items():
        logging.getLogger(name).setLevel(was)
    structlog.configure(**config)
    warnings.showwarning = show


def _child_env() -> dict[str, str]:
    """The environment for a child: without a JOURNAL_STREAM inherited from whoever runs the tests."""
    return {key: value for key, value in os.environ.items() if key not in ("JOURNAL_STREAM", "INVOCATION_ID")}


def _configured(fmt: str, level: str = "info") -> tuple[io.StringIO, Any]:
    """A StringIO that ckptd's logging writes to in `fmt`, and a ckptd logger."""
    out = io.StringIO()
    log.configure(fmt, level, stream=out)
    return out, log.get("ckptd.test")


def test_journal_lines_start_with_their_priority(child: Path) -> None:
    """With stderr the journal's stream, every line is `<N>` and one JSON object: the level's syslog priority
    (debug 7, info 6, warning 4, error 3, critical 2), then event and level; Python warnings and a library's
    records come out the same way, and a file name cannot start a line of its own."""
    done = subprocess.run(
        [sys.executable, str(child), "debug"], capture_output=True, text=True, env=_child_env(), timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    matches = [PREFIXED.fullmatch(line) for line in lines]
    assert all(matches), lines
    records = [(int(m[1]), json.loads(m[2])) for m in matches if m]
    assert [(n, record["level"], record["event"]) for n, record in records] == EXPECTED
    by_event = {record["event"]: record for _, record in records}
    assert by_event["at info"]["path"] == '/data/runs/exp1/evil\\u000a<2>{"event": "forged"}.ckpt'
    assert "ValueError: boom" in by_event["at exception"]["exception"]
    warning = by_event["RuntimeWarning: inotify watch limit reached"]
    assert (warning["logger"], warning["category"]) == ("py.warnings", "RuntimeWarning")
    assert warning["source"].startswith(str(child))
    assert by_event["library warning"]["logger"] == "watchdog.observers"


def test_no_prefix_when_stderr_is_not_the_journal(child: Path) -> None:
    """A $JOURNAL_STREAM that names another file (inherited by a child whose output is a pipe) adds no prefix:
    every line is plain JSON."""
    env = {**_child_env(), "JOURNAL_STREAM": "1:1"}
    done = subprocess.run(
        [sys.executable, str(child), "debug"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(record["level"], record["event"]) for record in records] == [(level, e) for _, level, e in EXPECTED]


def test_is_journal_compares_device_and_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """is_journal is true only for the file whose device and inode $JOURNAL_STREAM names; a stream without a
    file, a missing or malformed variable, are not the journal."""
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert log.is_journal(a)
        assert not log.is_journal(b)
        assert not log.is_journal(io.StringIO())
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not log.is_journal(a)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not log.is_journal(a)


@pytest.mark.usefixtures("restore_logging")
def test_console_under_the_journal_prefixes_every_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console format written to the journal also carries priorities, on each line of a traceback too, so
    none of them lands at journald's default priority."""
    with (tmp_path / "journal").open("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        log.configure("console", "info", stream=stream)
        try:
            raise ValueError("boom")
        except ValueError:
            log.get("ckptd.test").exception("step failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert len(lines) > 1
    assert all(line.startswith("<3>") for line in lines), lines
    assert "step failed" in lines[0]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["info", "warning"])
def test_libraries_are_heard_at_warning_and_above(level: str) -> None:
    """Below debug, libraries' INFO and DEBUG records are dropped, whatever library it is; their warnings and
    ckptd's own records at the level pass."""
    out, logger = _configured("json", level)
    for name in ("watchdog.observers.inotify", "apscheduler.scheduler", "botocore.credentials", "some.library"):
        logging.getLogger(name).info("library chatter")
        logging.getLogger(name).debug("library chatter")
    logging.getLogger("urllib3.connectionpool").warning("retrying")
    logger.warning("own warning")
    logger.info("own info")
    events = [(r["logger"], r["event"]) for r in map(json.loads, out.getvalue().splitlines())]
    expected = [("urllib3.connectionpool", "retrying"), ("ckptd.test", "own warning")]
    assert events == (expected if level == "warning" else [*expected, ("ckptd.test", "own info")])


@pytest.mark.usefixtures("restore_logging")
def test_debug_lets_libraries_through() -> None:
    """At debug, libraries' INFO and DEBUG records pass too: the level to ask for when a library misbehaves."""
    out, _ = _configured("json", "debug")
    logging.getLogger("watchdog.observers").debug("inotify event")
    logging.getLogger("apscheduler.scheduler").info("job ran")
    events = [(r["level"], r["event"]) for r in map(json.loads, out.getvalue().splitlines())]
    assert events == [("debug", "inotify event"), ("info", "job ran")]


@pytest.mark.usefixtures("restore_logging")
def test_python_warnings_are_log_events() -> None:
    """warnings.warn becomes one log event (logger py.warnings, level warning) with category and source fields,
    never a two-line text between the JSON lines."""
    out, _ = _configured("json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(RuntimeWarning("watch limit\nreached"), stacklevel=1)
    [record] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["event"] == "RuntimeWarning: watch limit\\u000areached"
    assert (record["level"], record["logger"], record["category"]) == ("warning", "py.warnings", "RuntimeWarning")
    assert record["source"].startswith(f"{__file__}:")


def _verified(run: Path, **extra: Any) -> dict[str, Any]:
    """The fields of a `checkpoint verified` event, as the daemon logs them."""
    return {
        "path": str(run / "epoch-01_step-000100.ckpt"),
        "run": str(run),
        "status": "ok",
        "bytes": 123456,
        "seconds": 1.23456789,
        "step": 100,
        "warnings": None,
        **extra,
    }


@pytest.mark.usefixtures("restore_logging")
def test_console_line_for_a_person(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the console an event is one line: the status right after the event, the path relative to its run, the
    run relative to the current folder, floats rounded, no empty fields."""
    monkeypatch.chdir(tmp_path)
    out, logger = _configured("console")
    logger.info("checkpoint verified", **_verified(tmp_path / "runs" / "exp1", problems=[], metrics={}, note=""))
    [line] = out.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[info\s*\] checkpoint verified\s+status=ok \[ckptd.test\] "
        r"path=epoch-01_step-000100.ckpt run=runs/exp1 bytes=123456 seconds=1.23 step=100",
        line,
    ), line


@pytest.mark.usefixtures("restore_logging")
def test_console_keeps_paths_it_cannot_shorten(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path outside its run is relative to the current folder or absolute; under systemd, whose current folder
    is /, nothing is made relative to it."""
    monkeypatch.chdir("/")
    out, logger = _configured("console")
    logger.warning("checkpoint gone from disk", path="/data/other/a.ckpt", run="/data/runs/exp1")
    logger.info("checkpoint verified", path="/data/runs/exp1/b.ckpt")
    lines = out.getvalue().splitlines()
    assert "path=/data/other/a.ckpt run=/data/runs/exp1" in lines[0]
    assert lines[1].endswith("path=/data/runs/exp1/b.ckpt")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1.23456789, "1.23"),
        (0.000123456, "0.000123"),
        (12.3456, "12.3"),
        (12345.678, "12346"),
        (-0.41216, "-0.412"),
        (0.0, "0.0"),
        (math.inf, "inf"),
        (0, "0"),
        (False, "False"),
    ],
)
def test_console_rounds_floats(value: Any, shown: str) -> None:
    """Floats keep three significant digits and all their integer digits; ints, booleans, zero and infinities are
    shown as they are (0 and False are values, not empty fields)."""
    out, logger = _configured("console")
    logger.info("measured", value=value, metrics={"val_loss": 0.412345})
    assert out.getvalue().rstrip("\n").endswith(f"value={shown} metrics={{'val_loss': 0.412}}")


@pytest.mark.usefixtures("restore_logging")
def test_json_keeps_every_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON is for machines: absolute paths, empty fields and floats exactly as logged."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "exp1"
    out, logger = _configured("json")
    logger.info("checkpoint verified", **_verified(run, problems=[]))
    [record] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {key: record[key] for key in ("path", "run", "seconds", "warnings", "problems")} == {
        "path": str(run / "epoch-01_step-000100.ckpt"),
        "run": str(run),
        "seconds": 1.23456789,
        "warnings": None,
        "problems": [],
    }
    assert (record["event"], record["level"], record["status"]) == ("checkpoint verified", "info", "ok")
    assert record["timestamp"].endswith("Z")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_file_name_cannot_break_a_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Control characters and undecodable bytes in any field, a nested one or a library's message included, are
    escaped: each event stays one line in both formats."""
    monkeypatch.chdir(tmp_path)
    evil = os.fsdecode(b"evil\n2026-01-01 [error] forged\r\x1b[31m\xff.ckpt")
    out, logger = _configured(fmt)
    logger.warning("checkpoint not ok", path=str(tmp_path / "run" / evil), run=str(tmp_path / "run"), names=[evil])
    logging.getLogger("watchdog").warning("cannot watch %s", evil)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        assert "\r" not in line and "\x1b" not in line and "\udcff" not in line
        assert "\\u000a" in line and "\\xff" in line


def _journald() -> str | None:
    """systemd-journald's binary when this machine can run a private one (root, unshare, systemd-cat)."""
    tools = [shutil.which(name) for name in ("unshare", "systemd-cat", "journalctl")]
    binary = next(
        (p for p in ("/usr/lib/systemd/systemd-journald", "/lib/systemd/systemd-journald") if Path(p).exists()), None
    )
    return binary if os.geteuid() == 0 and all(tools) else None


# A journald of its own, in a private mount namespace: tmpfs over /run and the persistent journal folder, so nothing
# reaches the host's journal or disk. systemd-cat connects the child's stdout and stderr to it, as systemd connects
# a service's, with SyslogLevelPrefix= on (its --level-prefix default).
JOURNAL_SCRIPT = """
set -eu
journald=$1 ident=$2 count=$3; shift 3
mount -t tmpfs tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
"$journald" >/dev/null 2>&1 &
trap 'kill $! 2>/dev/null || true' EXIT
i=0
until [ -S /run/systemd/journal/stdout ]; do
    i=$((i+1)); [ $i -lt 100 ] || { echo NO-JOURNALD; exit 0; }; sleep 0.1
done
systemd-cat -t "$ident" "$@"
show() { journalctl --directory=/run/log/journal --no-pager -t "$ident" "$@"; }
i=0; until [ "$(show -o cat | wc -l)" -ge "$count" ]; do i=$((i+1)); [ $i -lt 100 ] || break; sleep 0.1; done
show -o json; echo ===; show -p warning -o cat
"""


def test_real_journal_stores_priorities_and_plain_json(child: Path) -> None:
    """Through a real journald, each entry's PRIORITY is its level's, the prefix is gone from MESSAGE, which is one
    JSON object, and `journalctl -p warning` shows exactly the warnings and worse."""
    journald = _journald()
    assert journald is not None, "a private journald needs root, unshare, systemd-cat and journalctl (make tools)"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", JOURNAL_SCRIPT, "sh",
         journald, "ckptd-test", str(len(EXPECTED)), sys.executable, str(child), "debug"],
        capture_output=True, text=True, env=_child_env(), timeout=120, check=False,
    )  # fmt: skip
    if done.stdout.startswith("NO-JOURNALD") or (
        done.returncode != 0 and done.stderr.startswith(("unshare:", "mount:"))
    ):
        pytest.fail(f"a private journald could not start here: {done.stdout}{done.stderr}")
    assert done.returncode == 0, done.stderr
    entries, _, warned = done.stdout.partition("===\n")
    journal = [json.loads(line) for line in entries.splitlines()]
    got = [(int(e["PRIORITY"]), json.loads(e["MESSAGE"])) for e in journal]
    assert [(n, record["level"], record["event"]) for n, record in got] == EXPECTED
    assert [json.loads(line)["event"] for line in warned.splitlines()] == [e for n, _, e in EXPECTED if n <= 4]
