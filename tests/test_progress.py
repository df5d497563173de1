"""Progress (issue 14): the long commands draw the file being read, its bytes, the rate and the time left on a
terminal, and nothing at all when their output goes to a pipe; the daemon logs each copy as it starts and, while
it lasts, as it goes.

The commands run as real processes on a real pseudo-terminal (pty.openpty) over real checkpoints of some 36 MB
each (five pieces of the verifier's 8 MiB read), so that each bar has bytes and a rate to show.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkpoints
import pytest
from structlog.testing import capture_logs

from ckptd import mirror, progress
from ckptd.catalog import Catalog
from ckptd.config import default_node, load_config
from ckptd.scan import reconcile
from ckptd.scrub import scrub
from ckptd.verify import engine_versions, verify

CKPTD = Path(sys.executable).parent / "ckptd"
NODE = default_node()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BYTES = re.compile(r"\d+\.\d/\d+\.\d [kMG]B")  # rich's DownloadColumn: "25.2/37.7 MB"
RATE = re.compile(r"\d+\.\d [kMG]B/s")  # rich's TransferSpeedColumn: "143.2 MB/s"
BAR = "━"
FLOATS = 3 << 20  # float32 weights per checkpoint; with Adam's two moments, some 36 MB a file
NAMES = ("epoch-01_step-000100.pt", "epoch-02_step-000200.pt")


class Site:
    """runs/exp: two real checkpoints of ~36 MB, a config mirroring them to the local folder `backup`, with a
    scrub bandwidth that does not slow the test down."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / "runs" / "exp"
        self.paths = [
            checkpoints.torch_zip(self.run / name, epoch=i + 1, global_step=(i + 1) * 100, size_floats=FLOATS)
            for i, name in enumerate(NAMES)
        ]
        self.config = root / "config.toml"
        self.config.write_text(
            '[daemon]\nstate_dir = "state"\nscrub_bandwidth = "10GB/s"\n\n[[watch]]\nname = "w"\npath = "runs"\n'
            '\n[watch.mirror]\nto = ["backup"]\nwhat = ["all"]\n\n[mirror.backup]\nurl = "backup"\n'
        )
        self.legacy = root / "old" / "epoch_005_checkpoint.pt"  # no step in its name, no sidecar: migrate reads it
        checkpoints.torch_zip(self.legacy, epoch=5, global_step=500, size_floats=FLOATS)

    def commands(self) -> list[tuple[str, list[object], tuple[str, ...]]]:
        """(command, argv, the file names its progress may show), in the order they depend on each other."""
        config = ["--config", self.config]
        restored = self.root / "restored"
        return [
            ("verify", ["verify", *self.paths], NAMES),
            ("scan", ["scan", *config], NAMES),
            ("mirror", ["mirror", *config], NAMES),
            ("scrub", ["scrub", *config], NAMES),
            ("restore", ["restore", "backup", "w/exp", "--latest", "--to", restored, *config], (NAMES[1],)),
            ("export", ["export", self.paths[0], "--to", self.root / "weights.safetensors"], ("weights.safetensors",)),
            ("migrate", ["migrate", self.legacy.parent], (self.legacy.name,)),
        ]


def on_a_terminal(argv: list[object], cwd: Path, columns: int = 200) -> tuple[int, str]:
    """Run ckptd with stdin, stdout and stderr on a pseudo-terminal `columns` wide; return its exit status and
    everything it drew, raw (escapes and all)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")}
    process = subprocess.Popen([CKPTD, *map(str, argv)], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                               env={**env, "TERM": "xterm-256color"})  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=240), b"".join(chunks).decode()


def frames(drawn: str) -> list[str]:
    """The lines a terminal was drawn, without colours: each redraw of the bars starts after a carriage return."""
    return [line for line in re.split(r"[\r\n]+", ANSI.sub("", drawn)) if line.strip()]


def test_long_commands_on_a_terminal_show_the_file_its_bytes_and_the_rate(tmp_path: Path) -> None:
    """On a terminal, `verify`, `scan`, `mirror`, `scrub`, `restore`, `export` and `migrate` each draw the name
    of the file being read with a bar, its bytes done and total, and a rate; commands over several checkpoints
    also draw the whole job ("2 of 2 checkpoints"). The bars are cleared at the end: the command's answer follows."""
    site = Site(tmp_path)
    for command, argv, names in site.commands():
        code, drawn = on_a_terminal(argv, tmp_path)
        assert code == 0, (command, ANSI.sub("", drawn))
        bars = [line for line in frames(drawn) if BAR in line and any(name in line for name in names)]
        assert bars, (command, frames(drawn))
        assert any(BYTES.search(line) and RATE.search(line) for line in bars), (command, bars)
        if command in ("verify", "scan", "mirror", "scrub"):
            whole = "copies" if command == "mirror" else "checkpoints"
            assert re.search(rf"\d of {4 if command == 'scrub' else 2} {whole}", ANSI.sub("", drawn)), command
        assert "\x1b[?25h" in drawn  # the cursor is given back
    assert (tmp_path / "restored" / NAMES[1]).is_file() and (tmp_path / "weights.safetensors").is_file()
    assert (site.legacy.parent / "epoch-05_step-000500.pt").is_file()


