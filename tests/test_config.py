"""config.toml: parsing, path resolution, durations, and every problem reported at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import (
    DEFAULT_PATTERNS,
    MIN_POLL_INTERVAL,
    MIN_RESCAN_INTERVAL,
    MIN_RETENTION_INTERVAL,
    MIN_SCRUB_INTERVAL,
    MirrorTargetConfig,
    load_config,
    parse_config,
    parse_duration,
)
from ckptd.daemon import Daemon
from ckptd.errors import ConfigError, ExitCode
from ckptd.mirrors import SCHEMES, make_target, scheme_of
from ckptd.scheduler import Scheduler, cron_trigger

CKPTD = Path(sys.executable).parent / "ckptd"


def _write(path: Path, text: str) -> Path:
    """Write dedented TOML at path (creating its folder); return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    """The problems load_config reports for the file at path."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.exit_code == ExitCode.CONFIG
    return caught.value.problems


BAD = """\
    [daemon]
    state_dir = "state"
    workers = "many"
    colour = "blue"

    [[watch]]
    name = "a"
    path = "runs/a"
    settle_seconds = "slow"
    poll_interval = "5x"

    [[watch]]
    name = "a"
    path = "runs/missing"
    """

# (key path, a piece of the message: the bad value or what is wrong)
BAD_EXPECTED = [
    ("daemon.workers", "'many'"),
    ("daemon.colour", "unknown key"),
    ("watch[0].settle_seconds", "'slow'"),
    ("watch[0].poll_interval", "'5x'"),
    ("watch[1].name", "'a'"),
    ("watch[1].path", "runs/missing does not exist"),
]


def test_valid_config_parses_with_paths_resolved_against_its_folder(tmp_path: Path) -> None:
    """Relative paths are resolved against the config file's folder; absolute ones are kept; durations parse."""
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "abs").mkdir()
    config_file = _write(
        tmp_path / "etc" / "config.toml",
        f"""\
        [daemon]
        state_dir = "state"
        log_format = "json"
        trusted_globals = ["numpy.dtype"]
        workers = 4
        rescan_interval = "10m"

        [[watch]]
        name = "exp"
        path = "../runs/exp"
        settle_seconds = 0.5
        poll = true
        poll_interval = "30s"
        metric = {{ name = "val_loss", mode = "max" }}

        [[watch]]
        name = "abs.1"
        path = "{tmp_path / "abs"}"
        patterns = ["*.pt"]
        """,
    )
    config = load_config(config_file)
    assert config.source == config_file
    assert config.daemon.state_dir == tmp_path / "etc" / "state"
    assert (config.daemon.log_format, config.daemon.workers, config.daemon.rescan_interval) == ("json", 4, 600.0)
    assert config.daemon.trusted_globals == ["numpy.dtype"]
    exp, absolute = config.watch
    assert exp.path == tmp_path / "runs" / "exp"
    assert (exp.settle_seconds, exp.poll, exp.poll_interval, exp.patterns) == (0.5, True, 30.0, DEFAULT_PATTERNS)
    assert exp.metric is not None and (exp.metric.name, exp.metric.mode) == ("val_loss", "max")
    assert absolute.path == tmp_path / "abs" and absolute.patterns == ["*.pt"] and absolute.metric is None
    assert config.watch_named("abs.1") is absolute and config.watch_named("nope") is None


def test_defaults_fill_a_minimal_config(tmp_path: Path) -> None:
    """A config with one watch gets the documented defaults, the state folder beside the config file."""
    (tmp_path / "runs").mkdir()
    config = load_config(_write(tmp_path / "config.toml", '[[watch]]\nname = "r"\npath = "runs"\n'))
    assert config.daemon.state_dir == tmp_path / ".ckptd"
    assert (config.daemon.workers, config.daemon.rescan_interval, config.daemon.log_level) == (1, 600.0, "info")
    assert (config.watch[0].settle_seconds, config.watch[0].poll, config.watch[0].poll_interval) == (2.0, False, 30.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30.0), ("10m", 600.0), ("24h", 86400.0), (5, 5.0), (2.5, 2.5), ("45", 45.0), ("500ms", 0.5),
     ("10min", 600.0), ("1.5h", 5400.0), ("7d", 604800.0), ("2w", 1209600.0), (" 3 s ", 3.0), (0, 0.0)],
)  # fmt: skip
def test_durations_parse(value: Any, seconds: float) -> None:
    """Durations are numbers of seconds or strings with a unit: ms, s, m/min, h, d, w."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "-5s", -1, True, "", "s", "1e3s", "10 minutes"])
def test_bad_durations_are_refused(value: Any) -> None:
    """Anything else, negatives and booleans included, raises ValueError."""
    with pytest.raises(ValueError):
        parse_duration(value)


def test_bad_config_lists_every_problem_at_once(tmp_path: Path) -> None:
    """Unknown key, wrong type, bad duration, missing folder and duplicate name come in one ConfigError."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    problems = _problems(_write(tmp_path / "config.toml", BAD))
    assert len(problems) == len(BAD_EXPECTED), problems
    for key, detail in BAD_EXPECTED:
        assert any(p.startswith(f"at '{key}': ") and detail in p for p in problems), (key, problems)


