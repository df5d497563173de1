"""The `ckptd` command line. Errors become a message and an exit code here, in one place (`main`).

Commands that only read sidecars or the catalog (`latest`, `best`, `list`, `show`, `status`) never import
torch, so they answer in a fraction of a second inside launch scripts.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import math
import os
import shlex
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckptd import __version__
from ckptd.errors import CkptdError, ConfigError, ExitCode, NoAnswer, UsageError

if TYPE_CHECKING:
    from ckptd.catalog import Catalog
    from ckptd.config import Config, WatchConfig
    from ckptd.model import Entry, Verification
    from ckptd.progress import Tracker
    from ckptd.sidecar import Sidecar, Store

DEFAULT_CONFIGS = (Path("config.toml"), Path("/etc/ckptd/config.toml"))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI and exit with ckptd's documented status (see errors.ExitCode)."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="ckptd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ckptd: aborted", err=True)
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = ExitCode.USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except CkptdError as exc:
        click.echo(f"ckptd: {exc}", err=True)
        code = exc.exit_code
    except BrokenPipeError:
        code = ExitCode.OK
    except OSError as exc:  # the machine refused (a state folder not writable, a full disk): not a bug of ours
        if _debugging():
            traceback.print_exc()
        click.echo(f"ckptd: {exc}", err=True)
        code = ExitCode.IO
    except Exception as exc:  # a bug of ours: one line for the user, the traceback for a report
        if _debugging():
            traceback.print_exc()
        hint = "" if _debugging() else " (run with --debug for the traceback)"
        click.echo(f"ckptd: unexpected error: {type(exc).__name__}: {exc}{hint}", err=True)
        code = ExitCode.SOFTWARE
    sys.exit(int(code or 0))


_debug = False


def _debugging() -> bool:
    return _debug or os.environ.get("CKPTD_DEBUG", "") not in ("", "0")


def _echo_path(path: str) -> None:
    """Print a path for scripts (`"$(ckptd latest RUN)"`): its bytes exactly as the file system has them, even
    when they are not valid UTF-8."""
    sys.stdout.flush()
    sys.stdout.buffer.write(os.fsencode(path) + b"\n")
    sys.stdout.buffer.flush()


def _echo_json(value: Any) -> None:
    """Print one strict JSON document on stdout: a float that is not finite becomes the string "NaN",
    "Infinity" or "-Infinity" (as in sidecars), so that jq, JavaScript and Go parse every answer."""
    click.echo(json.dumps(_finite(value), indent=2, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(inner) for inner in value]
    return value


def _config_path(option: Path | None) -> Path | None:
    if option is not None:
        return option
    from_env = os.environ.get("CKPTD_CONFIG")
    if from_env:
        return Path(from_env)
    return next((p for p in DEFAULT_CONFIGS if p.is_file()), None)


def _load(option: Path | None, *, required: bool, folders: bool = True) -> Config | None:
    """The config, or None when there is none and it is not `required` (UsageError when it is).

    folders=False skips the check that the watched folders exist (see config.load_config).
    """
    from ckptd.config import load_config

    path = _config_path(option)
    if path is None:
        if required:
            raise UsageError("no config file: pass --config FILE (or set CKPTD_CONFIG, or add ./config.toml)")
        return None
    return load_config(path, check_folders=folders)


def _command_config(option: Path | None, *, folders: bool = True) -> Config:
    """The config a command needs, with its logs kept to warnings and errors on stderr."""
    from ckptd import log

    config = _load(option, required=True, folders=folders)
    assert config is not None
    log.configure(config.daemon.log_format, "warning")
    return config


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file [default: $CKPTD_CONFIG, ./config.toml, /etc/ckptd/config.toml].",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckptd")
@click.option("--debug", is_flag=True, help="Print the traceback of an unexpected error (also CKPTD_DEBUG=1).")
def cli(debug: bool) -> None:
    """Verify, catalog, prune and mirror training checkpoints."""
    global _debug
    _debug = debug


# ----------------------------------------------------------------------------------------------- verify


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per PATH.")
@click.option("--trust", multiple=True, metavar="MODULE.NAME", help="Admit a pickle global (repeatable).")
@config_option
def verify(paths: tuple[Path, ...], as_json: bool, trust: tuple[str, ...], config_file: Path | None) -> int:
    """Verify checkpoints: hash, CRCs, a safe load, NaN/Inf. Exit 0 when every PATH is ok, else 1."""
    from ckptd import progress
    from ckptd import verify as engine
    from ckptd.model import CheckpointChanged

    config = _load(config_file, required=False) if config_file else None
    trusted = [*trust, *(config.daemon.trusted_globals if config else [])]
    try:
        engine.resolve_trusted(trusted)
    except engine.TrustError as exc:
        raise UsageError(str(exc)) from exc
    results: list[Verification] = []
    busy: list[str] = []
    with progress.shown() as bars:
        if bars is not None:
            bars.plan(len(paths), sum(progress.size_of(_named(path)) for path in paths))
        for path in paths:
            watch = _watch_of(config, path)
            keys = watch.metric.keys() if watch is not None and watch.metric is not None else {}
            try:
                results.append(_verify_one(engine, path, trusted, keys, bars))
            except CheckpointChanged as exc:
                busy.append(f"{exc.path}: changed while being verified (still being written?); try again")
    if as_json:
        from ckptd.sidecar import jsonable

        _echo_json([jsonable(r) for r in results])
    else:
        from ckptd import tables

        tables.print_verifications(results)
    for line in busy:
        click.echo(f"ckptd: {line}", err=True)
    return ExitCode.OK if not busy and all(r.status == "ok" for r in results) else ExitCode.CHECK_FAILED


def _named(path: Path) -> Path:
    """A checkpoint named on the command line: a link's target, which is what the user means."""
    return path.resolve() if path.is_symlink() else path


def _verify_one(
    engine: Any, path: Path, trusted: list[str], keys: dict[str, str], bars: Tracker | None
) -> Verification:
    path = _named(path)
    from ckptd.progress import size_of

    read = bars.start(path.name, size_of(path), "verify") if bars is not None else None
    result: Verification = engine.verify(path, trusted=trusted, progress=read, metric_keys=keys)
    return result


