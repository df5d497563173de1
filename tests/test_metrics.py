"""ckptd.metrics: the series the daemon exposes, the bounded run labels, the HTTP endpoint and the textfile, the two
config keys, and docs/alerts.yml checked against a real scrape.

Every test uses a real registry (a `Metrics` of its own) and parses the exposition with prometheus_client's own
parser, as Prometheus would read it. The daemon end to end is in tests/e2e/test_metrics_daemon.py.
"""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ckptd.config import listen_address, load_config
from ckptd.daemon import MirrorService
from ckptd.errors import ConfigError
from ckptd.fsutil import TEMP_MARK
from ckptd.metrics import DELETE_REASONS, STATUSES, Metrics, delete_reason, run_label
from ckptd.mirror import mirror_pass, targets_of
from ckptd.model import Entry
from ckptd.retention import Policy, plan

ALERTS = Path(__file__).resolve().parents[1] / "docs" / "alerts.yml"
NOW = 1_700_000_000.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """{(sample name, labels): value} of an exposition, read by prometheus_client's parser."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when the exposition lacks it."""
    return found.get((name, frozenset(labels.items())))


def names_of(found: Samples) -> set[str]:
    """Every sample name of an exposition."""
    return {name for name, _labels in found}


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> str:
    """GET /metrics from 127.0.0.1:port, as Prometheus scrapes it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text: str = answer.read().decode()
        return text


def every_series() -> Metrics:
    """A Metrics with every method called once, so that every series the daemon can expose has a sample."""
    metrics = Metrics()
    metrics.watches(["runs"])
    metrics.targets(["backup"])
    metrics.verified("runs", "ok", 0.2, 1000)
    metrics.queue(2)
    metrics.checkpoints({"runs": {"ok": 1}})
    metrics.watch_health({"runs": True})
    metrics.run("runs", "exp1", activity=NOW, step=100, metric="val_loss", value=0.5)
    metrics.deleted("runs", "no_keep_rule", 10)
    metrics.quarantined("scrub")
    metrics.mirror_copied("backup", 1.5)
    metrics.mirror_failed("backup")
    metrics.mirror_backlog({"backup": {"pending": 1, "failed": 1, "failing_since": NOW}})
    metrics.succeeded("scrub", NOW)
    return metrics


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    """every_series() served over HTTP on a free loopback port; stopped at the end."""
    metrics = every_series()
    port = free_port()
    metrics.serve("127.0.0.1", port)
    yield metrics, port
    metrics.stop()


# --------------------------------------------------------------------------------------------- the series


def test_verified_counts_by_watch_and_status_with_seconds_and_bytes() -> None:
    """Each verification counts once under its watch and status; its seconds go to the histogram and its bytes to
    the hashed counter, except for a verification that hashed nothing (a timeout recorded unsupported)."""
    metrics = Metrics()
    metrics.watches(["runs", "other"])
    metrics.verified("runs", "ok", 0.3, 1000)
    metrics.verified("runs", "ok", 2.0, 500)
    metrics.verified("runs", "corrupt", 0.1, 200)
    metrics.verified("runs", "unsupported", 0.0, 0)
    found = samples(metrics.render().decode())
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="ok") == 2
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="corrupt") == 1
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="unsupported") == 1
    assert value(found, "ckptd_checkpoints_verified_total", watch="other", status="ok") == 0
    assert value(found, "ckptd_verify_seconds_count") == 3
    assert value(found, "ckptd_verify_seconds_sum") == pytest.approx(2.4)
    assert value(found, "ckptd_verify_seconds_bucket", le="0.5") == 2
    assert value(found, "ckptd_bytes_hashed_total", watch="runs") == 1700
    assert value(found, "ckptd_build_info", version=__import__("ckptd").__version__) == 1
    assert value(found, "ckptd_up") == 1


def test_configured_watches_and_targets_start_at_zero() -> None:
    """Every status, deletion reason and target has a series at 0 before its first event, so that increase() sees
    the first one; nothing is exposed for a watch or target that is not configured."""
    metrics = Metrics()
    metrics.watches(["runs"])
    metrics.targets(["backup"])
    found = samples(metrics.render().decode())
    for status in STATUSES:
        assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status=status) == 0
    for reason in DELETE_REASONS:
        assert value(found, "ckptd_retention_deleted_total", watch="runs", reason=reason) == 0
    assert value(found, "ckptd_mirror_failures_total", target="backup") == 0
    assert value(found, "ckptd_mirror_copies_total", target="backup") == 0
    assert value(found, "ckptd_quarantined_total", by="retention") == 0
    assert not [k for k in found if ("watch", "elsewhere") in k[1] or ("target", "s3") in k[1]]


def test_queue_gauge_counts_a_change_only_when_the_size_changes() -> None:
    """The main loop reports the queue every turn: an unchanged size is not a change (no textfile rewrite)."""
    metrics = Metrics()
    metrics.queue(3)
    before = metrics.changes
    metrics.queue(3)
    assert metrics.changes == before
    metrics.queue(0)
    assert metrics.changes == before + 1
    assert value(samples(metrics.render().decode()), "ckptd_verify_queue") == 0


def test_mirror_backlog_and_failing_since_per_target() -> None:
    """The backlog is pending plus failing copies; failing_since is 0 for a target that works."""
    metrics = Metrics()
    metrics.mirror_backlog({
        "backup": {"pending": 2, "failed": 3, "done": 7, "last_error": "x", "failing_since": NOW},
        "s3": {"pending": 0, "failed": 0, "done": 1, "last_error": None, "failing_since": None},
    })  # fmt: skip
    found = samples(metrics.render().decode())
    assert value(found, "ckptd_mirror_backlog", target="backup") == 5
    assert value(found, "ckptd_mirror_failing_since_timestamp_seconds", target="backup") == NOW
    assert value(found, "ckptd_mirror_backlog", target="s3") == 0
    assert value(found, "ckptd_mirror_failing_since_timestamp_seconds", target="s3") == 0


# ------------------------------------------------------------------------------------------------ run labels


def test_run_series_keep_only_the_most_recently_active_runs() -> None:
    """With room for 3 runs, a 4th newer run takes the place of the least recently active one; a run older than
    all of them gets no series; a run gone from disk loses its series."""
    metrics = Metrics(max_runs=3)
    for i in range(3):
        metrics.run("runs", f"exp{i}", activity=NOW + i, step=100 + i, metric="val_loss", value=0.5 - i / 10)
    metrics.run("runs", "fresh", activity=NOW + 10, step=7, metric="val_loss", value=0.1)
    metrics.run("runs", "ancient", activity=NOW - 1000, step=5, metric="val_loss", value=9.0)
    found = samples(metrics.render().decode())
    steps = {dict(k[1])["run"]: v for k, v in found.items() if k[0] == "ckptd_run_latest_step"}
    assert steps == {"exp1": 101, "exp2": 102, "fresh": 7}
    best = {dict(k[1])["run"] for k in found if k[0] == "ckptd_run_best_value"}
    assert best == {"exp1", "exp2", "fresh"}
    metrics.run_gone("runs", "exp2")
    found = samples(metrics.render().decode())
    assert {dict(k[1])["run"] for k in found if k[0].startswith("ckptd_run_")} == {"exp1", "fresh"}


def test_run_best_series_follows_the_metric_and_goes_without_one() -> None:
    """A run whose best is ranked by another metric (a reload) keeps one best series; without a best value, none."""
    metrics = Metrics()
    metrics.run("runs", "exp", activity=NOW, step=1, metric="val_loss", value=0.5)
    metrics.run("runs", "exp", activity=NOW, step=2, metric="val_acc", value=0.9)
    found = samples(metrics.render().decode())
    assert value(found, "ckptd_run_best_value", watch="runs", run="exp", metric="val_acc") == 0.9
    assert value(found, "ckptd_run_best_value", watch="runs", run="exp", metric="val_loss") is None
    metrics.run("runs", "exp", activity=NOW, step=3, metric=None, value=None)
    found = samples(metrics.render().decode())
    assert not [k for k in found if k[0] == "ckptd_run_best_value"]
    assert value(found, "ckptd_run_latest_step", watch="runs", run="exp") == 3


def test_watches_reconfigured_drop_the_runs_of_a_removed_watch() -> None:
    """After a reload without a watch, its runs' series and its gauges are gone."""
    metrics = Metrics()
    metrics.run("old", "exp", activity=NOW, step=1, metric=None, value=None)
    metrics.run("runs", "exp", activity=NOW, step=1, metric=None, value=None)
    metrics.checkpoints({"old": {"ok": 2}, "runs": {"ok": 1}})
    metrics.watch_health({"old": True, "runs": True})
    metrics.watches(["runs"])
    found = samples(metrics.render().decode())
    assert value(found, "ckptd_run_latest_step", watch="old", run="exp") is None
    assert value(found, "ckptd_run_latest_step", watch="runs", run="exp") == 1
    assert not [k for k in found if ("watch", "old") in k[1]]
    assert value(found, "ckptd_checkpoints", watch="runs", status="ok") == 1
    assert value(found, "ckptd_watch_healthy", watch="runs") == 1


