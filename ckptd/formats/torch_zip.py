"""The zip archives that `torch.save` writes (also Lightning's .ckpt files), read without torch.

The central directory is parsed once, then every record's CRC-32 is checked against the bytes: torch.load
itself never checks them, so a flipped bit in tensor data would otherwise load silently. `Crcs` computes them
from one sequential read of the file (the verify engine's, which also hashes it), `crc_problems` from a buffer.
`storage_types` says which storage type data.pkl gives each tensor record, before anything is loaded.

torch.save stores records uncompressed; an archive written otherwise may deflate them, and a hostile one
may deflate 1 GiB of zeros into 1 MB. Inflation is therefore always streamed, in pieces of at most
_CHUNK bytes of output, never beyond the size the central directory declares for the record, and
`inflation_refusals` names the records whose declared size is beyond MAX_INFLATE_RATIO times their
compressed size (or all together beyond MAX_INFLATED_TOTAL): those are neither inflated nor loaded.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from ckptd.formats.buffers import Buffer, Sweep
from ckptd.formats.pickles import persistent_ids

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CHUNK = 8 << 20
MAX_RECORDS = 2_000_000  # a checkpoint has one record per storage; parsing more would take gigabytes
MAX_INFLATE_RATIO = 100  # deflate reaches ~1000:1 only on data made to (zeros): a bomb, not a checkpoint
MAX_INFLATED_TOTAL = 16 << 30
Check = Callable[[], None]
"""Called between pieces of work; raises to stop it (the verify engine's time budget)."""


class ZipStructureError(Exception):
    """The archive's structure is broken (truncated, bad central directory, record out of bounds)."""


@dataclass(frozen=True)
class ZipRecord:
    """One record of a zip archive, with absolute offsets into the file that holds it."""

    name: str
    data_start: int
    compressed_size: int
    file_size: int
    crc: int
    method: int

    @property
    def data_end(self) -> int:
        """The absolute offset just past the record's bytes."""
        return self.data_start + self.compressed_size


class Window(io.RawIOBase):
    """A read-only, seekable view of `buffer[start:start+length]`, so zipfile can parse an embedded archive."""

    def __init__(self, buffer: Buffer, start: int, length: int) -> None:
        self._view = memoryview(buffer)[start : start + length]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, target: Any) -> int:
        out = memoryview(target).cast("B")
        piece = self._view[self._pos : self._pos + len(out)]
        out[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)


