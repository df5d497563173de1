"""config.toml -> frozen, validated models.

`parse_config` is pure (text and the file's path in, models out); `load_config` reads the file and checks
what needs the disk (the watched folders exist). Either collects every problem before it raises one
ConfigError, each naming the key and its value: `at 'watch[0].settle_seconds': ...`.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ckptd.errors import ConfigError
from ckptd.mirrors import scheme_of, scheme_problem

DEFAULT_PATTERNS = ["*.pt", "*.pth", "*.ckpt", "*.bin", "*.safetensors"]
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d|w)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "10m", "24h", "7d". Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30, "30s", "10m" or "24h"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError('expected a duration such as 30, "30s", "10m" or "24h"')
    return float(match[1]) * _UNITS[match[2] or "s"]


Duration = Annotated[float, BeforeValidator(parse_duration)]

# Lower bounds of the durations a zero would turn into a busy loop. Each is documented in config.toml and the
# README's configuration section; a value under it is refused at load time, never replaced by another.
MIN_POLL_INTERVAL = 0.1  # the daemon's own tick: polling faster finds nothing sooner
MIN_RESCAN_INTERVAL = 1.0  # a rescan walks every watched folder and reads its sidecars
MIN_RETENTION_INTERVAL = 1.0  # a retention pass reads the catalog and plans every run of the watch
MIN_SCRUB_INTERVAL = 3600.0  # a scrub re-reads every checkpoint and mirror copy, at scrub_bandwidth


def _duration_at_least(minimum: float, example: str, why: str) -> Callable[[Any], float | None]:
    """A validator: a duration of at least `minimum` seconds (None passes: the key was left out)."""

    def parse(value: Any) -> float | None:
        if value is None:
            return None
        seconds = parse_duration(value)
        if seconds < minimum:
            least = f"{minimum * 1000:g}ms" if minimum < 1 else _seconds_text(minimum)
            raise ValueError(f'expected a duration of at least {least}, such as "{example}": {why}')
        return seconds

    return parse


def _seconds_text(seconds: float) -> str:
    """The bound as a user would write it: "1h" for 3600, "1s" for 1."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _auto_or_duration(value: Any) -> float | None:
    """None for "auto", else a duration of at least one second."""
    if value == "auto" or value is None:
        return None
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError('expected "auto" or a duration of at least 1s, such as "10m"')
    return seconds


_SIZE_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
    "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from a number or a string such as "500GB", "1.5TiB", "200MB". Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "500GB" or "1.5TiB"')
    if isinstance(value, int | float) and value >= 0:
        return int(value)
    match = _SIZE.match(str(value))
    if not match or match[2].lower() not in _SIZE_UNITS:
        raise ValueError('expected a size such as "500GB" or "1.5TiB"')
    return int(float(match[1]) * _SIZE_UNITS[match[2].lower()])


Size = Annotated[int, BeforeValidator(parse_size)]


def _size_above_zero(value: Any) -> int | None:
    """A size of at least one byte: `max_size = 0` would read as "no limit" to some and delete everything that
    no invariant protects to others, so it is refused (leaving the key out means no limit)."""
    if value is None:
        return None
    size = parse_size(value)
    if size < 1:
        raise ValueError('expected a size above 0, such as "500GB"; leave max_size out for no limit')
    return size


def _min_free(value: Any) -> str | None:
    """`min_free`: a share of the file system ("5%") or a size ("20GB"), checked here, read by min_free_bytes."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share < 100:
                raise ValueError
        elif parse_size(text) < 1:
            raise ValueError
    except ValueError:
        raise ValueError('expected a share of the disk such as "5%" or a size such as "20GB"') from None
    return text


def min_free_bytes(setting: str, disk_size: int) -> int:
    """The free bytes `min_free` asks for on a file system of `disk_size` bytes."""
    if setting.endswith("%"):
        return int(disk_size * float(setting[:-1]) / 100)
    return parse_size(setting)


_REGION = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")  # botocore's own rule for a region name


def _region(value: Any) -> str:
    """An S3 region boto3 accepts ("" for the AWS chain's): checked here, not when the first copy fails."""
    text = str(value)
    if text and not _REGION.match(text):
        raise ValueError('expected a region name such as "us-east-1" (lowercase letters, digits and dashes)')
    return text


def _endpoint(value: Any) -> str:
    """An S3 endpoint URL boto3 accepts ("" for AWS): http(s)://host[:port][/path]."""
    text = str(value)
    if not text:
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f'expected a URL such as "https://minio.example:9000" ({exc})') from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError('expected a URL such as "https://minio.example:9000" (http or https, a host, no query)')
    return text