# ------------------------------------------------------------------------------------------------- scan


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, file_okay=True, path_type=Path))
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def scan(paths: tuple[Path, ...], config_file: Path | None, as_json: bool) -> int:
    """Verify new and changed checkpoints under PATHS (or the watched folders), once, then exit."""
    from ckptd import log, progress
    from ckptd.catalog import Catalog
    from ckptd.config import DEFAULT_PATTERNS
    from ckptd.scan import reconcile
    from ckptd.sidecar import Store, store_of
    from ckptd.verify import engine_versions
    from ckptd.verify import verify as engine_verify

    config = _load(config_file, required=not paths)
    log.configure(config.daemon.log_format if config else "console", "warning")
    state_dir = config.daemon.state_dir if config else Path.home() / ".local/state/ckptd"
    trusted = config.daemon.trusted_globals if config else []
    from ckptd.verify import TrustError, resolve_trusted

    try:  # once, before any checkpoint: a name that will not import concerns the config, not a checkpoint
        resolve_trusted(trusted)
    except TrustError as exc:
        assert config is not None
        raise ConfigError(str(config.source), [f"at 'daemon.trusted_globals': {exc}"]) from None
    targets: list[tuple[str, Path, list[str]]] = []
    if paths:
        for path in paths:
            watch = _watch_of(config, path)
            targets.append(
                (watch.name, path.absolute(), watch.patterns) if watch else ("", path.absolute(), DEFAULT_PATTERNS)
            )
    else:
        assert config is not None
        targets = [(w.name, w.path, w.patterns) for w in config.watch]
    summary: dict[str, Any] = {}
    failed = False
    with Catalog(state_dir) as catalog, progress.shown() as bars:
        for watch_name, root, patterns in targets:
            watch = config.watch_named(watch_name) if config else None
            report = reconcile(
                root, watch=watch_name, patterns=patterns, catalog=catalog,
                verifier=functools.partial(engine_verify, trusted=trusted, root=root if root.is_dir() else root.parent,
                                           metric_keys=watch.metric.keys() if watch and watch.metric else None),
                engine=engine_versions,
                boundaries=[w.path for w in config.watch] if config else (),
                store=store_of(config) if config else Store(),
                placement=watch.sidecars if watch else "auto", metric=watch.metric if watch else None,
                progress=bars,
            )  # fmt: skip
            failed |= any(v.status != "ok" for v in report.verified) or bool(report.failed)
            summary[str(root)] = {
                "verified": dict(report.by_status()), "unchanged": report.unchanged, "links": report.links,
                "still_being_written": report.busy, "gone": report.gone,
                "removed_sidecars": report.removed_sidecars, "unreadable": report.failed,
                "not_ok": [{"path": v.path, "status": v.status, "problems": v.problems}
                           for v in report.verified if v.status != "ok"],
            }  # fmt: skip
    if as_json:
        _echo_json(summary)
    else:
        from ckptd import tables

        tables.print_scan(summary, state_dir)
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


def _watch_of(config: Config | None, path: Path) -> Any:
    if config is None:
        return None
    resolved = path.resolve()
    return next((w for w in config.watch if resolved.is_relative_to(w.path.resolve())), None)


# ------------------------------------------------------------------------------------ read-only questions


def _reading_config(config_file: Path | None) -> Config | None:
    """The config for the read-only commands, when one is found and loads; None otherwise. A config that does not
    load is no reason to refuse an answer: they then read only the sidecars beside checkpoints."""
    path = _config_path(config_file)
    if path is None:
        return None
    try:
        from ckptd.config import load_config

        return load_config(path, check_folders=False)
    except CkptdError:
        return None


def _reading_store(config: Config | None) -> Store:
    """Where sidecars are: the config's state folder too (some trainers' sidecars live there, see
    docs/layouts.md); beside the checkpoints only without a config."""
    from ckptd.sidecar import Store, store_of

    return store_of(config) if config is not None else Store()


def _entries(folder: Path, config: Config | None) -> list[tuple[Sidecar, Entry]]:
    """The verified checkpoints under `folder`, from their sidecars, by path."""
    return sorted(_each_entry(folder, config), key=lambda found: found[1].path)


def _each_entry(folder: Path, config: Config | None) -> Iterator[tuple[Sidecar, Entry]]:
    """`_entries` one at a time, in walk order: what a whole tree's `list --json` streams."""
    from ckptd.model import Entry

    for parsed, current in _reading_store(config).find(folder):
        yield parsed, Entry.of(parsed.verification, _run_of(parsed), parsed.pinned, verified=current)


def _run_of(parsed: Sidecar) -> str:
    """The run of a checkpoint: the folder its trainer writes checkpoints into (see ckptd.layouts)."""
    from ckptd import layouts

    return str(layouts.run_of(parsed.checkpoint, parsed.verification.layout))


