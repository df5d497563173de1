"""Specification of the format readers: ckptd/formats/pickles.py, torch_zip.py and safetensors.py."""

import collections
import dataclasses
import io
import json
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import checkpoints as ck
import pytest
from safetensors import safe_open

from ckptd.formats import safetensors as st
from ckptd.formats import torch_zip
from ckptd.formats.pickles import (
    ForbiddenGlobal,
    PickleStructureError,
    RestrictedUnpickler,
    globals_in,
    globals_in_bytes,
)

SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux
GETCWD = f"{os.getcwd.__module__}.getcwd"


class Recorder(pickle.Unpickler):
    """A real unpickler that records every global it is asked for and hands back a harmless stand-in."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.asked: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        self.asked.append(f"{module}.{name}")
        return lambda *args, **kwargs: None


def asked_for(data: bytes) -> list[str]:
    """The globals the real pickle machinery looks up when it loads `data` (nothing is run)."""
    recorder = Recorder(data)
    recorder.load()
    return recorder.asked


# ---------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("protocol", range(6))
def test_globals_in_finds_os_system_in_a_reduce_pickle_of_every_protocol(protocol: int, tmp_path: Path) -> None:
    """A __reduce__ to os.system pickled with protocols 0 to 5 is reported as posix.system, as unpickling would."""
    data = pickle.dumps(ck.HostilePayload(tmp_path / "marker"), protocol=protocol)
    opcodes = {op.name for op, _, _ in pickletools.genops(data)}
    assert ("STACK_GLOBAL" if protocol >= 4 else "GLOBAL") in opcodes
    assert globals_in_bytes(data) == [SYSTEM] == asked_for(data)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_globals_in_resolves_stack_global_names_taken_from_the_memo(protocol: int) -> None:
    """A STACK_GLOBAL whose module name comes back from the memo (BINGET) is still named in full."""
    data = pickle.dumps((os.system, os.getcwd), protocol=protocol)
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert ops.count("STACK_GLOBAL") == 2 and "BINGET" in ops  # the second "posix" is a memo reference
    assert globals_in_bytes(data) == [SYSTEM, GETCWD] == asked_for(data)


def test_globals_in_resolves_long_binput_and_long_binget_names() -> None:
    """Module and attribute names stored with LONG_BINPUT and fetched with LONG_BINGET are resolved."""
    data = (
        b"\x80\x04"
        + b"\x8c\x05posixr\x00\x01\x00\x00"  # SHORT_BINUNICODE 'posix', LONG_BINPUT 256
        + b"\x8c\x06systemr\x01\x01\x00\x00"  # SHORT_BINUNICODE 'system', LONG_BINPUT 257
        + b"\x93"  # STACK_GLOBAL
        + b"0"  # POP
        + b"j\x00\x01\x00\x00j\x01\x01\x00\x00\x93"  # LONG_BINGET 256, LONG_BINGET 257, STACK_GLOBAL
        + b"."
    )
    assert globals_in_bytes(data) == ["posix.system", "posix.system"] == asked_for(data)


def test_globals_in_finds_protocol_0_global_with_put_and_get() -> None:
    """A text-mode (protocol 0) pickle naming a global twice through PUT and GET reports it once, as loaded."""
    data = pickle.dumps([os.system, os.system], protocol=0)
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert "GLOBAL" in ops and "GET" in ops
    assert globals_in_bytes(data) == [SYSTEM] == asked_for(data)


def test_globals_in_finds_the_class_of_an_inst_opcode() -> None:
    """The INST opcode (protocol 0 class instantiation) names its class like GLOBAL does."""
    data = b"(S'true'\niposix\nsystem\n."
    assert globals_in_bytes(data) == ["posix.system"] == asked_for(data)


def test_globals_in_reports_an_unresolvable_stack_global_as_unknown() -> None:
    """A STACK_GLOBAL whose names were not pushed as plain strings is reported with '?' rather than missed."""
    data = b"\x80\x04\x8c\x05posix\x8c\x06system\x8c\x04junk0\x93."  # 'junk' popped: the tracker cannot tell
    found = globals_in_bytes(data)
    assert len(found) == 1 and "?" in found[0]


def test_globals_in_finds_nothing_in_a_pickle_of_plain_data() -> None:
    """Plain containers, numbers and strings need no globals."""
    assert globals_in_bytes(pickle.dumps({"epoch": 3, "loss": [0.5, None], "name": "run"}, protocol=5)) == []


def test_globals_in_reads_exactly_one_pickle_and_leaves_the_stream_after_it() -> None:
    """Given concatenated pickles, globals_in reads one up to STOP and leaves the stream at the next."""
    first = pickle.dumps(collections.OrderedDict(), protocol=2)
    second = pickle.dumps(os.system, protocol=4)
    stream = io.BytesIO(first + second)
    assert globals_in(stream) == ["collections.OrderedDict"]
    assert stream.tell() == len(first)
    assert globals_in(stream) == [SYSTEM]
    assert stream.read() == b""


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80\x04\x8c\x05posix", pickle.dumps(os.system, protocol=4)[:-1], b"\xff\xfe garbage"],
    ids=["empty", "cut-in-string", "no-stop", "garbage"],
)
def test_globals_in_raises_pickle_structure_error_on_a_broken_pickle(data: bytes) -> None:
    """Bytes that are not one complete pickle raise PickleStructureError."""
    with pytest.raises(PickleStructureError):
        globals_in_bytes(data)


def test_restricted_unpickler_refuses_a_forbidden_global_without_running_it(tmp_path: Path) -> None:
    """RestrictedUnpickler raises ForbiddenGlobal naming os.system, and the payload's command never runs."""
    marker = tmp_path / "marker"
    data = pickle.dumps({"ok": 1, "payload": ck.HostilePayload(marker)}, protocol=4)
    with pytest.raises(ForbiddenGlobal) as caught:
        RestrictedUnpickler(io.BytesIO(data), {"collections.OrderedDict": collections.OrderedDict}).load()
    assert caught.value.qualified_name == SYSTEM
    assert isinstance(caught.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_restricted_unpickler_refuses_even_a_global_that_is_only_referenced() -> None:
    """A pickle that merely references os.system, without calling it, is refused too."""
    with pytest.raises(ForbiddenGlobal, match="system"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(os.system)), {}).load()