def _cron(value: Any) -> str | None:
    """A crontab line that the scheduler's own parser accepts (ckptd.scheduler.cron_trigger), checked here so
    that a bad one is a config error at load time and on SIGHUP, not a crash of a running daemon."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError('expected a crontab line such as "0 * * * *" (minute hour day month weekday, in UTC)')
    from ckptd.scheduler import cron_trigger  # apscheduler is imported only when a config has a cron line

    cron_trigger(value)
    return value


def _no_nul(value: Any) -> Any:
    """A path or URL without a NUL character, which the OS refuses in any path (with ValueError, not OSError)."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("a path or URL cannot hold a NUL character")
    return value


PathText = Annotated[Path, BeforeValidator(_no_nul)]


def listen_address(text: str) -> tuple[str, int]:
    """(host, port) from "host:port" ("127.0.0.1:9464", "localhost:9464", "[::1]:9464"). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets: its port cannot be told from its last group
    if not sep or not host or any(c.isspace() or c in "/[]" for c in host) or not port.isdigit():
        raise ValueError('expected "host:port", such as "127.0.0.1:9464" (an IPv6 address in brackets: "[::1]:9464")')
    if not 1 <= int(port) <= 65535:
        raise ValueError('expected a port from 1 to 65535, such as "127.0.0.1:9464"')
    return host, int(port)


def _listen(value: Any) -> str | None:
    """`metrics_listen`: "host:port", checked here so that a typo is a config error, not a daemon without metrics."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError('expected "host:port", such as "127.0.0.1:9464"')
    listen_address(value)
    return value


def _prom_file(value: Any) -> Any:
    """`metrics_textfile`: node_exporter's textfile collector reads only files named *.prom."""
    if isinstance(value, str) and not value.endswith(".prom"):
        raise ValueError('expected a file name ending in ".prom" (node_exporter reads only those), such as'
                         ' "/var/lib/node_exporter/textfile_collector/ckptd.prom"')  # fmt: skip
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def default_node() -> str:
    """This box's name in a shared target when `[daemon] node` is left out: its short host name, made a safe
    path component (anything else becomes "-")."""
    short = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", short).lstrip(".-")[:63] or "node"


