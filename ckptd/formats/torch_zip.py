"""The zip archives that `torch.save` writes (also Lightning's .ckpt files), read without torch.

The central directory is parsed once, then every record's CRC-32 is checked against the bytes: torch.load
itself never checks them, so a flipped bit in tensor data would otherwise load silently.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

from ckptd.formats.buffers import Buffer

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CHUNK = 8 << 20


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


def record_crc(buffer: Buffer, record: ZipRecord) -> int:
    """Compute the CRC-32 of a record's uncompressed bytes, reading them in 8 MiB pieces."""
    view = memoryview(buffer)
    crc = 0
    inflate = zlib.decompressobj(-zlib.MAX_WBITS) if record.method == zipfile.ZIP_DEFLATED else None
    for at in range(record.data_start, record.data_end, _CHUNK):
        piece = view[at : min(at + _CHUNK, record.data_end)]
        crc = zlib.crc32(inflate.decompress(piece) if inflate else piece, crc)
    if inflate is not None:
        crc = zlib.crc32(inflate.flush(), crc)
    return crc


def crc_problems(buffer: Buffer, records: list[ZipRecord]) -> list[str]:
    """Check every record's CRC-32; return one line per record whose bytes do not match it."""
    problems = []
    for record in records:
        if record.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problems.append(f"record {record.name!r}: unsupported zip compression method {record.method}")
            continue
        try:
            actual = record_crc(buffer, record)
        except zlib.error as exc:
            problems.append(f"record {record.name!r}: compressed data is broken ({exc})")
            continue
        if actual != record.crc:
            problems.append(
                f"record {record.name!r} (bytes {record.data_start}-{record.data_end}): CRC-32 mismatch,"
                f" stored {record.crc:08x}, computed {actual:08x}"
            )
    return problems


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
    """Return a record's uncompressed bytes (for small records such as data.pkl)."""
    data = bytes(memoryview(buffer)[record.data_start : record.data_end])
    if record.method == zipfile.ZIP_DEFLATED:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    return data