def test_long_commands_piped_print_no_progress(tmp_path: Path) -> None:
    """With stdout and stderr on pipes, none of these commands draws anything: no escape sequence and no bar
    anywhere, and stderr holds only what the command has to say (restore's proof line)."""
    site = Site(tmp_path)
    for command, argv, _names in site.commands():
        done = subprocess.run([CKPTD, *map(str, argv)], capture_output=True, text=True, cwd=tmp_path, timeout=240)
        assert done.returncode == 0, (command, done.stderr)
        for output in (done.stdout, done.stderr):
            assert "\x1b" not in output and BAR not in output and "\r" not in output, (command, output)
        assert done.stderr == "" or command == "restore", (command, done.stderr)
        assert not RATE.search(done.stderr), command


@pytest.mark.parametrize("columns", [44, 70])
def test_a_narrow_terminal_shortens_the_name_at_its_start(tmp_path: Path, columns: int) -> None:
    """On a terminal 70 or 44 columns wide, the bar's name keeps its end (the step and the extension) after an
    ellipsis: cut at its start, never in its middle, and the bar's line fits the terminal (under 64 columns
    without the rate and the time left)."""
    path = checkpoints.torch_zip(tmp_path / "a-run-with-a-rather-long-name-lr=0.001" / "epoch-01_step-000100.pt",
                                 size_floats=FLOATS)  # fmt: skip
    long = tmp_path / "a-very-long-checkpoint-name-that-does-not-fit-epoch-01_step-000100.pt"
    path.rename(long)
    code, drawn = on_a_terminal(["verify", long], tmp_path, columns=columns)
    assert code == 0
    bars = [line for line in frames(drawn) if BAR in line and BYTES.search(line)]  # not the table's rule
    assert bars and all("…" in line and "step-000100.pt " in line for line in bars), "\n".join(bars)
    assert long.name not in "".join(bars)
    assert all(len(line) <= columns for line in bars), bars
    assert any(RATE.search(line) for line in bars) == (columns >= 64)


def test_shorten_keeps_the_end_of_a_name() -> None:
    """A name that fits is kept whole; one that does not loses its start, never its end, and takes `room` cells
    at most (wide characters count two)."""
    assert progress.shorten("epoch-01.pt", 20) == "epoch-01.pt"
    assert progress.shorten("a-long-run-name/epoch-01.pt", 12) == "…epoch-01.pt"
    assert progress.shorten("模型模型模型.pt", 8) == "…模型.pt"