class DaemonConfig(_Model):
    """`[daemon]`: settings of the daemon and of every command."""

    state_dir: PathText = Path(".ckptd")
    # This box's namespace on every mirror target: copies go to <target>/<node>/<watch>/<run>/, so boxes that
    # mirror into one bucket never write, rewrite or delete each other's keys. Default: the short host name.
    # Set it where host names change (containers) or to keep a box's copies when it is replaced.
    node: str = Field(default_factory=default_node, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    trusted_globals: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")]] = []
    workers: int = Field(default=1, ge=1, le=32)
    rescan_interval: Annotated[float, BeforeValidator(_duration_at_least(
        MIN_RESCAN_INTERVAL, "10m", "each rescan walks every watched folder"))] = 600.0  # fmt: skip
    worker_idle_timeout: Duration = 1800.0  # 0: the workers stop as soon as the queue is empty
    # The time budget of one verification: "auto" is 60 s plus 1 s per 100 MB. One that runs longer is
    # stopped (its worker killed if need be) and recorded `unsupported`, and the queue goes on.
    verify_timeout: Annotated[float | None, BeforeValidator(_auto_or_duration)] = None  # None: "auto"

    def timeout_for(self, size: int) -> float:
        """The verify_timeout for a checkpoint of `size` bytes, in seconds."""
        from ckptd.verify import default_timeout  # ckptd.verify imports torch only when it verifies

        return self.verify_timeout if self.verify_timeout is not None else default_timeout(size)

    # e.g. "7d": re-read every checkpoint and mirror copy this often; left out, never
    scrub_interval: Annotated[float | None, BeforeValidator(_duration_at_least(
        MIN_SCRUB_INTERVAL, "7d", "each scrub re-reads every checkpoint; leave scrub_interval out to never scrub"
    ))] = None  # fmt: skip
    scrub_bandwidth: Annotated[int, BeforeValidator(lambda v: parse_rate(v))] = 50_000_000
    # How long a daemon's claim on a watched folder lasts unless renewed (ckptd.lease): two daemons that watch
    # one shared folder (NFS, Lustre) agree on one owner; a standby takes over within this after the owner died.
    lease_term: Annotated[float, BeforeValidator(_duration_at_least(
        3.0, "60s", "the owner renews every third of it; it must outlast NFS attribute caching"))] = 60.0  # fmt: skip
    # Prometheus metrics (ckptd.metrics), off unless set: an HTTP endpoint at "host:port", and/or a file for
    # node_exporter's textfile collector (its name must end in .prom; rewritten atomically every few seconds).
    metrics_listen: Annotated[str | None, BeforeValidator(_listen)] = None
    metrics_textfile: Annotated[PathText | None, BeforeValidator(_prom_file)] = None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of metrics_listen, or None when it is off."""
        return listen_address(self.metrics_listen) if self.metrics_listen else None


class MetricConfig(_Model):
    """`[watch.metric]`: which metric makes a checkpoint the best, and in which direction."""

    name: str = Field(min_length=1)
    mode: Literal["min", "max"] = "min"
    # Where the metric is, when it is not where ckptd looks (see metadata.extract): a dotted path with list
    # indices into the loaded checkpoint, such as "history.val_dice[-1]".
    key: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w-]*(\[-?\d+\])*(\.[A-Za-z_][\w-]*(\[-?\d+\])*)*$")

    def keys(self) -> dict[str, str]:
        """{name: key} for the verify engine, or nothing when no key is set."""
        return {self.name: self.key} if self.key else {}


class RetentionConfig(_Model):
    """`[watch.retention]`: what to keep; everything else is deleted (never what an invariant protects)."""

    interval: Annotated[float | None, BeforeValidator(_duration_at_least(
        MIN_RETENTION_INTERVAL, "10m", "leave interval and cron out to run every 10m"))] = None  # fmt: skip
    cron: Annotated[str | None, BeforeValidator(_cron)] = None
    keep_last: int = Field(default=3, ge=0)
    keep_best: int = Field(default=1, ge=0)
    keep_every: int = Field(default=0, ge=0)
    keep_every_steps: int = Field(default=0, ge=0)
    keep_within: Duration = 0.0
    min_epoch: int = Field(default=0, ge=0)
    max_size: Annotated[int | None, BeforeValidator(_size_above_zero)] = None
    # Free space to keep on the watched folder's file system ("5%" or "20GB"): below it, retention runs at once
    # and deletes the oldest checkpoints that only soft rules keep (never an invariant) until it is met.
    min_free: Annotated[str | None, BeforeValidator(_min_free)] = None
    on_corrupt: Literal["quarantine", "keep", "delete"] = "quarantine"
    dry_run: bool = False

    @model_validator(mode="after")
    def _one_schedule(self) -> RetentionConfig:
        if self.interval is not None and self.cron is not None:
            raise ValueError("give either interval or cron, not both")
        return self

    @property
    def every(self) -> float:
        """The interval in seconds when no cron expression is given (default 10 minutes)."""
        return self.interval if self.interval is not None else 600.0


def parse_rate(value: Any) -> int:
    """Bytes per second from "200MB/s" (or a plain size); "" or 0 means no limit. Raises ValueError."""
    if value in ("", None, 0):
        return 0
    return parse_size(str(value).removesuffix("/s") if isinstance(value, str) else value)


class MirrorTargetConfig(_Model):
    """`[mirror.NAME]`: a backup target. Credentials never go here: S3 uses the standard AWS chain."""

    url: Annotated[str, BeforeValidator(_no_nul), Field(min_length=1)]
    keep_superseded: int = Field(default=1, ge=0)
    max_bandwidth: Annotated[int, BeforeValidator(parse_rate)] = 0
    endpoint_url: Annotated[str, BeforeValidator(_endpoint)] = ""
    region: Annotated[str, BeforeValidator(_region)] = ""
    checksum: Literal["sha256", "off"] = "sha256"
    # How a stored copy is proved (S3): "auto" compares the store's own MD5 ETag and reads back where it is no
    # MD5; "checksum" trusts the SHA-256 the store reports (stores that validate it, such as AWS S3);
    # "read-back" downloads every copy. See ckptd/mirrors/s3.py and docs/security.md.
    proof: Literal["auto", "checksum", "read-back"] = "auto"
    # Every call to an S3 store waits at most `timeout` to connect and to read each answer, and is tried
    # `attempts` times: a store that never answers fails a command within attempts x timeout, not minutes.
    timeout: Annotated[float, BeforeValidator(_duration_at_least(1.0, "20s", "a store must get time to answer"))] = 20.0
    attempts: int = Field(default=2, ge=1, le=10)

    @model_validator(mode="after")
    def _proof_needs_a_checksum(self) -> MirrorTargetConfig:
        if self.proof == "checksum" and self.checksum == "off":
            raise ValueError('proof = "checksum" needs checksum = "sha256": with it off the store reports none')
        return self


MirrorWhat = Literal["best", "latest", "milestones", "all"]


def _best_and_latest() -> list[MirrorWhat]:
    return ["best", "latest"]


class WatchMirrorConfig(_Model):
    """`[watch.mirror]`: which checkpoints of a watch go to which targets."""

    to: list[str] = Field(min_length=1)
    what: list[MirrorWhat] = Field(default_factory=_best_and_latest, min_length=1)


class WatchConfig(_Model):
    """`[[watch]]`: one watched folder."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: PathText
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS), min_length=1)
    settle_seconds: float = Field(default=2.0, ge=0, le=3600)
    poll: bool = False
    poll_interval: Annotated[float, BeforeValidator(_duration_at_least(
        MIN_POLL_INTERVAL, "30s", "each poll lists every file in the folder"))] = 30.0  # fmt: skip
    metric: MetricConfig | None = None
    retention: RetentionConfig | None = None
    mirror: WatchMirrorConfig | None = None
    # Where sidecars go: "auto" beside each checkpoint except where its trainer would trip over a file there
    # (accelerate's checkpoints folder, torchtitan's step-<N> folders: then the state folder); "beside" or
    # "state" for every checkpoint of the watch. See docs/layouts.md.
    sidecars: Literal["auto", "beside", "state"] = "auto"