def test_duplicate_watch_names_are_reported_alone(tmp_path: Path) -> None:
    """A config valid but for a reused watch name names the second watch and the name."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = '[[watch]]\nname = "x"\npath = "a"\n\n[[watch]]\nname = "x"\npath = "b"\n'
    assert _problems(_write(tmp_path / "config.toml", text)) == [
        "at 'watch[1].name': the name 'x' is used by an earlier watch; names must be unique"
    ]


def test_missing_watched_folder_is_reported_with_its_path(tmp_path: Path) -> None:
    """A watched folder that does not exist is a config problem naming the absolute folder."""
    problems = _problems(_write(tmp_path / "config.toml", '[[watch]]\nname = "x"\npath = "nowhere"\n'))
    assert problems == [f"at 'watch[0].path': folder {tmp_path / 'nowhere'} does not exist; create it or fix the path"]


def test_parse_config_is_pure_and_does_not_check_folders(tmp_path: Path) -> None:
    """parse_config validates the text only; a missing folder is load_config's concern."""
    config = parse_config('[[watch]]\nname = "x"\npath = "nowhere"\n', tmp_path / "config.toml")
    assert config.watch[0].path == tmp_path / "nowhere"


def test_a_config_without_watches_is_refused(tmp_path: Path) -> None:
    """At least one [[watch]] is required."""
    assert _problems(_write(tmp_path / "config.toml", "[daemon]\nworkers = 2\n")) == [
        "at 'watch': required key is missing"
    ]


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ('[[watch]]\nname = "bad name"\npath = "r"\n', "watch[0].name", "'bad name'"),
        ('[[watch]]\nname = "r"\npath = "r"\npatterns = []\n', "watch[0].patterns", "[]"),
        ('[[watch]]\nname = "r"\npath = "r"\nsettle_seconds = -1\n', "watch[0].settle_seconds", "-1"),
        ('[[watch]]\nname = "r"\npath = "r"\nmetric = { name = "l", mode = "median" }\n', "watch[0].metric.mode",
         "'median'"),
        ('[daemon]\nrescan_interval = "soon"\n[[watch]]\nname = "r"\npath = "r"\n', "daemon.rescan_interval",
         "'soon'"),
        ('[daemon]\nlog_level = "loud"\n[[watch]]\nname = "r"\npath = "r"\n', "daemon.log_level", "'loud'"),
        ('[daemon]\ntrusted_globals = ["os"]\n[[watch]]\nname = "r"\npath = "r"\n', "daemon.trusted_globals[0]",
         "'os'"),
        ('source = "elsewhere.toml"\n[[watch]]\nname = "r"\npath = "r"\n', "source", "unknown key"),
        ('[[watch]]\nname = "r"\npath = "r"\nmetric = { name = "d", key = "history..val[x]" }\n',
         "watch[0].metric.key", "'history..val[x]'"),
    ],
)  # fmt: skip
def test_each_bad_value_names_its_key_and_value(tmp_path: Path, text: str, key: str, detail: str) -> None:
    """Each invalid value is reported at its key path, quoting the value."""
    (tmp_path / "r").mkdir()
    problems = _problems(_write(tmp_path / "config.toml", text))
    assert len(problems) == 1 and problems[0].startswith(f"at '{key}': ") and detail in problems[0], problems


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    """TOML that does not parse is one problem naming the line."""
    problems = _problems(_write(tmp_path / "config.toml", '[[watch]\nname = "x"\n'))
    assert len(problems) == 1 and problems[0].startswith("not valid TOML: ") and "line 1" in problems[0]


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A config file that does not exist gives ConfigError, not a traceback."""
    problems = _problems(tmp_path / "absent.toml")
    assert len(problems) == 1 and problems[0].startswith("cannot read the config file")


def test_config_error_message_lists_every_problem() -> None:
    """ConfigError's message names the file, the count and one line per problem."""
    error = ConfigError("/etc/ckptd/config.toml", ["at 'a': x", "at 'b': y"])
    assert str(error) == "/etc/ckptd/config.toml: 2 problems in the config:\n  - at 'a': x\n  - at 'b': y"