def test_restricted_unpickler_rebuilds_objects_whose_globals_are_allowed() -> None:
    """Globals on the allow-list resolve to the objects given for them."""
    value = {"order": collections.OrderedDict(a=1, b=[2.5, "x"])}
    data = pickle.dumps(value, protocol=2)
    loaded = RestrictedUnpickler(io.BytesIO(data), {"collections.OrderedDict": collections.OrderedDict}).load()
    assert loaded == value and type(loaded["order"]) is collections.OrderedDict


def test_restricted_unpickler_refuses_persistent_ids() -> None:
    """A pickle holding a persistent id is refused."""

    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "storage-0" if obj == "tensor" else None

    buffer = io.BytesIO()
    WithPersistentIds(buffer, protocol=2).dump(["tensor"])
    with pytest.raises(pickle.UnpicklingError, match="persistent"):
        RestrictedUnpickler(io.BytesIO(buffer.getvalue()), {}).load()


# ---------------------------------------------------------------------------------------------- torch_zip


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real torch.save zip checkpoint, never modified."""
    return ck.torch_zip(tmp_path_factory.mktemp("zip") / "model.pt", size_floats=256)


def test_read_records_lists_every_record_of_a_torch_file_with_its_bytes(torch_file: Path) -> None:
    """read_records returns every record in file order; each one's span holds exactly zipfile's bytes for it."""
    data = torch_file.read_bytes()
    records = torch_zip.read_records(data)
    with zipfile.ZipFile(torch_file) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        assert {r.name for r in records} == set(infos)
        assert [r.data_start for r in records] == sorted(r.data_start for r in records)
        for record in records:
            info = infos[record.name]
            assert (record.crc, record.file_size, record.method) == (info.CRC, info.file_size, info.compress_type)
            assert torch_zip.stored_bytes(data, record) == archive.read(record.name)
    assert {"model/data.pkl", "model/data/0"} <= {r.name for r in records}


def test_crc_problems_is_empty_for_a_good_torch_file(torch_file: Path) -> None:
    """Every record of an untouched torch.save file matches its CRC-32."""
    data = torch_file.read_bytes()
    assert torch_zip.crc_problems(data, torch_zip.read_records(data)) == []


def test_crc_problems_names_the_record_holding_a_flipped_byte(tmp_path: Path) -> None:
    """One flipped bit gives exactly one CRC-32 problem, naming the record whose byte span holds it."""
    path = ck.torch_zip(tmp_path / "model.pt", size_floats=256)
    offset = ck.flip_tensor_byte(path)
    data = path.read_bytes()
    records = torch_zip.read_records(data)
    (problem,) = torch_zip.crc_problems(data, records)
    (hit,) = [r for r in records if r.data_start <= offset < r.data_end]
    assert f"record {hit.name!r}" in problem and "CRC-32 mismatch" in problem
    assert f"bytes {hit.data_start}-{hit.data_end}" in problem


def _zip(method: int, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def test_crc_problems_checks_deflated_records_through_inflate() -> None:
    """Deflated records are checked on their uncompressed bytes; damaged compressed data is a problem."""
    payload = b"".join(f"checkpoint bytes {i * 7919 % 10007} ".encode() for i in range(500))  # ~3:1, not a bomb
    data = _zip(zipfile.ZIP_DEFLATED, {"a/data.pkl": payload})
    (record,) = torch_zip.read_records(data)
    assert record.compressed_size < record.file_size
    assert torch_zip.crc_problems(data, [record]) == []
    assert torch_zip.stored_bytes(data, record) == payload
    damaged = bytearray(data)
    damaged[record.data_start + record.compressed_size // 2] ^= 0xFF
    (problem,) = torch_zip.crc_problems(bytes(damaged), [record])
    assert "a/data.pkl" in problem


def test_a_zip_bomb_record_is_refused_before_it_is_inflated() -> None:
    """A record declaring 1000 times its compressed size is named by inflation_refusals and skipped by the CRC
    check (nothing inflated); a record that inflates past its declared size is a problem, found in pieces."""
    bomb = _zip(zipfile.ZIP_DEFLATED, {"a/data/0": bytes(8 << 20)})
    (record,) = torch_zip.read_records(bomb)
    assert record.file_size > 1000 * record.compressed_size
    refusals = torch_zip.inflation_refusals([record])
    assert list(refusals) == ["a/data/0"] and "beyond 100:1 (a zip bomb?)" in refusals["a/data/0"]
    assert torch_zip.crc_problems(bomb, [record]) == []
    lying = dataclasses.replace(record, file_size=record.file_size // 2, crc=0)
    with pytest.raises(torch_zip.InflationError, match="inflates beyond the 4194304 bytes its directory declares"):
        torch_zip.record_crc(bomb, lying)


def test_a_record_stream_reads_a_deflated_record_piece_by_piece() -> None:
    """record_stream yields the uncompressed bytes as they are read, and tells its position (pickletools asks)."""
    payload = bytes(range(256)) * 100_000
    data = _zip(zipfile.ZIP_DEFLATED, {"a/data.pkl": payload})
    (record,) = torch_zip.read_records(data)
    stream = torch_zip.record_stream(data, record)
    assert stream.read(1000) == payload[:1000] and stream.tell() == 1000
    assert stream.read() == payload[1000:]


def test_crc_problems_reports_an_unsupported_compression_method() -> None:
    """A record compressed with a method other than stored or deflate is reported, not skipped."""
    data = _zip(zipfile.ZIP_BZIP2, {"a/data/0": b"x" * 100})
    (problem,) = torch_zip.crc_problems(data, torch_zip.read_records(data))
    assert "unsupported zip compression method 12" in problem


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.999])
def test_read_records_raises_zip_structure_error_on_truncation(torch_file: Path, keep: float) -> None:
    """A torch file cut short anywhere raises ZipStructureError saying how many bytes are left."""
    data = torch_file.read_bytes()
    cut = data[: int(len(data) * keep)]
    with pytest.raises(torch_zip.ZipStructureError, match=f"the file is {len(cut)} bytes"):
        torch_zip.read_records(cut)


def test_read_records_raises_zip_structure_error_on_a_broken_central_directory(tmp_path: Path) -> None:
    """A zip whose end-of-central-directory record is overwritten raises ZipStructureError."""
    path = ck.torch_zip(tmp_path / "model.pt", size_floats=256)
    ck.break_central_directory(path)
    with pytest.raises(torch_zip.ZipStructureError, match="broken zip structure"):
        torch_zip.read_records(path.read_bytes())


def test_read_records_raises_zip_structure_error_on_a_missing_local_header(torch_file: Path) -> None:
    """A central-directory entry pointing at bytes that are no local header raises ZipStructureError."""
    data = bytearray(torch_file.read_bytes())
    assert data[:4] == b"PK\x03\x04"
    data[:4] = b"\0\0\0\0"
    with pytest.raises(torch_zip.ZipStructureError, match="no local header at byte 0"):
        torch_zip.read_records(bytes(data))


def test_read_records_raises_zip_structure_error_when_a_record_overruns_the_archive(torch_file: Path) -> None:
    """A local header whose extra field pushes a record's bytes past the archive's end raises ZipStructureError."""
    data = bytearray(torch_file.read_bytes())
    records = torch_zip.read_records(bytes(data))
    last = max(records, key=lambda r: r.data_start)
    header_at = bytes(data).rfind(b"PK\x03\x04", 0, last.data_start)
    struct.pack_into("<H", data, header_at + 28, 0xFFFF)  # the local header's extra-field length
    with pytest.raises(torch_zip.ZipStructureError, match="archive ends at byte"):
        torch_zip.read_records(bytes(data))


def test_read_records_reads_an_archive_embedded_at_an_offset(torch_file: Path) -> None:
    """An archive inside a larger buffer (as in a DCP .distcp file) gives absolute offsets into that buffer."""
    archive = torch_file.read_bytes()
    prefix, suffix = b"\xaa" * 1000, b"\xbb" * 500
    buffer = prefix + archive + suffix
    inner = torch_zip.read_records(archive)
    outer = torch_zip.read_records(buffer, len(prefix), len(archive))
    assert [r.data_start - len(prefix) for r in outer] == [r.data_start for r in inner]
    assert torch_zip.crc_problems(buffer, outer) == []
    outer_pickle, inner_pickle = torch_zip.find_record(outer, "data.pkl"), torch_zip.find_record(inner, "data.pkl")
    assert outer_pickle is not None and inner_pickle is not None
    assert torch_zip.stored_bytes(buffer, outer_pickle) == torch_zip.stored_bytes(archive, inner_pickle)


def test_find_record_matches_a_name_under_the_archive_folder(torch_file: Path) -> None:
    """find_record finds '<dir>/data.pkl' by its suffix and returns None for a name that is absent."""
    records = torch_zip.read_records(torch_file.read_bytes())
    found = torch_zip.find_record(records, "data.pkl")
    assert found is not None and found.name == "model/data.pkl"
    assert torch_zip.find_record(records, "constants.pkl") is None
    assert torch_zip.find_record(records, "ata.pkl") is None


def test_is_torchscript_tells_script_archives_from_checkpoints(torch_file: Path) -> None:
    """Archives with constants.pkl or a code/ folder are TorchScript; a torch.save checkpoint is not."""
    assert not torch_zip.is_torchscript(torch_zip.read_records(torch_file.read_bytes()))

    def record(name: str) -> torch_zip.ZipRecord:
        return torch_zip.ZipRecord(name=name, data_start=0, compressed_size=0, file_size=0, crc=0, method=0)

    assert torch_zip.is_torchscript([record("m/data.pkl"), record("m/constants.pkl")])
    assert torch_zip.is_torchscript([record("m/data.pkl"), record("m/code/__torch__.py")])


def test_window_reads_and_seeks_within_its_slice() -> None:
    """A Window behaves as a file holding only its slice of the buffer."""
    window = torch_zip.Window(b"0123456789", 2, 5)
    assert window.read() == b"23456"
    assert window.seek(-2, io.SEEK_END) == 3 and window.read() == b"56"
    assert window.seek(1) == 1 and window.read(2) == b"34"
    assert window.seek(-100, io.SEEK_CUR) == 0


# ---------------------------------------------------------------------------------------------- safetensors


def st_file(header: dict[str, Any], data_len: int, *, claimed_len: int | None = None) -> bytes:
    """Bytes of a safetensors file with this JSON header and `data_len` data bytes."""
    encoded = json.dumps(header).encode()
    length = len(encoded) if claimed_len is None else claimed_len
    return length.to_bytes(8, "little") + encoded + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)


def f32(begin: int, count: int) -> dict[str, Any]:
    """A header entry for `count` float32 values stored from `begin`."""
    return {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}


def test_parse_header_reads_a_real_safetensors_file_like_the_reference_reader(tmp_path: Path) -> None:
    """A file written by safetensors parses into its tensors in file order, with absolute offsets and metadata."""
    path = ck.safetensors_file(tmp_path / "model.safetensors")
    data = path.read_bytes()
    header = st.parse_header(data)
    assert header.metadata == {"format": "pt"}
    assert header.data_start == 8 + int.from_bytes(data[:8], "little")
    assert [t.start for t in header.tensors] == sorted(t.start for t in header.tensors)
    assert header.tensors[0].start == header.data_start and header.tensors[-1].end == len(data)
    with safe_open(path, framework="pt") as reader:
        assert {t.name for t in header.tensors} == set(reader.keys())
        for entry in header.tensors:
            assert list(entry.shape) == list(reader.get_slice(entry.name).get_shape())


def test_parse_header_sorts_tensors_by_offset_and_makes_offsets_absolute() -> None:
    """Header entries come back in data order, whatever order the JSON lists them in."""
    raw = {"b": f32(8, 2), "a": f32(0, 2), "__metadata__": {"step": "7"}}
    header = st.parse_header(st_file(raw, 16))
    start = header.data_start
    assert [(t.name, t.start, t.end) for t in header.tensors] == [("a", start, start + 8), ("b", start + 8, start + 16)]
    assert header.metadata == {"step": "7"}


def test_parse_header_accepts_empty_tensors_and_sub_byte_dtypes() -> None:
    """Zero-element tensors take no bytes, and a 4-bit dtype rounds its byte count up."""
    raw = {
        "empty": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
        "packed": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]},
        "half": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [2, 10]},
    }
    header = st.parse_header(st_file(raw, 10))
    assert {t.name for t in header.tensors} == {"empty", "packed", "half"}


@pytest.mark.parametrize(
    ("raw", "data_len", "message"),
    [
        ({"a": f32(0, 2), "b": f32(12, 2)}, 20, "tensor 'b' starts at byte .* leaves a gap"),
        ({"a": f32(0, 2), "b": f32(4, 2)}, 12, "tensor 'b' starts at byte .* overlaps the previous tensor"),
        ({"a": f32(4, 2)}, 12, "tensor 'a' starts at byte .* leaves a gap"),
        ({"a": f32(0, 2)}, 9, r"tensors end at byte \d+ but the file is \d+ bytes \(trailing bytes\)"),
        ({"a": f32(0, 2)}, 7, r"tensors end at byte \d+ but the file is \d+ bytes \(truncated\)"),
        ({}, 3, r"\(trailing bytes\)"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, r"hold 8 bytes, but F32\[3\] needs 12"),
        ({"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}, 16, r"F16\[2, 2\] needs 8"),
        ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [8, 0]}}, 8, "needs 8"),
        ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16, "tensor 'a': unknown dtype 'F128'"),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype None"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "is not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 4]}}, 4, "is not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4, r"is not \[begin, end\]"),
        ({"a": [1, 2]}, 4, "entry is not an object"),
        ({"__metadata__": ["x"]}, 0, "__metadata__ is not an object"),
    ],
    ids=[
        "gap",
        "overlap",
        "gap-at-start",
        "trailing-bytes",
        "tensors-past-end",
        "no-tensors-but-data",
        "wrong-size-for-shape",
        "wrong-size-for-dtype",
        "end-before-begin",
        "unknown-dtype",
        "no-dtype",
        "negative-dimension",
        "shape-not-a-list",
        "offsets-not-a-pair",
        "entry-not-an-object",
        "metadata-not-an-object",
    ],
)
def test_parse_header_rejects_a_broken_rule_naming_it(raw: dict[str, Any], data_len: int, message: str) -> None:
    """Each broken safetensors rule raises SafetensorsError with a message naming the rule and the tensor."""
    with pytest.raises(st.SafetensorsError, match=message):
        st.parse_header(st_file(raw, data_len))


def test_parse_header_rejects_a_header_longer_than_the_file() -> None:
    """A header length beyond the file's end raises SafetensorsError giving both sizes."""
    data = st_file({"a": f32(0, 1)}, 4, claimed_len=1000)
    with pytest.raises(st.SafetensorsError, match=f"header claims 1000 bytes but the file is {len(data)} bytes"):
        st.parse_header(data)


