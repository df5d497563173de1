"""Pickle streams, read without ever running them.

`globals_in` lists the globals a pickle would import, by disassembling it (`pickletools` only decodes);
`RestrictedUnpickler` rebuilds a pickle whose globals are all on an explicit allow-list and refuses any other.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Mapping
from typing import IO, Any, Protocol, cast

_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


class PickleStructureError(Exception):
    """The bytes are not a well-formed pickle."""


class Readable(Protocol):
    """What pickletools reads a pickle from."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readline(self) -> bytes: ...


def globals_in(stream: Readable) -> list[str]:
    """Return the `module.name` globals that the pickle at the stream's position imports, in order.

    Reads exactly one pickle (up to its STOP opcode), leaving the stream just past it. Handles GLOBAL and
    INST (protocols 0-3) and STACK_GLOBAL (protocol 4+, whose names may come from the memo). Raises
    PickleStructureError when the stream is not a complete pickle.
    """
    found: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # the last values pushed, enough to resolve STACK_GLOBAL
    try:
        for opcode, arg, _pos in pickletools.genops(cast("IO[bytes]", stream)):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(f"{module}.{attr}")
            elif name == "STACK_GLOBAL":
                module, attr = [*["?", "?"], *recent][-2:]
                found.append(f"{module if isinstance(module, str) else '?'}.{attr if isinstance(attr, str) else '?'}")
            if name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(str(arg))] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(str(arg))))
            elif name not in ("FRAME", "PROTO"):
                recent.append(None)
            del recent[:-2]
    except (ValueError, EOFError, UnicodeDecodeError, IndexError) as exc:
        raise PickleStructureError(f"not a complete pickle: {exc}") from exc
    return found


def globals_in_bytes(data: bytes) -> list[str]:
    """`globals_in` for a pickle held in memory."""
    return globals_in(io.BytesIO(data))


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that is not on the allow-list."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(f"global {qualified_name} is not allowed")
        self.qualified_name = qualified_name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only globals named in `allowed` (`"module.name"` -> object).

    Anything else raises ForbiddenGlobal before it is imported, so no code from the pickle can run beyond
    the constructors of allowed classes. Persistent ids are refused too.
    """

    def __init__(self, file: IO[bytes], allowed: Mapping[str, Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self._allowed:
            raise ForbiddenGlobal(qualified)
        return self._allowed[qualified]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed here")
