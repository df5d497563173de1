"""A pytest plugin (registered in conftest.py): run the ckptd command line in this process.

`ckptd("verify", path)` calls `ckptd.cli.main` from tmp_path, with no config unless one is passed and HOME in
tmp_path (so `scan` without a config keeps its catalog there), and returns the exit status and output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckptd.cli import main


@dataclass
class Done:
    """A finished command: exit status and output."""

    code: int
    out: str
    err: str


Ckptd = Callable[..., Done]


@pytest.fixture
def ckptd(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Ckptd]:
    """Run the ckptd command line in this process, from tmp_path, with no config unless one is passed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPTD_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: object) -> Done:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return Done(int(exited.value.code or 0), captured.out, captured.err)

    yield run
    root.handlers, root.level = handlers, level  # log.configure bound stderr to this test's capture