def test_run_label_is_relative_to_the_watch(tmp_path: Path) -> None:
    """The run label is the run folder below its watch, `.` for the watch itself: never an absolute path."""
    assert run_label(str(tmp_path / "a" / "b"), tmp_path) == "a/b"
    assert run_label(str(tmp_path), tmp_path) == "."


# --------------------------------------------------------------------------------------- deletion reasons


def _entry(path: str, step: int, *, status: str = "ok", size: int = 100) -> Entry:
    return Entry(path=path, run="/r", status=status, size=size, mtime=NOW - 1000 + step, sha256=f"{step:064x}",
                 step=step, epoch=step, resumable=True)  # fmt: skip


def _deleted_reasons(policy: Policy, entries: list[Entry]) -> set[str]:
    return {delete_reason(d.reasons) for d in plan(entries, policy, NOW).decisions if d.action == "delete"}


def test_delete_reason_labels_the_planners_real_reasons() -> None:
    """Each way the planner deletes maps to its own label (read from real plans, so a reworded reason fails here)."""
    entries = [_entry(f"/r/{i}.pt", i) for i in range(1, 6)]
    assert _deleted_reasons(Policy(keep_last=2, keep_best=0), entries) == {"no_keep_rule"}
    assert _deleted_reasons(Policy(keep_last=5, keep_best=0, max_size=250), entries) == {"max_size"}
    assert _deleted_reasons(Policy(keep_last=5, keep_best=0, free_deficit=150), entries) == {"min_free"}
    corrupt = [*entries, _entry("/r/bad.pt", 9, status="corrupt")]
    assert _deleted_reasons(Policy(keep_last=5, keep_best=0, on_corrupt="delete"), corrupt) == {"corrupt"}
    assert delete_reason(("something new",)) == "other"


