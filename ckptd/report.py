"""`ckptd report`: one run as a picture. What the catalog knows of a run, drawn and tabled for a person.

Three steps, each with one job:
- `gather` reads one run from the catalog: every checkpoint it ever had (present, and gone with `gone_at`),
  what retention did to each and why (the journal), what the next pass would keep and by which rule (the
  planner, run read-only), what was mirrored where (mirror_queue), and the run's latest and best.
- `render_svg`, `render_html` and `render_png` draw a `RunReport`: the metric (and each other metric) against
  step, every checkpoint marked by what happened to it, latest and best highlighted, each checkpoint's size, and
  the run's disk use over time; the HTML page adds a table of every checkpoint below the charts. The page is one
  self-contained file: the charts are inline SVG, the style inline CSS; nothing is fetched, no script runs.
- `write` puts a rendering on disk atomically.

matplotlib draws (the optional extra `ckptd[report]`): it is imported here only, inside the functions that draw,
so the daemon and every other command never load it; when it is missing, `ReportUnavailable` says how to install
it. It draws on figures of its own (no pyplot, no global backend): Agg for PNG, its SVG writer for the page.
Names come from disk and may be hostile: every one is escaped for HTML, and no text is read as mathtext.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import time
import xml.etree.ElementTree as ET  # only to parse the SVG matplotlib just wrote
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptd import selection
from ckptd.catalog import Catalog, Row
from ckptd.errors import CkptdError, ExitCode, NoAnswer
from ckptd.fsutil import atomic_write_bytes
from ckptd.tables import human_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ckptd.config import WatchConfig

INSTALL_HINT = "pip install 'ckptd[report]'"
MORE_METRICS = 3  # panels for metrics other than the run's own; the table holds every one
TABLE_METRICS = 8  # metrics with a column of their own; the others share one cell per row
_COUNTERS = {"epoch", "epochs", "step", "steps", "global_step", "globalstep"}

# What happened to a checkpoint (present ones: what the next retention pass would do with it).
Fate = Literal["kept", "to delete", "to quarantine", "deleted", "quarantined", "gone"]


class ReportUnavailable(CkptdError):
    """matplotlib, which draws the report, is not installed: this install cannot do what was asked (exit 2)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Copy:
    """One mirror target's record of a checkpoint."""

    target: str
    state: str  # pending, failed, done, dropped (as in mirror_queue)
    copied: bool  # proved on the target at least once
    roles: tuple[str, ...]  # best, latest, milestone, all
    error: str | None = None


@dataclass(frozen=True)
class Point:
    """One checkpoint of the run, and what became of it."""

    path: str
    name: str  # relative to the run folder
    kind: str  # file, directory or link
    status: str | None  # ok, corrupt, unsafe, unsupported; None before verification
    step: int | None
    epoch: int | None
    metrics: dict[str, float]
    size: int
    written: float  # mtime, seconds
    gone_at: float | None
    fate: Fate
    reasons: tuple[str, ...]  # the rules that keep it, or why it was (or will be) deleted
    detail: str | None = None  # where a quarantined checkpoint went, why a deletion was skipped
    copies: tuple[Copy, ...] = ()
    latest: bool = False
    best: bool = False
    pinned: bool = False

    @property
    def present(self) -> bool:
        """True while it is on disk."""
        return self.gone_at is None

    @property
    def mirrored_to(self) -> tuple[str, ...]:
        """The targets that hold a proved copy of it."""
        return tuple(c.target for c in self.copies if c.copied)

    @property
    def mark(self) -> str:
        """Its mark in the charts: its fate, or `not ok` for a kept checkpoint that is corrupt, unsafe or
        unsupported (kept for review)."""
        if self.fate == "kept" and self.status not in ("ok", None):
            return "not ok"
        return self.fate


@dataclass(frozen=True)
class RunReport:
    """Everything a report of one run shows; `gather` builds it, the renderers only read it."""

    run: str
    watch: str
    metric: str | None  # the metric the run is judged by (the watch's, else the one its best was chosen by)
    mode: selection.Mode
    points: tuple[Point, ...]  # by step (then epoch, mtime, path)
    generated_at: float
    policy: str = ""  # the retention policy in one line; "" when the watch has none
    rotates: bool = False  # its trainer deletes its own old checkpoints (retention leaves the run alone)
    targets: tuple[str, ...] = ()  # the mirror targets any checkpoint of the run was queued for
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def checkpoints(self) -> list[Point]:
        """The checkpoints proper (links left out)."""
        return [p for p in self.points if p.kind != "link"]

    @property
    def metric_names(self) -> list[str]:
        """Every metric the checkpoints hold, the run's own metric first."""
        held = sorted({name for p in self.checkpoints for name in p.metrics})
        if self.metric in held:
            held.remove(self.metric)
            held.insert(0, self.metric)
        return held

    @property
    def charted(self) -> list[str]:
        """The metrics drawn, one panel each: the run's own, then up to MORE_METRICS others (epoch and step, which
        some trainers also log as metrics, are the charts' axes and the table's columns already)."""
        names = [n for n in self.metric_names if n.lower().strip("_-. ") not in _COUNTERS or n == self.metric]
        return names[: 1 + MORE_METRICS]

    @property
    def bytes_present(self) -> int:
        """Bytes the run's checkpoints hold on disk now."""
        return sum(p.size for p in self.checkpoints if p.present)

    def count(self, *fates: Fate) -> int:
        """How many checkpoints have one of `fates`."""
        return sum(1 for p in self.checkpoints if p.fate in fates)


