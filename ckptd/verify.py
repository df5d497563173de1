"""The verify engine: one read of a checkpoint's bytes gives its SHA-256, its CRC checks and its NaN/Inf scan.

Given a path, `verify` returns a `Verification`. Its structure comes first, from a few small reads: a torch
zip's central directory and data.pkl (whose persistent ids say which storage type, so which dtype, each
tensor record holds), or a safetensors header. Then one sequential read of the whole file, in _HASH_CHUNK
pieces read with pread into reused buffers, feeds two threads: the first hashes each piece and drops it from
the page cache (fsutil.drop_cache), the second adds it to the running CRC-32 of every zip record it overlaps
(formats.torch_zip.Crcs) and scans the tensor bytes it holds for NaN and Inf (_Scans). Meanwhile the main
thread loads the file with `torch.load(weights_only=True, mmap=True)`, which reads only the pickle and the
zip directory, for the metadata and the tensors' count, dtypes and sizes; each loaded tensor's storage is
found back in the file by its address (/proc/self/maps) to take the scan's answer for it. Safetensors and DCP
go through readers that never unpickle arbitrary objects. Nothing in a checkpoint is ever executed: pickles
are disassembled first, and one that needs a global outside torch's weights-only allow-list (plus the
user's trusted names) is reported `unsafe` and never loaded. Memory does not grow with the file's size.

The page cache is left as it was found (issue 13): each piece is dropped as soon as it is read, and every
file opened is dropped whole once its mappings are closed (what the pickle reads and torch's mapping
touched). Touching each page once and dropping it keeps a training job's dataset cached, where three passes
over a mapping made the checkpoint's pages look hot and evicted it. Pages cached before the read are dropped
too: a checkpoint the trainer just wrote is not what it reads next. The legacy torch format and bare pickles
(torch cannot map them) and DCP items are read again beside the one read, then dropped likewise.

This is the only module that imports torch, and it does so lazily, after the read has started, so that
the import overlaps the read.

Every step is bounded, since anyone who can write a watched folder chooses the bytes: a verification has a
time budget (`timeout`, by default 60 s plus 1 s per 100 MB) checked between pieces of work, the walk over a
loaded object visits each container once (shared references are not walked again) and at most MAX_VISITS
nodes, a data.pkl larger than MAX_PICKLE_BYTES is not loaded, zip records inflate in pieces and never past
their declared size (formats.torch_zip), JSON headers have a depth limit (untrusted.load_json), and the
lists a sidecar carries are capped (MAX_LISTED). What exceeds a budget ends `unsupported`, with the reason.
Only regular files are read: a FIFO, socket or device, as the checkpoint or inside a directory checkpoint,
is `unsupported` and never opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib
import math
import mmap
import os
import pickle
import queue
import stat as stat_module
import threading
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from ckptd import formats, layouts
from ckptd.discover import directory_digest, directory_files, identity, special_files
from ckptd.formats import safetensors as st_format
from ckptd.formats import torch_zip
from ckptd.formats.buffers import Buffer, Sweep
from ckptd.formats.pickles import (
    ForbiddenGlobal,
    PickleStructureError,
    RestrictedUnpickler,
    globals_in,
    plain_values,
)
from ckptd.fsutil import NotRegularFile, drop_cache, kind_of, open_confined, open_regular
from ckptd.layouts import dcp, nshtrainer
from ckptd.metadata import Extracted, extract, holds_training_state
from ckptd.model import CheckpointChanged, Format, Identity, Status, TensorStats, Verification
from ckptd.untrusted import UntrustedInput, load_json, relative

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
"""Called from the hashing thread with the number of bytes just hashed."""

_HASH_CHUNK = 8 << 20
_IN_FLIGHT = 3  # pieces of the one read between its two threads: 24 MiB of buffers, whatever the file's size
_SCAN_ELEMENTS = 16 << 20  # elements per NaN/Inf reduction: bounded, and no temporary tensor at all
MAX_VISITS = 10_000_000  # nodes of a loaded object walked for its tensors (a real checkpoint: ~10 per tensor)
MAX_PICKLE_BYTES = 64 << 20  # a data.pkl holds structure, not tensor bytes; real ones are KBs to a few MB
MAX_LISTED = 100  # problems, warnings and unsafe globals kept in a record; the rest summed up in one line
MAX_JSON_MEMBER = 64 << 20  # a trainer_state.json, an index, a config: structure, not tensors
TIMEOUT_BASE = 60.0
TIMEOUT_RATE = 100e6  # bytes per second added to the base: a slow disk still finishes well inside


def default_timeout(size: int) -> float:
    """The time budget of a verification when none is configured: 60 s plus 1 s per 100 MB."""
    return TIMEOUT_BASE + size / TIMEOUT_RATE


class OverBudget(Exception):
    """A verification passed its time budget or a structural limit; the message says which."""


class _Scope:
    """What one verification may spend and where it may read: its time scope, checked between pieces of work
    (from any thread), and the folder below which files are opened without following links (when given). It
    also carries what the verification was asked to read besides: {metric: dotted path} (`[watch.metric] key`)."""

    def __init__(self, seconds: float, root: Path | None, metric_keys: Mapping[str, str] | None = None) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.root = root
        self.metric_keys = dict(metric_keys or {})

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise OverBudget(f"verification stopped after {self.seconds:.0f} s (verify_timeout); not verified")

    def open(self, path: Path) -> int:
        """Open a regular file to read (fsutil.open_confined below the root, else never through a final link)."""
        return open_confined(self.root, path) if self.root is not None else open_regular(path)


class TrustError(ValueError):
    """A trusted global name cannot be imported."""


@dataclass
class _Findings:
    """What one format's checks found; turned into a Verification at the end."""

    format: Format | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unsafe_globals: list[str] = field(default_factory=list)
    unsupported: str | None = None
    extracted: Extracted = field(default_factory=Extracted)
    tensors: TensorStats = field(default_factory=TensorStats)
    sha256: str | None = None
    files: dict[str, str] | None = None
    layout: str | None = None
    loaded: Any = None  # the object a weights-only load gave, while it is still needed
    scans: _Scans | None = None  # what the one read found of each tensor record's bytes (a torch zip's)
    inode: int = 0  # of the file loaded, to find its storages in the process's mappings


# ---------------------------------------------------------------------------------------------- entry point