class Config(_Model):
    """The whole config file, with every path made absolute."""

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    watch: list[WatchConfig] = Field(min_length=1)
    mirror: dict[str, MirrorTargetConfig] = Field(default_factory=dict)
    source: Path = Path("config.toml")
    # What chose daemon.state_dir, so that `check-config` can say when the environment did: a shell without
    # $STATE_DIRECTORY would otherwise read another catalog than the service.
    state_dir_from: Literal["daemon.state_dir", "$STATE_DIRECTORY", "default"] = "default"

    def watch_named(self, name: str) -> WatchConfig | None:
        """The watch called `name`, if any."""
        return next((w for w in self.watch if w.name == name), None)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.startswith(("function-", "literal[", "constrained-")):
            text += f".{part}" if text else part
    return text


def _message(error: dict[str, Any]) -> str:
    where = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        if any(word in where.lower() for word in ("secret", "access_key", "password", "token")):
            return f"at '{where}': credentials never go in the config file; use the AWS chain (env, profile, role)"
        return f"at '{where}': unknown key (remove it, or check its spelling)"
    if error["type"] == "missing":
        return f"at '{where}': required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"at '{where}': {message[0].lower() + message[1:]}, got {error['input']!r}"


def parse_config(text: str, source: Path, default_state_dir: Path | None = None) -> Config:
    """Parse config text; resolve relative paths against the folder of `source`.

    `default_state_dir` is the state folder when the text sets none (systemd's $STATE_DIRECTORY).

    Returns the validated Config. Raises ConfigError listing every problem at once: TOML syntax, unknown keys,
    wrong types or values, then the cross-checks (duplicate watch names, names in `to` without a
    `[mirror.NAME]`, URL schemes no target implements, credentials in URLs, folders inside one another).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(source), [f"not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    for key in ("source", "state_dir_from"):  # set by ckptd itself below, so the file must not carry them
        if key in raw:
            problems.append(f"at '{key}': unknown key (remove it, or check its spelling)")
    daemon = raw.get("daemon", {})
    state_dir_from = "default"
    if isinstance(daemon, dict) and "state_dir" in daemon:
        state_dir_from = "daemon.state_dir"
    elif isinstance(daemon, dict) and default_state_dir is not None:
        raw["daemon"] = {**daemon, "state_dir": str(default_state_dir)}
        state_dir_from = "$STATE_DIRECTORY"
    config: Config | None = None
    try:
        config = Config.model_validate({**raw, "source": source, "state_dir_from": state_dir_from})
    except ValidationError as exc:
        problems += [_message(dict(e)) for e in exc.errors()]
    # The cross-checks read the raw TOML, so that they are reported beside every other problem: one round of
    # fixes, not one per kind of problem.
    problems += _duplicate_names(raw) + _unknown_targets(raw) + _unknown_schemes(raw)
    # Folders and URLs are checked even when other keys are invalid: on their own values (_paths_only).
    checked = config if config is not None else _paths_only(raw, source)
    resolved = _resolved(checked, source.parent) if checked is not None else None
    if resolved is not None:
        problems += url_problems(resolved) + layout_problems(resolved, lambda p: Path(os.path.normpath(p)))
        problems += _shared_locations(resolved) + (_milestones_without_rule(resolved) if config else [])
    if problems:
        raise ConfigError(str(source), problems)
    assert config is not None and resolved is not None
    return resolved


def _paths_only(raw: dict[str, Any], source: Path) -> Config | None:
    """A Config holding only the paths and URLs of a config that failed validation, so that url_problems and
    layout_problems still report beside the other problems; None when those values are themselves unusable.
    Built without validation (model_construct): it only ever reaches those two checks, never a caller."""
    daemon, watches, mirrors = raw.get("daemon", {}), raw.get("watch"), raw.get("mirror", {})
    if not (isinstance(daemon, dict) and isinstance(watches, list) and isinstance(mirrors, dict)):
        return None
    state_dir = daemon.get("state_dir", ".ckptd")
    paths = [w.get("path") if isinstance(w, dict) else None for w in watches]
    targets = {
        n: (m["url"], m.get("endpoint_url", "")) for n, m in mirrors.items() if isinstance(m, dict) and m.get("url")
    }
    texts = [state_dir, *paths, *(u for pair in targets.values() for u in pair)]
    if not all(isinstance(text, str) and "\x00" not in text for text in texts) or not all(paths) or not state_dir:
        return None
    return Config.model_construct(
        daemon=DaemonConfig.model_construct(state_dir=Path(state_dir)),
        watch=[WatchConfig.model_construct(path=Path(str(path))) for path in paths],
        mirror={n: MirrorTargetConfig.model_construct(url=u, endpoint_url=e) for n, (u, e) in targets.items()},
        source=source,
    )


_QUERY_CREDENTIALS = re.compile(r"(x-amz-(credential|signature|security-token)|awsaccesskeyid|signature)=", re.I)


def url_problems(config: Config) -> list[str]:
    """Credentials written into a URL (`https://KEY:SECRET@host`, `s3://KEY:SECRET@bucket`, a presigned query):
    refused, so that they never reach a log line, the catalog or `status --json`."""
    problems = []
    for name, target in config.mirror.items():
        for key, url in (("url", target.url), ("endpoint_url", target.endpoint_url)):
            if "://" not in url:
                continue
            try:
                parts = urlsplit(url)
            except ValueError:  # unparsable ("http://[::1"): its own field check says so
                continue
            if "@" in parts.netloc or parts.username or parts.password:
                problems.append(
                    f"at 'mirror.{name}.{key}': the URL holds credentials (user:password@); they never go in the"
                    " config file: use the AWS chain (environment, AWS_PROFILE, instance role)"
                )
            elif _QUERY_CREDENTIALS.search(parts.query):
                problems.append(f"at 'mirror.{name}.{key}': the URL holds a signature or credential in its query;"
                                " remove it and use the AWS chain")  # fmt: skip
    return problems


def layout_problems(config: Config, canonical: Callable[[Path], Path]) -> list[str]:
    """Folders that would feed on each other: a state folder or a local mirror folder inside a watched folder
    (or one holding it), watches inside one another, a watch at `/`. `canonical` makes paths comparable
    (normpath for the text, realpath once the disk can be asked)."""
    problems = []
    watches = [(f"watch[{i}].path", canonical(w.path)) for i, w in enumerate(config.watch)]
    for key, path in watches:
        if path == Path(path.anchor):
            problems.append(f"at '{key}': {path} cannot be watched: it holds the whole system, ckptd's own state"
                            " included; watch the folder your trainer writes into")  # fmt: skip
    for i, (key, path) in enumerate(watches):
        for other_key, other in watches[i + 1 :]:
            if path == other or path.is_relative_to(other) or other.is_relative_to(path):
                problems.append(f"at '{other_key}': {other} overlaps {key} ({path}); each checkpoint must belong"
                                " to one watch: watch separate folders")  # fmt: skip
    owned = [("daemon.state_dir", canonical(config.daemon.state_dir), "quarantined checkpoints would be found there"
              " and quarantined again")]  # fmt: skip
    owned += [(f"mirror.{name}.url", canonical(Path(m.url)), "copies would be found there and copied again")
              for name, m in config.mirror.items() if scheme_of(m.url) == "file"]  # fmt: skip
    for key, path, why in owned:
        for watch_key, watched in watches:
            if path.is_relative_to(watched) or watched.is_relative_to(path):
                problems.append(f"at '{key}': {path} and the watched folder {watched} ({watch_key}) are inside one"
                                f" another; {why}: put it elsewhere")  # fmt: skip
    return problems


def _duplicate_names(raw: dict[str, Any]) -> list[str]:
    """Watch names used twice, read from the raw TOML so they are reported beside every other problem."""
    watches = raw.get("watch")
    if not isinstance(watches, list):
        return []
    names = [w.get("name") if isinstance(w, dict) else None for w in watches]
    return [
        f"at 'watch[{i}].name': the name {n!r} is used by an earlier watch; names must be unique"
        for i, n in enumerate(names)
        if isinstance(n, str) and n in names[:i]
    ]


def _unknown_targets(raw: dict[str, Any]) -> list[str]:
    """Names in a watch's `[watch.mirror] to` without a `[mirror.NAME]` table (and names listed twice): such a
    copy would wait forever while retention keeps its checkpoint "awaiting mirror". The closest defined name is
    suggested, for a typo."""
    mirrors = raw.get("mirror")
    defined = sorted(mirrors) if isinstance(mirrors, dict) else []
    watches = raw.get("watch")
    problems = []
    for i, watch in enumerate(watches if isinstance(watches, list) else []):
        mirror = watch.get("mirror") if isinstance(watch, dict) else None
        to = mirror.get("to") if isinstance(mirror, dict) else None
        names: list[Any] = to if isinstance(to, list) else []
        for j, name in enumerate(names):
            if not isinstance(name, str):
                continue  # a type error, which validation reports
            key = f"watch[{i}].mirror.to[{j}]"
            if name in names[:j]:
                problems.append(f"at '{key}': {name!r} is listed twice; list each target once")
            elif name not in defined:
                problems.append(f"at '{key}': no [mirror.{name}] table in the config; {_did_you_mean(name, defined)}")
    return problems


def _did_you_mean(name: str, defined: list[str]) -> str:
    if not defined:
        return f"add one with its url (a folder or s3://bucket/prefix), or remove {name!r}"
    close = difflib.get_close_matches(name, defined, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}(defined: {', '.join(defined)})"


def _milestones_without_rule(config: Config) -> list[str]:
    """Mirrored milestones are the epochs retention's keep_every names: without it none is one, and a mirror
    that copies "milestones" would copy none."""
    return [
        f"at 'watch[{i}].mirror.what': \"milestones\" needs [watch.retention] keep_every = N (the milestone epochs)"
        for i, watch in enumerate(config.watch)
        if watch.mirror and "milestones" in watch.mirror.what and not (watch.retention and watch.retention.keep_every)
    ]


def _shared_locations(config: Config) -> list[str]:
    """Two targets at one place (a folder, a bucket and prefix): each would rewrite the other's index.json."""
    seen: dict[str, str] = {}
    problems = []
    for name, target in config.mirror.items():
        where = f"{target.endpoint_url}|{target.url.rstrip('/')}"
        if where in seen:
            problems.append(f"at 'mirror.{name}.url': {target.url!r} is also [mirror.{seen[where]}]'s; give each"
                            " target a place of its own (another folder or prefix)")  # fmt: skip
        seen.setdefault(where, name)
    return problems


