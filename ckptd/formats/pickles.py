"""Pickle streams, read without ever running them.

`globals_in` lists the globals a pickle would import, by disassembling it (`pickletools` only decodes);
`RestrictedUnpickler` rebuilds a pickle whose globals are all on an explicit allow-list and refuses any other;
`persistent_ids` lists the persistent ids of a pickle (torch.save's storages) without resolving any global.
"""

from __future__ import annotations

import _compat_pickle
import collections
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


MAX_ARGUMENT = 1 << 26  # bytes: no opcode argument of a pickle ckptd reads is larger (see verify.MAX_PICKLE_BYTES)


class _Capped:
    """A stream whose reads may not ask for more than MAX_ARGUMENT bytes at once: pickletools reads an opcode's
    argument with one read(n), n taken from the pickle, and a damaged or hostile length (2**62) would make a
    zip record's reader allocate that much before finding the stream shorter."""

    def __init__(self, stream: Readable) -> None:
        self._stream = stream

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > MAX_ARGUMENT:
            raise ValueError(f"an argument of {size} bytes, over the limit of {MAX_ARGUMENT}")
        return self._stream.read(size)

    def readline(self) -> bytes:
        return self._stream.readline()


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
        for opcode, arg, _pos in pickletools.genops(cast("IO[bytes]", _Capped(stream))):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(_python3_name(module, attr))
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


def _python3_name(module: str, attr: str) -> str:
    """The name an unpickler imports for a protocol 0-2 GLOBAL: Python 2 spellings (`__builtin__.eval`,
    `commands.call`) are mapped as pickle's fix_imports and torch's loaders map them, so that a name is judged
    and reported as what it would really run."""
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


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


class _Opaque:
    """What stands in for any object a pickle builds from an allowed global: nothing is imported or called,
    and whatever the pickle then does to the object (set its state, fill it) is ignored."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        return

    def __call__(self, *_args: Any, **_kwargs: Any) -> _Opaque:
        return _Opaque()

    def __setstate__(self, _state: Any) -> None:
        return

    def __setitem__(self, _key: Any, _value: Any) -> None:
        return

    def append(self, _value: Any) -> None:
        """Ignored (APPEND on an opaque list)."""

    def extend(self, _values: Any) -> None:
        """Ignored (APPENDS on an opaque list)."""


# Plain containers and codecs a pickle may name, rebuilt as what they are: none runs code of the pickle's choosing.
_PLAIN: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,  # state_dicts set attributes on theirs (_metadata)
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "_codecs.encode": lambda text, encoding="latin-1": str(text).encode(encoding),
}


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file: Readable, allowed: frozenset[str]) -> None:
        super().__init__(cast("IO[bytes]", file))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self._allowed:
            raise ForbiddenGlobal(qualified)
        return _PLAIN.get(qualified, _Opaque)

    def persistent_load(self, pid: Any) -> Any:
        return _Opaque()  # a tensor storage: its bytes are not needed to read a step or a metric


def plain_values(stream: Readable, allowed: frozenset[str]) -> Any:
    """The plain values (numbers, strings, lists, dicts) of a pickle, every other object replaced by a stand-in.

    For reading what a trainer recorded (a step, an epoch, a metric) from pickles torch's weights-only loader
    would refuse (numpy RNG states, a user's dataclass): only globals in `allowed` are accepted, none is
    imported, and nothing the pickle names is ever called. Raises ForbiddenGlobal for any other global, and
    pickle.UnpicklingError (or another exception of a broken pickle) when the bytes are not a pickle.
    """
    return _PlainUnpickler(stream, allowed).load()


class _StandIn(_Opaque):
    """The class that stands in for a global in `persistent_ids`; `qualified` is the global's name."""

    qualified = ""


class _IdUnpickler(pickle.Unpickler):
    def __init__(self, file: Readable) -> None:
        super().__init__(cast("IO[bytes]", file))
        self.found: list[tuple[Any, ...]] = []
        self._classes: dict[str, type[_StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self._classes:
            self._classes[qualified] = type("StandIn", (_StandIn,), {"qualified": qualified})
        return self._classes[qualified]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple):
            named = (v.qualified if isinstance(v, type) and issubclass(v, _StandIn) else v for v in pid)
            self.found.append(tuple(named))
        return _Opaque()


def persistent_ids(stream: Readable) -> list[tuple[Any, ...]]:
    """The persistent ids (tuples) of a pickle, in order, each global in them given by its `module.name`.

    No global is imported and nothing the pickle names is called: every global is a class of stand-ins that
    ignore what the pickle does to them, so a hostile pickle builds only inert objects, in time and memory
    linear in its length. torch.save's ids are ('storage', 'torch.FloatStorage', key, location, numel).
    Raises pickle.UnpicklingError (or another exception of a broken pickle) when the bytes are not a pickle.
    """
    unpickler = _IdUnpickler(stream)
    unpickler.load()
    return unpickler.found