def read_records(buffer: Buffer, start: int = 0, length: int | None = None) -> list[ZipRecord]:
    """Parse the central directory of the zip archive at `buffer[start:start+length]`.

    Given the bytes of a file (an mmap, usually) and where the archive lies in it. Returns its records in
    file order, with absolute data offsets. Raises ZipStructureError when there is no end-of-central-
    directory record (truncation), the central directory is broken, or a record lies outside the archive.
    """
    view = memoryview(buffer)
    size = len(view) - start if length is None else length
    try:
        # zipfile's own reader of the end record (private, stable since Python 2): how many records the central
        # directory holds, checked before ZipFile builds an object for each one.
        end = zipfile._EndRecData(Window(buffer, start, size))  # type: ignore[attr-defined]
        declared = int(end[4]) if end else 0  # zipfile._ECD_ENTRIES_TOTAL
        if declared > MAX_RECORDS:
            raise ZipStructureError(f"the archive declares {declared} records, over the limit of {MAX_RECORDS}")
        with zipfile.ZipFile(Window(buffer, start, size)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error, EOFError) as exc:
        raise ZipStructureError(f"broken zip structure ({exc}); the file is {size} bytes") from exc
    records = []
    for info in infos:
        header_at = info.header_offset
        header = bytes(view[start + header_at : start + header_at + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size:
            raise ZipStructureError(f"record {info.filename!r}: local header at byte {header_at} is cut off")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_SIGNATURE:
            raise ZipStructureError(f"record {info.filename!r}: no local header at byte {header_at}")
        name_len, extra_len = fields[9], fields[10]
        data_start = start + header_at + _LOCAL_HEADER.size + name_len + extra_len
        record = ZipRecord(
            name=info.filename,
            data_start=data_start,
            compressed_size=info.compress_size,
            file_size=info.file_size,
            crc=info.CRC,
            method=info.compress_type,
        )
        if record.data_end > start + size:
            raise ZipStructureError(
                f"record {info.filename!r} needs bytes {data_start}-{record.data_end}"
                f" but the archive ends at byte {start + size}"
            )
        records.append(record)
    records.sort(key=lambda r: r.data_start)
    return records


class InflationError(ValueError):
    """A deflated record inflates beyond the size its central directory declares."""


def inflation_refusals(records: list[ZipRecord]) -> dict[str, str]:
    """{record name: why} for the deflated records that will not be inflated: past MAX_INFLATE_RATIO, or all of
    them when together they would pass MAX_INFLATED_TOTAL. Empty for torch.save's archives (nothing deflated)."""
    deflated = [r for r in records if r.method == zipfile.ZIP_DEFLATED]
    total = sum(r.file_size for r in deflated)
    if total > MAX_INFLATED_TOTAL:
        why = f"deflated records would inflate to {total} bytes in all, beyond {MAX_INFLATED_TOTAL}; not loaded"
        return {r.name: why for r in deflated}
    return {
        r.name: f"record {r.name!r} would inflate {r.file_size} bytes from {r.compressed_size}, beyond"
        f" {MAX_INFLATE_RATIO}:1 (a zip bomb?); not inflated or loaded"
        for r in deflated
        if r.file_size > MAX_INFLATE_RATIO * max(r.compressed_size, 1)
    }


def _pieces(buffer: Buffer, record: ZipRecord, check: Check | None = None) -> Iterator[bytes | memoryview]:
    """A record's uncompressed bytes, piece by piece (each at most _CHUNK bytes). Raises InflationError when
    the record inflates beyond its declared size, zlib.error when its compressed data is broken."""
    view = memoryview(buffer)
    if record.method != zipfile.ZIP_DEFLATED:
        for at in range(record.data_start, record.data_end, _CHUNK):
            if check is not None:
                check()
            yield view[at : min(at + _CHUNK, record.data_end)]
        return
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    produced = 0
    for at in range(record.data_start, record.data_end, _CHUNK):
        pending: bytes | memoryview = view[at : min(at + _CHUNK, record.data_end)]
        while pending:
            if check is not None:
                check()
            out = inflate.decompress(pending, _CHUNK)
            pending = inflate.unconsumed_tail
            produced += len(out)
            if produced > record.file_size:
                raise InflationError(
                    f"record {record.name!r} inflates beyond the {record.file_size} bytes its directory declares"
                )
            yield out
            if not out and not pending:
                break
    rest = inflate.flush()
    if produced + len(rest) > record.file_size:
        raise InflationError(
            f"record {record.name!r} inflates beyond the {record.file_size} bytes its directory declares"
        )
    yield rest


def record_crc(buffer: Buffer, record: ZipRecord, check: Check | None = None) -> int:
    """Compute the CRC-32 of a record's uncompressed bytes, in pieces (memory stays flat whatever it inflates to).

    Raises InflationError or zlib.error (see _pieces).
    """
    crc = 0
    for piece in _pieces(buffer, record, check):
        crc = zlib.crc32(piece, crc)
    return crc


def crcs_recorded(records: list[ZipRecord]) -> bool:
    """False when the archive's writer recorded no CRC-32s (torch.serialization.set_crc32_options(False) leaves
    every field 0): there is nothing to check them against, which is not damage."""
    return any(r.crc != 0 for r in records if r.file_size > 0) or not any(r.file_size > 0 for r in records)


def crc_problems(buffer: Buffer, records: list[ZipRecord], check: Check | None = None) -> list[str]:
    """Check every record's CRC-32; return one line per record whose bytes do not match it.

    Records that `inflation_refusals` names are skipped (the caller reports them), so nothing inflates
    beyond the limits.
    """
    problems = []
    refused = inflation_refusals(records)
    for record in records:
        if record.name in refused:
            continue
        if record.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problems.append(f"record {record.name!r}: unsupported zip compression method {record.method}")
            continue
        try:
            actual = record_crc(buffer, record, check)
        except InflationError as exc:
            problems.append(str(exc))
            continue
        except zlib.error as exc:
            problems.append(f"record {record.name!r}: compressed data is broken ({exc})")
            continue
        if actual != record.crc:
            problems.append(_mismatch(record, actual))
    return problems


def _mismatch(record: ZipRecord, actual: int) -> str:
    return (
        f"record {record.name!r} (bytes {record.data_start}-{record.data_end}): CRC-32 mismatch,"
        f" stored {record.crc:08x}, computed {actual:08x}"
    )


class Crcs:
    """The CRC-32 of every stored (uncompressed) record, from the bytes of a read of the whole file front to back.

    `feed` each piece of the read in order; then `problems` says what `crc_problems` would of those records.
    The deflated ones (`deflated`: none in torch.save's archives) are not fed: check them with crc_problems.
    """

    def __init__(self, records: list[ZipRecord], check: Check | None = None) -> None:
        stored = [r for r in records if r.method == zipfile.ZIP_STORED]
        self.deflated = [r for r in records if r.method != zipfile.ZIP_STORED]
        self._stored = stored
        self._crcs = [0] * len(stored)
        self._sweep = Sweep((r.data_start, r.data_end, index) for index, r in enumerate(stored))
        self._check = check

    def feed(self, at: int, piece: memoryview) -> None:
        """Add the piece of the file at offset `at` to the CRC of each record it overlaps."""
        for index, part in self._sweep.overlaps(at, piece):
            if self._check is not None:
                self._check()
            self._crcs[index] = zlib.crc32(part, self._crcs[index])

    def problems(self) -> list[str]:
        """One line per stored record whose bytes, as fed, do not match its CRC-32."""
        return [_mismatch(r, crc) for r, crc in zip(self._stored, self._crcs, strict=True) if crc != r.crc]


def storage_types(buffer: Buffer, records: list[ZipRecord], pickled: ZipRecord, check: Check | None = None
                  ) -> dict[str, str]:  # fmt: skip
    """{tensor record name: its storage type ('torch.FloatStorage'...)}, from the persistent ids torch.save
    writes in data.pkl: ('storage', type, key, location, numel), the bytes of key being record `data/<key>`.

    The pickle is read with formats.pickles.persistent_ids (nothing resolved, nothing run). A storage saved
    untyped (torch.UntypedStorage: dtypes newer than the typed storages) says no dtype; records no id names
    are left out. Raises what persistent_ids raises for a broken pickle, InflationError or zlib.error.
    """
    top = pickled.name[: -len("data.pkl")]
    names = {r.name for r in records}
    found: dict[str, str] = {}
    for pid in persistent_ids(record_stream(buffer, pickled, check)):
        kind = pid[0].decode("ascii", "replace") if pid and isinstance(pid[0], bytes) else pid[0] if pid else None
        if len(pid) == 5 and kind == "storage" and isinstance(pid[1], str) and isinstance(pid[2], str):
            name = f"{top}data/{pid[2]}"
            if name in names:
                found[name] = pid[1]
    return found


def find_record(records: list[ZipRecord], suffix: str) -> ZipRecord | None:
    """Return the record whose name is `suffix` under the archive's top folder (torch writes `<dir>/data.pkl`)."""
    for record in records:
        if record.name == suffix or record.name.endswith("/" + suffix):
            return record
    return None


def is_torchscript(records: list[ZipRecord]) -> bool:
    """True for TorchScript archives, whose loading would run their code."""
    return any(r.name.endswith("/constants.pkl") or "/code/" in r.name for r in records)


def stored_bytes(buffer: Buffer, record: ZipRecord) -> bytes:
    """Return a record's uncompressed bytes, for small records (tests); see `record_stream` for the rest.

    Raises InflationError or zlib.error.
    """
    return b"".join(bytes(piece) for piece in _pieces(buffer, record))


class _Stream(io.RawIOBase):
    """A read-only stream over an iterator of byte pieces."""

    def __init__(self, pieces: Iterator[bytes | memoryview]) -> None:
        self._pieces = pieces
        self._left: bytes | memoryview = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Only tells where it is (pickletools asks for positions); it cannot move."""
        if (offset, whence) != (0, io.SEEK_CUR):
            raise io.UnsupportedOperation("a record stream only reads forward")
        return self._pos

    def readinto(self, target: Any) -> int:
        out = memoryview(target).cast("B")
        while not self._left:
            self._left = next(self._pieces, b"")
            if not self._left:
                return 0
        count = min(len(out), len(self._left))
        out[:count] = self._left[:count]
        self._left = self._left[count:]
        self._pos += count
        return count


def record_stream(buffer: Buffer, record: ZipRecord, check: Check | None = None) -> IO[bytes]:
    """A stream of a record's uncompressed bytes, inflated piece by piece as it is read (a pickle scanner reads
    data.pkl through it without holding it whole). Reading raises InflationError or zlib.error."""
    return cast("IO[bytes]", io.BufferedReader(_Stream(_pieces(buffer, record, check))))
