"""config.toml: parsing, path resolution, durations, and every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import DEFAULT_PATTERNS, load_config, parse_config, parse_duration
from ckptd.errors import ConfigError, ExitCode

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
    (tmp_path / "runs").mkdir()
    text = '[[watch]]\nname = "x"\npath = "runs"\n\n[[watch]]\nname = "x"\npath = "runs"\n'
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