def test_deleted_counts_by_reason_and_frees_bytes() -> None:
    """A deletion counts under its watch and reason (an unknown reason as "other"), and adds its bytes."""
    metrics = Metrics()
    metrics.deleted("runs", "max_size", 100)
    metrics.deleted("runs", "made-up", 50)
    found = samples(metrics.render().decode())
    assert value(found, "ckptd_retention_deleted_total", watch="runs", reason="max_size") == 1
    assert value(found, "ckptd_retention_deleted_total", watch="runs", reason="other") == 1
    assert value(found, "ckptd_retention_freed_bytes_total", watch="runs") == 150


# ------------------------------------------------------------------------------------ the mirror thread


def test_a_real_mirror_pass_counts_copies_their_seconds_and_failures_per_target(tmp_path: Path) -> None:
    """mirror_pass tells the mirror thread of each copy (on_copy): made and timed on the working folder target,
    failed on the one whose folder is a file; the backlog comes from the catalog, and a pass with a failure is
    no success."""
    from test_mirror import Site, _enqueue, _local

    (tmp_path / "broken").write_text("not a folder")
    site = Site(tmp_path, {"backup": _local(tmp_path / "backup"), "broken": _local(tmp_path / "broken")})
    metrics = Metrics()
    service = MirrorService(site.config, metrics=metrics)
    with site.catalog() as catalog:
        _enqueue(catalog, site.config, now=time.time())
        report = mirror_pass(site.config, catalog, targets_of(site.config), on_copy=service._on_copy)
        service._count(report, catalog)
    found = samples(metrics.render().decode())
    copied = value(found, "ckptd_mirror_copies_total", target="backup")
    assert copied == len(report.copied) == 3
    assert value(found, "ckptd_mirror_copy_seconds_count", target="backup") == copied
    assert (value(found, "ckptd_mirror_copy_seconds_sum", target="backup") or 0) > 0
    assert value(found, "ckptd_mirror_failures_total", target="broken") == len(report.failed) == 3
    assert value(found, "ckptd_mirror_backlog", target="broken") == 3
    assert value(found, "ckptd_last_success_timestamp_seconds", job="mirror_pass") is None  # a copy failed