def _existing_folder(path: Path) -> Path:
    """The run folder asked about, absolute; a link to a folder answers for the folder it points to."""
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder (give the run folder that holds the checkpoints)")
    return path.resolve() if path.is_symlink() else path.absolute()


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--weights", is_flag=True, help="Also answer with a checkpoint that holds weights only.")
@config_option
def latest(run: Path, weights: bool, config_file: Path | None) -> int:
    """Print the path of RUN's newest ok checkpoint that training can resume from (it holds optimizer state;
    by step, then epoch, then mtime); exit 1 if there is none.

    Made for launch scripts: python train.py --resume "$(ckptd latest runs/exp1)"
    """
    from ckptd import selection

    entries = [e for _s, e in _entries(_existing_folder(run), _reading_config(config_file))]
    found = selection.latest(entries, weights=weights)
    if found is None:
        only = selection.latest(entries, weights=True)
        if only is not None:
            raise NoAnswer(
                f"{run}: no verified checkpoint holds training state to resume from; the newest holds weights only"
                f" ({only.path}): use --weights to accept it"
            )
        raise NoAnswer(f"{run}: no verified ok checkpoint yet (is the daemon running? try: ckptd scan {run})")
    _echo_path(found.path)
    return ExitCode.OK


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--metric", help="Metric name, such as val_loss [default: the watch's metric in the config].")
@click.option("--mode", type=click.Choice(["min", "max"]), help="[default: the watch's mode, else min]")
@config_option
def best(run: Path, metric: str | None, mode: str | None, config_file: Path | None) -> int:
    """Print the path of RUN's best ok checkpoint by METRIC, or else the trainer's own best file (best.pt,
    best_model.pt, best_<metric>.ckpt); exit 1 if there is neither."""
    from ckptd import selection

    folder = _existing_folder(run)
    config = _reading_config(config_file)
    watch = _watch_of(config, folder)
    if metric is None and watch is not None and watch.metric is not None:
        metric, mode = watch.metric.name, mode or watch.metric.mode
    entries = [e for _s, e in _entries(folder, config)]
    found = selection.best(entries, metric, "max" if mode == "max" else "min")
    held = selection.metric_names(entries)
    if metric is not None and metric not in held:
        names = ", ".join(held[:20]) or "none"
        if found is None:
            raise NoAnswer(f"{run}: no verified ok checkpoint has the metric {metric!r}; they hold: {names}")
        click.echo(f"ckptd: no checkpoint of {run} holds {metric!r} (they hold: {names}); this is the trainer's own"
                   " best file", err=True)  # fmt: skip
    elif found is None:
        raise NoAnswer(f"{run}: give --metric (no metric in the config for it, and no best.pt-like file)")
    _echo_path(found.path)
    return ExitCode.OK


@cli.command(name="list")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@config_option
def list_(folder: Path, as_json: bool, config_file: Path | None) -> int:
    """List the verified checkpoints under a run or a folder of runs, from their sidecars."""
    where, config = _existing_folder(folder), _reading_config(config_file)
    if as_json:
        from ckptd.sidecar import jsonable

        # Streamed, one checkpoint at a time: a whole tree of a million checkpoints in constant memory.
        rows = ({**jsonable(s.verification), "current": e.verified, "verified_at": s.verified_at,
                 "pinned": s.pinned} for s, e in _each_entry(where, config))  # fmt: skip
        _echo_json_array(rows)
    else:
        from ckptd import tables

        tables.print_entries([e for _s, e in _entries(where, config)], folder)
    return ExitCode.OK


def _echo_json_array(rows: Iterable[Any]) -> None:
    """Print a JSON array as `json.dumps(list(rows), indent=2)` would, writing each row as it comes."""
    first = True
    for row in rows:
        item = json.dumps(row, indent=2, allow_nan=False).replace("\n", "\n  ")  # strings hold no raw newline
        click.echo(("[\n  " if first else ",\n  ") + item, nl=False)
        first = False
    click.echo("[]" if first else "\n]")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar's JSON.")
@config_option
def show(checkpoint: Path, as_json: bool, config_file: Path | None) -> int:
    """Show what ckptd knows of one checkpoint (its sidecar); a link answers for the checkpoint it points to."""
    from ckptd import sidecar

    store = _reading_store(_reading_config(config_file))
    if checkpoint.is_symlink():
        checkpoint = checkpoint.resolve()
    parsed = store.read(checkpoint.absolute())
    where = store.path_of(checkpoint.absolute())
    if parsed is None or where is None:
        raise NoAnswer(f"{checkpoint}: not verified yet (no sidecar); run: ckptd verify {checkpoint}")
    current = sidecar.is_current(parsed, checkpoint.absolute())
    if as_json:
        click.echo(where.read_text(), nl=False)
    else:
        from ckptd import tables

        tables.print_sidecar(parsed, current)
    return ExitCode.OK if parsed.verification.status == "ok" and current else ExitCode.CHECK_FAILED


@cli.command()
@config_option
def run(config_file: Path | None) -> int:
    """Run the daemon: watch, verify, record, until SIGTERM (reload the config with SIGHUP)."""
    from ckptd import daemon

    path = _config_path(config_file)
    if path is None:
        raise UsageError("no config file: pass --config FILE (or set CKPTD_CONFIG, or add ./config.toml)")
    return daemon.run(path)


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--check", is_flag=True,
              help="Exit 1 when something needs a person: the daemon down, a target failing for longer than"
                   " --failing-for, a quarantine not acknowledged, a checkpoint that cannot be recorded.")  # fmt: skip
@click.option("--failing-for", default="1h", show_default=True, metavar="DURATION",
              help="With --check: how long a target may fail before it counts.")  # fmt: skip
@click.option("--ack", is_flag=True, help="Acknowledge the quarantines listed so far (--check then passes).")
@click.option(
    "--run",
    "run_folder",
    type=click.Path(path_type=Path),
    help="Only this run folder's checkpoints, latest and best (the rest of the report stays whole).",
)
def status(
    config_file: Path | None, as_json: bool, check: bool, failing_for: str, ack: bool, run_folder: Path | None
) -> int:
    """Is the daemon running; per watched folder: runs, checkpoints by status, latest and best, queue; and what
    needs a person (checkpoints not ok, quarantines, failing targets and steps)."""
    from ckptd import state
    from ckptd.catalog import Catalog
    from ckptd.config import parse_duration

    config = _command_config(config_file)
    try:
        threshold = parse_duration(failing_for)
    except ValueError as exc:
        raise UsageError(f"--failing-for {failing_for!r}: {exc}") from None
    state_dir = config.daemon.state_dir
    now = time.time()
    if ack:
        state.acknowledge(state_dir, now)
    pid = state.holder(state_dir)
    published = (state.read_status(state_dir) or {}) if pid else {}
    report: dict[str, Any] = {
        "running": pid is not None, "pid": pid, "state_dir": str(state_dir),
        "queue": published.get("queue", 0) + len(published.get("in_flight", [])) if pid else 0,
        "updated_at": published.get("updated_at"), "watches": {},
        "failing_steps": published.get("failing_steps", {}),
        "failing_checkpoints": published.get("failing_checkpoints", {}),
        "broken_targets": published.get("broken_targets", {}),
        "unreachable_targets": published.get("unreachable_targets", {}),
        "unhealthy_watches": sorted(n for n, w in published.get("watches", {}).items() if not w.get("healthy", True)),
        "below_min_free": published.get("below_min_free", {}),
        "config_rejected": published.get("config_rejected"),
        "standing_by": published.get("standing_by", {}),
    }  # fmt: skip
    only = _run_in_config(config, run_folder) if run_folder is not None else None
    with Catalog(state_dir) as catalog:
        for watch in config.watch:
            if only is not None and only[0] is not watch:
                continue
            run = only[1] if only is not None else None
            runs = catalog.runs(watch.name, run)
            report["watches"][watch.name] = {
                "folder": str(watch.path),
                **({"run": run} if run is not None else {}),
                "checkpoints": catalog.counts(watch.name, run),
                "not_ok": catalog.not_ok(watch.name, run=run),
                "runs": [_run_status(catalog, watch, r) for r in runs],
                "polling": published.get("watches", {}).get(watch.name, {}).get("polling", watch.poll),
                "last_reconciliation": published.get("last_reconciliation", {}).get(watch.name),
            }
        report["scrub_problems"] = catalog.scrub_problems()
        report["quarantined"] = catalog.quarantined_since(state.acknowledged_at(state_dir))
        backlog = catalog.mirror_backlog()
        report["mirrors"] = {name: backlog.get(name, {"pending": 0, "failed": 0, "done": 0, "last_error": None,
                             "failing_since": None}) for name in config.mirror}  # fmt: skip
    report["attention"] = _attention(report, now=now, failing_for=threshold)
    if as_json:
        _echo_json(report)
    else:
        from ckptd import tables

        tables.print_status(report)
    return ExitCode.CHECK_FAILED if check and report["attention"] else ExitCode.OK


