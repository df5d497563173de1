"""config.toml -> frozen, validated models.

`parse_config` is pure (text and the file's path in, models out); `load_config` reads the file and checks
what needs the disk (the watched folders exist). Either collects every problem before it raises one
ConfigError, each naming the key and its value: `at 'watch[0].settle_seconds': ...`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ckptd.errors import ConfigError

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
_CRON = re.compile(r"^\s*\S+(\s+\S+){4}\s*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DaemonConfig(_Model):
    """`[daemon]`: settings of the daemon and of every command."""

    state_dir: Path = Path(".ckptd")
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    trusted_globals: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")]] = []
    workers: int = Field(default=1, ge=1, le=32)
    rescan_interval: Duration = 600.0
    worker_idle_timeout: Duration = 1800.0
    # The time budget of one verification: "auto" is 60 s plus 1 s per 100 MB. One that runs longer is
    # stopped (its worker killed if need be) and recorded `unsupported`, and the queue goes on.
    verify_timeout: Annotated[float | None, BeforeValidator(_auto_or_duration)] = None  # None: "auto"

    def timeout_for(self, size: int) -> float:
        """The verify_timeout for a checkpoint of `size` bytes, in seconds."""
        from ckptd.verify import default_timeout  # ckptd.verify imports torch only when it verifies

        return self.verify_timeout if self.verify_timeout is not None else default_timeout(size)

    scrub_interval: Duration | None = None  # e.g. "7d": re-read every checkpoint and mirror copy this often
    scrub_bandwidth: Annotated[int, BeforeValidator(lambda v: parse_rate(v))] = 50_000_000


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

    interval: Duration | None = None
    cron: str | None = Field(default=None, pattern=_CRON.pattern)
    keep_last: int = Field(default=3, ge=0)
    keep_best: int = Field(default=1, ge=0)
    keep_every: int = Field(default=0, ge=0)
    keep_every_steps: int = Field(default=0, ge=0)
    keep_within: Duration = 0.0
    min_epoch: int = Field(default=0, ge=0)
    max_size: Size | None = None
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

    url: str = Field(min_length=1)
    keep_superseded: int = Field(default=1, ge=0)
    max_bandwidth: Annotated[int, BeforeValidator(parse_rate)] = 0
    endpoint_url: str = ""
    region: str = ""
    checksum: Literal["sha256", "off"] = "sha256"
    # How a stored copy is proved (S3): "auto" compares the store's own MD5 ETag and reads back where it is no
    # MD5; "checksum" trusts the SHA-256 the store reports (stores that validate it, such as AWS S3);
    # "read-back" downloads every copy. See ckptd/mirrors/s3.py and docs/security.md.
    proof: Literal["auto", "checksum", "read-back"] = "auto"

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
    path: Path
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS), min_length=1)
    settle_seconds: float = Field(default=2.0, ge=0, le=3600)
    poll: bool = False
    poll_interval: Duration = 30.0
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

    Returns the validated Config. Raises ConfigError listing every problem: TOML syntax, unknown keys,
    wrong types or values, duplicate watch names.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(source), [f"not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    if "source" in raw:  # set by ckptd itself below, so the file must not carry it
        problems.append("at 'source': unknown key (remove it, or check its spelling)")
    config: Config | None = None
    try:
        if default_state_dir is not None and isinstance(raw.get("daemon", {}), dict):
            raw.setdefault("daemon", {}).setdefault("state_dir", str(default_state_dir))
        config = Config.model_validate({**raw, "source": source})
    except ValidationError as exc:
        problems += [_message(dict(e)) for e in exc.errors()]
    problems += _duplicate_names(raw)
    if problems:
        raise ConfigError(str(source), problems)
    assert config is not None
    resolved = _resolved(config, source.parent)
    problems = url_problems(resolved) + layout_problems(resolved, lambda p: Path(os.path.normpath(p)))
    if problems:
        raise ConfigError(str(source), problems)
    return resolved


_QUERY_CREDENTIALS = re.compile(r"(x-amz-(credential|signature|security-token)|awsaccesskeyid|signature)=", re.I)


def url_problems(config: Config) -> list[str]:
    """Credentials written into a URL (`https://KEY:SECRET@host`, `s3://KEY:SECRET@bucket`, a presigned query):
    refused, so that they never reach a log line, the catalog or `status --json`."""
    problems = []
    for name, target in config.mirror.items():
        for key, url in (("url", target.url), ("endpoint_url", target.endpoint_url)):
            if "://" not in url:
                continue
            parts = urlsplit(url)
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
              for name, m in config.mirror.items() if "://" not in m.url]  # fmt: skip
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


def _resolved(config: Config, base: Path) -> Config:
    def absolute(path: Path) -> Path:
        return path if path.is_absolute() else (base / path).resolve()

    def target(settings: MirrorTargetConfig) -> MirrorTargetConfig:
        if "://" in settings.url and not settings.url.startswith("file://"):
            return settings
        return settings.model_copy(update={"url": str(absolute(Path(settings.url.removeprefix("file://"))))})

    return config.model_copy(
        update={
            "daemon": config.daemon.model_copy(update={"state_dir": absolute(config.daemon.state_dir)}),
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
        if isinstance(folder, str) and not (base / folder).is_dir():
            problems.append(f"at 'watch[{i}].path': folder {base / folder} does not exist; create it or fix the path")
    return problems