def _unknown_schemes(raw: dict[str, Any]) -> list[str]:
    """Mirror URLs whose scheme no target implements (`gs://`), by the table make_target builds from
    (ckptd.mirrors.SCHEMES), so a URL that passes here is one a target is built for."""
    mirrors = raw.get("mirror")
    problems = []
    for name, target in (mirrors if isinstance(mirrors, dict) else {}).items():
        url = target.get("url") if isinstance(target, dict) else None
        problem = scheme_problem(url) if isinstance(url, str) and url else None
        if problem:
            problems.append(f"at 'mirror.{name}.url': {problem}")
    return problems


def _resolved(config: Config, base: Path) -> Config:
    def absolute(path: Path) -> Path:
        return path if path.is_absolute() else (base / path).resolve()

    def target(settings: MirrorTargetConfig) -> MirrorTargetConfig:
        if scheme_of(settings.url) != "file":
            return settings
        return settings.model_copy(update={"url": str(absolute(Path(settings.url.removeprefix("file://"))))})

    textfile = config.daemon.metrics_textfile
    daemon = {"state_dir": absolute(config.daemon.state_dir), "metrics_textfile": textfile and absolute(textfile)}
    return config.model_copy(
        update={
            "daemon": config.daemon.model_copy(update=daemon),
            "watch": [w.model_copy(update={"path": absolute(w.path)}) for w in config.watch],
            "mirror": {name: target(m) for name, m in config.mirror.items()},
        }
    )