def test_check_config_exits_78_with_every_problem_on_stderr(tmp_path: Path) -> None:
    """`ckptd check-config BAD` exits 78 and prints every problem on stderr, nothing on stdout."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    config_file = _write(tmp_path / "config.toml", BAD)
    done = subprocess.run([CKPTD, "check-config", config_file], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert done.stdout == ""
    assert f"{len(BAD_EXPECTED)} problems" in done.stderr
    for key, detail in BAD_EXPECTED:
        assert any(f"at '{key}': " in line and detail in line for line in done.stderr.splitlines()), key


def test_check_config_exits_0_and_prints_ok(tmp_path: Path) -> None:
    """`ckptd check-config GOOD` exits 0 and says ok."""
    (tmp_path / "runs").mkdir()
    config_file = _write(tmp_path / "config.toml", '[[watch]]\nname = "r"\npath = "runs"\n')
    done = subprocess.run([CKPTD, "check-config", config_file], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{config_file}: ok")


# ------------------------------------------------------------------------------- credentials and layouts


@pytest.mark.parametrize(
    ("mirror", "key"),
    [
        ('url = "s3://AKIAEXAMPLE:hunter2@bucket/prefix"', "mirror.s3.url"),
        ('url = "s3://bucket"\nendpoint_url = "http://AKIAEXAMPLE:hunter2@minio.local:9000"', "mirror.s3.endpoint_url"),
        ('url = "s3://bucket"\nendpoint_url = "https://token@minio.local"', "mirror.s3.endpoint_url"),
    ],
)
def test_credentials_in_a_url_are_refused_and_never_echoed(tmp_path: Path, mirror: str, key: str) -> None:
    """A URL with user:password@ is exit 78 naming the key, and the message does not repeat the secret."""
    (tmp_path / "runs").mkdir()
    path = _write(tmp_path / "config.toml", f'[[watch]]\nname = "r"\npath = "runs"\n[mirror.s3]\n{mirror}\n')
    [problem] = _problems(path)
    assert problem.startswith(f"at '{key}': the URL holds credentials") and "AWS chain" in problem
    assert "hunter2" not in problem and "AKIAEXAMPLE" not in problem
    done = subprocess.run([CKPTD, "check-config", path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and "hunter2" not in done.stderr + done.stdout


def test_a_presigned_query_in_an_endpoint_is_refused(tmp_path: Path) -> None:
    """A signature or credential in a URL's query is refused the same way."""
    text = '[[watch]]\nname = "r"\npath = "runs"\n[mirror.s3]\nurl = "s3://b"\n'
    text += 'endpoint_url = "https://s3.local/?X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc"\n'
    with pytest.raises(ConfigError, match="signature or credential in its query"):
        parse_config(text, tmp_path / "config.toml")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[daemon]\nstate_dir = "runs/state"\n[[watch]]\nname = "r"\npath = "runs"\n',
         "at 'daemon.state_dir': {root}/runs/state and the watched folder {root}/runs (watch[0].path) are inside one"
         " another; quarantined checkpoints would be found there and quarantined again"),
        ('[[watch]]\nname = "r"\npath = "runs"\n[mirror.b]\nurl = "runs/backup"\n',
         "at 'mirror.b.url': {root}/runs/backup and the watched folder {root}/runs (watch[0].path) are inside one"
         " another; copies would be found there and copied again"),
        ('[[watch]]\nname = "r"\npath = "runs"\n[[watch]]\nname = "s"\npath = "runs/exp1"\n',
         "at 'watch[1].path': {root}/runs/exp1 overlaps watch[0].path ({root}/runs)"),
        ('[[watch]]\nname = "r"\npath = "runs"\n[[watch]]\nname = "s"\npath = "./runs/"\n',
         "at 'watch[1].path': {root}/runs overlaps watch[0].path ({root}/runs)"),
        ('[[watch]]\nname = "r"\npath = "/"\n', "at 'watch[0].path': / cannot be watched"),
    ],
)  # fmt: skip
def test_layouts_that_would_recurse_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    """State or a local mirror inside a watched folder, overlapping watches, a watch at /: exit 78 naming the key."""
    (tmp_path / "runs" / "exp1").mkdir(parents=True)
    path = _write(tmp_path / "config.toml", text)
    problems = _problems(path)
    assert any(p.startswith(fragment.format(root=tmp_path)) for p in problems), problems