# --------------------------------------------------------------------------------------------------- gather


def gather(catalog: Catalog, run: str, *, watch: WatchConfig | None = None, now: float | None = None) -> RunReport:
    """Read one run from the catalog.

    Given the catalog, the run as the catalog names it (the run folder below the watch's path), and the watch
    from the config (for its metric and retention policy; without it, kept checkpoints carry no rule). Present
    checkpoints get what the next retention pass would do with them, from the planner run read-only (nothing
    is deleted or journaled). Raises NoAnswer when the catalog knows no checkpoint of `run`.
    """
    now = time.time() if now is None else now
    rows, journal, queue = _run_history(catalog, run)
    if not rows:
        raise NoAnswer(f"{run}: not in the catalog (no checkpoint of it was ever recorded; try: ckptd scan {run})")
    found = catalog.runs(run=run)
    record = found[0] if found else {}
    watch_name = watch.name if watch is not None else rows[0].watch
    metric = watch.metric.name if watch is not None and watch.metric else record.get("best_metric")
    mode: selection.Mode = watch.metric.mode if watch is not None and watch.metric else "min"
    rotates = run in catalog.rotating_runs()
    decisions, policy, warnings = _next_pass(catalog, run, watch, now)
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in journal:
        entries.setdefault(entry["path"], []).append(entry)
    copies: dict[str, list[tuple[str, Copy]]] = {}
    for item in queue:
        copy = Copy(
            target=item["target"], state=item["state"], copied=bool(item["copied"]),
            roles=tuple(r for r in str(item["role"]).split(",") if r), error=item["last_error"],
        )  # fmt: skip
        copies.setdefault(item["path"], []).append((item["sha256"], copy))
    points = []
    for row in rows:
        journaled = _entry_of(row, entries.get(row.path, []))
        fate, reasons, detail = _fate(row, journaled, decisions.get(row.path), rotates, policy)
        held = tuple(
            c for sha, c in copies.get(row.path, [])
            if (row.sha256 is None or sha == row.sha256)  # a copy of these bytes, not of an older save of the name
            and (c.copied or c.state in ("pending", "failed"))
        )  # fmt: skip
        points.append(
            Point(
                path=row.path, name=_relative(row.path, run), kind=row.kind, status=row.status, step=row.step,
                epoch=row.epoch, metrics=dict(row.metrics), size=row.size, written=row.mtime, gone_at=row.gone_at,
                fate=fate, reasons=reasons, detail=detail, copies=held,
                latest=row.path == record.get("latest") and row.gone_at is None,
                best=row.path == record.get("best") and row.gone_at is None, pinned=row.pinned,
            )
        )  # fmt: skip
    points.sort(key=lambda p: (_or(p.step), _or(p.epoch), p.written, p.path))
    return RunReport(
        run=run, watch=watch_name, metric=metric, mode=mode, points=tuple(points), generated_at=now,
        policy=policy, rotates=rotates, targets=tuple(sorted({item["target"] for item in queue})),
        warnings=tuple(warnings),
    )  # fmt: skip