def _attention(report: dict[str, Any], *, now: float, failing_for: float) -> list[str]:
    """What in a status report needs a person, one line each (`status --check` fails on any)."""
    found = []
    if not report["running"]:
        found.append("the daemon is not running")
    elif report["updated_at"] is None or now - _epoch(report["updated_at"]) > STATUS_STALE:
        found.append(f"the daemon has not written its status since {report['updated_at']} (a full state folder,"
                     " or a main loop that stopped): its other answers may be old")  # fmt: skip
    for name, error in report["broken_targets"].items():
        found.append(f"mirror target {name} cannot be used: {error}")
    for name, error in report["unreachable_targets"].items():
        found.append(f"mirror target {name} could not be reached at the last recheck: {error}")
    for name in report["unhealthy_watches"]:
        found.append(f"watch {name}: its observer stopped (restarted and rescanned by the daemon)")
    for problem in report["scrub_problems"]:
        if problem["result"] in ("mismatch", "unreadable"):
            found.append(f"scrub {problem['location']}: {problem['result']} {problem['detail'] or ''}".strip())
    for name, backlog in report["mirrors"].items():
        since = backlog.get("failing_since")
        if since is not None and now - since >= failing_for:
            found.append(f"mirror target {name}: {backlog['failed']} copies failing since {_iso(since)}:"
                         f" {backlog['last_error']}")  # fmt: skip
    for item in report["quarantined"]:
        found.append(f"quarantined {item['path']} to {item['to']} (acknowledge with `ckptd status --ack`)")
    for path, failure in report["failing_checkpoints"].items():
        found.append(f"cannot record {path}: {failure['error']}")
    for step, error in report["failing_steps"].items():
        found.append(f"daemon step {step} failing: {error}")
    for watch, short in report["below_min_free"].items():
        found.append(
            f"watch {watch}: its disk is {short} bytes below min_free (retention frees what no invariant"
            " keeps; the rest needs a person)"
        )
    if report["config_rejected"]:
        found.append(f"the last config reload was rejected: {'; '.join(report['config_rejected']['problems'])}")
    return found


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


STATUS_STALE = 180.0  # a running daemon rewrites status.json at least every minute (daemon.STATUS_IDLE_EVERY)