# ----------------------------------------------------------------------------------- HTTP and the textfile


def test_http_endpoint_serves_the_exposition(served: tuple[Metrics, int]) -> None:
    """GET /metrics on the configured port answers the registry's exposition, parsable by Prometheus's parser."""
    metrics, port = served
    metrics.verified("runs", "ok", 0.2, 1000)
    found = samples(scrape(port))
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="ok") == 2
    assert value(found, "ckptd_run_latest_step", watch="runs", run="exp1") == 100


def test_serve_on_a_taken_port_raises() -> None:
    """A port another process holds raises OSError (the daemon logs it and goes on without the endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError):
            Metrics().serve("127.0.0.1", holder.getsockname()[1])


def test_two_metrics_objects_never_share_series() -> None:
    """Each Metrics has its own registry: two daemons in one process (or two tests) do not see each other."""
    one, two = Metrics(), Metrics()
    one.verified("runs", "ok", 0.1, 10)
    assert value(samples(two.render().decode()), "ckptd_checkpoints_verified_total", watch="runs", status="ok") is None


def test_textfile_is_written_atomically_and_readable(tmp_path: Path) -> None:
    """The textfile is replaced whole (no temp file left beside it), world-readable for node_exporter, and parses."""
    metrics = every_series()
    path = tmp_path / "ckptd.prom"
    metrics.write_textfile(path)
    first = path.stat().st_ino
    metrics.verified("runs", "ok", 0.1, 10)
    metrics.write_textfile(path)
    assert path.stat().st_ino != first  # a new file renamed into place, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044
    assert [p.name for p in tmp_path.iterdir()] == ["ckptd.prom"]
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    found = samples(path.read_text())
    assert value(found, "ckptd_checkpoints_verified_total", watch="runs", status="ok") == 2


def test_stop_writes_up_zero_and_closes_the_endpoint(tmp_path: Path) -> None:
    """A clean stop leaves ckptd_up 0 in the textfile and closes the port."""
    metrics = Metrics()
    port = free_port()
    metrics.serve("127.0.0.1", port)
    assert value(samples(scrape(port)), "ckptd_up") == 1
    metrics.stop(tmp_path / "ckptd.prom")
    assert value(samples((tmp_path / "ckptd.prom").read_text()), "ckptd_up") == 0
    with pytest.raises(urllib.error.URLError):
        scrape(port)


# ---------------------------------------------------------------------------------------------- the config


def _config(tmp_path: Path, daemon: str) -> str:
    (tmp_path / "runs").mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\n{daemon}\n[[watch]]\nname = "r"\npath = "runs"\n')
    return str(path)


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    """Without the two keys, no endpoint and no textfile."""
    config = load_config(Path(_config(tmp_path, "")))
    assert config.daemon.metrics_listen is None and config.daemon.metrics_address is None
    assert config.daemon.metrics_textfile is None


def test_metrics_keys_parse_and_resolve(tmp_path: Path) -> None:
    """host:port gives the address (IPv6 in brackets); a relative textfile resolves against the config's folder."""
    (tmp_path / "tf").mkdir()
    config = load_config(Path(_config(tmp_path, 'metrics_listen = "127.0.0.1:9464"\nmetrics_textfile = "tf/c.prom"')))
    assert config.daemon.metrics_address == ("127.0.0.1", 9464)
    assert config.daemon.metrics_textfile == tmp_path / "tf" / "c.prom"
    assert listen_address("[::1]:9464") == ("::1", 9464)
    assert listen_address("localhost:1") == ("localhost", 1)


