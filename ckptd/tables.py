"""Human-readable output: rich tables for the CLI. Imported only when a command prints for a person."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape as _e
from rich.table import Table

from ckptd.model import Entry, Verification
from ckptd.sidecar import Sidecar

_STYLE = {"ok": "green", "corrupt": "bold red", "unsafe": "bold magenta", "unsupported": "yellow"}


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _status(status: str | None) -> str:
    status = status or "pending"
    return f"[{_STYLE.get(status, 'dim')}]{status}[/]"


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _relative(path: str, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def print_verifications(results: Sequence[Verification]) -> None:
    """One row per verified path, then every problem and warning spelled out."""
    console = Console()
    table = Table(show_edge=False, pad_edge=False)
    for column in ("checkpoint", "status", "format", "size", "epoch", "step", "tensors", "metrics"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(
            _e(r.path), _status(r.status), r.format or "-", human_bytes(r.size_bytes),
            "-" if r.epoch is None else str(r.epoch), "-" if r.global_step is None else str(r.global_step),
            str(r.tensors.count), _e(_metrics(r.metrics)),
        )  # fmt: skip
    console.print(table)
    for r in results:
        for line in r.problems:
            console.print(f"[red]problem[/] {_e(line)}", highlight=False)
        if r.unsafe_globals:
            console.print(
                f"[magenta]unsafe[/] {_e(r.path)}: needs globals {_e(', '.join(r.unsafe_globals))}"
                " (admit harmless ones with --trust MODULE.NAME)",
                highlight=False,
            )
        for line in r.warnings:
            console.print(f"[yellow]warning[/] {_e(r.path)}: {_e(line)}", highlight=False)


def print_entries(entries: Sequence[Entry], base: Path) -> None:
    """A table of checkpoints from their sidecars."""
    table = Table(show_edge=False, pad_edge=False)
    for column in ("checkpoint", "status", "epoch", "step", "size", "modified", "metrics"):
        table.add_column(column, overflow="fold")
    for e in sorted(entries, key=lambda e: (e.run, e.step if e.step is not None else -1, e.mtime)):
        status = _status(e.status) if e.verified else "[yellow]changed since verified[/]"
        table.add_row(
            _e(_relative(e.path, base)), status, "-" if e.epoch is None else str(e.epoch),
            "-" if e.step is None else str(e.step), human_bytes(e.size),
            datetime.fromtimestamp(e.mtime, UTC).strftime("%Y-%m-%d %H:%M:%S"), _e(_metrics(e.metrics)),
        )  # fmt: skip
    Console().print(table if entries else f"no verified checkpoints under {_e(str(base))}")


def print_sidecar(found: Sidecar, current: bool) -> None:
    """What one sidecar says, as aligned key/value lines."""
    v = found.verification
    table = Table.grid(padding=(0, 2))
    rows: list[tuple[str, Any]] = [
        ("checkpoint", v.path), ("status", _status(v.status) + ("" if current else " [yellow](changed since)[/]")),
        ("format", v.format), ("producer", v.producer), ("size", human_bytes(v.size_bytes)), ("sha256", v.sha256),
        ("epoch", v.epoch), ("step", v.global_step), ("metrics", _metrics(v.metrics)),
        ("tensors", f"{v.tensors.count} ({v.tensors.parameters:,} parameters, {human_bytes(v.tensors.bytes)})"),
        ("dtypes", ", ".join(f"{k}: {n}" for k, n in sorted(v.tensors.dtypes.items()))),
        ("verified", f"{found.verified_at} on {found.host} by ckptd {found.ckptd_version}"),
        ("pinned", "yes" if found.pinned else "no"),
    ]  # fmt: skip
    rows += [("problem", p) for p in v.problems] + [("warning", w) for w in v.warnings]
    rows += [("unsafe global", g) for g in v.unsafe_globals]
    for key, value in rows:
        shown = "-" if value is None else str(value) if key == "status" else _e(str(value))  # status is markup
        table.add_row(f"[bold]{key}[/]", shown)
    Console().print(table)


def print_scan(summary: dict[str, Any], state_dir: Path) -> None:
    """One paragraph per scanned folder."""
    console = Console()
    for root, s in summary.items():
        verified = ", ".join(f"{n} {status}" for status, n in sorted(s["verified"].items())) or "none"
        console.print(
            f"[bold]{_e(root)}[/]: verified {verified}; {s['unchanged']} unchanged; {s['links']} link(s);"
            f" {len(s['gone'])} gone; {len(s['removed_sidecars'])} stale sidecar(s) removed",
            highlight=False,
        )
        for item in s["not_ok"]:
            console.print(f"  [red]{item['status']}[/] {_e(item['path'])}: {_e('; '.join(item['problems']))}",
                          highlight=False)  # fmt: skip
        for path in s["still_being_written"]:
            console.print(f"  [yellow]busy[/] {_e(path)}: changed while being read; will be verified later")
        for line in s["unreadable"]:
            console.print(f"  [red]unreadable[/] {_e(line)}", highlight=False)
    console.print(f"catalog: {_e(str(state_dir))}", highlight=False, style="dim")


def print_status(report: dict[str, Any]) -> None:
    """The daemon's state and each watched folder's runs with their latest and best."""
    console = Console()
    if report["running"]:
        console.print(f"daemon: [green]running[/] (pid {report['pid']}), queue {report['queue']}", highlight=False)
    else:
        console.print("daemon: [yellow]not running[/]", highlight=False)
    for name, watch in report["watches"].items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(watch["checkpoints"].items())) or "no checkpoints"
        mode = "polling" if watch["polling"] else "inotify"
        console.print(
            f"\n[bold]{_e(name)}[/] {_e(watch['folder'])} ({mode}): {counts};"
            f" last reconciliation {watch['last_reconciliation'] or 'never'}",
            highlight=False,
        )
        table = Table(show_edge=False, pad_edge=False)
        for column in ("run", "latest", "best"):
            table.add_column(column, overflow="fold")
        for run in watch["runs"]:
            best = "-"
            if run["best"] and run["best_value"] is not None:
                best = f"{Path(run['best']).name} ({run['best_metric']}={run['best_value']:.4g})"
            elif run["best"]:  # no metric ranks the run: the trainer's own best file (selection.best)
                best = f"{Path(run['best']).name} (the trainer's own best)"
            name = _relative(run["run"], Path(watch["folder"]))
            if run.get("trainer_rotates"):
                name += " (its trainer rotates it)"
            latest = Path(run["latest"]).name if run["latest"] else "-"
            if run.get("latest_weights"):
                latest += f" (newer, weights only: {Path(run['latest_weights']).name})"
            if run.get("metric_missing"):
                missing = run["metric_missing"]
                best += f" ({missing['metric']} missing; held: {', '.join(missing['held']) or 'none'})"
            table.add_row(_e(name), _e(latest), _e(best))
        if watch["runs"]:
            console.print(table)
    for watch in report["watches"].values():
        for bad in watch.get("not_ok", [])[:20]:
            console.print(f"[red]{bad['status']}[/] {_e(bad['path'])}: {_e(bad['problem'] or '')}", highlight=False)
    for item in report.get("quarantined", [])[:20]:
        console.print(f"[red]quarantined[/] {_e(item['path'])} -> {_e(str(item['to']))}", highlight=False)
    for path, failure in list(report.get("failing_checkpoints", {}).items())[:20]:
        console.print(f"[red]cannot record[/] {_e(path)}: {_e(failure['error'])}", highlight=False)
    for step, error in report.get("failing_steps", {}).items():
        console.print(f"[red]daemon step failing[/] {_e(step)}: {_e(error)}", highlight=False)
    for name, holder in report.get("standing_by", {}).items():
        owner = f"{holder['node']} ({holder['host']}, pid {holder['pid']})" if holder else "another daemon"
        console.print(f"[yellow]standing by[/] watch {name}: its folder is owned by {_e(owner)}", highlight=False)
    for name, short in report.get("below_min_free", {}).items():
        console.print(f"[red]disk below min_free[/] watch {name}: {short} bytes short", highlight=False)
    for name, error in report.get("unreachable_targets", {}).items():
        console.print(f"[red]mirror target unreachable[/] {name}: {_e(error)}", highlight=False)
    for name in report.get("unhealthy_watches", []):
        console.print(f"[red]observer stopped[/] watch {name} (restarted by the daemon)", highlight=False)
    for name, error in report.get("broken_targets", {}).items():
        console.print(f"[red]mirror target unusable[/] {name}: {_e(error)}", highlight=False)
    if report.get("config_rejected"):
        rejected = report["config_rejected"]
        console.print(f"[red]config reload rejected[/] at {rejected['at']}, running on the old config:",
                      highlight=False)  # fmt: skip
        for problem in rejected["problems"]:
            console.print(f"  - {_e(problem)}", highlight=False)
    for problem in report.get("scrub_problems", [])[:20]:
        console.print(
            f"[red]scrub[/] {_e(problem['location'])}: {problem['result']} {_e(problem['detail'] or '')}",
            highlight=False,
        )
    for name, backlog in report.get("mirrors", {}).items():
        line = (
            f"\nmirror [bold]{name}[/]: {backlog['done']} copied, {backlog['pending']} waiting,"
            f" {backlog['failed']} failing"
        )
        if backlog["last_error"]:
            line += f"; last error: {_e(backlog['last_error'])}"
        console.print(line, highlight=False)
    if report.get("attention"):
        console.print(f"\n[red]{len(report['attention'])} thing(s) need attention[/] (`ckptd status --check` fails)",
                      highlight=False)  # fmt: skip


def print_prune(reports: Sequence[Any]) -> None:
    """A table per run: each checkpoint's action and reasons, and the bytes the plan frees."""
    console = Console()
    for report in reports:
        by_run: dict[str, list[Any]] = {}
        for decision in report.plan.decisions:
            by_run.setdefault(decision.run, []).append(decision)
        skipped = {d.path: why for d, why in report.skipped}
        for run, decisions in sorted(by_run.items()):
            table = Table(title=_e(f"{report.watch}: {run}"), title_justify="left", show_edge=False, pad_edge=False)
            for column in ("checkpoint", "action", "size", "reasons"):
                table.add_column(column, overflow="fold")
            for d in sorted(decisions, key=lambda d: d.path):
                action = {"keep": "[green]keep[/]", "delete": "[red]delete[/]"}.get(d.action, f"[yellow]{d.action}[/]")
                if d.path in skipped:
                    action += f" [dim](skipped: {_e(skipped[d.path])})[/]"
                table.add_row(_e(Path(d.path).name), action, human_bytes(d.size), _e("; ".join(d.reasons)))
            console.print(table)
        verb = "would free" if report.dry_run else "freed"
        freed = sum(d.size for d in report.plan.decisions if d.action != "keep" and d.path not in skipped)
        console.print(f"{report.watch}: {verb} {human_bytes(freed)}", highlight=False)
        for warning in report.plan.warnings:
            console.print(f"[yellow]warning[/] {_e(warning)}", highlight=False)