def _run_history(catalog: Catalog, run: str) -> tuple[list[Row], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every checkpoint row of `run` (present and gone), its journal entries (oldest first) and its mirror_queue
    rows, each through the index on run."""
    return catalog.history(run), catalog.journal(run=run), catalog.mirror_rows(run)


def _entry_of(row: Row, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The journal entry that tells what became of the bytes of `row`: the last one of its path (oldest first)
    that names its inode, or names none; an entry about older bytes under the same name does not count."""
    found = [e for e in entries if not e.get("inode") or not row.inode or e["inode"] == row.inode]
    return found[-1] if found else None


def _next_pass(
    catalog: Catalog, run: str, watch: WatchConfig | None, now: float
) -> tuple[dict[str, tuple[str, tuple[str, ...]]], str, list[str]]:
    """{path: (action, reasons)} of the next retention pass over the run, planned read-only; the policy in one
    line; the plan's warnings. Nothing when the watch has no retention policy."""
    if watch is None or watch.retention is None:
        return {}, "", []
    from ckptd.prune import free_deficit, plan_watch

    retention = watch.retention
    planned = plan_watch(
        watch, retention, catalog, now, catalog.awaiting_mirror(watch.name, run), free_deficit(watch, retention), run
    )
    rules = {
        "keep_last": retention.keep_last, "keep_best": retention.keep_best, "keep_every": retention.keep_every,
        "keep_every_steps": retention.keep_every_steps, "keep_within": retention.keep_within,
        "min_epoch": retention.min_epoch, "max_size": retention.max_size, "min_free": retention.min_free,
    }  # fmt: skip
    policy = ", ".join(f"{k} = {_setting(v)}" for k, v in rules.items() if v) + f", on_corrupt = {retention.on_corrupt}"
    if retention.dry_run:
        policy += " (dry run: nothing is deleted)"
    return {d.path: (d.action, d.reasons) for d in planned.decisions}, policy, list(planned.warnings)


def _setting(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fate(
    row: Row,
    entry: dict[str, Any] | None,
    decision: tuple[str, tuple[str, ...]] | None,
    rotates: bool,
    policy: str,
) -> tuple[Fate, tuple[str, ...], str | None]:
    """What happened to the checkpoint of `row`: its fate, the reasons, and a detail."""
    reasons = tuple(entry["reasons"]) if entry is not None else ()
    if row.gone_at is not None:
        if entry is not None and entry["state"] == "done":
            if entry["action"] == "quarantine":
                return "quarantined", reasons, entry["detail"]
            return "deleted", reasons, None
        outside = "removed outside ckptd" + (" (its trainer deletes its own old checkpoints)" if rotates else "")
        return "gone", (outside,), None
    detail = None
    if entry is not None and entry["state"] == "skipped":
        detail = f"a {entry['action']} was skipped: {entry['detail'] or 'it changed since it was planned'}"
    elif entry is not None and entry["state"] == "pending":
        detail = f"a {entry['action']} is under way"
    if row.kind == "link":
        return "kept", (f"link to {row.link_target}",), detail
    if decision is None:
        return "kept", ("no retention policy",) if not policy else ("not planned yet",), detail
    action, why = decision
    if action == "delete":
        return "to delete", why, detail
    if action == "quarantine":
        return "to quarantine", why, detail
    return "kept", why, detail


def _or(value: int | None) -> int:
    return -1 if value is None else value


def _relative(path: str, run: str) -> str:
    prefix = run.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


# ----------------------------------------------------------------------------------------------------- draw


@dataclass(frozen=True)
class _Mark:
    label: str  # in the legend
    marker: str
    color: str
    filled: bool = True
    size: float = 55


# Okabe-Ito colours: told apart with every common kind of colour blindness.
MARKS: dict[str, _Mark] = {
    "kept": _Mark("kept (by a rule: see the table)", "o", "#0072B2"),
    "not ok": _Mark("kept for review (corrupt, unsafe, unsupported)", "^", "#CC79A7", size=70),
    "to delete": _Mark("deleted at the next retention pass", "o", "#E69F00", filled=False),
    "to quarantine": _Mark("quarantined at the next retention pass", "s", "#E69F00", filled=False),
    "deleted": _Mark("deleted by retention", "X", "#D55E00", size=80),
    "quarantined": _Mark("quarantined (corrupt)", "s", "#882255", size=60),
    "gone": _Mark("removed outside ckptd", "x", "#6E6E6E", size=60),
}
RING_COLORS = ("#009E73", "#56B4E9", "#332288", "#999933", "#117733", "#44AA99")
BEST_COLOR = "#F0B400"
LATEST_COLOR = "#222222"
_TEXT = "#222222"
_GRID = "#E4E4E4"


def require_matplotlib() -> None:
    """Raise ReportUnavailable, saying how to install it, when matplotlib is missing (before any work is done)."""
    _matplotlib()


def _matplotlib() -> Any:
    """matplotlib, or ReportUnavailable saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportUnavailable(f"ckptd report draws with matplotlib, which is not installed: {INSTALL_HINT}") from exc
    return matplotlib


def figure(report: RunReport, tips: dict[str, list[str]] | None = None) -> Figure:
    """The report's charts as one matplotlib figure (drawn with Agg); `tips` gets {SVG id: the paths of its
    marks, in order} for the tooltips (see _titles)."""
    tips = {} if tips is None else tips
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        names = report.charted
        others = names[1:]
        ratios = [3.0] + [1.3] * len(others) + [1.3, 1.4]
        fig = Figure(figsize=(12, 0.9 + 1.3 * sum(ratios)), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
        main = fig.add_subplot(grid[0])
        panels = [main] + [fig.add_subplot(grid[i + 1], sharex=main) for i in range(len(others))]
        sizes = fig.add_subplot(grid[len(others) + 1], sharex=main)
        disk = fig.add_subplot(grid[len(others) + 2])
        axis, axis_label = _positions(report)
        plotted = [p for p in report.checkpoints if p.path in axis]
        fig.suptitle(_title(report), x=0.01, ha="left", fontsize=12.5, fontweight="bold", color=_TEXT)
        if names:
            _metric_panel(main, report, plotted, axis, names[0], tips, main=True)
            for ax, name in zip(panels[1:], others, strict=True):
                _metric_panel(ax, report, plotted, axis, name, tips, main=False)
        else:
            main.text(0.5, 0.5, "no checkpoint of this run holds a metric", ha="center", va="center",
                      transform=main.transAxes, color="#666666")  # fmt: skip
            main.set_title("checkpoints against step")
            main.set_yticks([])
            _marks(main, report, plotted, axis, lambda _p: 0.5, tips, main=True)
        _size_panel(sizes, plotted, axis, tips)
        sizes.set_xlabel(axis_label)
        for ax in panels:
            ax.tick_params(labelbottom=False)
        _disk_panel(disk, report, tips)
        missing = len(report.checkpoints) - len(plotted)
        if missing:
            fig.text(0.01, 0.002, f"{missing} checkpoint(s) without a {axis_label} are in the table only",
                     fontsize=8, color="#666666")  # fmt: skip
    return fig


_STYLE = {
    "text.parse_math": False,  # names and metrics come from disk: "$" is a dollar, never mathtext
    "svg.hashsalt": "ckptd",  # the same report draws the same SVG
    "svg.fonttype": "path",  # glyphs as paths: the page needs no font
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 8,
    "axes.edgecolor": "#888888",
    "axes.labelcolor": _TEXT,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": _GRID,
    "grid.linewidth": 0.8,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "legend.fontsize": 9,
}


def _title(report: RunReport) -> str:
    counts = [f"{len(report.checkpoints)} checkpoints"]
    fates: tuple[Fate, ...] = ("kept", "to delete", "deleted", "quarantined", "gone")
    for fate in fates:
        n = report.count(fate)
        if n or fate in ("kept", "deleted"):
            counts.append(f"{n} {fate}")
    judged = f"{report.metric} ({report.mode})" if report.metric else "no metric"
    disk = f"{human_bytes(report.bytes_present)} on disk"
    return f"{_short(report.run, 100)}\n{judged}  ·  {', '.join(counts)}  ·  {disk}"


def _short(text: str, limit: int) -> str:
    """`text` printable and at most `limit` characters (the start elided: a run's own name is at its end)."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _positions(report: RunReport) -> tuple[dict[str, float], str]:
    """Where along x the charts put each checkpoint ({path: x}), and what x is: the step when checkpoints have
    one, else the epoch, else their order; a checkpoint without the one chosen is left out (the table has it)."""
    points = report.checkpoints
    if any(p.step is not None for p in points):
        return {p.path: float(p.step) for p in points if p.step is not None}, "step"
    if any(p.epoch is not None for p in points):
        return {p.path: float(p.epoch) for p in points if p.epoch is not None}, "epoch"
    ordered = sorted(points, key=lambda p: (p.written, p.path))
    return {p.path: float(i) for i, p in enumerate(ordered)}, "checkpoint (in the order written)"


def _metric_panel(
    ax: Axes,
    report: RunReport,
    plotted: Sequence[Point],
    axis: dict[str, float],
    name: str,
    tips: dict[str, list[str]],
    *,
    main: bool,
) -> None:
    """One metric against step: its curve through every checkpoint that holds it, and their marks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    valued = sorted((p for p in plotted if _value(p, name) is not None), key=lambda p: (axis[p.path], p.written))
    ys = [_value(p, name) or 0.0 for p in valued]
    ax.plot([axis[p.path] for p in valued], ys, color="#9AA7B5", linewidth=1.4, zorder=1)
    label = _short(name, 40)
    if ys and min(ys) > 0 and max(ys) / min(ys) > 30:  # a loss falling over decades: read it on a log scale
        ax.set_yscale("log")
        decades = math.log10(max(ys) / min(ys))
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades < 3 else (1.0,)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        label += " (log scale)"
    ax.set_ylabel(label)
    better = f"  ({report.mode}: {'lower' if report.mode == 'min' else 'higher'} is better)" if main else ""
    ax.set_title(f"{_short(name, 60)} against step{better}")
    _marks(ax, report, valued, axis, lambda p: _value(p, name) or 0.0, tips, main=main)


def _value(point: Point, name: str) -> float | None:
    value = point.metrics.get(name)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _marks(
    ax: Axes,
    report: RunReport,
    points: Sequence[Point],
    axis: dict[str, float],
    value: Callable[[Point], float],
    tips: dict[str, list[str]],
    *,
    main: bool,
) -> None:
    """Every checkpoint's mark; on the main panel also the mirror rings, best and latest, and the legend. Each
    group of marks gets an SVG id, and each mark a tooltip (see _titles)."""
    handles: list[Any] = []
    for key, style in MARKS.items():
        chosen = [p for p in points if p.mark == key]
        if not chosen:
            continue
        found = ax.scatter(
            [axis[p.path] for p in chosen], [value(p) for p in chosen], s=style.size * (1.0 if main else 0.7),
            marker=style.marker, facecolors=style.color if style.filled else "white", edgecolors=style.color,
            linewidths=1.0 if style.filled else 1.8, zorder=4, label=style.label,
        )  # fmt: skip
        found.set_gid(_gid(tips, "marks" if main else "metric-marks", [p.path for p in chosen]))
        handles.append(found)
    if not main:
        return
    for i, target in enumerate(report.targets):
        chosen = [p for p in points if target in p.mirrored_to]
        if not chosen:
            continue
        found = ax.scatter(
            [axis[p.path] for p in chosen], [value(p) for p in chosen], s=190 + 130 * i, marker="o", facecolors="none",
            edgecolors=RING_COLORS[i % len(RING_COLORS)], linewidths=1.6, zorder=3,
            label=f"mirrored to {_short(target, 30)}",
        )  # fmt: skip
        found.set_gid(_gid(tips, "mirrored", [p.path for p in chosen]))
        handles.append(found)
    best = next((p for p in points if p.best), None)
    latest = next((p for p in points if p.latest), None)
    if best is not None:
        found = ax.scatter([axis[best.path]], [value(best)], s=460, marker="*", color=BEST_COLOR, edgecolors="#7A5A00",
                           linewidths=0.8, zorder=2, label="best")  # fmt: skip
        found.set_gid(_gid(tips, "best", [best.path]))
        handles.append(found)
    # Best and latest each get a vertical line labelled at the top, where no mark can be hidden by the label.
    lines = [(latest, "latest", LATEST_COLOR, (0, (4, 3)), "latest (what a resume loads)")] if latest else []
    if best is not None:
        text = f"best {report.metric}={value(best):.4g}" if report.metric in best.metrics else "best"
        lines.append((best, text, "#A07800", (0, (1, 2)), "_best"))
    left, right = ax.get_xlim()
    for row, (point, text, color, dashes, label) in enumerate(lines):
        x = axis[point.path]
        if row == 0 or latest is None or axis[latest.path] != x:  # one line where best is latest: the labels say both
            line = ax.axvline(x, color=color, linestyle=dashes, linewidth=1.2, zorder=0, label=label)
            if not label.startswith("_"):
                handles.append(line)
        flip = right > left and (x - left) / (right - left) > 0.75  # near the right edge: the label goes left
        ax.annotate(
            text, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(-5 if flip else 5, -4 - 15 * row),
            textcoords="offset points", va="top", ha="right" if flip else "left", fontsize=9, fontweight="bold",
            color=color, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=6,
        )  # fmt: skip
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, handletextpad=0.5,
                  labelspacing=1.0, markerscale=0.75)  # fmt: skip


def _gid(tips: dict[str, list[str]], group: str, paths: list[str]) -> str:
    """A new SVG id for a group of marks (one per path, in order), recorded in `tips`."""
    gid = f"ckptd-{group}-{len(tips)}"
    tips[gid] = paths
    return gid


def _size_panel(ax: Axes, points: Sequence[Point], axis: dict[str, float], tips: dict[str, list[str]]) -> None:
    """Each checkpoint's size, coloured as its mark; hollow once it left the disk."""
    unit, scale = _unit(max((p.size for p in points), default=0))
    xs = sorted({axis[p.path] for p in points})
    gaps = [b - a for a, b in itertools.pairwise(xs) if b > a]
    width = 0.7 * min(gaps) if gaps else 0.8
    bars = ax.bar(
        [axis[p.path] for p in points], [p.size / scale for p in points], width=width,
        color=[MARKS[p.mark].color if p.present else "white" for p in points],
        edgecolor=[MARKS[p.mark].color for p in points], linewidth=1.2, zorder=3,
    )  # fmt: skip
    for bar, point in zip(bars, points, strict=True):
        bar.set_gid(_gid(tips, "size", [point.path]))
    ax.set_title("size of each checkpoint (hollow: no longer on disk)")
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)


def _disk_panel(ax: Axes, report: RunReport, tips: dict[str, list[str]]) -> None:
    """The bytes the run's checkpoints held on disk over time: each one written adds its size, each one gone
    takes it away."""
    from matplotlib import dates

    events: list[tuple[float, int, int, str]] = []  # (time, additions first at one instant, bytes, path)
    for p in report.checkpoints:
        events.append((p.written, 0, p.size, p.path))
        if p.gone_at is not None:
            events.append((p.gone_at, 1, -p.size, p.path))
    events.sort()
    ax.set_title(f"disk used by the run's checkpoints over time (UTC): {human_bytes(report.bytes_present)} now")
    if not events:
        return
    times, totals, total = [events[0][0]], [0], 0
    removed: list[tuple[float, int, str]] = []
    for when, _order, change, path in events:
        total += change
        times.append(when)
        totals.append(total)
        if change < 0:
            removed.append((when, total, path))
    # Up to now, unless nothing happened for long: a flat line over days would squeeze the events into a sliver.
    span = times[-1] - times[0]
    end = report.generated_at if report.generated_at - times[-1] <= max(span, 60.0) else times[-1] + 0.04 * span
    times.append(max(end, times[-1]))
    totals.append(total)
    unit, scale = _unit(max(totals))
    stamps = [datetime.fromtimestamp(t, UTC) for t in times]
    values = [t / scale for t in totals]
    ax.step(stamps, values, where="post", color="#0072B2", linewidth=1.6, zorder=3, label="on disk")  # type: ignore[arg-type]
    ax.fill_between(stamps, values, step="post", color="#0072B2", alpha=0.12, zorder=2)  # type: ignore[arg-type]
    if removed:
        moments = [datetime.fromtimestamp(w, UTC) for w, _t, _p in removed]
        found = ax.scatter(moments, [t / scale for _w, t, _p in removed], marker="X", s=40,  # type: ignore[arg-type]
                           color=MARKS["deleted"].color, zorder=4, label="a checkpoint left the disk")  # fmt: skip
        found.set_gid(_gid(tips, "removed", [p for _w, _t, p in removed]))
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    locator = dates.AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator, tz=UTC))  # type: ignore[no-untyped-call]
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _unit(largest: float) -> tuple[str, float]:
    """The binary unit to draw byte counts up to `largest` in, and its size: round ticks in KiB, MiB, GiB."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if largest >= scale:
            return unit, float(scale)
    return "bytes", 1.0


# ----------------------------------------------------------------------------------------------- renderings


_SVG = "http://www.w3.org/2000/svg"
_XLINK = "http://www.w3.org/1999/xlink"


def render_svg(report: RunReport) -> str:
    """The charts as one SVG element (no XML declaration, no DOCTYPE: ready to inline in HTML), each mark with a
    tooltip naming its checkpoint, what happened to it and why."""
    tips: dict[str, list[str]] = {}
    fig = figure(report, tips)
    matplotlib = _matplotlib()
    buffer = io.StringIO()
    with matplotlib.rc_context(_STYLE):
        fig.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    ET.register_namespace("", _SVG)
    ET.register_namespace("xlink", _XLINK)
    root = ET.fromstring(buffer.getvalue())  # noqa: S314  # matplotlib's own output, just written
    _titles(root, tips, {p.path: p for p in report.points}, report.metric)
    root.attrib.pop("width", None)
    root.attrib.pop("height", None)
    root.set("role", "img")
    root.set("aria-label", f"ckptd report of {report.run}")
    return ET.tostring(root, encoding="unicode")


def _titles(root: ET.Element, tips: dict[str, list[str]], points: dict[str, Point], metric: str | None) -> None:
    """Give each mark drawn under an id of `tips` an SVG <title>: its tooltip in a browser. A group of one mark
    (a bar) gets it on the group; a scatter's on each of its <use> elements, one per point in order."""
    for group in root.iter(f"{{{_SVG}}}g"):
        paths = tips.get(group.get("id", ""))
        if paths is None:
            continue
        marks = list(group.iter(f"{{{_SVG}}}use")) if len(paths) > 1 else [group]
        if len(paths) > 1 and len(marks) != len(paths):
            continue  # not drawn one element per mark (never seen): no tooltips rather than wrong ones
        for element, path in zip(marks, paths, strict=True):
            title = ET.SubElement(element, f"{{{_SVG}}}title")
            title.text = _tooltip(points[path], metric)