@pytest.mark.parametrize("bad", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "::1:9464",
                                 "127.0.0.1:http", "a b:1", 9464])  # fmt: skip
def test_bad_metrics_listen_is_a_config_error_naming_the_key(tmp_path: Path, bad: Any) -> None:
    """A listen address that is not host:port with a port from 1 to 65535 is refused, naming the key and value."""
    text = f"metrics_listen = {bad!r}".replace("'", '"') if isinstance(bad, str) else f"metrics_listen = {bad}"
    with pytest.raises(ConfigError) as caught:
        load_config(Path(_config(tmp_path, text)))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("at 'daemon.metrics_listen': expected ")
    assert repr(bad) in caught.value.problems[0]


def test_textfile_must_end_in_prom_and_its_folder_exist(tmp_path: Path) -> None:
    """node_exporter reads only *.prom files, and a folder that does not exist would fail every write."""
    with pytest.raises(ConfigError) as caught:
        load_config(Path(_config(tmp_path, 'metrics_textfile = "ckptd.txt"')))
    assert caught.value.problems[0].startswith("at 'daemon.metrics_textfile': expected a file name ending in \".prom\"")
    with pytest.raises(ConfigError) as caught:
        load_config(Path(_config(tmp_path, 'metrics_textfile = "nowhere/ckptd.prom"')))
    assert caught.value.problems == [
        f"at 'daemon.metrics_textfile': folder {tmp_path / 'nowhere'} does not exist; create it (node_exporter's"
        " --collector.textfile.directory) or fix the path"
    ]


# ---------------------------------------------------------------------------------------------- alerts.yml

_NAME = re.compile(r"\bckptd_[a-z0-9_]+\b")
_DURATION = re.compile(r"^\d+[smhdwy]$")


def unknown_names(expr: str, exposed: set[str]) -> list[str]:
    """The ckptd_* names an expression uses that the daemon does not expose."""
    return sorted({name for name in _NAME.findall(expr) if name not in exposed})


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        rules += group["rules"]
    return rules


def test_alert_rules_have_the_prometheus_rule_file_structure() -> None:
    """Each rule has alert, expr, labels.severity, a summary and description, and a valid `for` when it has one;
    the three alerts the issue asks for are there."""
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), rule["alert"]
        assert "for" not in rule or _DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])
    assert {"CkptdMirrorFailing", "CkptdCheckpointQuarantined", "CkptdNotSeen"} <= set(names)
    failing = next(r for r in rules if r["alert"] == "CkptdMirrorFailing")
    assert "3600" in failing["expr"]  # one hour
    not_seen = next(r for r in rules if r["alert"] == "CkptdNotSeen")
    assert "node_textfile_mtime_seconds" in not_seen["expr"] and "ckptd_up" in not_seen["expr"]


def test_alert_rules_use_only_metrics_the_daemon_exposes(served: tuple[Metrics, int]) -> None:
    """Every ckptd_* name in an expression is a sample name of a real scrape of the endpoint."""
    exposed = names_of(samples(scrape(served[1])))
    for rule in _rules():
        assert _NAME.findall(rule["expr"]) or "up{" in rule["expr"], rule["alert"]
        assert unknown_names(rule["expr"], exposed) == [], rule["alert"]


def test_unknown_names_catches_a_misspelled_metric(served: tuple[Metrics, int]) -> None:
    """The check above can fail: a counter without its _total, or a typo, is reported."""
    exposed = names_of(samples(scrape(served[1])))
    assert unknown_names("increase(ckptd_quarantined[1h]) > 0", exposed) == ["ckptd_quarantined"]
    assert unknown_names("ckptd_mirror_backlogg > 0 or ckptd_up == 0", exposed) == ["ckptd_mirror_backlogg"]


def test_promtool_accepts_the_alert_rules() -> None:
    """Prometheus's own promtool (`make tools` installs it) parses every expression of docs/alerts.yml."""
    checked = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