def _epoch(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _run_status(catalog: Catalog, watch: WatchConfig, run: dict[str, Any]) -> dict[str, Any]:
    """One run's line of `status`: latest (resumable) and best, the newest weights-only checkpoint when it is
    newer, whether its trainer rotates it, and the metric names it holds when the watch's metric is not one."""
    from ckptd import selection

    found: dict[str, Any] = {k: run[k] for k in ("run", "latest", "best", "best_metric", "best_value")}
    found["trainer_rotates"] = run["rotated_at"] is not None
    entries = [r.entry() for r in catalog.in_run(run["run"]) if r.kind != "link"]
    newest = selection.latest(entries, weights=True)
    found["latest_weights"] = newest.path if newest is not None and newest.path != run["latest"] else None
    held = selection.metric_names(entries)
    missing = watch.metric is not None and watch.metric.name not in held and bool(selection.usable(entries))
    found["metric_missing"] = {"metric": watch.metric.name, "held": held[:20]} if missing and watch.metric else None
    return found


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print the plan; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as a JSON list.")
@click.option("--run", "run_folder", type=click.Path(path_type=Path), help="Only this run folder.")
def prune(config_file: Path | None, dry_run: bool, as_json: bool, run_folder: Path | None) -> int:
    """Apply each watch's retention policy now (or only print the plan, with --dry-run)."""
    from ckptd.catalog import Catalog
    from ckptd.prune import prune_watch

    config = _command_config(config_file)
    only = _run_in_config(config, run_folder) if run_folder is not None else None
    reports = []
    before = _finish_before(config.daemon.state_dir)
    with Catalog(config.daemon.state_dir) as catalog:
        for watch in config.watch:
            if watch.retention is None or (only is not None and only[0] is not watch):
                continue
            run = only[1] if only is not None else None
            reports.append(
                prune_watch(
                    watch, watch.retention, catalog=catalog, state_dir=config.daemon.state_dir, dry_run=dry_run,
                    awaiting_mirror=functools.partial(catalog.awaiting_mirror, watch.name, run),
                    finish_before=before, run=run,
                )
            )  # fmt: skip
    if not reports:
        where = f"the watch of {run_folder} has" if only is not None else "no watch has"
        raise UsageError(f"{where} no [watch.retention] section: nothing to prune")
    if as_json:
        _echo_json([row for r in reports for row in r.to_rows()])
    else:
        from ckptd import tables

        tables.print_prune(reports)
    return ExitCode.CHECK_FAILED if any(r.skipped for r in reports) else ExitCode.OK


def _run_in_config(config: Config, folder: Path, *, exists: bool = True) -> tuple[WatchConfig, str]:
    """The watch holding the run folder `folder` and the run as the catalog names it (below the watch's path
    as the config gives it); a UsageError naming the watched folders when it is in none. With `exists` False
    the folder may be gone (`report`: a run deleted whole still has its history in the catalog)."""
    resolved = (_existing_folder(folder) if exists else folder).resolve()
    watch = _watch_of(config, resolved)
    if watch is not None:
        return watch, str(watch.path / resolved.relative_to(watch.path.resolve()))
    watched = ", ".join(str(w.path) for w in config.watch) or "none"
    raise UsageError(f"--run {folder}: not in a watched folder (the config watches: {watched})")


def _finish_before(state_dir: Path) -> float:
    """Which journal intents a command may finish (delete.finish_pending): all of them, unless a daemon runs
    on the same state folder; then only those an hour old, so as never to race one it is carrying out."""
    from ckptd import state

    return time.time() - 3600 if state.holder(state_dir) is not None else float("inf")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@config_option
def pin(checkpoint: Path, config_file: Path | None) -> int:
    """Keep CHECKPOINT forever: retention never deletes a pinned checkpoint."""
    return _set_pin(checkpoint, config_file, pinned=True)


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@config_option
def unpin(checkpoint: Path, config_file: Path | None) -> int:
    """Let retention decide about CHECKPOINT again."""
    return _set_pin(checkpoint, config_file, pinned=False)


def _set_pin(checkpoint: Path, config_file: Path | None, *, pinned: bool) -> int:
    from ckptd import sidecar
    from ckptd.catalog import Catalog

    config = _command_config(config_file)
    path = checkpoint.absolute()
    with Catalog(config.daemon.state_dir) as catalog:
        cataloged = catalog.set_pinned(str(path), pinned)
    # The sidecar is what every box sharing a folder reads: a standby box, whose catalog never saw the
    # checkpoint, pins it there, and the owner's deletion executor honours it (ckptd.delete).
    store = sidecar.store_of(config)
    beside = store.read(path) is not None
    if beside:
        store.set_pinned(path, pinned)
    if not (cataloged or beside):
        raise NoAnswer(f"{checkpoint}: not in the catalog yet; verify it first: ckptd scan {checkpoint.parent}")
    click.echo(f"{'pinned' if pinned else 'unpinned'}: {path}")
    return ExitCode.OK


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print what would be copied; copy nothing.")
@click.option("--verify", "verify_copies", is_flag=True, help="Read back every copy; repair any that differs.")
@click.option("--json", "as_json", is_flag=True, help="Print what the pass did as JSON (failures also on stderr).")
def mirror(config_file: Path | None, dry_run: bool, verify_copies: bool, as_json: bool) -> int:
    """Copy each run's best and latest to the mirror targets now (one pass), or check the copies."""
    from ckptd import mirror as mirroring
    from ckptd import progress
    from ckptd.catalog import Catalog
    from ckptd.mirrors import STALE_AFTER, MirrorError

    config = _command_config(config_file)
    if not config.mirror:
        raise UsageError("no [mirror.NAME] section in the config: nothing to mirror to")
    done: dict[str, Any] = {"dry_run": dry_run, "unusable": {}, "unreachable": {}, "lost": [], "rebuilt": [],
                            "would_copy": [], "copied": [], "failed": [], "verified": {}}  # fmt: skip

    def said(key: str, line: str, text: str, *, err: bool = False) -> None:
        done[key].append(line)
        if err or not as_json:  # a failure goes to stderr with --json too; stdout holds only the document
            click.echo(text, err=err)

    broken: dict[str, str] = {}
    targets = mirroring.targets_of(config, broken)
    for name, error in sorted(broken.items()):  # one unusable target never stops the others
        done["unusable"][name] = error
        click.echo(f"failed: target {name} cannot be used: {error}", err=True)
    with Catalog(config.daemon.state_dir) as catalog:
        for watch in config.watch:
            for run in {r.run for r in catalog.present(watch=watch.name)}:
                mirroring.enqueue_run(catalog, config, watch, run, now=time.time())
        if not verify_copies:  # what the targets lost is queued again (--verify does it, and counts it)
            found = mirroring.recheck(catalog, config, targets, dry_run=dry_run, sweep_idle=STALE_AFTER)
            for name, error in sorted(found.unreachable.items()):
                done["unreachable"][name] = error
                click.echo(f"failed: {name}: not rechecked: {error}", err=True)
            for line in found.lost:
                said("lost", line, f"lost: {line}")
            for line in found.rebuilt:
                said("rebuilt", line, f"{'would rebuild' if dry_run else 'rebuilt'}: {line}")
            for line in found.requeued if dry_run else ():
                said("would_copy", line, f"would copy: {line}")
        with progress.shown(not dry_run) as bars:
            report = mirroring.mirror_pass(config, catalog, targets, dry_run=dry_run, due_only=False, progress=bars)
        for line in report.pending:
            said("would_copy", line, f"would copy: {line}")
        for line in report.copied:
            said("copied", line, f"copied: {line}")
        for line in report.failed:
            said("failed", line, f"failed: {line}", err=True)
        if verify_copies:
            for target in targets.values():
                try:
                    checked = mirroring.verify_target(config, catalog, target, repair=not dry_run)
                except MirrorError as exc:  # a target down: say so, check the others
                    done["verified"][target.name] = {"checked": 0, "bad": [], "repaired": [], "error": str(exc)}
                    click.echo(f"{target.name}: not checked: {exc}", err=True)
                    continue
                bad = [line for line in checked.failed if line not in checked.repaired]
                done["verified"][target.name] = {"checked": checked.checked, "bad": bad,
                                                 "repaired": list(checked.repaired), "error": None}  # fmt: skip
                for line in checked.failed:
                    repaired = line in checked.repaired
                    if not (as_json and repaired):
                        click.echo(f"repaired: {line}" if repaired else f"bad: {line}", err=not repaired)
                if not as_json:
                    click.echo(f"{target.name}: {checked.checked} copies checked, {len(checked.failed)} bad,"
                               f" {len(checked.repaired)} repaired")  # fmt: skip
    failed = bool(done["unusable"] or done["unreachable"] or done["failed"])
    failed |= any(v["error"] is not None or v["bad"] for v in done["verified"].values())
    if as_json:
        _echo_json({**done, "ok": not failed})
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


def _is_url(target: str) -> bool:
    """A target given as a store's URL (`s3://bucket/prefix`, `file:///srv/backup`), not a [mirror.NAME]."""
    return "://" in target


def _target(config: Config | None, name: str, node: str | None = None) -> Any:
    """The target to read: a configured [mirror.NAME] in this box's namespace (or `node`'s), or a store's URL at
    the top of the fleet (or in `node`'s namespace). A URL needs no config: S3 credentials come from the AWS
    chain and an endpoint from $AWS_ENDPOINT_URL."""
    from ckptd.config import MirrorTargetConfig
    from ckptd.mirrors import make_target, scheme_problem

    if _is_url(name):
        problem = scheme_problem(name)
        if problem:
            raise UsageError(f"{name}: {problem}")
        label, folder, namespace = "fleet", Path.cwd(), node or ""
        settings = MirrorTargetConfig(url=name, endpoint_url=os.environ.get("AWS_ENDPOINT_URL", ""))
    elif config is None:
        raise UsageError(f"no config file to find the mirror target {name!r} in: pass --config, or give a URL")
    elif name not in config.mirror:
        known = ", ".join(sorted(config.mirror)) or "none"
        raise UsageError(f"unknown mirror target {name!r} (configured: {known})")
    else:
        label, folder, namespace = name, config.source.parent, node or config.daemon.node
        settings = config.mirror[name]
    try:  # only the target asked for: building every configured one would open a client for each
        return make_target(label, settings, folder, node=namespace)
    except Exception as exc:
        what = name if _is_url(name) else f"mirror target {name}"
        raise NoAnswer(f"{what} cannot be used: {exc}") from None


@cli.command(name="ls")
@click.argument("target")
@click.argument("run", required=False)
@click.option("--node", help="Another box's copies (its [daemon] node); a URL TARGET without it lists every box.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the index files as JSON.")
def ls_(target: str, run: str | None, node: str | None, config_file: Path | None, as_json: bool) -> int:
    """What a mirror TARGET holds: a [mirror.NAME] (this box's copies, or --node's; optionally one RUN, as
    <watch>/<run>), or a store's URL (s3://bucket/prefix): every box of the fleet, every run, each copy's
    roles, step, metrics, size and age, from one listing and the small index files. Each run is named as
    `ckptd restore TARGET RUN` takes it: <watch>/<run>, and <node>/<watch>/<run> for a URL without --node."""
    from ckptd import mirror as mirroring
    from ckptd import tables

    config = None if _is_url(target) else _command_config(config_file, folders=False)
    chosen = _target(config, target, node)
    found = mirroring.indexes(chosen, run)
    if as_json:
        _echo_json(found)
        return ExitCode.OK
    if not found:
        hint = _did_you_mean(run, chosen, target) if run else ""
        raise NoAnswer(f"{target}: holds no run{' ' + run if run else ''} yet{hint}")
    also = f" --node {shlex.quote(node)}" if node else ""
    tables.print_copies(
        found, label=mirroring.copy_label, now=time.time(),
        restore_hint=lambda name: f"restore one: ckptd restore {shlex.quote(target)} {shlex.quote(name)}{also}"
                                  " --latest --to DIR",
    )  # fmt: skip
    return ExitCode.OK


def _held_runs(target: Any) -> list[str]:
    """The runs a target holds (each folder with an index.json), named as `ls` and `restore` name them."""
    from ckptd.mirror import INDEX

    return sorted({key.removesuffix(f"/{INDEX}") for key in target.list("") if key.endswith(f"/{INDEX}")})


def _near(asked: str, held: Sequence[str]) -> list[str]:
    """The runs in `held` that `asked` may have meant: those it names the end of (`exp1` for `runs/exp1`), else
    the closest by spelling (difflib), at most five."""
    asked = asked.strip("/")
    suffix = [name for name in held if name.endswith(f"/{asked}")]
    return suffix[:5] or difflib.get_close_matches(asked, held, n=5, cutoff=0.6)


def _did_you_mean(asked: str, target: Any, shown: str | None = None) -> str:
    """A hint for a run the target does not hold: the near misses among the runs it holds (or, with none, the
    first few it holds), and the `ls` to see them all. "" when the target cannot be listed now."""
    try:
        held = _held_runs(target)
    except Exception:  # the hint is a courtesy: the error it decorates is the answer
        return ""
    if asked.strip("/") in held:
        return ""
    see = f"see: ckptd ls {shown or target.name}"
    near = _near(asked, held)
    if near:
        return f"; did you mean {' or '.join(near)}? ({see})"
    if held:
        more = ", ..." if len(held) > 10 else ""
        return f"; it holds: {', '.join(held[:10])}{more} ({see})"
    return f"; it holds no run yet ({see})"


@cli.command()
@click.argument("target")
@click.argument("run")
@click.option("--best", "role", flag_value="best", help="Restore the mirror's best copy of the run.")
@click.option(
    "--latest",
    "role",
    flag_value="latest",
    help="Restore the mirror's latest: the run's newest resumable copy (never moved back past a copy whose"
    " local checkpoint rotted).",
)
@click.option("--step", type=click.IntRange(min=0), help="Restore the copy at this global step (see ckptd ls).")
@click.option("--sha256", "sha_prefix", metavar="PREFIX", help="Restore the copy whose sha256 starts with PREFIX.")
@click.option("--to", "destination", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--node", help="Restore another box's copy (its [daemon] node); with a URL TARGET, RUN starts with it.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the restored copy (path, sha256, proof) as JSON.")
def restore(target: str, run: str, role: str | None, step: int | None, sha_prefix: str | None, destination: Path,
            node: str | None, config_file: Path | None, as_json: bool) -> int:  # fmt: skip
    """Download one copy of RUN from TARGET into --to DIR, prove it, verify it, print its path.

    TARGET is a [mirror.NAME] (RUN is <watch>/<run> of this box, or of --node), or a store's URL
    (s3://bucket/prefix; RUN is <node>/<watch>/<run>): RUN exactly as `ckptd ls TARGET` names it. Any machine
    can bring back any box's run, with no config. A RUN the target does not hold exits 1, naming the runs it
    holds that come closest."""
    from ckptd import mirror as mirroring
    from ckptd import progress, sidecar
    from ckptd.mirrors import MirrorError, NotFound
    from ckptd.scan import sidecar_bytes
    from ckptd.verify import engine_versions
    from ckptd.verify import verify as engine_verify

    if [role, step, sha_prefix].count(None) != 2:
        raise UsageError("say which checkpoint, once: --best, --latest, --step N or --sha256 PREFIX")
    from ckptd.catalog import Catalog

    asked = run
    fleet = _is_url(target) and node is None
    if fleet:
        node, _, run = run.strip("/").partition("/")
        if not run:
            hint = _did_you_mean(asked, _target(None, target), target) or f" (see: ckptd ls {target})"
            raise UsageError(f"with a URL, RUN starts with the box: <node>/<watch>/<run>{hint}")
    config = None if _is_url(target) else _command_config(config_file, folders=False)
    chosen = _target(config, target, node)
    prefix = run.strip("/")
    own = config is not None and node in (None, config.daemon.node)
    # Only this box's own copies can be proved against its catalog; another box's against the target's sidecar.
    catalog = Catalog.existing(config.daemon.state_dir) if own and config is not None else None
    with progress.shown() as bars:  # the download, then its verification
        try:
            found = mirroring.restore(
                chosen, run, role, destination.absolute(),
                known=lambda name: (mirroring.recorded_sha(config, catalog, chosen.name, prefix, name)
                                    if own and config is not None else None),
                step=step, sha256=sha_prefix, progress=bars,
            )  # fmt: skip
        except NotFound as exc:
            # The whole store for a URL's <node>/<watch>/<run>: the box may be the part that is wrong.
            hint = _did_you_mean(asked, _target(None, target), target) if fleet else _did_you_mean(run, chosen, target)
            raise NoAnswer(f"{target}: no run {asked!r}{hint}" if hint else str(exc)) from exc
        except MirrorError as exc:
            raise NoAnswer(str(exc)) from exc
        finally:
            if catalog is not None:
                catalog.close()
        restored = found.path
        # Its hashes proved it whole; a completion marker outside it (DeepSpeed's `latest`) was not restored.
        trusted = config.daemon.trusted_globals if config is not None else []
        read = bars.start(restored.name, found.sidecar.verification.size_bytes, "verify") if bars is not None else None
        result = engine_verify(restored, trusted=trusted, require_complete=False, progress=read)
    if not sidecar.placed_in_state("auto", restored, result.layout):  # never a name a trainer would count
        sidecar.write(restored, sidecar_bytes(result, engine_versions(), time.time()))
    if result.status != "ok":
        raise NoAnswer(f"{restored}: restored, but it is {result.status}: {'; '.join(result.problems)}")
    click.echo(f"ckptd: sha256 {found.sidecar.verification.sha256} proved against {found.proof}", err=True)
    if as_json:
        record = found.sidecar.verification
        _echo_json({"path": str(restored), "target": target, "run": asked, "name": restored.name,
                    "sha256": record.sha256, "proof": found.proof, "status": result.status,
                    "epoch": record.epoch, "step": record.global_step, "size_bytes": record.size_bytes})  # fmt: skip
    else:
        _echo_path(str(restored))
    return ExitCode.OK


@cli.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print every rename and deletion; change nothing.")
@click.option("--verbose", "-v", is_flag=True, help="Also list the names left as they are.")
@click.option("--delete-old", is_flag=True, help="Also delete checkpoints below --keep-min-epoch.")
@click.option("--keep-min-epoch", type=click.IntRange(min=0), help="With --delete-old: the first epoch to keep.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) done as JSON.")
def migrate(root: Path, dry_run: bool, verbose: bool, delete_old: bool, keep_min_epoch: int | None,
            config_file: Path | None, as_json: bool) -> int:  # fmt: skip
    """Rename checkpoints under ROOT to epoch-NN_step-SSSSSS<ext>; sidecars and the catalog follow."""
    from ckptd import delete, progress
    from ckptd import migrate as migration
    from ckptd.catalog import CATALOG_NAME, Catalog
    from ckptd.config import DEFAULT_PATTERNS

    if delete_old and keep_min_epoch is None:
        raise UsageError("--delete-old needs --keep-min-epoch N")
    config = _load(config_file, required=False)
    watch = _watch_of(config, root)
    patterns = watch.patterns if watch else DEFAULT_PATTERNS
    from ckptd import discover

    found = list(discover.discover(root.absolute(), patterns))
    paths = [c.path for c in found if c.kind != "link"]
    entries = migration.sidecar_entries(paths)
    trusted = config.daemon.trusted_globals if config else []

    def verifier(path: Path) -> Verification:  # torch is imported only when a name has no step
        from ckptd.verify import verify as engine_verify

        read = bars.start(path.name, progress.size_of(path), "read") if bars is not None else None
        return engine_verify(path, trusted=trusted, progress=read)

    # Fix: a name without a step and without a current sidecar has its step read from its contents.
    with progress.shown() as bars:
        result = migration.plan_renames(paths, migration.steps_from_sidecars(entries, verifier))
    state_dir = config.daemon.state_dir if config is not None else Path.home() / ".local/state/ckptd"
    # Opened when it exists too: a migrate --delete-old killed here left an intent in it to finish.
    journaled = not dry_run and (state_dir / CATALOG_NAME).exists()
    catalog = Catalog(state_dir) if delete_old or (config is not None and not dry_run) or journaled else None
    here = root.absolute()
    journal_watch, journal_root = (watch.name, watch.path) if watch else (delete.migrate_watch(here), here)
    if catalog is not None and not dry_run:  # a migrate killed half-way: finished through its journal first
        delete.finish_pending(catalog, {journal_watch: journal_root}, state_dir, before=_finish_before(state_dir))
    if delete_old:
        assert keep_min_epoch is not None and catalog is not None
        metric = watch.metric if watch else None
        # Fix: the target of a link (last.ckpt -> epoch_...) is a retention invariant; it was deleted here.
        links = {str(c.link_target): str(c.path) for c in found if c.kind == "link" and c.link_target is not None}
        result.deletions = migration.plan_deletions(
            entries.values(), keep_min_epoch, metric.name if metric else None, metric.mode if metric else "min",
            links, catalog.awaiting_mirror(watch.name) if watch else frozenset(),
        )  # fmt: skip
    doomed_paths = {Path(d.path) for d in result.deletions}
    result.renames = [(source, target) for source, target in result.renames if source not in doomed_paths]
    done: dict[str, list[Any]] = {"deleted": [], "renamed": [], "links_repointed": [], "failed": []}

    def said(key: str, item: dict[str, Any], text: str) -> None:
        done[key].append(item)
        if key == "failed":  # on stderr with --json too: stdout holds only the document
            click.echo(text, err=True)
        elif not as_json:
            click.echo(text)

    try:
        for decision in result.deletions:  # first, so that nothing is renamed only to be deleted
            assert catalog is not None
            removal = delete.Removal.planned(decision, journal_watch, journal_root)
            try:
                delete.execute(removal, catalog, state_dir, now=time.time(), dry_run=dry_run)
            except (delete.Refused, OSError) as exc:
                said("failed", {"path": decision.path, "error": f"not deleted: {exc}"},
                     f"not deleted: {decision.path} ({exc})")  # fmt: skip
                continue
            said("deleted", {"path": decision.path, "reasons": list(decision.reasons)},
                 f"deleted: {decision.path} ({'; '.join(decision.reasons)})")  # fmt: skip
        links_to: dict[Path, list[Path]] = {}
        for c in found:
            if c.kind == "link" and c.link_target is not None:
                links_to.setdefault(c.link_target, []).append(c.path)
        for source, target in result.renames:
            if not dry_run:
                try:
                    migration.apply_rename(source, target, catalog)
                except OSError as exc:
                    said("failed", {"path": str(source), "error": f"not renamed to {target.name}: {exc}"},
                         f"failed: {source} -> {target.name}: {exc}")  # fmt: skip
                    continue
            said("renamed", {"from": str(source), "to": str(target)}, f"renamed: {source} -> {target.name}")
            for link in links_to.get(source.resolve(), []):  # never left dangling: it follows its target
                if not dry_run:
                    try:
                        migration.repoint(link, target)
                    except OSError as exc:
                        said("failed", {"path": str(link), "error": f"still points to {source.name}: {exc}"},
                             f"failed: link {link} still points to {source.name}: {exc}")  # fmt: skip
                        continue
                said("links_repointed", {"link": str(link), "to": str(target)},
                     f"link re-pointed: {link} -> {target.name}")  # fmt: skip
    finally:
        if catalog is not None:
            catalog.close()
    if as_json:
        _echo_json({
            "root": str(here), "dry_run": dry_run, **done,
            "collisions": [{"sources": [str(p) for p in sources], "target": str(target)}
                           for sources, target in result.collisions],
            "unparsable": [{"path": str(path), "why": why} for path, why in result.unparsable],
            "unchanged": [str(path) for path in result.untouched],
        })  # fmt: skip
        return ExitCode.CHECK_FAILED if done["failed"] else ExitCode.OK
    for sources, target in result.collisions:
        click.echo(f"collision: {', '.join(p.name for p in sources)} -> {target.name} (left alone)")
    for path, why in result.unparsable:
        click.echo(f"unparsable: {path} ({why})")
    if verbose:
        for path in result.untouched:
            click.echo(f"unchanged: {path}")
    if dry_run:
        click.echo("dry run: nothing was changed")
    return ExitCode.CHECK_FAILED if done["failed"] else ExitCode.OK


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "destination", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), default="safetensors", show_default=True)
@click.option("--key", help="Where the weights are, when not model_state_dict, state_dict or model.")
@click.option("--trust", multiple=True, metavar="MODULE.NAME", help="Admit a pickle global (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the exported file's record as JSON.")
def export(checkpoint: Path, destination: Path, fmt: str, key: str | None, trust: tuple[str, ...],
           as_json: bool) -> int:  # fmt: skip
    """Write CHECKPOINT's model weights (no optimizer state) as an inference-only file, and verify it."""
    from ckptd import export as exporting
    from ckptd import progress, tables

    try:
        with progress.shown() as bars:
            result = exporting.export(checkpoint, destination, fmt=fmt, key=key, trusted=list(trust), progress=bars)
    except exporting.ExportError as exc:
        raise NoAnswer(str(exc)) from exc
    after = result.verification.size_bytes
    if as_json:
        from ckptd.sidecar import jsonable

        _echo_json({"source": str(checkpoint), "path": str(destination), "format": fmt, "tensors": result.tensors,
                    "source_bytes": result.source_bytes, "size_bytes": after,
                    "sha256": result.verification.sha256, "verification": jsonable(result.verification)})  # fmt: skip
        return ExitCode.OK
    click.echo(
        f"exported {result.tensors} tensors to {destination}: {tables.human_bytes(result.source_bytes)} ->"
        f" {tables.human_bytes(after)} ({after / max(result.source_bytes, 1):.0%}), sha256 {result.verification.sha256}"
    )
    return ExitCode.OK


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def scrub(config_file: Path | None, as_json: bool) -> int:
    """Re-read every checkpoint and mirror copy at a limited rate; repair or quarantine what rotted."""
    from ckptd import mirror as mirroring
    from ckptd import progress
    from ckptd import scrub as scrubbing
    from ckptd.catalog import Catalog

    config = _command_config(config_file)
    broken: dict[str, str] = {}
    targets = mirroring.targets_of(config, broken)
    with Catalog(config.daemon.state_dir) as catalog, progress.shown() as bars:
        report = scrubbing.scrub(config, catalog, targets, progress=bars)
    report.unreachable.extend(sorted(broken))
    if as_json:
        _echo_json(report.__dict__)
    else:
        click.echo(
            f"scrubbed {report.checked}: {report.ok} ok, {len(report.repaired)} repaired,"
            f" {len(report.quarantined)} quarantined, {len(report.mismatched)} bad and not repaired,"
            f" {len(report.skipped)} skipped (changed since verified)"
        )
        for line in report.repaired:
            click.echo(f"repaired: {line}")
        for line in report.quarantined:
            click.echo(f"quarantined: {line}")
        for line in report.mismatched:
            click.echo(f"bad: {line}", err=True)
        for name in report.unreachable:
            click.echo(f"target {name}: unreachable, its copies not checked ({broken.get(name, 'see the log')})",
                       err=True)  # fmt: skip
    failed = report.quarantined or report.mismatched or report.unreachable
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