def test_no_terminal_means_no_tracker_and_no_rich_import() -> None:
    """`progress.shown()` gives None when stderr is not a terminal, and rich's progress is never imported: a
    command on a pipe pays nothing for progress."""
    code = (
        "import sys\nfrom ckptd import progress\n"
        "with progress.shown() as bars:\n    assert bars is None\n"
        "assert 'rich.progress' not in sys.modules and 'rich' not in sys.modules, sorted(sys.modules)\n"
        "print('quiet')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "quiet\n", done.stderr


def test_the_whole_job_counts_the_bytes_each_item_really_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, the overall bar's total becomes what the items really read: a skipped item (none read)
    leaves it, a grown one adds to it, so it ends full; a callback of an item that is over counts no more."""
    master, slave = pty.openpty()
    drained: list[bytes] = []
    reader = threading.Thread(target=lambda: _drain(master, drained), daemon=True)
    reader.start()
    with open(slave, "w", encoding="utf-8") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        with progress.shown() as bars:
            assert bars is not None
            bars.plan(3, 300)
            first = bars.start("a.pt", 100)
            assert first is not None
            first(100)
            bars.start("b.pt", 100)  # skipped: reads nothing
            first(50)  # late, from a thread of the item before: not counted
            third = bars.start("c.pt", 100)
            assert third is not None
            third(150)
            bars.finish()
            whole, current = bars.progress.tasks  # type: ignore[attr-defined]
            assert (whole.description, whole.total, whole.completed) == ("3 of 3 checkpoints", 250, 250)
            assert (current.description, current.total, current.completed) == ("c.pt", 100, 150)
        monkeypatch.undo()
    reader.join(timeout=10)
    os.close(master)
    assert b"c.pt" in b"".join(drained)


def _drain(master: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            return
        if not chunk:
            return
        into.append(chunk)


class Recorder:
    """A Tracker that keeps what it is told: the plans, and each item with its name, size, action and bytes."""

    def __init__(self) -> None:
        self.plans: list[tuple[int, int, str]] = []
        self.items: list[dict[str, Any]] = []

    def plan(self, count: int, size: int, noun: str = "checkpoints") -> None:
        self.plans.append((count, size, noun))

    def start(self, name: str, size: int, action: str = "") -> Callable[[int], None]:
        item: dict[str, Any] = {"name": name, "size": size, "action": action, "read": 0}
        self.items.append(item)

        def read(count: int) -> None:
            item["read"] += count

        return read


def test_core_functions_tell_a_tracker_every_item_and_its_bytes(tmp_path: Path) -> None:
    """reconcile, mirror_pass, scrub and restore plan their work and tell a tracker each checkpoint they read and
    every byte of it, without rich: what the terminal's bars are drawn from."""
    site = Site(tmp_path)
    config = load_config(site.config)
    sizes = {p.name: p.stat().st_size for p in site.paths}
    watch = config.watch[0]
    with Catalog(config.daemon.state_dir) as catalog:
        told = Recorder()
        reconcile(watch.path, watch="w", patterns=watch.patterns, catalog=catalog, verifier=verify,
                  engine=engine_versions, progress=told)  # fmt: skip
        assert told.plans == [(2, sum(sizes.values()), "checkpoints")]
        assert {i["name"]: (i["size"], i["read"], i["action"]) for i in told.items} == {
            name: (size, size, "verify") for name, size in sizes.items()
        }
        for run in {r.run for r in catalog.present(watch="w")}:
            mirror.enqueue_run(catalog, config, watch, run, now=0.0)
        targets = mirror.targets_of(config)
        told = Recorder()
        report = mirror.mirror_pass(config, catalog, targets, due_only=False, progress=told)
        assert len(report.copied) == 2 and told.plans == [(2, sum(sizes.values()), "copies")]
        assert {i["name"]: (i["read"], i["action"]) for i in told.items} == {
            name: (size, "copy to backup") for name, size in sizes.items()
        }
        told = Recorder()
        scrubbed = scrub(config, catalog, targets, progress=told)
        assert scrubbed.ok == 4 and [p[0] for p in told.plans] == [2, 2]
        assert sorted((i["name"], i["read"]) for i in told.items) == sorted(2 * list(sizes.items()))
    told = Recorder()
    found = mirror.restore(targets["backup"], "w/exp", "latest", tmp_path / "restored", lambda _name: None,
                           progress=told)  # fmt: skip
    assert [(i["name"], i["read"], i["action"]) for i in told.items] == [(found.path.name, sizes[NAMES[1]], "restore")]


def test_the_daemon_logs_a_copy_as_it_starts_and_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror pass with no terminal logs `mirror copy started` (path, target, bytes) before each copy and
    `mirror copy progress` (bytes done of bytes, MB/s, ETA) every COPY_PROGRESS_EVERY seconds while it runs: here
    every piece, with the interval at 0; a real local-folder copy."""
    site = Site(tmp_path)
    config = load_config(site.config)
    watch = config.watch[0]
    monkeypatch.setattr(mirror, "COPY_PROGRESS_EVERY", 0.0)
    with Catalog(config.daemon.state_dir) as catalog:
        reconcile(watch.path, watch="w", patterns=watch.patterns, catalog=catalog, verifier=verify,
                  engine=engine_versions)  # fmt: skip
        for run in {r.run for r in catalog.present(watch="w")}:
            mirror.enqueue_run(catalog, config, watch, run, now=0.0)
        with capture_logs() as logs:
            report = mirror.mirror_pass(config, catalog, mirror.targets_of(config), due_only=False)
    assert len(report.copied) == 2
    for path in site.paths:
        size = path.stat().st_size
        mine = [e for e in logs if e.get("path") == str(path)]
        events = [e["event"] for e in mine]
        assert events[0] == "mirror copy started" and events[-1] == "checkpoint mirrored", events
        assert (mine[0]["target"], mine[0]["bytes"]) == ("backup", size)
        going = [e for e in mine if e["event"] == "mirror copy progress"]
        assert going and going[-1]["bytes_done"] == size and all(e["bytes"] == size for e in going)
        assert all(e["target"] == "backup" and e["mb_per_s"] >= 0 and "eta_s" in e for e in going)
        assert [e["bytes_done"] for e in going] == sorted(e["bytes_done"] for e in going)
    assert (tmp_path / "backup" / NODE / "w" / "exp" / NAMES[1]).is_file()
