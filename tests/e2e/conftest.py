"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_daemon import Daemon


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts (it appends each); every one is stopped at the test's end."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.close()