@cli.command(name="check-config")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and every problem as JSON.")
def check_config(file: Path, as_json: bool) -> int:
    """Validate a config file; print every problem (exit 78) or `ok`."""
    try:
        return _check_config(file, as_json)
    except ConfigError as exc:
        if as_json:  # the problems are the answer: on stdout as JSON, and on stderr as ever
            _echo_json({"file": str(file), "ok": False, "problems": exc.problems})
        raise


def _check_config(file: Path, as_json: bool) -> int:
    from ckptd.config import load_config

    config = load_config(file)
    # The trusted globals are imported by the verifier only: an import that fails would surface as every
    # checkpoint failing. Tried here, where importing a module costs nothing that matters.
    problems = []
    for i, name in enumerate(config.daemon.trusted_globals):
        module, _, attr = name.rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            problems.append(f"at 'daemon.trusted_globals[{i}]': {name!r} cannot be imported ({exc})")
    if problems:
        raise ConfigError(str(file), problems)
    # Say what chose the state folder: one chosen by $STATE_DIRECTORY differs from what a shell without it reads.
    if as_json:
        _echo_json({"file": str(file), "ok": True, "problems": [], "watches": [w.name for w in config.watch],
                    "mirrors": sorted(config.mirror), "state_dir": str(config.daemon.state_dir),
                    "state_dir_from": config.state_dir_from, "node": config.daemon.node})  # fmt: skip
        return ExitCode.OK
    chosen_by = {
        "$STATE_DIRECTORY": " (from $STATE_DIRECTORY; set daemon.state_dir so commands run without it agree)",
        "default": " (the default, beside the config file)",
    }.get(config.state_dir_from, "")
    click.echo(f"{file}: ok ({len(config.watch)} watched folder(s), state in {config.daemon.state_dir}{chosen_by};"
               f" node {config.daemon.node} on mirror targets)")  # fmt: skip
    return ExitCode.OK


