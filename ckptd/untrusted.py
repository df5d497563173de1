"""Input that anyone who can write a watched folder or a mirror target controls: names and JSON documents.

ckptd runs as root and reads file names from disk and object names from targets (index.json, listings), and
parses JSON that others may have written (safetensors headers, sidecars, index files). Everything here is
pure and raises `UntrustedInput` naming what is wrong:

- `component` accepts one path component and nothing that could climb out of a folder: no separator, no
  `..`, no NUL, not empty, at most NAME_MAX bytes. `relative` accepts a '/'-joined path of such components.
- `fit_name` shortens a name that would pass NAME_MAX once ckptd adds its own suffix (a sidecar's
  `.ckptd.json`, a temp file's marks), keeping it unique with a hash of the full name.
- `load_json` parses JSON of bounded size and nesting depth, so a header nested 200,000 deep is a clear
  error, not a RecursionError.
- `printable` renders a name for logs and terminals: undecodable bytes and control characters escaped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

NAME_MAX = 255  # bytes in one path component, on every Linux file system ckptd supports
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 100 << 20

# A string runs to its closing quote, or to the end of the text when unterminated (invalid JSON anyway), so
# the scan stays linear however the quotes and backslashes are arranged.
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.?)*+(?:"|\Z)', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UntrustedInput(ValueError):
    """A name or document from disk or a target that ckptd refuses to use; the message says why."""


def component(name: object, *, what: str = "name") -> str:
    """Return `name` if it is one safe path component; raise UntrustedInput otherwise.

    Safe: a non-empty str, not `.` or `..`, without '/', '\\' or NUL, at most NAME_MAX bytes encoded as the
    file system would (undecodable bytes round-trip through surrogateescape).
    """
    if not isinstance(name, str):
        raise UntrustedInput(f"{what} {name!r} is not a string")
    if name in ("", ".", ".."):
        raise UntrustedInput(f"{what} {name!r} is not a file name")
    if "/" in name or "\\" in name or "\x00" in name:
        raise UntrustedInput(f"{what} {printable(name)!r} holds a path separator or NUL; only plain names are used")
    try:
        encoded = os.fsencode(name)
    except UnicodeError as exc:
        raise UntrustedInput(f"{what} {printable(name)!r} cannot be a file name: {exc}") from None
    if len(encoded) > NAME_MAX:
        raise UntrustedInput(f"{what} is {len(encoded)} bytes long, over the {NAME_MAX}-byte limit of a file name")
    return name


def relative(path: object, *, what: str = "path") -> tuple[str, ...]:
    """Split a '/'-joined relative path into safe components; raise UntrustedInput for anything else.

    An absolute path, an empty component (`a//b`), `.` or `..` anywhere is refused: the result can only
    name something inside the folder it is joined to.
    """
    if not isinstance(path, str) or not path:
        raise UntrustedInput(f"{what} {path!r} is not a relative path")
    if path.startswith("/"):
        raise UntrustedInput(f"{what} {printable(path)!r} is absolute; only paths inside the folder are used")
    return tuple(component(part, what=what) for part in path.split("/"))


def fit_name(name: str, suffix: str = "", *, prefix: str = "", room: int = 0) -> str:
    """`prefix + name + suffix`, with `name` shortened when the whole would pass NAME_MAX - `room` bytes.

    A shortened name keeps as much of the start as fits, then `~` and 16 hex digits of the SHA-256 of the
    full name, so two long names that share a start never share a shortened name. Names that fit are
    returned unchanged, so short names behave exactly as before.
    """
    limit = NAME_MAX - room
    encoded = os.fsencode(name)
    whole = len(os.fsencode(prefix)) + len(encoded) + len(os.fsencode(suffix))
    if whole <= limit:
        return f"{prefix}{name}{suffix}"
    mark = "~" + hashlib.sha256(encoded).hexdigest()[:16]
    keep = max(0, limit - len(os.fsencode(prefix)) - len(os.fsencode(suffix)) - len(mark))
    return f"{prefix}{os.fsdecode(encoded[:keep])}{mark}{suffix}"


def json_depth(data: bytes) -> int:
    """The deepest nesting of objects and arrays in JSON text (brackets inside strings do not count)."""
    deepest = depth = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b'""', data)):
        if match[0] in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(data: bytes, *, what: str, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON from an untrusted source; raise UntrustedInput when it is too large, too deep or invalid."""
    if len(data) > max_bytes:
        raise UntrustedInput(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    depth = json_depth(data)
    if depth > max_depth:
        raise UntrustedInput(f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UntrustedInput(f"{what} is not valid JSON: {exc}") from None


def printable(text: str) -> str:
    """`text` safe to print or log: undecodable bytes as \\xNN, control characters as \\uNNNN."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:  # undecodable bytes from the file system (surrogateescape) show as the bytes they were
            text = os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # other lone surrogates (from JSON, say) show as code points
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
