"""Exit codes and the errors that carry them. The CLI turns any of these into a message and a code in one place."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """ckptd's documented exit statuses (the README lists them)."""

    OK = 0
    CHECK_FAILED = 1  # a checkpoint is not ok, or there is no answer (no latest checkpoint yet)
    USAGE = 2  # bad arguments: a missing path, an unknown option
    SOFTWARE = 70  # EX_SOFTWARE: a bug in ckptd; one line, the traceback under --debug or CKPTD_DEBUG=1
    IO = 74  # EX_IOERR: the file system refused (a state folder not writable, a full disk); the message names it
    ALREADY_RUNNING = 75  # EX_TEMPFAIL: another daemon holds the state folder's lock
    CONFIG = 78  # EX_CONFIG: the config file is unreadable or invalid; systemd does not restart on it


class CkptdError(Exception):
    """An error meant for the user: its message says what is wrong, where, and how to fix it."""

    exit_code = ExitCode.CHECK_FAILED


class UsageError(CkptdError):
    """Bad arguments."""

    exit_code = ExitCode.USAGE


class NoAnswer(CkptdError):
    """A question with no answer yet, such as `latest` on a run without a verified checkpoint."""

    exit_code = ExitCode.CHECK_FAILED


class AlreadyRunning(CkptdError):
    """Another daemon uses the same state folder."""

    exit_code = ExitCode.ALREADY_RUNNING


class ConfigError(CkptdError):
    """The config file is invalid; carries every problem found, not only the first."""

    exit_code = ExitCode.CONFIG

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the config:\n{lines}")