def _tooltip(point: Point, metric: str | None) -> str:
    where = [f"{k} {v}" for k, v in (("step", point.step), ("epoch", point.epoch)) if v is not None]
    lines = [point.name, "  ".join([*where, human_bytes(point.size)])]
    if metric is not None and metric in point.metrics:
        lines.append(f"{metric} = {point.metrics[metric]:.6g}")
    lines.append(f"{_fate_text(point)}: {'; '.join(point.reasons)}")
    if point.detail:
        lines.append(point.detail)
    if point.copies:
        lines.append("mirrors: " + ", ".join(_copy_text(c) for c in point.copies))
    return "\n".join(lines)


def _fate_text(point: Point) -> str:
    if point.mark == "not ok":
        return f"kept for review ({point.status})"
    return {"to delete": "deleted at the next pass", "to quarantine": "quarantined at the next pass"}.get(
        point.fate, point.fate
    )


def _copy_text(copy: Copy) -> str:
    if copy.copied:
        return copy.target
    if copy.state == "failed":
        return f"{copy.target} (failing: {copy.error or 'see ckptd status'})"
    return f"{copy.target} (queued)"


def render_png(report: RunReport, *, dpi: int = 110) -> bytes:
    """The charts as a PNG (for chat and tickets)."""
    fig = figure(report)
    buffer = io.BytesIO()
    with _matplotlib().rc_context(_STYLE):
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def render_html(report: RunReport) -> str:
    """One self-contained page: a summary, the charts (inline SVG), how to read them, and a table of every
    checkpoint. Every name is escaped; nothing is fetched and no script runs."""
    e = html.escape
    svg = render_svg(report)
    names = report.metric_names
    columned = (report.charted + [n for n in names if n not in report.charted])[:TABLE_METRICS]
    latest = next((p for p in report.points if p.latest), None)
    best = next((p for p in report.points if p.best), None)
    present = sum(1 for p in report.checkpoints if p.present)
    when = datetime.fromtimestamp(report.generated_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    facts = [
        ("run", e(report.run)),
        ("watch", e(report.watch)),
        ("metric", e(f"{report.metric} ({report.mode})") if report.metric else "none"),
        ("latest", e(latest.name) if latest else "none"),
        ("best", _best_text(best, report.metric)),
        ("retention", e(report.policy) if report.policy else "no [watch.retention] policy"),
        ("mirrors", e(", ".join(report.targets)) if report.targets else "none queued"),
        ("on disk", f"{human_bytes(report.bytes_present)} in {present} of {len(report.checkpoints)} checkpoints"),
    ]
    notes = [*report.warnings]
    if report.rotates:
        notes.append("its trainer deletes its own old checkpoints: ckptd's retention leaves this run alone")
    head = [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts]
    rest = [n for n in names if n not in columned]  # beyond TABLE_METRICS columns: one cell of name=value pairs
    columns = ["step", "epoch", "checkpoint", *(e(n) for n in columned), *(["other metrics"] if rest else []),
               "size", "status", "what happened", "why", "mirrored to"]  # fmt: skip
    rows = []
    for p in report.points:
        roles = "".join(f' <span class="tag {t}">{t}</span>' for t in ("latest", "best", "pinned") if getattr(p, t))
        why = e("; ".join(p.reasons)) + (f"<br><small>{e(p.detail)}</small>" if p.detail else "")
        values = "".join(f'<td class="num">{_number(p.metrics.get(n))}</td>' for n in columned)
        if rest:
            pairs = ", ".join(f"{e(n)}={_number(p.metrics[n])}" for n in rest if n in p.metrics)
            values += f'<td class="more">{pairs or "&ndash;"}</td>'
        mirrored = ", ".join(e(_copy_text(c)) for c in p.copies) or "&ndash;"
        status = e(p.status or "pending") if p.kind != "link" else "link"
        rows.append(
            f'<tr class="{_css(p.mark)}"><td class="num">{_number(p.step)}</td><td class="num">{_number(p.epoch)}'
            f'</td><td class="name">{e(p.name)}{roles}</td>{values}<td class="num">{human_bytes(p.size)}</td>'
            f'<td>{status}</td><td><span class="dot"></span>{e(_fate_text(p))}</td><td>{why}</td>'
            f"<td>{mirrored}</td></tr>"
        )
    shown = {p.mark for p in report.checkpoints}
    legend = "".join(
        f'<li class="{_css(key)}"><span class="dot"></span>{e(mark.label)}</li>'
        for key, mark in MARKS.items() if key in shown
    )  # fmt: skip
    extra = f'<p class="note">{e("; ".join(notes))}</p>' if notes else ""
    more = len(names) - len(report.charted)
    hidden = f" ({more} more metric(s) are in the table only)" if more > 0 else ""
    return _PAGE.format(
        title=e(f"ckptd report: {report.run}"), heading=e(_short(report.run, 120)), when=e(when),
        facts="".join(head), notes=extra, svg=svg, legend=legend, hidden=e(hidden),
        columns="".join(f"<th>{c}</th>" for c in columns), rows="\n".join(rows), count=len(report.points),
        css=_CSS,
    )  # fmt: skip


def _best_text(best: Point | None, metric: str | None) -> str:
    if best is None:
        return "none"
    if metric is None or metric not in best.metrics:
        return html.escape(best.name)
    return f"{html.escape(best.name)} ({html.escape(metric)} = {_number(best.metrics[metric])})"


def _number(value: object) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.6g}"
    return html.escape(str(value))