def test_a_state_folder_nested_through_a_link_is_refused(tmp_path: Path) -> None:
    """state_dir given as a link whose target lies inside the watched folder is caught once links are resolved."""
    (tmp_path / "runs" / "hidden-state").mkdir(parents=True)
    (tmp_path / "state").symlink_to(tmp_path / "runs" / "hidden-state")
    path = _write(tmp_path / "config.toml", '[daemon]\nstate_dir = "state"\n[[watch]]\nname = "r"\npath = "runs"\n')
    [problem] = _problems(path)
    assert problem.startswith(f"at 'daemon.state_dir': {tmp_path}/runs/hidden-state and the watched folder")


def test_a_metric_key_is_a_dotted_path_with_list_indices(tmp_path: Path) -> None:
    """`[watch.metric] key` reaches a metric kept anywhere in a checkpoint: names and [index] parts."""
    (tmp_path / "r").mkdir()
    text = '[[watch]]\nname = "r"\npath = "r"\n[watch.metric]\nname = "val_dice"\nmode = "max"\n'
    config = load_config(_write(tmp_path / "c.toml", text + 'key = "history.val_dice[-1]"\n'))
    assert config.watch[0].metric is not None and config.watch[0].metric.keys() == {"val_dice": "history.val_dice[-1]"}


# ------------------------------------------------------------------------------------ cross-checks at load

GOOD = """\
    [daemon]
    state_dir = "state"
    rescan_interval = "1s"
    scrub_interval = "1h"

    [[watch]]
    name = "runs"
    path = "runs"
    poll = true
    poll_interval = "100ms"

    [watch.retention]
    cron = "0 3 * * sun"
    max_size = "500GB"

    [watch.mirror]
    to = ["backup", "s3"]

    [mirror.backup]
    url = "backup"

    [mirror.s3]
    url = "s3://bucket/prefix"
    """