# ----------------------------------------------------------------------------------------------- report


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one self-contained page here: the charts and a table of every checkpoint.")  # fmt: skip
@click.option("--png", "png_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the charts as a PNG image here (for chat and tickets).")  # fmt: skip
@config_option
def report(run: Path, html_file: Path | None, png_file: Path | None, config_file: Path | None) -> int:
    """Draw RUN from the catalog: its metrics against step, each checkpoint marked by what happened to it (kept
    and by which rule, deleted and why, quarantined, mirrored where), latest and best, sizes and disk use.

    Needs matplotlib: pip install 'ckptd[report]'. Give --html FILE, --png FILE or both; RUN may be a run folder
    that no longer exists (its history stays in the catalog)."""
    from ckptd import report as reporting
    from ckptd.catalog import Catalog

    if html_file is None and png_file is None:
        raise UsageError("say where to write the report: --html FILE, --png FILE, or both")
    reporting.require_matplotlib()
    config = _command_config(config_file, folders=False)
    watch, name = _run_in_config(config, run, exists=False)
    catalog = Catalog.existing(config.daemon.state_dir)
    if catalog is None:
        raise NoAnswer(f"{run}: not in the catalog (there is no catalog in {config.daemon.state_dir} yet; is the"
                       f" daemon running? try: ckptd scan --config {config.source})")  # fmt: skip
    with catalog:
        found = reporting.gather(catalog, name, watch=watch)
    if html_file is not None:
        reporting.write(html_file.absolute(), reporting.render_html(found).encode("utf-8"))
        click.echo(f"wrote {html_file}")
    if png_file is not None:
        reporting.write(png_file.absolute(), reporting.render_png(found))
        click.echo(f"wrote {png_file}")
    return ExitCode.OK