def _css(mark: str) -> str:
    return "mark-" + mark.replace(" ", "-")


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #222; margin: 24px auto; max-width: 1240px; padding: 0 16px; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 16px; margin: 28px 0 8px; }
.sub { color: #666; margin: 0 0 14px; }
table { border-collapse: collapse; }
.facts th { text-align: left; color: #555; font-weight: 600; padding: 2px 14px 2px 0; vertical-align: top; }
.facts td { padding: 2px 0; word-break: break-all; }
.note { background: #fff4e0; border-left: 4px solid #E69F00; padding: 6px 10px; }
figure { margin: 16px 0 0; }
figure svg { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
figcaption { margin: 6px 0 0; }
ul.legend { list-style: none; padding: 0; margin: 0 0 10px; display: flex; flex-wrap: wrap; gap: 4px 22px;
            color: #444; font-size: 13px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px;
       border: 2px solid var(--c); background: var(--c); vertical-align: -1px; }
.mark-kept { --c: #0072B2; } .mark-not-ok { --c: #CC79A7; } .mark-to-delete { --c: #E69F00; }
.mark-to-quarantine { --c: #E69F00; } .mark-deleted { --c: #D55E00; } .mark-quarantined { --c: #882255; }
.mark-gone { --c: #6E6E6E; }
.mark-to-delete .dot, .mark-to-quarantine .dot { background: #fff; }
.mark-deleted .dot, .mark-gone .dot, .mark-quarantined .dot { border-radius: 2px; }
table.checkpoints { width: 100%; font-size: 13px; }
.checkpoints th { text-align: left; border-bottom: 2px solid #bbb; padding: 6px 8px; white-space: nowrap;
                  position: sticky; top: 0; background: #fff; }
.checkpoints td { border-bottom: 1px solid #e6e6e6; padding: 5px 8px; vertical-align: top; }
.checkpoints td.more { font-size: 12px; color: #555; overflow-wrap: anywhere; min-width: 12em; }
.checkpoints td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.checkpoints td.name { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px;
                       overflow-wrap: break-word; }
.checkpoints tr.mark-deleted td, .checkpoints tr.mark-gone td, .checkpoints tr.mark-quarantined td { color: #777; }
.checkpoints tr.mark-deleted td.name, .checkpoints tr.mark-gone td.name { text-decoration: line-through; }
.tag { font: 600 11px system-ui, sans-serif; border-radius: 3px; padding: 0 5px; margin-left: 4px; color: #fff;
       white-space: nowrap; text-decoration: none; display: inline-block; }
.tag.latest { background: #222; } .tag.best { background: #B08400; } .tag.pinned { background: #009E73; }
footer { color: #888; font-size: 12px; margin: 24px 0; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="ckptd report">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>{heading}</h1>
<p class="sub">ckptd report, made {when} from the catalog</p>
<table class="facts">{facts}</table>
{notes}
<figure>
{svg}
<figcaption class="sub">Each mark is a checkpoint, coloured by what happened to it. Rings: a proved copy on a
mirror target (one ring per target). Star: the run's best. Dashed line: its latest, what
<code>ckptd latest</code> resumes from. Hover a mark for its checkpoint and why it was kept or deleted{hidden}.
</figcaption>
</figure>
<h2>Every checkpoint ({count})</h2>
<ul class="legend">{legend}</ul>
<div class="scroll">
<table class="checkpoints">
<thead><tr>{columns}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
</div>
<footer>Made by ckptd. Present checkpoints show what the next retention pass would do with them and by which rule;
removed ones show what the journal recorded.</footer>
</body>
</html>
"""


def write(path: Path, data: bytes) -> None:
    """Write a rendering to `path` atomically (a reader never sees half a report). Raises OSError."""
    atomic_write_bytes(path, data)