def test_parse_header_rejects_an_absurd_header_length() -> None:
    """A header length above the format's 100 MiB cap raises SafetensorsError without reading it."""
    with pytest.raises(st.SafetensorsError, match="header claims"):
        st.parse_header((st.MAX_HEADER + 1).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00", "too short for a safetensors header"),
        ((5).to_bytes(8, "little") + b"{abc}", "header is not valid JSON"),
        ((4).to_bytes(8, "little") + b"\xff\xfe{}", "header is not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
    ids=["shorter-than-8-bytes", "bad-json", "not-utf8", "json-array"],
)
def test_parse_header_rejects_a_header_that_is_no_json_object(data: bytes, message: str) -> None:
    """A file too short for the length field, or whose header is no JSON object, raises SafetensorsError."""
    with pytest.raises(st.SafetensorsError, match=message):
        st.parse_header(data)


def test_parse_index_returns_the_weight_map_or_raises(tmp_path: Path) -> None:
    """parse_index returns a sharded folder's weight map; an index that is not JSON or lacks one raises."""
    index = ck.safetensors_sharded(tmp_path / "hf", shards=2)
    assert st.parse_index(index) == json.loads(index.read_text())["weight_map"]
    for text in ("{not json", '{"metadata": {}}', '{"weight_map": {"a": 1}}', "[]"):
        index.write_text(text)
        with pytest.raises(st.SafetensorsError, match=index.name):
            st.parse_index(index)
