"""Human-readable output: rich tables on a terminal, plain records on a pipe. Imported only when a command
prints without `--json`.

Two rules hold for everything printed here (docs/json.md, "Piped output"):
- A path or a file name is never folded, wrapped or cut. On a narrow terminal a table drops its low-value
  columns first (`Column.drop`); when even the columns that always stay are wider than the terminal, the table
  is drawn at its own width and the terminal wraps the line, the path whole in it. Lines that are not tables
  are never wrapped by ckptd either (rich's `soft_wrap`).
- When stdout is not a terminal, every line is one record: tab-separated fields, the full path in one field,
  no colour, no wrapping whatever COLUMNS says. Lines for people (the column names, summaries, problems)
  start with `#`, so `grep -v '^#'` keeps only the records, and a path (always absolute there) never does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from rich.cells import cell_len
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from ckptd.model import Entry, Verification
from ckptd.sidecar import Sidecar

_STYLE = {"ok": "green", "corrupt": "bold red", "unsafe": "bold magenta", "unsupported": "yellow"}

Cell = str | Text


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass(frozen=True)
class Column:
    """One column of a terminal table and how it gives way when the terminal is narrow.

    Every column is kept on one line (`no_wrap`) except the one `wrap` column of free text (metrics, reasons,
    notes), which wraps between words: with one such column, rich narrows that one only, never below its
    longest word, so no word is ever folded. `drop` 0 means always shown (the path, the status); otherwise the
    column goes when the table does not fit, the highest `drop` first.
    """

    header: str
    drop: int = 0
    wrap: bool = False
    justify: JustifyMethod = "left"


class Output:
    """Where a command's human output goes: a rich console on a terminal, plain records on a pipe.

    Given no console, it writes to stdout and takes the plain form whenever stdout is not a terminal (what
    COLUMNS or FORCE_COLOR say does not matter); given one (tests), the console's `is_terminal` decides.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console if console is not None else Console(highlight=False)
        self.terminal = self.console.is_terminal if console is not None else sys.stdout.isatty()
        if not self.terminal:
            self.console.file.flush()  # what was written as text goes first: records go to the bytes below it

    def line(self, text: str) -> None:
        """One line as it is, no markup: its bytes as the file system has them (a name need not be UTF-8)."""
        data = text.encode("utf-8", "surrogateescape") + b"\n"
        buffer = getattr(self.console.file, "buffer", None)
        if buffer is None:
            self.console.file.write(data.decode("utf-8", "replace"))
        else:
            buffer.write(data)

    def record(self, fields: Sequence[object]) -> None:
        """One record on a pipe: its fields separated by tabs (a tab, newline or CR in one is written \\t, \\n,
        \\r), `-` for a field with no value."""
        self.line("\t".join(_field(f) for f in fields))

    def note(self, text: Text | str) -> None:
        """A line for people: on a terminal as it is, never wrapped by rich; on a pipe after `# `."""
        shown = text if isinstance(text, Text) else Text(text)
        if self.terminal:
            self.console.print(shown, soft_wrap=True, highlight=False)
        else:
            self.line(f"# {shown.plain}")

    def table(self, columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> None:
        """A table: on a terminal drawn by rich with the widest set of columns that fits (see Column); on a pipe
        `# ` and the column names, then one record per row."""
        if not self.terminal:
            self.line("# " + "\t".join(c.header for c in columns))
            for row in rows:
                self.record([_plain(c) for c in row])
            return
        console = self.console

        def keeping(kept: list[int]) -> tuple[list[Column], list[list[Cell]]]:
            return [columns[i] for i in kept], [[row[i] for i in kept] for row in rows]

        shown = list(range(len(columns)))
        ranks = sorted({c.drop for c in columns if c.drop}, reverse=True)
        while _minimum(*keeping(shown)) > console.width and ranks:
            rank = ranks.pop(0)
            shown = [i for i in shown if columns[i].drop != rank]
        need = _minimum(*keeping(shown))
        table = _rich_table(*keeping(shown))
        if need <= console.width:
            console.print(table)
            return
        # Wider than the terminal even so: drawn at its own width, every line whole; the terminal wraps it.
        colors = cast(Any, console.color_system)  # one of the names Console takes, as a plain str
        wide = Console(file=console.file, width=need, force_terminal=True, color_system=colors,
                       no_color=console.no_color, highlight=False)  # fmt: skip
        wide.print(table, crop=False)

    def done(self) -> None:
        """Flush what was written (the plain records go below the text layer)."""
        self.console.file.flush()


def _field(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _minimum(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> int:
    """The narrowest a table of these columns can be drawn without folding a word or wrapping a `no_wrap` cell:
    each column as wide as its widest cell (its widest word for the `wrap` column), header included, plus the
    three cells between columns (` │ `; no edges). rich's own measure takes a word for a cell's minimum even
    when the cell may not wrap."""
    total = 3 * (len(columns) - 1)
    for i, column in enumerate(columns):
        texts = [column.header, *(_plain(row[i]) for row in rows)]
        if column.wrap:
            total += max((cell_len(word) for text in texts for word in text.split()), default=1)
        else:
            total += max(cell_len(line) for text in texts for line in text.splitlines() or [""])
    return total


def _rich_table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=not column.wrap,
                         overflow="fold" if column.wrap else "ignore")  # fmt: skip
    for row in rows:
        table.add_row(*(c if isinstance(c, Text) else Text(c) for c in row))
    return table


def _status(status: str | None) -> Text:
    status = status or "pending"
    return Text(status, style=_STYLE.get(status, "dim"))


def _metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _plain_metrics(metrics: Mapping[str, Any]) -> str:
    """Metrics in one record field: `name=value` joined by commas, values to 10 significant digits."""
    return ",".join(f"{k}={v:.10g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in sorted(metrics.items()))


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _relative(path: str, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def _absolute(path: str) -> str:
    """A path in full, as a record on a pipe gives it: an absolute one as it is (links not resolved)."""
    return path if Path(path).is_absolute() else str(Path.cwd() / path)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _marked(label: str, style: str, rest: str) -> Text:
    """A note: a coloured label, then plain text (names and problems are never read as markup)."""
    return Text.assemble((label, style), " ", rest)


# ------------------------------------------------------------------------------------------------ verify

_VERIFY = (Column("checkpoint"), Column("status"), Column("format", drop=5), Column("size", drop=3, justify="right"),
           Column("epoch", drop=4), Column("step", drop=2), Column("tensors", drop=6),
           Column("metrics", drop=1, wrap=True))  # fmt: skip
_VERIFY_PLAIN = ("checkpoint", "status", "format", "size_bytes", "epoch", "step", "tensors", "metrics")


def print_verifications(results: Sequence[Verification], out: Output | None = None) -> None:
    """One row per verified path, then every problem and warning spelled out."""
    out = out or Output()
    if out.terminal:
        out.table(_VERIFY, [
            [r.path, _status(r.status), r.format or "-", human_bytes(r.size_bytes), _number(r.epoch),
             _number(r.global_step), str(r.tensors.count), _metrics(r.metrics)] for r in results
        ])  # fmt: skip
    else:
        out.table([Column(h) for h in _VERIFY_PLAIN], [
            [_absolute(r.path), r.status, r.format or "-", str(r.size_bytes), _number(r.epoch), _number(r.global_step),
             str(r.tensors.count), _plain_metrics(r.metrics)] for r in results
        ])  # fmt: skip
    for r in results:
        for line in r.problems:
            out.note(_marked("problem", "red", f"{r.path}: {line}"))
        if r.unsafe_globals:
            out.note(_marked("unsafe", "magenta", f"{r.path}: needs globals {', '.join(r.unsafe_globals)}"
                                                  " (admit harmless ones with --trust MODULE.NAME)"))  # fmt: skip
        for line in r.warnings:
            out.note(_marked("warning", "yellow", f"{r.path}: {line}"))
    out.done()


# ------------------------------------------------------------------------------------------- list, show

_ENTRIES = (Column("checkpoint"), Column("status"), Column("epoch", drop=4), Column("step", drop=2),
            Column("size", drop=3, justify="right"), Column("modified", drop=5),
            Column("metrics", drop=1, wrap=True))  # fmt: skip
_ENTRIES_PLAIN = ("checkpoint", "status", "epoch", "step", "size_bytes", "modified", "metrics")
CHANGED = "changed since verified"


def print_entries(entries: Sequence[Entry], base: Path, out: Output | None = None) -> None:
    """A table of checkpoints from their sidecars: on a terminal named below `base`, on a pipe by full path."""
    out = out or Output()
    if not entries:
        out.note(f"no verified checkpoints under {base}")
        out.done()
        return
    ordered = sorted(entries, key=lambda e: (e.run, e.step if e.step is not None else -1, e.mtime))
    if out.terminal:
        out.table(_ENTRIES, [
            [_relative(e.path, base), _status(e.status) if e.verified else Text(CHANGED, style="yellow"),
             _number(e.epoch), _number(e.step), human_bytes(e.size),
             datetime.fromtimestamp(e.mtime, UTC).strftime("%Y-%m-%d %H:%M:%S"), _metrics(e.metrics)]
            for e in ordered
        ])  # fmt: skip
    else:
        out.table([Column(h) for h in _ENTRIES_PLAIN], [
            [_absolute(e.path), (e.status or "pending") if e.verified else CHANGED, _number(e.epoch),
             _number(e.step), str(e.size), _iso(e.mtime), _plain_metrics(e.metrics)] for e in ordered
        ])  # fmt: skip
    out.done()


def print_sidecar(found: Sidecar, current: bool, out: Output | None = None) -> None:
    """What one sidecar says: aligned `key  value` lines on a terminal, `key<TAB>value` records on a pipe."""
    out = out or Output()
    v = found.verification
    status = v.status + ("" if current else " (changed since)")
    rows: list[tuple[str, Any]] = [
        ("checkpoint", v.path), ("status", status), ("format", v.format), ("producer", v.producer),
        ("size", human_bytes(v.size_bytes) if out.terminal else v.size_bytes), ("sha256", v.sha256),
        ("epoch", v.epoch), ("step", v.global_step),
        ("metrics", _metrics(v.metrics) if out.terminal else _plain_metrics(v.metrics)),
        ("tensors", f"{v.tensors.count} ({v.tensors.parameters:,} parameters, {human_bytes(v.tensors.bytes)})"),
        ("dtypes", ", ".join(f"{k}: {n}" for k, n in sorted(v.tensors.dtypes.items()))),
        ("verified", f"{found.verified_at} on {found.host} by ckptd {found.ckptd_version}"),
        ("pinned", "yes" if found.pinned else "no"),
    ]  # fmt: skip
    rows += [("problem", p) for p in v.problems] + [("warning", w) for w in v.warnings]
    rows += [("unsafe global", g) for g in v.unsafe_globals]
    for key, value in rows:
        shown = "-" if value is None or value == "" else str(value)
        if not out.terminal:
            out.record([key, shown])
            continue
        text = Text.assemble((f"{key:<14}", "bold"), _status(v.status) if key == "status" else shown)
        if key == "status" and not current:
            text.append(" (changed since)", style="yellow")
        out.console.print(text, soft_wrap=True, highlight=False)
    out.done()


# -------------------------------------------------------------------------------------------------- scan


def print_scan(summary: dict[str, Any], state_dir: Path, out: Output | None = None) -> None:
    """One paragraph per scanned folder: on a pipe, its summary as a note and one record per checkpoint that
    is not ok (`<status> <path> <problems>`), still being written (`busy`) or unreadable."""
    out = out or Output()
    for root, s in summary.items():
        verified = ", ".join(f"{n} {status}" for status, n in sorted(s["verified"].items())) or "none"
        out.note(Text.assemble(
            (root, "bold"), f": verified {verified}; {s['unchanged']} unchanged; {s['links']} link(s);"
            f" {len(s['gone'])} gone; {len(s['removed_sidecars'])} stale sidecar(s) removed",
        ))  # fmt: skip
        items = [(item["status"], "red", item["path"], "; ".join(item["problems"])) for item in s["not_ok"]]
        items += [("busy", "yellow", path, "changed while being read; will be verified later")
                  for path in s["still_being_written"]]  # fmt: skip
        for line in s["unreadable"]:  # "<path>: <why>"
            path, _, why = line.partition(": ")
            items.append(("unreadable", "red", path, why))
        for status, style, path, detail in items:
            if out.terminal:
                out.note(Text.assemble("  ", (status, style), f" {path}: {detail}"))
            else:
                out.record([status, _absolute(path), detail])
    if out.terminal:
        out.console.print(f"catalog: {state_dir}", highlight=False, style="dim", soft_wrap=True, markup=False)
    else:
        out.note(f"catalog: {state_dir}")
    out.done()


# ------------------------------------------------------------------------------------------------ status

_RUNS = (Column("run"), Column("latest"), Column("best"), Column("by", drop=2), Column("notes", drop=1, wrap=True))
_RUNS_PLAIN = ("run", "latest", "best", "by", "notes")


def print_status(report: dict[str, Any], out: Output | None = None) -> None:
    """The daemon's state and each watched folder's runs with their latest and best."""
    out = out or Output()
    if report["running"]:
        out.note(Text.assemble("daemon: ", ("running", "green"), f" (pid {report['pid']}), queue {report['queue']}"))
    else:
        out.note(Text.assemble("daemon: ", ("not running", "yellow")))
    for name, watch in report["watches"].items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(watch["checkpoints"].items())) or "no checkpoints"
        mode = "polling" if watch["polling"] else "inotify"
        if out.terminal:
            out.note("")
        out.note(Text.assemble((name, "bold"), f" {watch['folder']} ({mode}): {counts};"
                               f" last reconciliation {watch['last_reconciliation'] or 'never'}"))  # fmt: skip
        rows = [_run_row(run, Path(watch["folder"]), out.terminal) for run in watch["runs"]]
        if rows:
            out.table(_RUNS if out.terminal else [Column(h) for h in _RUNS_PLAIN], rows)
    for watch in report["watches"].values():
        for bad in watch.get("not_ok", [])[:20]:
            out.note(_marked(bad["status"], "red", f"{bad['path']}: {bad['problem'] or ''}"))
    for item in report.get("quarantined", [])[:20]:
        out.note(_marked("quarantined", "red", f"{item['path']} -> {item['to']}"))
    for path, failure in list(report.get("failing_checkpoints", {}).items())[:20]:
        out.note(_marked("cannot record", "red", f"{path}: {failure['error']}"))
    for step, error in report.get("failing_steps", {}).items():
        out.note(_marked("daemon step failing", "red", f"{step}: {error}"))
    for name, holder in report.get("standing_by", {}).items():
        owner = f"{holder['node']} ({holder['host']}, pid {holder['pid']})" if holder else "another daemon"
        out.note(_marked("standing by", "yellow", f"watch {name}: its folder is owned by {owner}"))
    for name, short in report.get("below_min_free", {}).items():
        out.note(_marked("disk below min_free", "red", f"watch {name}: {short} bytes short"))
    for name, error in report.get("unreachable_targets", {}).items():
        out.note(_marked("mirror target unreachable", "red", f"{name}: {error}"))
    for name in report.get("unhealthy_watches", []):
        out.note(_marked("observer stopped", "red", f"watch {name} (restarted by the daemon)"))
    for name, error in report.get("broken_targets", {}).items():
        out.note(_marked("mirror target unusable", "red", f"{name}: {error}"))
    if report.get("config_rejected"):
        rejected = report["config_rejected"]
        out.note(_marked("config reload rejected", "red", f"at {rejected['at']}, running on the old config:"))
        for problem in rejected["problems"]:
            out.note(f"  - {problem}")
    for problem in report.get("scrub_problems", [])[:20]:
        out.note(_marked("scrub", "red", f"{problem['location']}: {problem['result']} {problem['detail'] or ''}"))
    for name, backlog in report.get("mirrors", {}).items():
        if out.terminal:
            out.note("")
        line = Text.assemble("mirror ", (name, "bold"), f": {backlog['done']} copied, {backlog['pending']} waiting,"
                             f" {backlog['failed']} failing")  # fmt: skip
        if backlog["last_error"]:
            line.append(f"; last error: {backlog['last_error']}")
        out.note(line)
    if report.get("attention"):
        if out.terminal:
            out.note("")
        out.note(Text.assemble((f"{len(report['attention'])} thing(s) need attention", "red"),
                               " (`ckptd status --check` fails)"))  # fmt: skip
    out.done()


def _run_row(run: dict[str, Any], folder: Path, terminal: bool) -> list[Cell]:
    """One run of `status`: its folder, latest and best (names on a terminal, full paths on a pipe), the metric
    that ranks its best, and notes."""

    def shown(path: str | None) -> str:
        return "-" if not path else Path(path).name if terminal else path

    by = "-"
    notes = []
    if run["best"] and run["best_value"] is not None:
        by = f"{run['best_metric']}={run['best_value']:.4g}"
    elif run["best"]:  # no metric ranks the run: the trainer's own best file (selection.best)
        notes.append("the trainer's own best")
    if run.get("trainer_rotates"):
        notes.append("its trainer rotates it")
    if run.get("latest_weights"):
        notes.append(f"newer, weights only: {shown(run['latest_weights'])}")
    if run.get("metric_missing"):
        missing = run["metric_missing"]
        notes.append(f"{missing['metric']} missing; held: {', '.join(missing['held']) or 'none'}")
    name = _relative(run["run"], folder) if terminal else run["run"]
    return [name, shown(run["latest"]), shown(run["best"]), by, "; ".join(notes) or "-"]


# ------------------------------------------------------------------------------------------------- prune

_PRUNE = (Column("checkpoint"), Column("action"), Column("size", drop=2, justify="right"),
          Column("reasons", drop=1, wrap=True))  # fmt: skip
_PRUNE_PLAIN = ("checkpoint", "action", "size_bytes", "reasons")


def print_prune(reports: Sequence[Any], out: Output | None = None) -> None:
    """A table per run: each checkpoint's action and reasons, and the bytes the plan frees. On a pipe the
    checkpoint is its full path, and a skipped deletion's action says `skipped: why`."""
    out = out or Output()
    for report in reports:
        by_run: dict[str, list[Any]] = {}
        for decision in report.plan.decisions:
            by_run.setdefault(decision.run, []).append(decision)
        skipped = {d.path: why for d, why in report.skipped}
        for run, decisions in sorted(by_run.items()):
            out.note(Text(f"{report.watch}: {run}", style="italic"))
            rows: list[list[Cell]] = []
            for d in sorted(decisions, key=lambda d: d.path):
                if out.terminal:
                    action = Text(d.action, style={"keep": "green", "delete": "red"}.get(d.action, "yellow"))
                    if d.path in skipped:
                        action.append(f" (skipped: {skipped[d.path]})", style="dim")
                    rows.append([Path(d.path).name, action, human_bytes(d.size), "; ".join(d.reasons)])
                else:
                    action_text = d.action + (f" (skipped: {skipped[d.path]})" if d.path in skipped else "")
                    rows.append([d.path, action_text, str(d.size), "; ".join(d.reasons)])
            out.table(_PRUNE if out.terminal else [Column(h) for h in _PRUNE_PLAIN], rows)
        verb = "would free" if report.dry_run else "freed"
        freed = sum(d.size for d in report.plan.decisions if d.action != "keep" and d.path not in skipped)
        out.note(f"{report.watch}: {verb} {human_bytes(freed)}")
        for warning in report.plan.warnings:
            out.note(_marked("warning", "yellow", warning))
    out.done()


# ---------------------------------------------------------------------------------------------------- ls

_COPIES = (Column("run"), Column("copy"), Column("roles", drop=1), Column("step", drop=3), Column("epoch", drop=8),
           Column("metrics", drop=4, wrap=True), Column("size", drop=6, justify="right"), Column("age", drop=7),
           Column("local", drop=5), Column("sha256", drop=9))  # fmt: skip
_COPIES_PLAIN = ("run", "copy", "roles", "step", "epoch", "metrics", "size_bytes", "mirrored_at", "local", "sha256")


def print_copies(indexes: Mapping[str, Mapping[str, Any]], *, label: Callable[[Mapping[str, Any], str], str],
                 now: float, restore_hint: Callable[[str], str] | None = None,
                 out: Output | None = None) -> None:  # fmt: skip
    """What a target holds (`ckptd ls`): one row per copy, from the runs' index files, keyed by the run as
    `restore` takes it (`<watch>/<run>`, or `<node>/<watch>/<run>` for a whole store). `label(index, name)`
    gives a copy's roles; `restore_hint(run)`, a restore command, is shown under the table on a terminal."""
    out = out or Output()
    rows: list[list[Cell]] = []
    for run, index in sorted(indexes.items()):
        for name, copy in sorted(index.get("copies", {}).items()):
            size, sha = copy.get("size_bytes"), copy.get("sha256")
            if out.terminal:
                roles = label(index, name)
                rows.append([
                    run, name, Text(roles, style="bold" if roles.split(",")[0] in ("best", "latest") else ""),
                    _number(copy.get("step")), _number(copy.get("epoch")), _metrics(copy.get("metrics") or {}),
                    "-" if size is None else human_bytes(size), _age(copy.get("mirrored_at"), now),
                    copy.get("local", "unknown"), "-" if not isinstance(sha, str) else sha[:12],
                ])  # fmt: skip
            else:
                rows.append([
                    run, name, label(index, name), _number(copy.get("step")), _number(copy.get("epoch")),
                    _plain_metrics(copy.get("metrics") or {}), _number(size), copy.get("mirrored_at") or "-",
                    copy.get("local", "unknown"), sha if isinstance(sha, str) else "-",
                ])  # fmt: skip
    out.table(_COPIES if out.terminal else [Column(h) for h in _COPIES_PLAIN], rows)
    if out.terminal and restore_hint and indexes:
        out.console.print(restore_hint(min(indexes)), style="dim", soft_wrap=True, highlight=False, markup=False)
    out.done()


def _age(when: object, now: float) -> str:
    """How long ago an ISO time was ("3h"), or "-"."""
    if not isinstance(when, str):
        return "-"
    try:
        seconds = now - datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"
