"""Specification of issue 13: verifying, mirroring, scrubbing and restoring leave the page cache as they found it.

Each test reads a real file into the page cache, runs the step, then asks the kernel (mincore, through
/usr/bin/fincore) how much of the file is still resident. Removing the drop-behind makes them fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from ckptd import fsutil
from ckptd.mirrors.local import LocalTarget
from ckptd.scrub import hash_throttled
from ckptd.throttle import Throttle
from ckptd.verify import verify

FINCORE = shutil.which("fincore")
MB = 1 << 20


def resident(path: Path) -> int:
    """Bytes of the file in the page cache now."""
    assert FINCORE is not None
    out = subprocess.run([FINCORE, "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return int(out.split()[0])


def cached(path: Path) -> Path:
    """Write the file's bytes to disk and read them all back into the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        while os.read(fd, 8 * MB):
            pass
    finally:
        os.close(fd)
    assert resident(path) >= 0.9 * path.stat().st_size
    return path


@pytest.fixture
def droppable(tmp_path: Path) -> Path:
    """A folder whose file system drops pages on request (not tmpfs, whose pages are the files themselves)."""
    assert FINCORE is not None, "the page-cache tests read residency with /usr/bin/fincore (util-linux)"
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(4 * MB))
    with fsutil.opened(cached(probe)) as fd:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's call itself, not ckptd's helper
    assert resident(probe) <= MB, (
        f"{tmp_path}: this file system keeps pages that posix_fadvise(DONTNEED) asks to drop (tmpfs?); run the"
        " suite with its temp folder on a disk file system"
    )
    return tmp_path


def torch_checkpoint(path: Path, nan: bool = False) -> Path:
    tensors = {f"layer{i}.weight": torch.randn(1 << 20) for i in range(8)}  # 32 MiB
    tensors["layer7.weight"][-1] = float("nan") if nan else 0.0
    torch.save({"epoch": 3, "state_dict": tensors}, path)
    return path


def test_drop_cache_drops_a_files_pages(droppable: Path) -> None:
    """fsutil.drop_cache takes a clean file's pages out of the page cache; sha256_fd drops what it hashed."""
    path = droppable / "data"
    data = os.urandom(16 * MB)
    path.write_bytes(data)
    cached(path)
    with fsutil.opened(path) as fd:
        assert fsutil.sha256_fd(fd) == hashlib.sha256(data).hexdigest()
    assert resident(path) <= MB


def test_verify_leaves_no_page_of_a_torch_checkpoint_cached(droppable: Path) -> None:
    """verify() of a cached torch.save checkpoint reads it once and drops it: afterwards almost none of it is
    resident; its SHA-256 is hashlib's and a NaN in its last element is found."""
    path = cached(torch_checkpoint(droppable / "model.pt", nan=True))
    result = verify(path)
    assert resident(path) <= MB
    assert result.status == "ok"
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.tensors.nonfinite == 1 and result.tensors.count == 8


def test_verify_leaves_no_page_of_a_safetensors_file_cached(droppable: Path) -> None:
    """The same for a safetensors file."""
    from safetensors.torch import save_file

    path = droppable / "model.safetensors"
    save_file({f"w{i}": torch.randn(1 << 20) for i in range(8)}, str(path))
    result = verify(cached(path))
    assert result.status == "ok" and result.tensors.nonfinite == 0
    assert resident(path) <= MB


def test_verify_finds_a_nan_cut_by_the_reads_piece_boundary(tmp_path: Path) -> None:
    """An element that straddles two pieces of the one read (8 MiB apart) is put together before it is scanned:
    a float32 NaN across byte 8 MiB of a safetensors file whose tensor starts 3 bytes past a multiple of 4."""
    values = torch.zeros(3 * MB, dtype=torch.float32)
    size = 4 * values.numel()
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [values.numel()], "data_offsets": [3, 3 + size]}}  # fmt: skip
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head) + 3  # the file offset of b's first element
    straddling = (8 * MB - start) // 4  # the element holding byte 8 MiB and the bytes before it
    assert start + 4 * straddling < 8 * MB < start + 4 * straddling + 4
    values[straddling] = float("nan")
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\x01\x02\x03" + values.numpy().tobytes())
    result = verify(path)
    assert result.tensors.nonfinite == 1, result


def test_verify_finds_a_flipped_byte_and_inf_as_before(tmp_path: Path) -> None:
    """CRC-32 problems and Inf are still found by the one read (pieces of 8 MiB over a 32 MiB file)."""
    path = torch_checkpoint(tmp_path / "model.pt")
    data = bytearray(path.read_bytes())
    data[20 * MB] ^= 0xFF
    path.write_bytes(bytes(data))
    result = verify(path)
    assert result.status == "corrupt"
    assert any("CRC-32 mismatch" in p for p in result.problems)
    inf = tmp_path / "inf.pt"
    torch.save({"w": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)}, inf)
    assert verify(inf).tensors.nonfinite == 1


def test_local_copy_leaves_neither_file_cached(droppable: Path) -> None:
    """A local mirror copy drops the source's pages as it copies them and the copy's once on disk; the copy
    is still proved by its read-back."""
    source = cached(torch_checkpoint(droppable / "model.pt"))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    cached(source)
    target = LocalTarget("backup", droppable / "backup")
    target.put_file("run/model.pt", source, sha256=sha)
    copy = droppable / "backup" / "run" / "model.pt"
    assert resident(source) <= MB and resident(copy) <= MB
    assert target.sha256("run/model.pt") == sha and resident(copy) <= MB


def test_restore_read_leaves_neither_file_cached(droppable: Path) -> None:
    """read_into (restore, a scrub's repair) drops the copy it reads; the caller's fsync then sha256_fd drops
    the restored file."""
    source = torch_checkpoint(droppable / "model.pt")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    target = LocalTarget("backup", droppable / "backup")
    target.put_file("run/model.pt", source, sha256=sha)
    copy = cached(droppable / "backup" / "run" / "model.pt")
    restored = droppable / "restored.pt"
    fd = os.open(restored, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        target.read_into("run/model.pt", fd)
        os.fsync(fd)
        assert fsutil.sha256_fd(fd) == sha
    finally:
        os.close(fd)
    assert resident(copy) <= MB and resident(restored) <= MB


def test_scrub_read_leaves_no_page_cached(droppable: Path) -> None:
    """A scrub's read of a checkpoint drops it behind."""
    path = cached(torch_checkpoint(droppable / "model.pt"))
    assert hash_throttled(path, Throttle(0), droppable) == hashlib.sha256(path.read_bytes()).hexdigest()
    cached(path)
    hash_throttled(path, Throttle(0), droppable)
    assert resident(path) <= MB