def verify(
    path: Path,
    *,
    trusted: Sequence[str] = (),
    progress: Progress | None = None,
    timeout: float | None = None,
    root: Path | None = None,
    require_complete: bool = True,
    metric_keys: Mapping[str, str] | None = None,
) -> Verification:
    """Verify the checkpoint at `path` (a file or a directory checkpoint; a link is not followed).

    `trusted` names extra globals (`"numpy._core.multiarray.scalar"`) that pickles may use; `timeout` is the
    time budget in seconds (default_timeout of the size when None); `root`, the watched folder, makes every
    file be opened from it without following any link below it (the daemon and `scan` give it: a run folder
    swapped for a link to a folder of root's is never read). Returns the record; never raises for a bad
    checkpoint. Raises FileNotFoundError when `path` is missing, TrustError when a trusted name cannot be
    imported, and CheckpointChanged when the checkpoint changed while it was read (it is still being
    written: retry later, do not call it corrupt) or is now reached through a link. A folder checkpoint its
    trainer has not finished is corrupt, unless `require_complete` is False (a restored copy, proved whole by
    its hashes, whose completion marker lay outside it). `metric_keys`: {metric: dotted path} read from the
    loaded object besides the usual places (a watch's `[watch.metric] key`).
    """
    started = time.monotonic()
    resolve_trusted(trusted)  # a bad name raises TrustError here, not a load failure that reads as corrupt
    mode = path.lstat().st_mode
    if stat_module.S_ISLNK(mode):
        raise CheckpointChanged(str(path), "is a symbolic link now; links are recorded, never verified")
    before = _identities(path)
    scope = _Scope(timeout if timeout is not None else default_timeout(before[""].size), root, metric_keys)
    try:
        if stat_module.S_ISDIR(mode):
            findings = _verify_directory(path, trusted, progress, scope, require_complete)
        elif stat_module.S_ISREG(mode):
            findings = _verify_file(path, trusted, progress, scope)
        else:
            findings = _Findings(unsupported=f"{path.name}: is {kind_of(mode)}; only regular files are read")
    except OverBudget as exc:
        findings = _Findings(unsupported=f"{path.name}: {exc}")
    except NotRegularFile as exc:  # swapped for a link or a FIFO while queued
        raise CheckpointChanged(str(path), f"{exc.filename}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise CheckpointChanged(str(path), "a folder on its path is now a symbolic link; not read") from None
    after = _identities(path)
    if before != after:
        raise CheckpointChanged(str(path), "changed while it was being verified")
    stat = identity(path)
    status: Status = "ok"
    if findings.problems:
        status = "corrupt"
    elif findings.unsafe_globals:
        status = "unsafe"
    elif findings.unsupported:
        status = "unsupported"
        findings.problems.append(findings.unsupported)
    if findings.tensors.nonfinite:
        findings.warnings.append(f"{findings.tensors.nonfinite} floating-point tensor(s) hold NaN or Inf")
    meta = findings.extracted
    findings.warnings += meta.notes
    return Verification(
        path=str(path),
        status=status,
        format=findings.format,
        size_bytes=stat.size,
        sha256=findings.sha256,
        mtime=stat.mtime,
        mtime_ns=stat.mtime_ns,
        device=stat.device,
        inode=stat.inode,
        problems=_capped(findings.problems, "problems"),
        warnings=_capped(findings.warnings, "warnings"),
        unsafe_globals=_capped(sorted(set(findings.unsafe_globals)), "globals"),
        epoch=meta.epoch,
        global_step=meta.global_step,
        metrics=meta.metrics,
        producer=meta.producer,
        keys=meta.keys,
        tensors=findings.tensors,
        files=findings.files,
        layout=findings.layout,
        needs=meta.needs[:16],
        resumable=meta.resumable,
        seconds=round(time.monotonic() - started, 6),
    )


def _capped(lines: list[str], what: str) -> list[str]:
    """At most MAX_LISTED lines, the last saying how many more there were: a sidecar stays small."""
    if len(lines) <= MAX_LISTED:
        return lines
    return [*lines[: MAX_LISTED - 1], f"... and {len(lines) - MAX_LISTED + 1} more {what}"]


def _identities(path: Path) -> dict[str, Identity]:
    """The identity of the checkpoint and, for a directory, of each file in it: none may change meanwhile."""
    found = {"": identity(path)}
    if path.is_dir():
        found |= {rel: identity(path / rel) for rel in directory_files(path)}
    return found


# --------------------------------------------------------------------------------------------- the one read


@dataclass(frozen=True)
class _File:
    """An open regular file: its descriptor, a read-only mapping for the small structural reads (b"" when
    empty), a path to the very file opened (`/proc/self/fd/N`, for readers that take a path: a file swapped
    under its name meanwhile is not what they read), its size and inode."""

    fd: int
    mapped: Buffer
    source: str
    size: int
    inode: int


@contextlib.contextmanager
def _opened(path: Path, scope: _Scope) -> Iterator[_File]:
    """Open a regular file (never a link, FIFO or device: fsutil.open_regular raises NotRegularFile) within the
    scope's root when it has one, and map it for random reads (MADV_RANDOM: a fault reads its page, not a
    window around it). On the way out the mapping is closed and the file's pages are dropped from the page cache.
    """
    fd = scope.open(path)
    try:
        found = os.fstat(fd)
        mapped: mmap.mmap | None = None
        if found.st_size > 0:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            with contextlib.suppress(OSError, AttributeError):
                mapped.madvise(mmap.MADV_RANDOM)
        try:
            yield _File(fd, mapped if mapped is not None else b"", _fd_path(fd, path), found.st_size, found.st_ino)
        except BaseException:
            # The traceback of a stopped verification (OverBudget) still holds views of the mapping, so it
            # cannot be closed now; it is unmapped when the traceback goes, as verify() returns.
            with contextlib.suppress(BufferError):
                if mapped is not None:
                    mapped.close()
            raise
        if mapped is not None:
            mapped.close()
        drop_cache(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _mapped(path: Path, scope: _Scope) -> Iterator[tuple[Buffer, str]]:
    """`_opened`, for the readers that need only the mapping and the path."""
    with _opened(path, scope) as file:
        yield file.mapped, file.source


def _fd_path(fd: int, path: Path) -> str:
    proc = f"/proc/self/fd/{fd}"
    return proc if Path(proc).exists() else str(path)


Feed = Callable[[int, memoryview], None]
"""Given each piece of the one read, in file order, with its offset in the file."""


@contextlib.contextmanager
def _reading(file: _File, scope: _Scope, progress: Progress | None, feeds: Sequence[Feed] = ()) -> Iterator[
        Future[str]]:  # fmt: skip
    """Start the one read of `file` on its own threads (see _one_read); yields its future SHA-256. Leaving the
    block waits for the read, which stops early when the block raised."""
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="ckptd-verify") as pool:
        future = pool.submit(_one_read, file, scope, progress, feeds, stop)
        try:
            yield future
        except BaseException:
            stop.set()
            raise


def _one_read(file: _File, scope: _Scope, progress: Progress | None, feeds: Sequence[Feed],
              stop: threading.Event) -> str:  # fmt: skip
    """Read the file front to back, once, in _HASH_CHUNK pieces; return its SHA-256. Each piece is dropped from
    the page cache as soon as it is read, hashed (hashlib releases the GIL, so this overlaps the load), then
    handed to `feeds` on a second thread; at most _IN_FLIGHT pieces are in memory. A file shorter than its size
    ends the read (verify's identity check reports the change); an error of a feed is raised here."""
    digest = hashlib.sha256()
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(_IN_FLIGHT if feeds else 1):
        free.put(bytearray(_HASH_CHUNK))
    full: queue.SimpleQueue[tuple[int, bytearray, int] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []
    checker = threading.Thread(target=_feed_all, args=(full, free, feeds, failed), name="ckptd-verify-check")
    if feeds:
        checker.start()
    try:
        at = 0
        while at < file.size and not stop.is_set() and not failed:
            scope.check()
            buffer = free.get()
            count = _read_at(file.fd, buffer, at, file.size - at)
            if count == 0:
                break
            drop_cache(file.fd, at, count)  # in our buffer now: the kernel's copy is not needed again
            digest.update(memoryview(buffer)[:count])
            if progress is not None:
                progress(count)
            if feeds:
                full.put((at, buffer, count))
            else:
                free.put(buffer)
            at += count
    finally:
        if feeds:
            full.put(None)
            checker.join()
    if failed:
        raise failed[0]
    return digest.hexdigest()


def _read_at(fd: int, buffer: bytearray, at: int, left: int) -> int:
    """Fill `buffer` (up to `left` bytes) from offset `at` of the file; fewer bytes only at its end."""
    view = memoryview(buffer)[: min(len(buffer), left)]
    got = 0
    while got < len(view):
        count = os.preadv(fd, [view[got:]], at + got)
        if count == 0:
            break
        got += count
    return got


def _feed_all(full: queue.SimpleQueue[tuple[int, bytearray, int] | None], free: queue.SimpleQueue[bytearray],
              feeds: Sequence[Feed], failed: list[BaseException]) -> None:  # fmt: skip
    """The one read's second thread: hand each piece to the feeds, then give its buffer back. After an error it
    only gives buffers back (the reader stops at its next piece)."""
    while (item := full.get()) is not None:
        at, buffer, count = item
        try:
            if not failed:
                view = memoryview(buffer)[:count]
                for feed in feeds:
                    feed(at, view)
        except BaseException as exc:
            failed.append(exc)
        finally:
            free.put(buffer)


class _Scans:
    """Whether the bytes of each tensor span [start, end) of a file, read as its dtype (a torch dtype's name),
    hold NaN or Inf: fed the pieces of the one read (`feed`), with elements cut by a piece's end carried over.
    Only floating-point and complex spans are given; the scan imports torch (on the read's second thread)."""

    def __init__(self, spans: Iterable[tuple[int, int, str]]) -> None:
        spans = list(spans)
        self._found: dict[tuple[int, int], tuple[str, bool | None]] = {(s, e): (d, False) for s, e, d in spans}
        self._sweep = Sweep((s, e, (s, e)) for s, e, _d in spans)
        self._carry: dict[tuple[int, int], bytearray] = {}

    def feed(self, at: int, piece: memoryview) -> None:
        for span, part in self._sweep.overlaps(at, piece):
            dtype, found = self._found[span]
            if found is False:  # not found yet, and scannable
                self._found[span] = (dtype, self._scan(span, dtype, part))

    def at(self, start: int, end: int, dtype: str) -> bool | None:
        """Whether the span holds NaN or Inf as `dtype`; None when it was not scanned as that dtype."""
        dtype_found, found = self._found.get((start, end), (None, None))
        return found if dtype_found == dtype else None

    def _scan(self, span: tuple[int, int], dtype: str, part: memoryview) -> bool | None:
        size = _element_size(dtype)
        if size is None:
            return None  # a dtype this torch does not have
        carry = self._carry.pop(span, None)
        if carry is not None:  # the element that the previous piece's end cut
            need = size - len(carry)
            carry += part[:need]
            part = part[need:]
            if len(carry) < size:
                self._carry[span] = carry
                return False
            found = _bytes_nonfinite(carry, dtype)
            if found is not False:
                return found
        whole = len(part) - len(part) % size
        if whole < len(part):
            self._carry[span] = bytearray(part[whole:])
        return _bytes_nonfinite(part[:whole], dtype)


# For the common floating-point dtypes: (bytes per element, bytes per number: a complex is two, the values the
# most significant byte of a number (little-endian: its last) takes when it is NaN or Inf). That byte holds the
# sign and the top bits of the exponent, all ones in NaN and Inf; outside them only in finite numbers past
# 2**127 (float16: 2**15), so that a piece without such a byte is known finite without torch, whose import
# the one read would otherwise wait for. A piece with one is scanned by torch.
_TOP_BYTES_F = b"\x7f\xff"
_TOP_BYTES_F16 = bytes([0x7C, 0x7D, 0x7E, 0x7F, 0xFC, 0xFD, 0xFE, 0xFF])
_FLOATS: dict[str, tuple[int, int, bytes]] = {
    "float32": (4, 4, _TOP_BYTES_F), "bfloat16": (2, 2, _TOP_BYTES_F), "float64": (8, 8, _TOP_BYTES_F),
    "float16": (2, 2, _TOP_BYTES_F16), "complex64": (8, 4, _TOP_BYTES_F), "complex128": (16, 8, _TOP_BYTES_F),
}  # fmt: skip


def _element_size(dtype_name: str) -> int | None:
    if dtype_name in _FLOATS:
        return _FLOATS[dtype_name][0]
    import torch

    dtype = getattr(torch, dtype_name, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _maybe_nonfinite(data: bytearray | memoryview, dtype_name: str) -> bool:
    """False when the elements in `data` are surely finite by their top bytes (see _FLOATS); True when they may
    not be, or the dtype is not one of _FLOATS."""
    if dtype_name not in _FLOATS:
        return True
    _size, number, values = _FLOATS[dtype_name]
    top = bytes(data)[number - 1 :: number]
    if len(values) > 2:
        return any(value in top for value in values)
    return values[:1] in top or values[1:] in top


def _bytes_nonfinite(data: bytearray | memoryview, dtype_name: str) -> bool | None:
    """Whether the elements in `data` (a writable buffer of whole elements) hold NaN or Inf; None when this torch
    cannot scan the dtype (float4 and other packed ones)."""
    if len(data) == 0 or not _maybe_nonfinite(data, dtype_name):
        return False
    import torch

    dtype = getattr(torch, dtype_name)
    try:
        flat = torch.frombuffer(data, dtype=dtype)
        return _has_nonfinite(torch.view_as_real(flat).reshape(-1) if dtype.is_complex else flat)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None


class _Mappings:
    """Where an address of this process lies in the file of `inode`, from /proc/self/maps (read once): how a
    storage that torch.load(mmap=True) mapped is found back in the file. Empty where /proc is missing."""

    def __init__(self, inode: int) -> None:
        self._regions: list[tuple[int, int, int]] = []
        with contextlib.suppress(OSError, ValueError), open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == str(inode):
                    low, _, high = fields[0].partition("-")
                    self._regions.append((int(low, 16), int(high, 16), int(fields[2], 16)))

    def offset(self, address: int) -> int | None:
        """The offset in the file of the byte at `address`; None when no mapping of the file holds it."""
        for low, high, file_offset in self._regions:
            if low <= address < high:
                return address - low + file_offset
        return None


# --------------------------------------------------------------------------------------------- single files


def _verify_file(path: Path, trusted: Sequence[str], progress: Progress | None, scope: _Scope) -> _Findings:
    size = path.lstat().st_size
    if size == 0:
        return _Findings(problems=[f"{path.name}: empty file (0 bytes)"], sha256=hashlib.sha256().hexdigest())
    with _opened(path, scope) as file:
        findings = _check_file(path.name, file, trusted, scope, progress=progress)
        if findings.loaded is not None:
            findings.extracted = extract(findings.loaded, path.name, keys_of=scope.metric_keys)
            findings.tensors = _stats_of(findings, path.name, scope)
    if nshtrainer.run_of_file(path) is not None:
        _add_nshtrainer_record(findings, path, scope)
    return findings


def _add_nshtrainer_record(findings: _Findings, path: Path, scope: _Scope) -> None:
    """Add what nshtrainer's `.metadata.json` beside the checkpoint records (its metrics: the checkpoint itself
    holds none; what the checkpoint says wins), and hold the checkpoint to the SHA-256 recorded there."""
    companion = nshtrainer.metadata_of(path)
    try:
        fd = scope.open(companion)
    except (OSError, ValueError):
        return  # not written yet, or not a regular file: the checkpoint's own values stand
    try:
        data = os.read(fd, MAX_JSON_MEMBER + 1)
    finally:
        os.close(fd)
    try:
        raw = load_json(data, what=companion.name, max_bytes=MAX_JSON_MEMBER)
    except UntrustedInput as exc:
        findings.warnings.append(f"{companion.name}: not read ({exc})")
        return
    recorded = nshtrainer.recorded_checksum(raw)
    if recorded is not None and findings.sha256 is not None and recorded != findings.sha256:
        findings.problems.append(
            f"{path.name}: its SHA-256 {findings.sha256[:16]}... differs from the checkpoint_checksum"
            f" {recorded[:16]}... that nshtrainer recorded in {companion.name}"
        )
    record = nshtrainer.extracted(raw)
    found = findings.extracted
    findings.extracted = dataclasses.replace(
        found,
        epoch=found.epoch if found.epoch is not None else record.epoch,
        global_step=found.global_step if found.global_step is not None else record.global_step,
        metrics={**record.metrics, **found.metrics},
        notes=[*found.notes, *record.notes],
    )


def _check_file(name: str, file: _File, trusted: Sequence[str], scope: _Scope, *, extra: frozenset[str] = frozenset(),
                load: bool = True, progress: Progress | None = None) -> _Findings:  # fmt: skip
    """Check one file by its content: a torch zip, a legacy torch file or safetensors; `name` is how problems
    name it. `extra` globals are normal in this file (a trainer's own, see ckptd.layouts) without being loaded;
    `load` asks for the object (in `.loaded`) when the pickle allows a weights-only load. The file is read once
    whole (its SHA-256 in `.sha256`), `progress` told of each piece."""
    kind = formats.detect_file(bytes(file.mapped[:64]), file.size)
    if kind == "torch_zip":
        return _check_torch_zip(name, file, trusted, scope, extra=extra, load=load, progress=progress)
    if kind == "safetensors":
        return _check_safetensors(name, file, scope, progress)
    with _reading(file, scope, progress) as read:
        findings = _check_other(name, kind, file, trusted, scope, extra=extra, load=load)
        findings.sha256 = read.result()
    return findings


def _check_other(name: str, kind: Format | None, file: _File, trusted: Sequence[str], scope: _Scope, *,
                 extra: frozenset[str], load: bool) -> _Findings:  # fmt: skip
    """A legacy torch file, a bare pickle, or no format ckptd knows (read beside the one read, which hashes it)."""
    mapped, source = file.mapped, file.source
    if kind == "torch_legacy":
        return _check_torch_legacy(name, source, trusted, scope, extra=extra, load=load)
    head = bytes(mapped[:8])
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return _check_plain_pickle(name, source, trusted, scope, extra=extra)
    if not any(head) and not any(mapped[: 1 << 20]):
        return _Findings(problems=[f"{name}: only zero bytes where a checkpoint should be (a write that never landed)"])
    text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
    what = "text" if text else f"bytes {head.hex()}"
    return _Findings(unsupported=f"{name}: not a checkpoint format ckptd knows (it starts with {what})")


def _check_torch_zip(name: str, file: _File, trusted: Sequence[str], scope: _Scope, *, extra: frozenset[str],
                     load: bool, progress: Progress | None) -> _Findings:  # fmt: skip
    """A torch zip: its directory and data.pkl first (what the one read is to compute depends on them), then the
    one read (SHA-256, the CRCs, the NaN/Inf scan of its tensors) while torch loads it."""
    findings = _Findings(format="torch_zip", inode=file.inode)
    try:
        records = torch_zip.read_records(file.mapped)
    except torch_zip.ZipStructureError as exc:
        findings.problems.append(f"{name}: {exc}")
        with _reading(file, scope, progress) as read:
            findings.sha256 = read.result()
        return findings
    recorded = torch_zip.crcs_recorded(records)
    crcs = torch_zip.Crcs(records, scope.check)
    names = _torch_zip_globals(name, file.mapped, records, findings, scope)
    findings.scans = _Scans(_storage_spans(file.mapped, records, scope) if names is not None else ())
    with _reading(file, scope, progress, [findings.scans.feed, *([crcs.feed] if recorded else [])]) as read:
        if names is not None:
            beyond = _disallowed(names, trusted)
            findings.unsafe_globals = [g for g in beyond if g not in extra]
            if not beyond and load:
                findings.loaded = _torch_load(file.source, name, trusted, findings, mmap_mode=True)
        findings.sha256 = read.result()
    if recorded:
        problems = crcs.problems() + torch_zip.crc_problems(file.mapped, crcs.deflated, scope.check)
        findings.problems[:0] = [f"{name}: {p}" for p in problems]
    else:
        findings.warnings.append(
            f"{name}: its CRC-32s were not recorded (torch.serialization.set_crc32_options(False)); only its"
            " SHA-256 protects it"
        )
    return findings


def _torch_zip_globals(name: str, mapped: Buffer, records: list[torch_zip.ZipRecord], findings: _Findings,
                       scope: _Scope) -> list[str] | None:  # fmt: skip
    """The globals data.pkl names; None, with the reason in `findings`, when the archive is not to be loaded."""
    refused = torch_zip.inflation_refusals(records)
    pickled = torch_zip.find_record(records, "data.pkl")
    if refused:
        findings.unsupported = f"{name}: {next(iter(refused.values()))}"
    elif torch_zip.is_torchscript(records):
        findings.unsupported = f"{name}: a TorchScript archive; loading it would run its code"
    elif pickled is None:
        findings.format = None
        findings.unsupported = f"{name}: a zip archive without data.pkl, not a torch checkpoint (an .npz?)"
    else:
        return _scan_pickle(mapped, pickled, name, findings, scope)
    return None


# The typed storages torch.save names in its persistent ids, by the dtype of their bytes: the floating-point and
# complex ones, which the one read scans (torch.storage._dtype_to_storage_type_map, frozen since torch 2.0).
_STORAGE_DTYPES = {
    "torch.DoubleStorage": "float64", "torch.FloatStorage": "float32", "torch.HalfStorage": "float16",
    "torch.BFloat16Storage": "bfloat16", "torch.ComplexDoubleStorage": "complex128",
    "torch.ComplexFloatStorage": "complex64",
}  # fmt: skip


def _little_endian(mapped: Buffer, records: list[torch_zip.ZipRecord]) -> bool:
    """True unless the archive's `byteorder` record says otherwise (torch writes it since 2.1: b"little")."""
    order = torch_zip.find_record(records, "byteorder")
    if order is None:
        return True  # older torch wrote no byteorder record, only on little-endian machines in practice
    if order.file_size > 16 or order.method != zipfile.ZIP_STORED:
        return False
    return torch_zip.stored_bytes(mapped, order) == b"little"


def _storage_spans(mapped: Buffer, records: list[torch_zip.ZipRecord], scope: _Scope) -> list[tuple[int, int, str]]:
    """(start, end, dtype) of each floating-point tensor record, by the storage type data.pkl gives it. Records
    of storages saved untyped (float8...) are left to the scan of the loaded tensor (_tensor_stats)."""
    pickled = torch_zip.find_record(records, "data.pkl")
    if pickled is None or not _little_endian(mapped, records):
        return []  # the bytes of a big-endian archive are swapped by the load: its tensors are scanned loaded
    try:
        types = torch_zip.storage_types(mapped, records, pickled, scope.check)
    except OverBudget:
        raise
    except Exception:  # a pickle the loader will refuse: nothing is scanned ahead, the load reports it
        return []
    return [
        (r.data_start, r.data_end, _STORAGE_DTYPES[types[r.name]])
        for r in records
        if r.method == zipfile.ZIP_STORED and types.get(r.name) in _STORAGE_DTYPES
    ]


def _scan_pickle(mapped: Buffer, record: torch_zip.ZipRecord, where: str, findings: _Findings,
                 scope: _Scope) -> list[str] | None:  # fmt: skip
    """The globals a data.pkl record names, read as a stream (never held whole); None, with the reason in
    `findings`, when it is too large to load or not a readable pickle."""
    if record.file_size > MAX_PICKLE_BYTES:
        findings.unsupported = (
            f"{where}: record {record.name!r} is a {record.file_size}-byte pickle, over the limit of"
            f" {MAX_PICKLE_BYTES} (a checkpoint's pickle holds structure, not tensors); not loaded"
        )
        return None
    try:
        return globals_in(torch_zip.record_stream(mapped, record, scope.check))
    except (PickleStructureError, OSError, ValueError, zlib.error) as exc:
        findings.problems.append(f"{where}: record {record.name!r} is not a readable pickle ({exc})")
        return None


def _check_torch_legacy(name: str, source: str, trusted: Sequence[str], scope: _Scope, *,
                        extra: frozenset[str] = frozenset(), load: bool = True) -> _Findings:  # fmt: skip
    findings = _Findings(format="torch_legacy")
    names: list[str] = []
    try:
        with open(source, "rb") as raw:
            handle = _Limited(raw, MAX_PICKLE_BYTES)  # the pickles come first; the storages' bytes follow them
            for _ in range(5):  # magic number, protocol, sys info, the object, the storage keys
                scope.check()
                names += globals_in(handle)
    except PickleStructureError as exc:
        findings.problems.append(f"{name}: legacy torch file with a broken pickle ({exc})")
        return findings
    except _PastLimit:
        findings.unsupported = (
            f"{name}: its pickles pass {MAX_PICKLE_BYTES} bytes (they hold structure, not tensors); not loaded"
        )
        return findings
    beyond = _disallowed(names, trusted)
    findings.unsafe_globals = [g for g in beyond if g not in extra]
    if not beyond and load:
        # torch cannot mmap the legacy format: this load reads the storages into memory.
        findings.loaded = _torch_load(source, name, trusted, findings, mmap_mode=False)
    return findings


def _check_plain_pickle(name: str, source: str, trusted: Sequence[str], scope: _Scope, *,
                        extra: frozenset[str]) -> _Findings:  # fmt: skip
    """A bare pickle (pickle.dump, not torch.save): never loaded, but its globals are named all the same, so a
    payload in it is unsafe like anywhere else."""
    findings = _Findings()
    try:
        with open(source, "rb") as raw:
            scope.check()
            names = globals_in(_Limited(raw, MAX_PICKLE_BYTES))
    except PickleStructureError as exc:
        findings.problems.append(f"{name}: a pickle that breaks off ({exc})")
        return findings
    except _PastLimit:
        findings.unsupported = f"{name}: a bare pickle over {MAX_PICKLE_BYTES} bytes; not read"
        return findings
    findings.unsafe_globals = [g for g in _disallowed(names, trusted) if g not in extra]
    if not findings.unsafe_globals:
        findings.unsupported = f"{name}: a bare pickle (pickle.dump), not a torch checkpoint; not loaded"
    return findings


class _PastLimit(Exception):
    """A reader was asked for more bytes than its limit."""


class _Limited:
    """A reader of at most `limit` bytes in all (a single request past it raises before reading anything)."""

    def __init__(self, handle: IO[bytes], limit: int) -> None:
        self._handle, self._left = handle, limit

    def _take(self, count: int) -> None:
        if count > self._left:
            raise _PastLimit
        self._left -= count

    def read(self, size: int = -1) -> bytes:
        self._take(size if size >= 0 else self._left + 1)
        return self._handle.read(size)

    def readline(self) -> bytes:
        line = self._handle.readline(self._left + 1)
        self._take(len(line))
        return line

    def tell(self) -> int:
        return self._handle.tell()


def _torch_load(source: str, name: str, trusted: Sequence[str], findings: _Findings, *, mmap_mode: bool) -> Any:
    """torch.load with weights_only; records an unsafe global or a load failure in `findings`."""
    import torch

    try:
        with torch.serialization.safe_globals(resolve_trusted(trusted)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap_mode)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Unsupported global" in message or "allowlisted via" in message:
            findings.unsafe_globals.append(_global_from_message(message))
        else:
            findings.problems.append(f"{name}: torch.load failed: {_first_line(message)}")
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for broken files
        findings.problems.append(f"{name}: torch.load failed: {_first_line(str(exc))}")
    return None


def _check_safetensors(name: str, file: _File, scope: _Scope, progress: Progress | None) -> _Findings:
    """A safetensors file: its header first, then the one read hashes it and scans each tensor's bytes."""
    findings = _Findings(format="safetensors")
    header = _safetensors_header(name, file.mapped, file.source, findings)
    tensors = header.tensors if header is not None else []
    scans = _Scans((t.start, t.end, _ST_DTYPES.get(t.dtype, t.dtype.lower())) for t in tensors if _st_floating(t.dtype))
    with _reading(file, scope, progress, [scans.feed]) as read:
        findings.sha256 = read.result()
    if header is not None:
        findings.tensors = _safetensors_stats(name, header.tensors, scans, findings)
        numeric = {k: v for k, v in header.metadata.items() if _is_number(v)}
        found = extract({k: float(v) for k, v in numeric.items()}, name, producer="huggingface")
        findings.extracted = Extracted(
            epoch=found.epoch,
            global_step=found.global_step,
            metrics=found.metrics,
            producer="huggingface",
            keys=[t.name for t in header.tensors][:200],
        )
    return findings


def _safetensors_header(name: str, mapped: Buffer, source: str, findings: _Findings) -> st_format.Header | None:
    """Parse a safetensors header, then open the file with the format's own reader as a second opinion (which
    may not know a dtype newer than it: a warning, not a problem)."""
    try:
        header = st_format.parse_header(mapped)
    except st_format.SafetensorsError as exc:
        findings.problems.append(f"{name}: {exc}")
        return None
    from safetensors import safe_open

    try:
        with safe_open(source, framework="pt") as reader:
            reader.keys()
    except Exception as exc:  # the reader raises its own SafetensorError and OSError
        message = _first_line(str(exc))
        if "dtype" in message.lower():
            findings.warnings.append(f"{name}: this ckptd's safetensors reader cannot read a dtype in it ({message})")
            return header
        findings.problems.append(f"{name}: the safetensors reader refuses it: {message}")
        return None
    return header


# --------------------------------------------------------------------------------------- directory formats


def _verify_directory(folder: Path, trusted: Sequence[str], progress: Progress | None, scope: _Scope,
                      require_complete: bool) -> _Findings:  # fmt: skip
    names = layouts.entries(folder)
    layout = layouts.detect(folder, names)
    specials = special_files(folder)
    if specials:
        findings = _Findings(unsupported=f"{folder.name}: holds {', '.join(specials)}; never read")
        findings.files = {}
    elif layout is None:
        findings = _Findings(unsupported=f"{folder.name}: a folder no trainer layout claims")
        findings.files = {}
    elif layout.name == "orbax":
        findings = _Findings(format="orbax", unsupported=f"{folder.name}: Orbax checkpoints are not verified yet")
        findings.files = _hash_files(folder, directory_files(folder), progress, scope)
    else:
        findings = _check_unit(folder, layout, names, trusted, progress, scope)
        if require_complete and not layout.complete(folder, names):  # by hand: the daemon and scan wait instead
            findings.problems.append(
                f"{folder.name}: incomplete {layout.name} checkpoint: the trainer has not finished this save (it is"
                " still being written, or the save crashed); the daemon and `ckptd scan` wait until it is complete"
            )
    findings.layout = layout.name if layout is not None else None
    if findings.files is not None:
        findings.sha256 = directory_digest(findings.files)
    return findings


def _hash_files(folder: Path, names: Sequence[str], progress: Progress | None, scope: _Scope) -> dict[str, str]:
    """The SHA-256 of each file, each read once and dropped behind (see _one_read)."""
    hashes = {}
    for rel in names:
        with _opened(folder / rel, scope) as file:
            hashes[rel] = _one_read(file, scope, progress, (), threading.Event())
    return hashes


@contextlib.contextmanager
def _mapped_or_empty(path: Path, scope: _Scope) -> Iterator[tuple[Buffer, str]]:
    if path.lstat().st_size == 0:
        yield b"", str(path)
        return
    with _mapped(path, scope) as found:
        yield found


def _unit_format(layout: layouts.Layout, names: frozenset[str]) -> Format | None:
    if layout.name in ("dcp", "lightning_sharded"):
        return "dcp"
    if layout.name == "pretrained" and any(n.endswith(formats.HF_INDEX_SUFFIX) for n in names):
        return "safetensors_sharded"
    return None


def _check_unit(
    folder: Path,
    layout: layouts.Layout,
    names: frozenset[str],
    trusted: Sequence[str],
    progress: Progress | None,
    scope: _Scope,
) -> _Findings:
    """Check a folder checkpoint member by member, each like a checkpoint of its own kind, and as a whole (DCP's
    `.metadata` and its items, a sharded index against its shards); the trainer's records give step, epoch and
    metrics. Every problem names the member it concerns; the status is the worst of them."""
    findings = _Findings(format=_unit_format(layout, names))
    files = directory_files(folder)
    stats: list[TensorStats] = []
    loaded: dict[str, Any] = {}
    dcp_roots = sorted({rel.rpartition("/")[0] for rel in files if rel.rpartition("/")[2] == formats.DCP_MARKER})
    items = Extracted()
    read_by_check = {rel for rel in files if _read_by_check(folder, rel, layout, dcp_roots)}
    with ThreadPoolExecutor(1, thread_name_prefix="ckptd-verify") as pool:
        # The members that _check_member reads are hashed by that read; the rest here, meanwhile.
        hashes = pool.submit(_hash_files, folder, [rel for rel in files if rel not in read_by_check], progress, scope)
        for root in dcp_roots:
            sub = _Findings()
            where = folder / root if root else folder
            metadata = _dcp_metadata(where, sub, scope)
            if metadata is not None:
                _check_dcp_items(where, metadata, [*trusted, *dcp.ITEMS], sub, scope)
            _merge_into(findings, sub, f"{root}/" if root else "")
            stats.append(sub.tensors)
            if not root:
                items = sub.extracted
        tensor_names: list[str] = []
        for rel in files:
            if rel.endswith((formats.HF_INDEX_SUFFIX, ".bin.index.json")):
                tensor_names += _check_index(folder, rel, files, findings, scope)
        member_hashes: dict[str, str] = {}
        for rel in files:
            if _dcp_part(rel, dcp_roots):
                continue  # checked with its DCP folder, item by item (without `.metadata`, only hashed)
            sha = _check_member(folder, rel, layout.member(rel), trusted, findings, scope, stats, loaded, progress)
            if sha is not None:
                member_hashes[rel] = sha
        hashed = hashes.result() | member_hashes
        hashed |= _hash_files(folder, [rel for rel in files if rel not in hashed], progress, scope)  # emptied meanwhile
        findings.files = {rel: hashed[rel] for rel in files}
    findings.tensors = _merge_stats(stats)
    found = layout.metadata(folder, _Reader(folder, layout, trusted, scope, loaded))
    findings.extracted = Extracted(
        epoch=found.epoch if found.epoch is not None else items.epoch,
        global_step=found.global_step if found.global_step is not None else items.global_step,
        metrics={**items.metrics, **found.metrics},
        producer=found.producer or items.producer,
        keys=found.keys or items.keys or sorted(tensor_names)[:200] or sorted(names)[:200],
        notes=[*items.notes, *found.notes],
        needs=found.needs,
        resumable=items.resumable or any(layout.member(rel).role == "optimizer" for rel in files),
    )  # fmt: skip
    return findings


def _dcp_part(rel: str, dcp_roots: Sequence[str]) -> bool:
    parent, _, leaf = rel.rpartition("/")
    return leaf.endswith(".distcp") or (parent in dcp_roots and leaf == formats.DCP_MARKER)


def _read_by_check(folder: Path, rel: str, layout: layouts.Layout, dcp_roots: Sequence[str]) -> bool:
    """Whether _check_member reads the member whole (through _check_file, which hashes it)."""
    if _dcp_part(rel, dcp_roots) or rel.endswith(".json") or (folder / rel).lstat().st_size == 0:
        return False
    return formats.is_checkpoint_name(rel) or layout.member(rel).role != "other"


def _merge_into(findings: _Findings, sub: _Findings, prefix: str) -> None:
    """Add what the checks of a part (a member, a DCP sub-folder) found, each line naming that part."""
    findings.problems += [f"{prefix}{p}" for p in sub.problems]
    findings.warnings += [f"{prefix}{w}" for w in sub.warnings]
    findings.unsafe_globals += sub.unsafe_globals
    if sub.unsafe_globals:
        findings.warnings.append(f"{prefix or './'}: its pickle needs {', '.join(sorted(set(sub.unsafe_globals)))}")
    if sub.unsupported and not findings.unsupported:
        findings.unsupported = f"{prefix}{sub.unsupported}"


def _check_member(folder: Path, rel: str, member: layouts.Member, trusted: Sequence[str], findings: _Findings,
                  scope: _Scope, stats: list[TensorStats], loaded: dict[str, Any],
                  progress: Progress | None) -> str | None:  # fmt: skip
    """Check one file of a folder checkpoint like a checkpoint of its own kind; problems name it by `rel`.
    Returns its SHA-256 when it read it whole (see _read_by_check), else None."""
    path = folder / rel
    size = path.lstat().st_size
    checkpoint_like = formats.is_checkpoint_name(path.name)
    if size == 0:
        if checkpoint_like or rel.endswith(".json"):
            findings.problems.append(f"{rel}: empty file (0 bytes)")
        return None
    if rel.endswith(".json"):
        try:
            with open(scope.open(path), "rb") as handle:
                load_json(handle.read(MAX_JSON_MEMBER + 1), what=rel, max_bytes=MAX_JSON_MEMBER)
        except UntrustedInput as exc:
            findings.problems.append(str(exc))
        return None
    if not checkpoint_like and member.role == "other":
        return None  # a script, a text file: hashed, nothing to check
    with _opened(path, scope) as file:
        sub = _check_file(rel, file, trusted, scope, extra=member.allowed, load=member.role in ("weights", "record"),
                          progress=progress)  # fmt: skip
        if sub.unsupported and not checkpoint_like:
            return sub.sha256  # a file of the trainer's own that is no checkpoint format (latest, a tokenizer)
        if sub.loaded is not None:
            loaded[rel] = sub.loaded
            if member.role == "weights":
                stats.append(_stats_of(sub, rel, scope))
            sub.loaded = None
        elif sub.format == "safetensors":
            stats.append(sub.tensors)
    _merge_into(findings, sub, "")
    return sub.sha256


def _check_index(folder: Path, rel: str, files: Sequence[str], findings: _Findings, scope: _Scope) -> list[str]:
    """A sharded index against its shards: every shard it names is there and holds the tensors mapped to it.
    Returns the tensor names it maps."""
    index = folder / rel
    base = rel.rpartition("/")[0]
    try:
        weight_map = st_format.parse_index(index)
    except st_format.SafetensorsError as exc:
        findings.problems.append(f"{rel}: {exc}")
        return []
    expected: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        expected.setdefault(shard, set()).add(tensor)
    for shard in sorted(expected):
        try:
            shard_rel = "/".join(p for p in (base, *relative(shard, what="a shard the index names")) if p)
        except UntrustedInput as exc:
            findings.problems.append(f"{rel}: {exc}")
            continue
        if shard_rel not in files:
            findings.problems.append(f"{rel} names shard {shard!r}, which is missing")
            continue
        if not shard.endswith(".safetensors"):
            continue  # a .bin shard: its pickle is checked as a member; the tensors' names need a load
        with _mapped_or_empty(folder / shard_rel, scope) as (mapped, _source):
            try:
                header = st_format.parse_header(mapped)
            except st_format.SafetensorsError:
                continue  # the member check reports it
            missing = expected[shard] - {t.name for t in header.tensors}
            if missing:
                findings.problems.append(
                    f"{shard_rel}: lacks {len(missing)} tensor(s) the index maps to it, e.g. {min(missing)!r}"
                )
    return list(weight_map)


class _Reader:
    """Bounded, safe reads of a folder checkpoint's files for its layout's metadata (see layouts.Reader)."""

    def __init__(self, folder: Path, layout: layouts.Layout, trusted: Sequence[str], scope: _Scope,
                 loaded: Mapping[str, Any]) -> None:  # fmt: skip
        self.folder, self.layout, self.trusted, self.scope, self._loaded = folder, layout, trusted, scope, loaded

    def _bytes(self, rel: str, limit: int) -> bytes | None:
        try:
            fd = self.scope.open(self.folder / rel)
        except (OSError, ValueError):
            return None
        try:
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        return data if len(data) <= limit else None

    def json(self, rel: str) -> Any:
        data = self._bytes(rel, MAX_JSON_MEMBER)
        try:
            return load_json(data, what=rel, max_bytes=MAX_JSON_MEMBER) if data is not None else None
        except UntrustedInput:
            return None

    def text(self, rel: str) -> str | None:
        data = self._bytes(rel, 4096)
        return data.decode("utf-8", "replace") if data is not None else None

    def loaded(self, rel: str) -> Any:
        return self._loaded.get(rel)

    def plain(self, rel: str) -> Any:
        from torch import _weights_only_unpickler as wou

        allowed = set(wou._get_allowed_globals()) | set(self.trusted) | set(self.layout.member(rel).allowed)
        try:
            with _mapped(self.folder / rel, self.scope) as (mapped, _source):
                records = torch_zip.read_records(mapped)
                pickled = torch_zip.find_record(records, "data.pkl")
                if pickled is None or pickled.file_size > MAX_PICKLE_BYTES or torch_zip.inflation_refusals(records):
                    return None
                return plain_values(torch_zip.record_stream(mapped, pickled, self.scope.check), frozenset(allowed))
        except OverBudget:
            raise
        except Exception:  # a missing file, a broken pickle, a global not allowed: nothing found
            return None


def _dcp_allowed() -> dict[str, Any]:
    """The globals a DCP `.metadata` pickle may use: DCP's own metadata classes, dtypes, torch.Size."""
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint import metadata as meta

    allowed: dict[str, Any] = {
        f"torch.{name}": value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
    }
    for name in dir(meta):
        value = getattr(meta, name)
        if isinstance(value, type) and value.__module__ == meta.__name__:
            allowed[f"{meta.__name__}.{name}"] = value
    allowed.update(
        {
            f"{meta.__name__}._MEM_FORMAT_ENCODING": meta._MEM_FORMAT_ENCODING,
            f"{filesystem.__name__}._StorageInfo": filesystem._StorageInfo,
            "torch.Size": torch.Size,
            "torch.serialization._get_layout": torch.serialization._get_layout,
            "collections.OrderedDict": __import__("collections").OrderedDict,
            "pathlib.PosixPath": pathlib.PosixPath,
            "pathlib.Path": pathlib.Path,
        }
    )
    return allowed


def _dcp_metadata(folder: Path, findings: _Findings, scope: _Scope) -> Any:
    marker = folder / formats.DCP_MARKER
    try:
        with open(scope.open(marker), "rb") as handle:
            return RestrictedUnpickler(handle, _dcp_allowed()).load()
    except ForbiddenGlobal as exc:
        findings.unsafe_globals.append(exc.qualified_name)
    except (FileNotFoundError, NotRegularFile, IsADirectoryError) as exc:
        findings.problems.append(f"{marker.name}: not a readable DCP metadata file ({exc})")
    except OSError:
        raise  # a link on the way, an I/O error: not the checkpoint's fault (see verify)
    except Exception as exc:  # a broken pickle raises anything from EOFError to ValueError
        findings.problems.append(f"{marker.name}: not a readable DCP metadata file ({_first_line(str(exc))})")
    return None


def _check_dcp_items(folder: Path, metadata: Any, trusted: Sequence[str], findings: _Findings, scope: _Scope) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    storage_data: Mapping[Any, Any] = getattr(metadata, "storage_data", None) or {}
    state: Mapping[str, Any] = getattr(metadata, "state_dict_metadata", None) or {}
    by_file: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage_data.items():
        by_file.setdefault(str(info.relative_path), []).append((index, info))
    values: dict[str, Any] = {}
    tensor_stats: list[TensorStats] = []
    for rel, items in sorted(by_file.items()):
        try:
            path = folder.joinpath(*relative(rel, what="a data file .metadata names"))
        except UntrustedInput as exc:
            findings.problems.append(f".metadata: {exc}")
            continue
        if not path.is_file() or path.is_symlink():
            findings.problems.append(f".metadata names {rel!r}, which is missing")
            continue
        size = path.lstat().st_size
        with _mapped_or_empty(path, scope) as (mapped, _source):
            for index, info in sorted(items, key=lambda item: int(item[1].offset)):
                scope.check()
                offset, length = int(info.offset), int(info.length)
                where = f"{rel} bytes {offset}-{offset + length}"
                if offset + length > size:
                    findings.problems.append(f"{rel} is short: .metadata needs {where}, the file has {size}")
                    continue
                if getattr(info, "transform_descriptors", None):
                    findings.unsupported = f"{rel}: DCP items with transforms {info.transform_descriptors}"
                    continue
                value = _dcp_item(mapped, offset, length, where, trusted, findings, scope)
                if value is None:
                    continue
                if isinstance(state.get(index.fqn), TensorStorageMetadata):
                    tensor_stats.append(_tensor_stats(value, scope))
                else:
                    values[index.fqn] = value
    findings.tensors = _merge_stats(tensor_stats)
    tensor_count = sum(isinstance(m, TensorStorageMetadata) for m in state.values())
    params = sum(math.prod(m.size) for m in state.values() if isinstance(m, TensorStorageMetadata))
    dtypes = Counter(
        str(m.properties.dtype).removeprefix("torch.") for m in state.values() if isinstance(m, TensorStorageMetadata)
    )
    findings.tensors = TensorStats(
        count=tensor_count,
        parameters=params,
        bytes=findings.tensors.bytes,
        dtypes=dict(dtypes),
        nonfinite=findings.tensors.nonfinite,
    )
    found = extract(values, folder.name, producer="dcp", keys_of=scope.metric_keys)
    keys = sorted({fqn.split(".")[0] for fqn in state})
    findings.extracted = Extracted(found.epoch, found.global_step, found.metrics, "dcp", keys[:200],
                                   resumable=holds_training_state(keys))  # fmt: skip


def _dcp_item(
    mapped: Buffer,
    offset: int,
    length: int,
    where: str,
    trusted: Sequence[str],
    findings: _Findings,
    scope: _Scope,
) -> Any:
    """Check one DCP item (a torch.save archive embedded in a .distcp file) and return its value."""
    import torch

    try:
        records = torch_zip.read_records(mapped, offset, length)
    except torch_zip.ZipStructureError as exc:
        findings.problems.append(f"{where}: {exc}")
        return None
    refused = torch_zip.inflation_refusals(records)
    if refused:
        findings.unsupported = f"{where}: {next(iter(refused.values()))}"
        return None
    findings.problems += [f"{where}: {p}" for p in torch_zip.crc_problems(mapped, records, scope.check)]
    pickled = torch_zip.find_record(records, "data.pkl")
    if pickled is None:
        findings.problems.append(f"{where}: item without a data.pkl record")
        return None
    names = _scan_pickle(mapped, pickled, where, findings, scope)
    if names is None:
        return None
    unsafe = _disallowed(names, trusted)
    if unsafe:
        findings.unsafe_globals += unsafe
        return None
    try:
        with torch.serialization.safe_globals(resolve_trusted(trusted)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            item = cast("IO[bytes]", torch_zip.Window(mapped, offset, length))
            return torch.load(item, map_location="cpu", weights_only=True)
    except Exception as exc:
        findings.problems.append(f"{where}: item does not load: {_first_line(str(exc))}")
        return None


# ---------------------------------------------------------------------------------------------- safety


def _disallowed(names: Sequence[str], trusted: Sequence[str]) -> list[str]:
    """The globals among `names` that neither torch's weights-only allow-list nor `trusted` admits."""
    from torch import _weights_only_unpickler as wou

    allowed = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals()) | set(trusted)  # type: ignore[no-untyped-call]
    return sorted({name for name in names if name not in allowed})


def prepare_process(threads: int) -> None:
    """Import torch now (it takes seconds) and cap its thread pool, so a verifier leaves training its cores."""
    import torch

    torch.set_num_threads(threads)


def engine_versions() -> dict[str, str]:
    """The versions of the libraries that verified a checkpoint, for its sidecar."""
    import safetensors
    import torch

    return {"torch": str(torch.__version__), "safetensors": str(safetensors.__version__)}


def resolve_trusted(names: Sequence[str]) -> list[Any]:
    """Import each trusted `module.name` and pair it with its name, as torch's safe_globals expects.

    Raises TrustError naming the first name that is not `module.name` or cannot be imported.
    """
    resolved: list[Any] = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if not module_name:
            raise TrustError(f"trusted global {name!r} is not of the form module.name")
        try:
            resolved.append((getattr(importlib.import_module(module_name), attr), name))
        except (ImportError, AttributeError) as exc:
            raise TrustError(f"trusted global {name!r} cannot be imported: {exc}") from exc
        if name == "numpy.dtype":
            # A pickled numpy scalar rebuilds its dtype through a class of numpy.dtypes (Float64DType...);
            # trusting numpy.dtype means trusting those plain dtype classes too.
            dtypes = importlib.import_module("numpy.dtypes")
            resolved += [(cls, f"numpy.dtypes.{n}") for n in dir(dtypes) if isinstance(cls := getattr(dtypes, n), type)]
    return resolved


def _global_from_message(message: str) -> str:
    """The global named in torch's weights-only refusal ("GLOBAL x.y was not..." or "but got <class 'x.y'>")."""
    for marker in ("but got <class '", "Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in message:
            return message.split(marker, 1)[1].split()[0].rstrip(".,:'>")
    return "unknown global"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no message"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- tensors


def _tensors(obj: Any, scope: _Scope) -> Iterator[torch.Tensor]:
    """Every tensor in a loaded object: containers walked without recursion, each container once (a pickle
    can share one list 16 times at each of 8 levels: 16^8 paths, 9 lists), at most MAX_VISITS nodes."""
    import torch

    seen: set[int] = set()
    stack = [obj]
    visits = 0
    while stack:
        item = stack.pop()
        visits += 1
        if visits % 65536 == 0:
            scope.check()
            if visits > MAX_VISITS:
                raise OverBudget(f"the loaded object has over {MAX_VISITS} nodes; not walked further")
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, Mapping | list | tuple | set | frozenset) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, Mapping) else item)


Scanned = Callable[[int, int, str], "bool | None"]
"""Given a storage's address, size in bytes and dtype: whether the one read found NaN or Inf in its bytes (None
when it did not scan them)."""


def _tensor_stats(obj: Any, scope: _Scope, unscanned: set[str] | None = None, scanned: Scanned | None = None
                  ) -> TensorStats:  # fmt: skip
    """Count tensors, parameters, bytes (each storage once) and dtypes; find NaN and Inf, from `scanned` where it
    answers, else by reading the storage. Dtypes this torch cannot scan (float4 and other packed ones) are added
    to `unscanned`, never raised."""
    count = parameters = total_bytes = nonfinite = 0
    dtypes: Counter[str] = Counter()
    results: dict[tuple[int, int, str], bool] = {}
    counted: set[tuple[int, int]] = set()  # storages whose bytes are counted (a view in another dtype shares them)
    for tensor in _tensors(obj, scope):
        count += 1
        parameters += tensor.numel()
        dtypes[str(tensor.dtype).removeprefix("torch.")] += 1
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            continue
        key = (storage.data_ptr(), storage.nbytes(), str(tensor.dtype).removeprefix("torch."))
        if key not in results:
            if key[:2] not in counted:
                counted.add(key[:2])
                total_bytes += storage.nbytes()
            try:
                found = scanned(*key) if scanned is not None else None
                results[key] = found if found is not None else _storage_nonfinite(storage, tensor.dtype)
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                results[key] = False
                if unscanned is not None:
                    unscanned.add(str(tensor.dtype).removeprefix("torch."))
        nonfinite += results[key]
    return TensorStats(count, parameters, total_bytes, dict(dtypes), nonfinite)


def _stats_of(findings: _Findings, name: str, scope: _Scope) -> TensorStats:
    """The tensor statistics of the object `findings` loaded; a dtype that cannot be scanned is a warning."""
    unscanned: set[str] = set()
    stats = _tensor_stats(findings.loaded, scope, unscanned, _scanned_in_file(findings))
    if unscanned:
        findings.warnings.append(f"{name}: tensors of dtype {', '.join(sorted(unscanned))} not scanned for NaN/Inf")
    findings.loaded = None
    return stats


def _scanned_in_file(findings: _Findings) -> Scanned | None:
    """What the one read of a torch zip found, by the address of a storage that torch mapped from it."""
    scans = findings.scans
    if scans is None:
        return None
    where = _Mappings(findings.inode)

    def scanned(address: int, nbytes: int, dtype: str) -> bool | None:
        offset = where.offset(address)
        return None if offset is None else scans.at(offset, offset + nbytes, dtype)

    return scanned


def _storage_nonfinite(storage: torch.UntypedStorage, dtype: torch.dtype) -> bool:
    import torch

    if not (dtype.is_floating_point or dtype.is_complex):
        return False
    itemsize = torch.empty(0, dtype=dtype).element_size()
    flat = torch.empty(0, dtype=dtype).set_(storage, 0, (storage.nbytes() // itemsize,), (1,))
    return _has_nonfinite(torch.view_as_real(flat).reshape(-1) if dtype.is_complex else flat)


def _has_nonfinite(flat: torch.Tensor) -> bool:
    """True if a 1-D floating tensor holds NaN or Inf: min and max, one pass, no temporary tensor."""
    import torch

    for at in range(0, flat.numel(), _SCAN_ELEMENTS):
        chunk = flat[at : at + _SCAN_ELEMENTS]
        try:
            low, high = torch.aminmax(chunk)
        except (RuntimeError, NotImplementedError):  # float8 and friends: widen this chunk only
            low, high = torch.aminmax(chunk.float())
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            return True
    return False


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}  # fmt: skip


def _st_floating(code: str) -> bool:
    """True for the safetensors dtypes that can hold NaN or Inf (F64... F8_E4M3, BF16, C64)."""
    return code.startswith(("F", "BF", "C"))


def _safetensors_stats(name: str, tensors: Sequence[st_format.TensorEntry], scans: _Scans,
                       findings: _Findings) -> TensorStats:  # fmt: skip
    import torch

    dtypes: Counter[str] = Counter()
    nonfinite = 0
    unscanned: set[str] = set()
    for entry in tensors:
        dtype_name = _ST_DTYPES.get(entry.dtype, entry.dtype.lower())
        dtypes[dtype_name] += 1
        if not isinstance(getattr(torch, dtype_name, None), torch.dtype):
            unscanned.add(entry.dtype)  # a dtype this torch does not have (F4, F8_E8M0...)
            continue
        if entry.end == entry.start or not _st_floating(entry.dtype):
            continue
        found = scans.at(entry.start, entry.end, dtype_name)
        if found is None:
            unscanned.add(entry.dtype)
        nonfinite += bool(found)
    if unscanned:
        findings.warnings.append(f"{name}: tensors of dtype {', '.join(sorted(unscanned))} not scanned for NaN/Inf")
    return TensorStats(
        count=len(tensors),
        parameters=sum(math.prod(t.shape) for t in tensors),
        bytes=sum(t.end - t.start for t in tensors),
        dtypes=dict(dtypes),
        nonfinite=nonfinite,
    )


def _merge_stats(parts: Sequence[TensorStats]) -> TensorStats:
    dtypes: Counter[str] = Counter()
    for part in parts:
        dtypes.update(part.dtypes)
    return TensorStats(
        count=sum(p.count for p in parts),
        parameters=sum(p.parameters for p in parts),
        bytes=sum(p.bytes for p in parts),
        dtypes=dict(dtypes),
        nonfinite=sum(p.nonfinite for p in parts),
    )


# ---------------------------------------------------------------------------------------------- export


def load_checkpoint(path: Path, trusted: Sequence[str] = ()) -> Any:
    """Load a checkpoint file for `ckptd export`, the same safe way `verify` loads it (weights_only, mmap).

    safetensors files come back as {name: tensor}. Raises ValueError when it cannot be loaded safely.
    """
    size = path.stat().st_size
    kind = formats.detect_file(_head(path), size)
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    findings = _Findings()
    obj = _torch_load(str(path), path.name, trusted, findings, mmap_mode=kind == "torch_zip")
    if obj is None:
        raise ValueError("; ".join(findings.problems + findings.unsafe_globals) or f"{path}: cannot be loaded")
    return obj


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(64)


def save_weights(tensors: Mapping[str, Any], destination: Path, fmt: str, metadata: Mapping[str, str]) -> None:
    """Write an inference-only file: safetensors with `metadata`, or a weights-only torch file.

    The torch file holds {"state_dict": tensors, "metadata": metadata}, loadable with weights_only=True.
    """
    import torch

    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(dict(tensors), str(destination), metadata=dict(metadata))
    else:
        torch.save({"state_dict": dict(tensors), "metadata": dict(metadata)}, destination)
