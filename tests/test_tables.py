"""The tables the CLI prints (ckptd.tables): on a terminal of any width a path or file name is never folded,
wrapped or cut (columns are dropped first); on a pipe each record is one tab-separated line, notes start with `#`.

Each test draws into a rich Console of a fixed width (a terminal) or a plain stream (a pipe); the command line
itself, on a real pseudo-terminal and piped, is tested in test_cli.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ckptd import tables
from ckptd.model import Entry
from ckptd.tables import Column, Output

RUN = "/srv/train/runs/a-long-experiment-name-lr=0.001"
NAMES = ["epoch=1-step=100-val_loss=0.7012.ckpt", "epoch=3-step=400-val_loss=0.3512.ckpt"]


def terminal(width: int) -> tuple[Output, io.StringIO]:
    """An Output drawing on a terminal `width` columns wide, and what it drew."""
    drawn = io.StringIO()
    return Output(Console(file=drawn, width=width, force_terminal=True, color_system=None)), drawn


def pipe() -> tuple[Output, io.BytesIO, io.TextIOWrapper]:
    """An Output writing to a pipe (not a terminal): the bytes it wrote, and the text stream over them."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)
    return Output(Console(file=stream)), raw, stream


def entries(metrics: dict[str, float] | None = None) -> list[Entry]:
    found = metrics or {"val_loss": 0.35, "val_acc": 0.91}
    return [Entry(path=f"{RUN}/{name}", run=RUN, status="ok", size=123_456, mtime=1_700_000_000.0 + i, epoch=i,
                  step=100 * (i + 1), metrics=found) for i, name in enumerate(NAMES)]  # fmt: skip


@pytest.mark.parametrize("width", [20, 40, 60, 80, 120, 200])
def test_print_entries_never_breaks_a_file_name_at_any_width(width: int) -> None:
    """At every width each checkpoint's name (below the folder listed) is whole on one line with its status."""
    out, drawn = terminal(width)
    tables.print_entries(entries(), Path(RUN).parent, out)
    lines = drawn.getvalue().splitlines()
    for name in NAMES:
        (row,) = [line for line in lines if f"a-long-experiment-name-lr=0.001/{name}" in line]
        assert " ok " in f"{row} "


def test_a_narrow_terminal_drops_the_low_value_columns_first() -> None:
    """Wide, `list` shows every column; narrower, `modified` goes before `epoch`, and `metrics` goes last; the
    checkpoint and its status always stay."""
    headers = ["checkpoint", "status", "epoch", "step", "size", "modified", "metrics"]

    def shown(width: int) -> list[str]:
        out, drawn = terminal(width)
        tables.print_entries(entries(), Path(RUN).parent, out)
        header = drawn.getvalue().splitlines()[0]
        return [h for h in headers if h in header.split()]

    gone: list[str] = []  # the columns in the order they go as the terminal narrows
    for width in range(200, 19, -1):
        gone += [h for h in headers if h not in shown(width) and h not in gone]
    assert gone == ["modified", "epoch", "size", "step", "metrics"]


def test_the_free_text_column_wraps_between_words_never_inside_one() -> None:
    """Metrics that do not fit wrap between `name=value` items, never inside one."""
    many = {f"metric_{i}": i / 7 for i in range(8)}
    out, drawn = terminal(100)
    tables.print_entries(entries(many), Path(RUN).parent, out)
    text = drawn.getvalue()
    for name, value in many.items():
        assert f"{name}={value:.4g}" in text


def test_a_table_wider_than_the_terminal_is_drawn_at_its_own_width() -> None:
    """When even the columns that always stay do not fit, the rows are drawn whole, wider than the terminal
    (which then wraps the line): a name is never cut, with or without an ellipsis."""
    out, drawn = terminal(20)
    out.table([Column("checkpoint"), Column("status"), Column("step", drop=1)], [[f"{RUN}/{NAMES[0]}", "ok", "100"]])
    (row,) = [line for line in drawn.getvalue().splitlines() if NAMES[0] in line]
    assert f"{RUN}/{NAMES[0]}" in row and "ok" in row and "…" not in drawn.getvalue()


def test_piped_records_are_tab_separated_after_a_hash_header() -> None:
    """On a pipe: `# ` and the column names, then one line per record whose first field is the full path;
    sizes in bytes, times in ISO 8601, metrics as name=value joined by commas; no colour, no wrapping."""
    out, raw, stream = pipe()
    tables.print_entries(entries(), Path("runs"), out)
    stream.flush()
    lines = raw.getvalue().decode().splitlines()
    assert lines[0] == "# checkpoint\tstatus\tepoch\tstep\tsize_bytes\tmodified\tmetrics"
    assert lines[2].split("\t") == [f"{RUN}/{NAMES[1]}", "ok", "1", "200", "123456", "2023-11-14T22:13:21Z",
                                    "val_acc=0.91,val_loss=0.35"]  # fmt: skip
    assert len(lines) == 3 and "\x1b" not in raw.getvalue().decode()