def _check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ckptd check-config path` in a subprocess, with $STATE_DIRECTORY only where `env` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"} | (env or {})
    return subprocess.run([CKPTD, "check-config", path], capture_output=True, text=True, timeout=60, env=environ)


def _good(tmp_path: Path, old: str = "", new: str = "") -> Path:
    """GOOD, with `old` replaced by `new`, written as tmp_path/config.toml beside its watched folder."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    assert old in GOOD
    return _write(tmp_path / "config.toml", GOOD.replace(old, new, 1))


def test_check_config_passes_a_config_at_every_lower_bound(tmp_path: Path) -> None:
    """GOOD (every cross-checked key set, each duration at its lower bound) passes check-config with exit 0."""
    done = _check_config(_good(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{tmp_path / 'config.toml'}: ok (1 watched folder(s), state in {tmp_path}/state")


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [
        ('to = ["backup", "s3"]', 'to = ["bakup", "s3"]', "watch[0].mirror.to[0]",
         "no [mirror.bakup] table in the config; did you mean 'backup'? (defined: backup, s3)"),
        ('cron = "0 3 * * sun"', 'cron = "99 * * * *"', "watch[0].retention.cron",
         "not a crontab line (minute hour day month weekday, in UTC): Error validating expression '99': the last"
         " value (99) is higher than the maximum value (59), got '99 * * * *'"),
        ('url = "s3://bucket/prefix"', 'url = "gs://bucket/prefix"', "mirror.s3.url",
         "unknown scheme 'gs'; ckptd implements file:// ("),
        ('poll_interval = "100ms"', "poll_interval = 0", "watch[0].poll_interval",
         'expected a duration of at least 100ms, such as "30s"'),
        ('rescan_interval = "1s"', 'rescan_interval = "0s"', "daemon.rescan_interval",
         'expected a duration of at least 1s, such as "10m"'),
        ('scrub_interval = "1h"', 'scrub_interval = "0s"', "daemon.scrub_interval",
         "expected a duration of at least 1h, such as \"7d\": each scrub re-reads every checkpoint; leave"
         " scrub_interval out to never scrub"),
        ('cron = "0 3 * * sun"', "interval = 0", "watch[0].retention.interval",
         'expected a duration of at least 1s, such as "10m": leave interval and cron out to run every 10m, got 0'),
        ('max_size = "500GB"', "max_size = 0", "watch[0].retention.max_size", "leave max_size out for no limit"),
        ('url = "s3://bucket/prefix"', 'url = "s3://bucket/prefix"\n    region = "no such region!"',
         "mirror.s3.region", 'expected a region name such as "us-east-1"'),
        ('url = "s3://bucket/prefix"', 'url = "s3://bucket/prefix"\n    endpoint_url = "http://[::1"',
         "mirror.s3.endpoint_url", "Invalid IPv6 URL"),
        ('to = ["backup", "s3"]', 'to = ["backup", "s3"]\n    what = ["milestones"]', "watch[0].mirror.what",
         '"milestones" needs [watch.retention] keep_every = N'),
        ('url = "backup"', 'url = "s3://bucket/prefix/"', "mirror.s3.url", "is also [mirror.backup]'s"),
        ('state_dir = "state"', 'state_dir = "state"\n    trusted_globals = ["nosuchmod.Thing"]',
         "daemon.trusted_globals[0]", "'nosuchmod.Thing' cannot be imported"),
        ('state_dir = "state"', 'state_dir = "state"\n    node = "../other-box"', "daemon.node", "string should match"),
    ],
    ids=["typo-in-to", "bad-cron", "gs-scheme", "poll-0", "rescan-0s", "scrub-0s", "retention-interval-0",
         "max-size-0", "bad-region", "bad-endpoint", "milestones-without-keep-every", "two-targets-one-place",
         "trusted-global-missing", "node-not-a-name"],
)  # fmt: skip
def test_check_config_refuses_each_cross_check_naming_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, fragment: str
) -> None:
    """A typo in `to`, a cron line APScheduler refuses, a scheme no target implements, a zero interval: each is
    exit 78 from check-config, one problem naming the config file and the key, nothing on stdout."""
    path = _good(tmp_path, old, new)
    done = _check_config(path)
    assert (done.returncode, done.stdout) == (78, ""), done.stderr
    first, *lines = done.stderr.splitlines()
    assert first == f"ckptd: {path}: 1 problem in the config:"
    assert len(lines) == 1 and lines[0].startswith(f"  - at '{key}': ") and fragment in lines[0], lines


def test_every_cross_check_is_reported_at_once(tmp_path: Path) -> None:
    """Duplicate names, overlapping watches, state and mirror folders inside a watch, a typo in `to`, an unknown
    scheme, a bad cron line and a wrong type: one ConfigError lists them all, not one round per kind."""
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    text = """\
        [daemon]
        state_dir = "runs/state"
        workers = "many"

        [[watch]]
        name = "r"
        path = "runs"
        [watch.retention]
        cron = "0 0 31 2 *"
        [watch.mirror]
        to = ["backpu"]

        [[watch]]
        name = "r"
        path = "runs/exp"

        [mirror.backup]
        url = "runs/backup"
        [mirror.offsite]
        url = "gs://bucket"
        """
    problems = _problems(_write(tmp_path / "config.toml", text))
    keys = [p.split("'")[1] for p in problems]
    assert sorted(keys) == sorted([
        "daemon.workers", "watch[0].retention.cron", "watch[1].name", "watch[0].mirror.to[0]", "mirror.offsite.url",
        "watch[1].path", "daemon.state_dir", "mirror.backup.url",
    ]), problems  # fmt: skip
    assert any("never fires" in p for p in problems) and any("did you mean 'backup'" in p for p in problems)


def test_to_names_a_target_without_any_mirror_table(tmp_path: Path) -> None:
    """With no [mirror.*] at all, a name in `to` says to add one; a name listed twice is named too."""
    text = '[[watch]]\nname = "r"\npath = "r"\n[watch.mirror]\nto = ["backup", "backup"]\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "config.toml")
    assert caught.value.problems == [
        "at 'watch[0].mirror.to[0]': no [mirror.backup] table in the config; add one with its url (a folder or"
        " s3://bucket/prefix), or remove 'backup'",
        "at 'watch[0].mirror.to[1]': 'backup' is listed twice; list each target once",
    ]


def test_a_name_far_from_every_target_gets_no_suggestion(tmp_path: Path) -> None:
    """No close name: the message lists the defined targets instead of guessing."""
    text = '[[watch]]\nname = "r"\npath = "r"\n[watch.mirror]\nto = ["tape"]\n[mirror.s3]\nurl = "s3://b"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "config.toml")
    assert caught.value.problems == ["at 'watch[0].mirror.to[0]': no [mirror.tape] table in the config; (defined: s3)"]


# One URL per scheme of ckptd.mirrors.SCHEMES: a scheme added there must be added here, and is then checked here.
SCHEME_URLS = {"file": "file:///srv/backup", "s3": "s3://bucket/prefix"}


def test_config_accepts_every_scheme_of_the_shared_table(tmp_path: Path) -> None:
    """Each scheme in SCHEMES, the table make_target builds from, is accepted by the config."""
    assert set(SCHEME_URLS) == set(SCHEMES)
    text = '[[watch]]\nname = "r"\npath = "r"\n' + "".join(
        f'[mirror.{name}]\nurl = "{url}"\n' for name, url in SCHEME_URLS.items()
    )
    config = parse_config(text, tmp_path / "config.toml")
    assert {name: scheme_of(target.url) for name, target in config.mirror.items()} == {"file": "file", "s3": "s3"}


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("gs://bucket/x", "unknown scheme 'gs'; ckptd implements file:// (a local folder or NFS mount: a plain path,"
                          " or file:///srv/backup) and s3:// (S3 and S3-compatible stores: s3://bucket/prefix)"),
        ("S3://bucket", "unknown scheme 'S3'"),
        ("s3://", "an s3:// URL needs a bucket"),
        ("file://", "a file:// URL needs a folder"),
        ("s3:/bucket", "'s3' followed by ':' looks like a URL without '//'"),
        ("gs://KEY:hunter2@bucket", "unknown scheme 'gs'"),
    ],
)  # fmt: skip
def test_config_and_make_target_refuse_a_url_alike(tmp_path: Path, url: str, fragment: str) -> None:
    """A URL no target implements is the same problem from the config (at load) and from make_target: both read
    SCHEMES. Neither repeats the URL, which may hold a secret."""
    text = f'[[watch]]\nname = "r"\npath = "r"\n[mirror.offsite]\nurl = "{url}"\n'
    with pytest.raises(ConfigError) as from_config:
        parse_config(text, tmp_path / "config.toml")
    with pytest.raises(ConfigError) as from_factory:
        make_target("offsite", MirrorTargetConfig(url=url), tmp_path, source=str(tmp_path / "config.toml"))
    [problem] = from_factory.value.problems
    assert problem in from_config.value.problems  # beside, for some, credentials or a folder holding the watch
    assert problem.startswith("at 'mirror.offsite.url': ") and fragment in problem
    assert from_factory.value.source == str(tmp_path / "config.toml")
    assert "hunter2" not in str(from_config.value) + str(from_factory.value)


@pytest.mark.parametrize("line", ["0 3 * * sun", "*/15 * * * *", "0 0 29 2 *", "30 4 * * mon-fri", "0 0 1 * *",
                                  "0 6 * * SAT,sun"])  # fmt: skip
def test_cron_lines_the_scheduler_runs_as_crontab_does_are_accepted(tmp_path: Path, line: str) -> None:
    """Plain crontab lines, named weekdays included, load; the config keeps the line as written."""
    text = f'[[watch]]\nname = "r"\npath = "r"\n[watch.retention]\ncron = "{line}"\n'
    retention = parse_config(text, tmp_path / "config.toml").watch[0].retention
    assert retention is not None and retention.cron == line


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("99 * * * *", "the last value (99) is higher than the maximum value (59)"),
        ("* * *", "Wrong number of fields; got 3, expected 5"),
        ("@daily", "Wrong number of fields; got 1, expected 5"),
        ("0 0 * * 1-5", "write the weekday field ('1-5') with names"),
        ("0 0 * * */2", "write the weekday field ('*/2') with names"),
        ("0 0 * * sun#1", "write the weekday field ('sun#1') with names"),
        ("0 0 1 * mon", "give a day of the month or weekdays, not both"),
        ("0 0 31 2 *", "this crontab line never fires"),
    ],
)
def test_cron_is_checked_by_the_schedulers_own_parser(tmp_path: Path, line: str, fragment: str) -> None:
    """A line APScheduler refuses, reads otherwise than crontab (numbered weekdays, day and weekday together)
    or that never fires is a config problem at the key, with the message of ckptd.scheduler.cron_trigger, the
    function the daemon schedules with."""
    text = f'[[watch]]\nname = "r"\npath = "r"\n[watch.retention]\ncron = "{line}"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "config.toml")
    with pytest.raises(ValueError) as scheduler_says:
        cron_trigger(line)
    [problem] = caught.value.problems
    assert problem == f"at 'watch[0].retention.cron': {scheduler_says.value}, got {line!r}"
    assert fragment in problem


def test_scheduler_uses_a_configured_interval_as_is() -> None:
    """Scheduler.add schedules the interval it is given, even under a second, and refuses zero or none instead of
    running every 10 minutes (or, as APScheduler would, every second)."""
    scheduler = Scheduler()
    scheduler.add("fast", lambda: None, every=0.5)
    scheduler.add("cron", lambda: None, every=600.0, cron="0 3 * * sun")
    fast, cron = scheduler._scheduler.get_job("fast"), scheduler._scheduler.get_job("cron")
    assert fast is not None and fast.trigger.interval.total_seconds() == 0.5
    assert cron is not None and str(cron.trigger) == str(cron_trigger("0 3 * * sun"))
    for every in (0.0, None):
        with pytest.raises(ValueError, match="an interval above 0 seconds"):
            scheduler.add("zero", lambda: None, every=every)


@pytest.mark.parametrize(
    ("section", "key", "lowest", "too_low"),
    [
        ("[daemon]\nrescan_interval = {}\n", "daemon.rescan_interval", '"1s"', '"999ms"'),
        ("[daemon]\nscrub_interval = {}\n", "daemon.scrub_interval", '"1h"', '"59m"'),
        ("[[watch]]\nname = \"w\"\npath = \"w\"\npoll_interval = {}\n", "watch[1].poll_interval", '"100ms"', "0.05"),
        ("[[watch]]\nname = \"w\"\npath = \"w\"\n[watch.retention]\ninterval = {}\n", "watch[1].retention.interval",
         '"1s"', "0.5"),
        ("[[watch]]\nname = \"w\"\npath = \"w\"\n[watch.retention]\nmax_size = {}\n", "watch[1].retention.max_size",
         "1", '"0.5"'),
    ],
)  # fmt: skip
def test_each_lower_bound_is_accepted_and_anything_below_refused(
    tmp_path: Path, section: str, key: str, lowest: str, too_low: str
) -> None:
    """Each documented lower bound (MIN_* in ckptd.config) is itself accepted; below it, and zero, are refused at
    the key, never replaced by another value."""
    head = '[[watch]]\nname = "r"\npath = "r"\n'
    place = (lambda body: body + head) if section.startswith("[daemon]") else (lambda body: head + body)
    parse_config(place(section.format(lowest)), tmp_path / "config.toml")
    for value in (too_low, "0"):
        with pytest.raises(ConfigError) as caught:
            parse_config(place(section.format(value)), tmp_path / "config.toml")
        [problem] = caught.value.problems
        assert problem.startswith(f"at '{key}': expected a "), problem
    assert (MIN_POLL_INTERVAL, MIN_RESCAN_INTERVAL, MIN_RETENTION_INTERVAL, MIN_SCRUB_INTERVAL) == (0.1, 1, 1, 3600)


def test_zero_keeps_its_documented_meaning_where_it_has_one(tmp_path: Path) -> None:
    """Where zero means something (stop idle workers at once, no bandwidth limit, no rule, no older copies, no
    settle wait), it loads as zero."""
    text = """\
        [daemon]
        worker_idle_timeout = 0
        scrub_bandwidth = 0

        [[watch]]
        name = "r"
        path = "r"
        settle_seconds = 0
        [watch.retention]
        keep_last = 0
        keep_best = 0
        keep_within = "0s"
        keep_every = 0
        min_epoch = 0

        [mirror.b]
        url = "/srv/b"
        keep_superseded = 0
        max_bandwidth = 0
        """
    config = parse_config(textwrap.dedent(text), tmp_path / "config.toml")
    retention = config.watch[0].retention
    assert retention is not None
    assert (config.daemon.worker_idle_timeout, config.daemon.scrub_bandwidth, config.watch[0].settle_seconds) == (
        0,
        0,
        0,
    )
    assert (retention.keep_last, retention.keep_best, retention.keep_within, retention.keep_every) == (0, 0, 0, 0)
    assert (config.mirror["b"].keep_superseded, config.mirror["b"].max_bandwidth) == (0, 0)
    assert config.daemon.scrub_interval is None and retention.max_size is None and retention.every == 600.0


def test_a_nul_in_a_path_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    """A NUL character (TOML's \\u0000) in a path is a config problem at its key, not a ValueError from the OS."""
    path = _write(tmp_path / "config.toml", '[[watch]]\nname = "r"\npath = "ru\\u0000ns"\n')
    assert _problems(path) == ["at 'watch[0].path': a path or URL cannot hold a NUL character, got 'ru\\x00ns'"]


def test_a_bad_cron_on_reload_keeps_the_running_config(tmp_path: Path) -> None:
    """SIGHUP's reload catches ConfigError only: a bad cron line is one at load time, so the daemon keeps its old
    config and its old retention schedule instead of dying."""
    path = _good(tmp_path)
    daemon = Daemon(path)
    daemon._schedule_jobs()
    before = str(daemon.scheduler._scheduler.get_job("retention:runs").trigger)
    path.write_text(path.read_text().replace('cron = "0 3 * * sun"', 'cron = "99 * * * *"'))
    old = daemon.config
    daemon._reload_config()
    assert daemon.config is old
    assert str(daemon.scheduler._scheduler.get_job("retention:runs").trigger) == before


# ------------------------------------------------------------------------------- where state_dir comes from


def test_check_config_says_when_state_directory_chose_the_state_folder(tmp_path: Path) -> None:
    """Without daemon.state_dir, $STATE_DIRECTORY (systemd's StateDirectory=) picks the state folder, and
    check-config says so; set in the file, the file wins and no note is printed; neither: the default."""
    (tmp_path / "runs").mkdir()
    bare = _write(tmp_path / "bare.toml", '[[watch]]\nname = "r"\npath = "runs"\n')
    env = {"STATE_DIRECTORY": f"{tmp_path}/from-env:{tmp_path}/second"}
    done = _check_config(bare, env)
    assert done.returncode == 0, done.stderr
    assert f"state in {tmp_path}/from-env (from $STATE_DIRECTORY; set daemon.state_dir" in done.stdout
    assert f"state in {tmp_path}/.ckptd (the default, beside the config file)" in _check_config(bare).stdout
    pinned = _write(
        tmp_path / "pinned.toml", '[daemon]\nstate_dir = "/srv/state"\n[[watch]]\nname = "r"\npath = "runs"\n'
    )
    assert _check_config(pinned, env).stdout.startswith(f"{pinned}: ok (1 watched folder(s), state in /srv/state;")


def test_parse_config_records_what_chose_the_state_folder(tmp_path: Path) -> None:
    """Config.state_dir_from: the file's key, the default state folder passed in ($STATE_DIRECTORY), or the default;
    the file itself cannot set it."""
    body = '[[watch]]\nname = "r"\npath = "r"\n'
    source, env_dir = tmp_path / "config.toml", tmp_path / "env"
    assert parse_config(body, source).state_dir_from == "default"
    assert parse_config(body, source, env_dir).state_dir_from == "$STATE_DIRECTORY"
    assert parse_config('[daemon]\nstate_dir = "s"\n' + body, source, env_dir).state_dir_from == "daemon.state_dir"
    with pytest.raises(ConfigError, match="at 'state_dir_from': unknown key"):
        parse_config('state_dir_from = "default"\n' + body, source)


@pytest.mark.parametrize(("value", "ok"), [("5%", True), ("20GB", True), ("1.5MB", True), ("0%", False),
                                           ("100%", False), ("0", False), ("lots", False)])  # fmt: skip
def test_min_free_takes_a_share_of_the_disk_or_a_size(tmp_path: Path, value: str, ok: bool) -> None:
    """`min_free` is "5%" of the file system or a size; zero, everything and words are refused naming the key."""
    from ckptd.config import min_free_bytes

    (tmp_path / "runs").mkdir()
    path = tmp_path / "c.toml"
    path.write_text(f'[[watch]]\nname = "w"\npath = "runs"\n[watch.retention]\nmin_free = "{value}"\n')
    if ok:
        setting = load_config(path).watch[0].retention.min_free  # type: ignore[union-attr]
        assert setting == value and min_free_bytes(setting, 1000) > 0
    else:
        with pytest.raises(ConfigError, match=r"watch\[0\]\.retention\.min_free"):
            load_config(path)