def load_config(path: Path, *, check_folders: bool = True) -> Config:
    """Read and validate the config file at `path`; check that each watched folder exists.

    `check_folders=False` skips that check, for commands that only talk to mirror targets (`ls`, `restore`)
    and must work on a fresh machine that has nothing but config.toml.

    Raises ConfigError with every problem found (exit status 78).
    """
    source = path.absolute()
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(source), [f"cannot read the config file: {exc}"]) from exc
    try:
        # Under systemd, StateDirectory= names the state folder in $STATE_DIRECTORY: the default when the
        # config sets none (a state folder beside /etc/ckptd/config.toml would be read-only there).
        state_env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        config = parse_config(text, source, Path(state_env) if state_env else None)
    except ConfigError as exc:
        missing = _missing_folders_raw(text, source.parent) if check_folders else []
        raise ConfigError(str(source), exc.problems + missing) from None
    problems = [
        f"at 'watch[{i}].path': folder {w.path} does not exist; create it or fix the path"
        for i, w in enumerate(config.watch)
        if check_folders and not w.path.is_dir()
    ]
    textfile = config.daemon.metrics_textfile
    if check_folders and textfile is not None and not textfile.parent.is_dir():
        problems.append(f"at 'daemon.metrics_textfile': folder {textfile.parent} does not exist; create it"
                        " (node_exporter's --collector.textfile.directory) or fix the path")  # fmt: skip
    problems += layout_problems(config, lambda p: Path(os.path.realpath(p)))  # links resolved: no nesting via them
    if problems:
        raise ConfigError(str(source), list(dict.fromkeys(problems)))
    return config


def _missing_folders_raw(text: str, base: Path) -> list[str]:
    """Missing-folder problems read from raw TOML, so they are reported beside the other problems."""
    try:
        watches = tomllib.loads(text).get("watch", [])
    except tomllib.TOMLDecodeError:
        return []
    problems = []
    for i, watch in enumerate(watches if isinstance(watches, list) else []):
        folder = watch.get("path") if isinstance(watch, dict) else None
        if isinstance(folder, str) and "\x00" not in folder and not (base / folder).is_dir():
            problems.append(f"at 'watch[{i}].path': folder {base / folder} does not exist; create it or fix the path")
    return problems