def test_a_piped_field_keeps_its_line_and_its_bytes() -> None:
    """A tab or newline inside a name is written `\\t` or `\\n` (one record stays one line), an empty field `-`,
    and a name that is not UTF-8 keeps its bytes (surrogateescape), as `ckptd latest` prints it."""
    out, raw, stream = pipe()
    odd = "/runs/a\tb\nc-\udcff.pt"
    out.note("before")
    out.record([odd, "", None, 3])
    out.done()
    stream.flush()
    assert raw.getvalue() == b"# before\n/runs/a\\tb\\nc-\xff.pt\t-\t-\t3\n"


def test_text_written_before_the_records_stays_before_them() -> None:
    """What a command printed as text before a table is flushed first: records go to the bytes beneath."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8")
    stream.write("first\n")
    out = Output(Console(file=stream))
    out.record(["second"])
    out.done()
    assert raw.getvalue() == b"first\nsecond\n"


def _index(best: str, latest: str) -> dict[str, Any]:
    copies = {name: {"name": name, "step": step, "epoch": 1, "metrics": {"val_loss": 0.5}, "size_bytes": 2048,
                     "sha256": "ab" * 32, "mirrored_at": "2024-01-01T00:00:00Z", "local": "intact"}
              for name, step in ((best, 100), (latest, 200))}  # fmt: skip
    return {"copies": copies, "best": {"name": best}, "latest": {"name": latest}, "superseded": []}


def test_ls_names_each_run_as_restore_takes_it_on_a_terminal_and_on_a_pipe() -> None:
    """`ls` keys each row by the run exactly as `restore` takes it (here a whole store's `<node>/<watch>/<run>`),
    in one field, and under the table on a terminal shows a restore command naming one."""
    found = {"gpu-a/runs/exp1": _index("epoch=1.ckpt", "epoch=2.ckpt")}

    def label(index: Any, name: str) -> str:
        return "best" if index["best"]["name"] == name else "latest"

    out, raw, stream = pipe()
    tables.print_copies(found, label=label, now=1_704_067_200.0, out=out)
    stream.flush()
    records = [line.split("\t") for line in raw.getvalue().decode().splitlines() if not line.startswith("#")]
    assert [r[:3] for r in records] == [["gpu-a/runs/exp1", "epoch=1.ckpt", "best"],
                                        ["gpu-a/runs/exp1", "epoch=2.ckpt", "latest"]]  # fmt: skip
    assert records[0][6:] == ["2048", "2024-01-01T00:00:00Z", "intact", "ab" * 32]
    for width in (40, 200):
        out, drawn = terminal(width)
        tables.print_copies(
            found,
            label=label,
            now=1_704_067_200.0,
            out=out,
            restore_hint=lambda run: f"restore one: ckptd restore s3://b {run} --latest --to DIR",
        )
        text = drawn.getvalue()
        assert any("gpu-a/runs/exp1" in line and "epoch=2.ckpt" in line for line in text.splitlines())
        assert "ckptd restore s3://b gpu-a/runs/exp1 --latest --to DIR" in text


def test_status_puts_the_notes_of_a_run_beside_its_names() -> None:
    """A run's best and latest are names on a terminal and full paths on a pipe; what ranks the best and the
    notes (the trainer's own best, a missing metric) are fields of their own, never glued to a path."""
    report: dict[str, Any] = {
        "running": False, "watches": {"w": {"folder": "/runs", "polling": False, "last_reconciliation": None,
                                            "checkpoints": {"ok": 2}, "runs": [
            {"run": "/runs/exp", "latest": "/runs/exp/epoch_2.pt", "best": "/runs/exp/best_model.pt",
             "best_metric": None, "best_value": None, "metric_missing": {"metric": "val_loss", "held": ["dice"]}}]}},
    }  # fmt: skip
    out, raw, stream = pipe()
    tables.print_status(report, out)
    stream.flush()
    (record,) = [line.split("\t") for line in raw.getvalue().decode().splitlines() if not line.startswith("#")]
    assert record == ["/runs/exp", "/runs/exp/epoch_2.pt", "/runs/exp/best_model.pt", "-",
                      "the trainer's own best; val_loss missing; held: dice"]  # fmt: skip
    out, drawn = terminal(60)
    tables.print_status(report, out)
    assert any("exp" in line and "epoch_2.pt" in line and "best_model.pt" in line
               for line in drawn.getvalue().splitlines())  # fmt: skip