def print_fleet(indexes: dict[str, dict[str, Any]], *, now: float) -> None:
    """Every box's runs on a shared target (`ckptd ls s3://...`): one row per copy, with its box, run, roles,
    step, metrics, size and age, from the runs' index files (keys `<node>/<watch>/<run>`)."""
    table = Table(show_edge=False, pad_edge=False)
    for column in ("box", "run", "copy", "roles", "step", "epoch", "metrics", "size", "age"):
        table.add_column(column, overflow="fold")
    for prefix, index in sorted(indexes.items()):
        node, _, run = prefix.partition("/")
        for name, copy in sorted(index.get("copies", {}).items()):
            roles = [r for r in ("best", "latest") if (index.get(r) or {}).get("name") == name]
            roles += [r for r in copy.get("roles", []) if r in ("milestone", "all")]
            size = copy.get("size_bytes")
            table.add_row(
                _e(node), _e(run), _e(name), ", ".join(roles) or "superseded",
                "-" if copy.get("step") is None else str(copy["step"]),
                "-" if copy.get("epoch") is None else str(copy["epoch"]), _e(_metrics(copy.get("metrics") or {})),
                "-" if size is None else human_bytes(size), _age(copy.get("mirrored_at"), now),
            )  # fmt: skip
    Console().print(table)


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
