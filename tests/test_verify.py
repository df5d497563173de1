"""Specification of the verify engine (ckptd.verify.verify) on real checkpoints built by tests/checkpoints.py."""

import hashlib
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import checkpoints as ck
import pytest
import torch

from ckptd import sidecar
from ckptd.catalog import Catalog
from ckptd.model import CheckpointChanged, Verification
from ckptd.scan import reconcile
from ckptd.verify import TrustError, directory_digest, verify

NUMPY_TRUST = ["numpy._core.multiarray.scalar", "numpy.dtype"]


def sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(problems: list[str]) -> bool:
    """True when every problem is a single non-empty line."""
    return all(p.strip() and "\n" not in p for p in problems)


def assert_corrupt(result: Verification, *fragments: str) -> str:
    """Assert the result is corrupt with one-line problems, one of which holds every fragment; return it."""
    assert result.status == "corrupt", result
    assert result.problems and one_line(result.problems), result.problems
    matching = [p for p in result.problems if all(f in p for f in fragments)]
    assert matching, f"no problem mentions {fragments}: {result.problems}"
    return matching[0]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lightning_ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The .ckpt files of one real 3-epoch Lightning run, built once for this module."""
    paths = ck.lightning_run(tmp_path_factory.mktemp("lightning"))
    assert len(paths) == 4  # three epochs plus last.ckpt
    return paths


@pytest.fixture(scope="module")
def big_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch zip checkpoint larger than 8 MiB, so the hashing reports progress more than once."""
    path = ck.torch_zip(tmp_path_factory.mktemp("big") / "big.pt", size_floats=1_000_000)
    assert path.stat().st_size > 8 << 20
    return path


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """A fresh three-shard Hugging Face safetensors folder."""
    return ck.safetensors_sharded(tmp_path / "hf", shards=3).parent


@pytest.fixture
def dcp(tmp_path: Path) -> Path:
    """A fresh torch.distributed.checkpoint folder."""
    return ck.dcp_checkpoint(tmp_path / "dcp", step=7)


# ---------------------------------------------------------------------------------------------- good files


def test_verify_torch_zip_is_ok_with_metadata_and_tensor_stats(tmp_path: Path) -> None:
    """A torch.save zip checkpoint is ok, with its epoch, step, metrics, keys and tensor counts."""
    path = ck.torch_zip(tmp_path / "model.pt", epoch=5, global_step=500, metrics={"acc": 0.9})
    result = verify(path)
    assert (result.status, result.format, result.problems, result.warnings) == ("ok", "torch_zip", [], [])
    assert (result.epoch, result.global_step, result.metrics, result.producer) == (5, 500, {"acc": 0.9}, "torch")
    assert result.keys == ["epoch", "global_step", "model_state_dict", "optimizer_state_dict", "metrics"]
    state = torch.load(path, weights_only=True)
    tensors = [*state["model_state_dict"].values()]
    tensors += [t for group in state["optimizer_state_dict"]["state"].values() for t in group.values()]
    assert result.tensors.count == len(tensors)
    assert result.tensors.parameters == sum(t.numel() for t in tensors)
    assert result.tensors.bytes == sum(t.untyped_storage().nbytes() for t in tensors)
    assert result.tensors.dtypes == {"float32": len(tensors) - 1, "int64": 1}
    assert result.tensors.nonfinite == 0
    assert result.size_bytes == path.stat().st_size
    assert result.files is None and not result.is_directory


def test_verify_torch_legacy_is_ok_with_the_same_findings_as_zip(tmp_path: Path) -> None:
    """A legacy (non-zip) torch.save file is ok, with the same metadata and tensor stats as its zip twin."""
    legacy = verify(ck.torch_legacy(tmp_path / "legacy.pt", epoch=2, global_step=20))
    twin = verify(ck.torch_zip(tmp_path / "zip.pt", epoch=2, global_step=20))
    assert (legacy.status, legacy.format, legacy.problems) == ("ok", "torch_legacy", [])
    assert (legacy.epoch, legacy.global_step, legacy.metrics) == (2, 20, {"val_loss": 0.5})
    assert legacy.tensors == twin.tensors


def test_verify_safetensors_file_is_ok_with_tensor_stats(tmp_path: Path) -> None:
    """A single safetensors file is ok, produced by huggingface, with its tensor names, counts and dtypes."""
    result = verify(ck.safetensors_file(tmp_path / "model.safetensors"))
    assert (result.status, result.format, result.problems, result.producer) == ("ok", "safetensors", [], "huggingface")
    assert sorted(result.keys) == ["embed.weight", "head.weight", "layer.0.bias", "layer.0.weight", "position_ids"]
    assert result.tensors.count == 5
    assert result.tensors.parameters == 64 * 32 + 32 * 32 + 32 + 8 * 32 + 64
    assert result.tensors.bytes == 4 * (64 * 32 + 32 * 32 + 32 + 8 * 32) + 8 * 64
    assert result.tensors.dtypes == {"float32": 4, "int64": 1}


def test_verify_sharded_safetensors_folder_is_ok_with_a_files_map(sharded: Path) -> None:
    """A sharded HF folder is ok; `files` maps every file to its SHA-256 and sha256 is their digest."""
    result = verify(sharded)
    assert (result.status, result.format, result.problems) == ("ok", "safetensors_sharded", [])
    assert result.is_directory
    assert result.files == {p.name: sha256(p) for p in sharded.iterdir()}
    assert result.sha256 == directory_digest(result.files)
    assert result.keys == sorted(f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias"))
    assert (result.tensors.count, result.tensors.parameters) == (6, 3 * (32 * 32 + 32))
    assert result.size_bytes == sum(p.stat().st_size for p in sharded.iterdir())


def test_verify_dcp_folder_is_ok_with_step_epoch_and_tensor_stats(dcp: Path) -> None:
    """A DCP folder is ok, producer dcp, with the step and epoch saved beside the model and its tensor stats."""
    result = verify(dcp)
    assert (result.status, result.format, result.problems, result.producer) == ("ok", "dcp", [], "dcp")
    assert (result.global_step, result.epoch) == (7, 2)
    assert result.keys == ["epoch", "model", "step"]
    assert result.tensors.count == 3
    assert result.tensors.parameters == 64 * 16 + 64 + 4 * 64
    assert result.tensors.bytes == 4 * result.tensors.parameters
    assert result.tensors.dtypes == {"float32": 3}
    assert result.files == {p.name: sha256(p) for p in dcp.iterdir()}
    assert result.sha256 == directory_digest(result.files)


def test_verify_lightning_ckpts_are_ok_torch_zip_from_lightning(lightning_ckpts: list[Path]) -> None:
    """Every .ckpt a real Lightning run writes is an ok torch_zip checkpoint produced by lightning."""
    for path in lightning_ckpts:
        result = verify(path)
        assert (result.status, result.format, result.problems, result.warnings) == ("ok", "torch_zip", [], []), path
        assert result.producer == "lightning"
        assert {"epoch", "global_step", "state_dict", "callbacks"} <= set(result.keys)
        assert result.sha256 == sha256(path)


def test_verify_lightning_metadata_comes_from_the_checkpoint_and_its_callbacks(lightning_ckpts: list[Path]) -> None:
    """Epoch, global_step and val_loss (the ModelCheckpoint callback's current_score) come from a Lightning file."""
    for path in lightning_ckpts:
        if path.name == "last.ckpt":
            continue
        state = torch.load(path, weights_only=True)
        (callback,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
        name_parts = dict(part.split("=") for part in path.stem.split("-"))
        result = verify(path)
        assert result.epoch == int(name_parts["epoch"]) == state["epoch"]
        assert result.global_step == int(name_parts["step"]) == state["global_step"]
        assert result.global_step == 4 * (result.epoch + 1)  # four batches an epoch
        assert set(result.metrics) == {"val_loss"}
        # The callback's full-precision score, which the file name's four decimals round.
        assert result.metrics["val_loss"] == float(callback["current_score"])
        assert result.metrics["val_loss"] == pytest.approx(float(name_parts["val_loss"]), abs=5e-5)


def test_verify_tied_weights_count_their_shared_storage_once(tmp_path: Path) -> None:
    """Two state-dict entries sharing one storage count as two tensors but their bytes only once."""
    weight = torch.randn(16, 8)
    path = tmp_path / "tied.pt"
    torch.save({"embed.weight": weight, "head.weight": weight, "head.bias": torch.zeros(16)}, path)
    result = verify(path)
    assert result.status == "ok"
    assert result.tensors.count == 3
    assert result.tensors.bytes == weight.nbytes + 16 * 4
    assert result.tensors.dtypes == {"float32": 3}


def test_verify_sha256_equals_hashlib_of_the_file(tmp_path: Path, big_zip: Path) -> None:
    """For every single-file format, good or corrupt, sha256 is hashlib.sha256 of the file's bytes."""
    paths = [
        ck.torch_zip(tmp_path / "a.pt"),
        ck.torch_legacy(tmp_path / "b.pt"),
        ck.safetensors_file(tmp_path / "c.safetensors"),
        big_zip,
    ]
    flipped = ck.torch_zip(tmp_path / "flipped.pt")
    ck.flip_tensor_byte(flipped)
    empty = tmp_path / "empty.pt"
    empty.touch()
    for path in [*paths, flipped, empty]:
        assert verify(path).sha256 == sha256(path), path


def test_verify_progress_reports_every_byte_hashed(big_zip: Path) -> None:
    """The progress callback is called per 8 MiB piece and its counts add up to the file's size."""
    pieces: list[int] = []
    verify(big_zip, progress=pieces.append)
    assert len(pieces) >= 2
    assert sum(pieces) == big_zip.stat().st_size


# ---------------------------------------------------------------------------------------------- directory digest


def test_directory_digest_is_stable_and_changes_when_one_shard_changes(sharded: Path) -> None:
    """A sharded folder's digest repeats across verifies and changes when one shard's bytes change."""
    first, again = verify(sharded), verify(sharded)
    assert first.sha256 == again.sha256
    assert first.files == again.files
    shard = sharded / "model-00002-of-00003.safetensors"
    ck.flip_safetensors_data_byte(shard)  # safetensors has no checksum: still ok, but not the same bytes
    changed = verify(sharded)
    assert changed.status == "ok"
    assert changed.sha256 != first.sha256
    assert {k for k in first.files or {} if changed.files and changed.files[k] != first.files[k]} == {shard.name}


def test_directory_digest_depends_on_names_and_hashes_not_on_folder_location(sharded: Path, tmp_path: Path) -> None:
    """Copying a directory checkpoint elsewhere keeps its digest; renaming one file inside changes it."""
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(sharded, copy)
    assert verify(copy).sha256 == verify(sharded).sha256
    assert directory_digest({"a": "1" * 64, "b": "2" * 64}) == directory_digest({"b": "2" * 64, "a": "1" * 64})
    assert directory_digest({"a": "1" * 64}) != directory_digest({"c": "1" * 64})


def test_verify_dcp_digest_changes_when_the_distcp_file_changes(dcp: Path) -> None:
    """A DCP folder's digest is stable and moves when its .distcp bytes change."""
    first = verify(dcp)
    assert verify(dcp).sha256 == first.sha256
    with open(dcp / "__0_0.distcp", "ab") as handle:
        handle.write(b"\0")
    assert verify(dcp).sha256 != first.sha256


# ---------------------------------------------------------------------------------------------- corruption


def test_verify_flipped_tensor_byte_is_corrupt_naming_the_record_and_its_bytes(tmp_path: Path) -> None:
    """One flipped bit in tensor data, which torch.load accepts, is corrupt by CRC-32 at that record's bytes."""
    path = ck.torch_zip(tmp_path / "model.pt")
    offset = ck.flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    problem = assert_corrupt(verify(path), "model.pt", "CRC-32 mismatch", "model/data/")
    match = re.search(r"bytes (\d+)-(\d+)", problem)
    assert match, problem
    assert int(match[1]) <= offset < int(match[2])


def test_verify_flipped_pickle_byte_is_corrupt_naming_data_pkl(tmp_path: Path) -> None:
    """A damaged data.pkl record is corrupt, with a problem naming that record."""
    path = ck.torch_zip(tmp_path / "model.pt")
    ck.flip_pickle_byte(path)
    assert_corrupt(verify(path), "model.pt", "data.pkl", "CRC-32")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_verify_truncated_torch_zip_is_corrupt_naming_its_size(tmp_path: Path, keep: float) -> None:
    """A truncated zip checkpoint is corrupt, with a problem naming the file and its size."""
    path = ck.torch_zip(tmp_path / "model.pt")
    size = ck.truncate(path, keep)
    result = verify(path)
    assert_corrupt(result, "model.pt", f"{size} bytes")
    assert result.sha256 == sha256(path)


def test_verify_truncated_torch_legacy_is_corrupt(tmp_path: Path) -> None:
    """A truncated legacy torch file is corrupt, with a problem naming the file."""
    path = ck.torch_legacy(tmp_path / "legacy.pt")
    ck.truncate(path, 0.5)
    assert_corrupt(verify(path), "legacy.pt")


def test_verify_zero_byte_file_is_corrupt_as_empty(tmp_path: Path) -> None:
    """A zero-byte checkpoint is corrupt, said to be empty, with the SHA-256 of no bytes."""
    path = ck.torch_zip(tmp_path / "model.pt")
    ck.zero_bytes(path)
    result = verify(path)
    assert_corrupt(result, "model.pt", "empty", "0 bytes")
    assert result.sha256 == hashlib.sha256(b"").hexdigest()
    assert result.size_bytes == 0


def test_verify_broken_central_directory_is_corrupt_as_a_zip_problem(tmp_path: Path) -> None:
    """A zip whose central directory is overwritten is corrupt, with a problem about its zip structure."""
    path = ck.torch_zip(tmp_path / "model.pt")
    ck.break_central_directory(path)
    assert_corrupt(verify(path), "model.pt", "zip")


def test_verify_safetensors_offsets_short_of_the_file_are_corrupt_at_that_byte(tmp_path: Path) -> None:
    """A safetensors header whose offsets stop short of the file's end is corrupt, naming the byte they stop at."""
    path = ck.safetensors_file(tmp_path / "model.safetensors")
    end = ck.corrupt_safetensors_header(path)
    assert_corrupt(verify(path), "model.safetensors", f"byte {end}", f"{path.stat().st_size} bytes")


def test_verify_truncated_safetensors_is_corrupt(tmp_path: Path) -> None:
    """A safetensors file cut short of its tensors' end is corrupt, naming the file."""
    path = ck.safetensors_file(tmp_path / "model.safetensors")
    ck.truncate(path, 0.9)
    assert_corrupt(verify(path), "model.safetensors")


def test_verify_sharded_index_naming_a_missing_shard_is_corrupt_naming_it(sharded: Path) -> None:
    """A sharded folder whose index names a shard that is gone is corrupt, naming the index and the shard."""
    deleted = ck.delete_shard(sharded)
    result = verify(sharded)
    assert_corrupt(result, "model.safetensors.index.json", deleted.name, "missing")
    assert deleted.name not in (result.files or {})


def test_verify_sharded_shard_with_a_bad_header_is_corrupt_naming_the_shard(sharded: Path) -> None:
    """A shard whose header offsets do not cover it exactly makes the folder corrupt, naming that shard."""
    shard = sharded / "model-00001-of-00003.safetensors"
    end = ck.corrupt_safetensors_header(shard)
    assert_corrupt(verify(sharded), shard.name, f"byte {end}")


def test_verify_sharded_index_that_is_not_json_is_corrupt_naming_it(sharded: Path) -> None:
    """A sharded folder whose index is not valid JSON is corrupt, naming the index."""
    (sharded / "model.safetensors.index.json").write_text("{not json")
    assert_corrupt(verify(sharded), "model.safetensors.index.json", "JSON")


def test_verify_dcp_with_a_short_distcp_is_corrupt_naming_it(dcp: Path) -> None:
    """A DCP folder whose .distcp file is truncated is corrupt, naming the file and the bytes .metadata needs."""
    short = ck.truncate_distcp(dcp, 0.5)
    result = verify(dcp)
    assert_corrupt(result, short.name, "short", f"the file has {short.stat().st_size}")


def test_verify_dcp_with_a_missing_distcp_is_corrupt_naming_it(dcp: Path) -> None:
    """A DCP folder whose .metadata names a .distcp file that is gone is corrupt, naming that file."""
    missing = ck.delete_distcp(dcp)
    assert_corrupt(verify(dcp), ".metadata", missing.name, "missing")


def test_verify_dcp_flipped_tensor_byte_is_corrupt_by_crc(dcp: Path) -> None:
    """A flipped bit inside a tensor of a .distcp file is corrupt by the embedded record's CRC-32."""
    weight = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))  # dcp_checkpoint's first tensor
    distcp = dcp / "__0_0.distcp"
    offset = distcp.read_bytes().find(weight.numpy().tobytes())
    assert offset > 0
    with open(distcp, "r+b") as handle:
        handle.seek(offset + 100)
        byte = handle.read(1)[0]
        handle.seek(offset + 100)
        handle.write(bytes([byte ^ 1]))
    assert_corrupt(verify(dcp), "__0_0.distcp bytes", "CRC-32 mismatch")


def test_a_file_that_is_no_checkpoint_at_all_is_unsupported_not_corrupt(tmp_path: Path) -> None:
    """A file named like a checkpoint whose content is no checkpoint format (a text .pth path file, an .npz, an
    ONNX model) is `unsupported` with a reason, never `corrupt`: corrupt is for bytes that start as a checkpoint
    and then break. A file of zeros where a checkpoint was (a crash that left the blocks unwritten) is corrupt."""
    import numpy

    (tmp_path / "site.pth").write_text("/usr/lib/python3/dist-packages\n")
    numpy.savez(tmp_path / "arrays.npz", a=numpy.zeros(3))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.pt")
    (tmp_path / "model.onnx.bin").write_bytes(bytes.fromhex("0807120c") + b"pytorch" + bytes(64))
    reasons = {
        "site.pth": "not a checkpoint format ckptd knows (it starts with text)",
        "arrays.pt": "a zip archive without data.pkl, not a torch checkpoint (an .npz?)",
        "model.onnx.bin": "not a checkpoint format ckptd knows (it starts with bytes 0807120c7079746f)",
    }
    for name, reason in reasons.items():
        result = verify(tmp_path / name)
        assert (result.status, result.problems) == ("unsupported", [f"{name}: {reason}"])
        assert result.sha256 == sha256(tmp_path / name)
    (tmp_path / "zeroed.ckpt").write_bytes(bytes(4096))
    assert_corrupt(verify(tmp_path / "zeroed.ckpt"), "zeroed.ckpt: only zero bytes where a checkpoint should be")


# ---------------------------------------------------------------------------------------------- warnings


@pytest.mark.parametrize(
    ("build", "name"),
    [(ck.torch_zip, "nan.pt"), (ck.torch_legacy, "nan.pt"), (ck.safetensors_file, "nan.safetensors")],
    ids=["torch_zip", "torch_legacy", "safetensors"],
)
def test_verify_nan_and_inf_are_a_warning_and_status_stays_ok(tmp_path: Path, build: object, name: str) -> None:
    """NaN and Inf in float tensors give a warning and a nonfinite count; the status stays ok."""
    assert callable(build)
    result = verify(build(tmp_path / name, nan=True))
    assert (result.status, result.problems) == ("ok", [])
    assert result.tensors.nonfinite == 2
    assert len(result.warnings) == 1 and "NaN" in result.warnings[0]


def test_a_file_saved_without_crcs_is_ok_with_a_warning(tmp_path: Path) -> None:
    """torch.serialization.set_crc32_options(False) writes zero CRC fields: not corrupt, but said in warnings,
    since only the SHA-256 then protects the file."""
    path = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(8), "epoch": 2}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    result = verify(path)
    assert (result.status, result.problems, result.epoch) == ("ok", [], 2)
    assert result.warnings == [
        "nocrc.pt: its CRC-32s were not recorded (torch.serialization.set_crc32_options(False)); only its SHA-256"
        " protects it"
    ]


def test_float8_and_float4_tensors_verify_without_a_traceback(tmp_path: Path) -> None:
    """float8 variants are scanned; float4 and float8_e8m0 (no NaN to look for, or no way to look) are counted
    and named in a warning: the status stays ok in torch and safetensors files alike."""
    from safetensors.torch import save_file

    packed = torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    torch.save({"a": torch.ones(8).to(torch.float8_e4m3fn), "b": torch.ones(4).to(torch.float8_e5m2fnuz)},
               tmp_path / "f8.pt")  # fmt: skip
    torch.save({"w": packed, "s": torch.ones(2).to(torch.float8_e8m0fnu)}, tmp_path / "f4.pt")
    save_file({"w": torch.ones(8).to(torch.float8_e4m3fn), "u": torch.ones(2).to(torch.float8_e8m0fnu)},
              str(tmp_path / "f8.safetensors"))  # fmt: skip
    save_file({"w": packed}, str(tmp_path / "f4.safetensors"))
    expected = {
        "f8.pt": [],
        "f4.pt": ["f4.pt: tensors of dtype float4_e2m1fn_x2 not scanned for NaN/Inf"],
        "f8.safetensors": ["f8.safetensors: tensors of dtype F8_E8M0 not scanned for NaN/Inf"],
        "f4.safetensors": ["f4.safetensors: tensors of dtype F4 not scanned for NaN/Inf"],
    }
    for name, warned in expected.items():
        result = verify(tmp_path / name)
        assert (result.status, result.problems, result.warnings) == ("ok", [], warned), name
        assert result.tensors.count == (1 if name == "f4.safetensors" else 2)
    with Catalog(tmp_path / "state") as catalog:  # and the daemon's record step writes their sidecars
        report = reconcile(tmp_path, watch="w", patterns=["*.pt", "*.safetensors"], catalog=catalog, verifier=verify,
                           engine=dict)  # fmt: skip
    assert sorted(Path(v.path).name for v in report.verified) == sorted(expected)
    assert all(sidecar.read(tmp_path / name) is not None for name in expected)


# ---------------------------------------------------------------------------------------------- safety


def test_verify_hostile_pickle_is_unsafe_and_never_runs(tmp_path: Path) -> None:
    """A zip checkpoint whose pickle calls os.system is unsafe, naming posix.system, and its command never runs."""
    marker = tmp_path / "marker"
    result = verify(ck.hostile_pickle(tmp_path / "hostile.pt", marker))
    assert (result.status, result.problems, result.unsafe_globals) == ("unsafe", [], ["posix.system"])
    assert not marker.exists()


def test_verify_hostile_legacy_pickle_is_unsafe_and_never_runs(tmp_path: Path) -> None:
    """A legacy torch file whose pickle calls os.system is unsafe and its command never runs."""
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pt"
    torch.save({"w": torch.ones(2), "x": ck.HostilePayload(marker)}, path, _use_new_zipfile_serialization=False)
    result = verify(path)
    assert (result.status, result.format, result.unsafe_globals) == ("unsafe", "torch_legacy", ["posix.system"])
    assert not marker.exists()


def test_verify_hostile_dcp_metadata_is_unsafe_and_never_runs(tmp_path: Path) -> None:
    """A DCP folder whose .metadata pickle calls os.system is unsafe and its command never runs."""
    marker = tmp_path / "marker"
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(ck.HostilePayload(marker)))
    result = verify(folder)
    assert (result.status, result.format, result.unsafe_globals) == ("unsafe", "dcp", ["posix.system"])
    assert not marker.exists()


def test_verify_hostile_pickle_stays_unsafe_when_other_names_are_trusted(tmp_path: Path) -> None:
    """Trusting harmless globals does not admit os.system."""
    marker = tmp_path / "marker"
    result = verify(ck.hostile_pickle(tmp_path / "hostile.pt", marker), trusted=NUMPY_TRUST)
    assert (result.status, result.unsafe_globals) == ("unsafe", ["posix.system"])
    assert not marker.exists()


def test_verify_numpy_scalar_needs_scalar_and_dtype_trusted(tmp_path: Path) -> None:
    """A numpy scalar is unsafe until numpy._core.multiarray.scalar and numpy.dtype are both trusted."""
    path = ck.numpy_scalar_checkpoint(tmp_path / "np.pt")
    untrusted = verify(path)
    assert untrusted.status == "unsafe"
    assert untrusted.unsafe_globals == sorted(NUMPY_TRUST)
    assert verify(path, trusted=NUMPY_TRUST[:1]).unsafe_globals == ["numpy.dtype"]
    assert verify(path, trusted=NUMPY_TRUST[1:]).unsafe_globals == ["numpy._core.multiarray.scalar"]
    trusted = verify(path, trusted=NUMPY_TRUST)  # numpy.dtype brings numpy.dtypes.Float64DType with it
    assert (trusted.status, trusted.problems, trusted.unsafe_globals) == ("ok", [], [])
    assert (trusted.epoch, trusted.keys, trusted.tensors.count) == (1, ["epoch", "best", "w"], 1)


def test_verify_trusted_name_that_cannot_be_imported_raises_trust_error(tmp_path: Path) -> None:
    """A trusted name that is not module.name, or cannot be imported, raises TrustError for any format."""
    paths = [
        ck.numpy_scalar_checkpoint(tmp_path / "np.pt"),
        ck.torch_zip(tmp_path / "model.pt"),
        ck.safetensors_file(tmp_path / "model.safetensors"),
        ck.dcp_checkpoint(tmp_path / "dcp"),
    ]
    for path in paths:
        for bad in ("nodots", "no_such_module_ckptd.thing", "numpy.no_such_attribute"):
            with pytest.raises(TrustError, match=re.escape(bad)):
                verify(path, trusted=[*NUMPY_TRUST, bad])


def test_verify_torchscript_archive_is_unsupported_and_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saved TorchScript module is unsupported, and neither torch.load nor torch.jit.load is called on it."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates torch.jit.script
        torch.jit.script(Tiny()).save(str(path))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a TorchScript archive was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    result = verify(path)
    assert (result.status, result.format) == ("unsupported", "torch_zip")
    assert len(result.problems) == 1 and "TorchScript" in result.problems[0]
    assert result.sha256 == sha256(path)


def test_verify_plain_non_checkpoint_file_is_unsupported(tmp_path: Path) -> None:
    """A file without a checkpoint extension that no format parses is unsupported, not corrupt."""
    path = tmp_path / "notes.txt"
    path.write_text("epoch=3 looked fine\n")
    result = verify(path)
    assert (result.status, result.format) == ("unsupported", None)
    assert len(result.problems) == 1 and "notes.txt" in result.problems[0]
    assert result.sha256 == sha256(path)


def test_verify_folder_without_a_marker_is_unsupported(tmp_path: Path) -> None:
    """A folder with no DCP, safetensors index or Orbax marker is unsupported."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    assert verify(tmp_path / "plain").status == "unsupported"


def test_verify_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    """Verifying a path that does not exist raises FileNotFoundError rather than reporting corrupt."""
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------- changes


def _rewrite_in_place(path: Path) -> None:
    """Overwrite the first byte with itself: same size and inode, a new mtime."""
    with open(path, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(first)


def _append(path: Path) -> None:
    """Append one byte."""
    with open(path, "ab") as handle:
        handle.write(b"\0")


def _replace(path: Path) -> None:
    """Replace the file by a copy of itself (a new inode), as a writer's atomic rename would."""
    temp = path.with_suffix(".tmp")
    shutil.copyfile(path, temp)
    os.replace(temp, path)


@pytest.mark.parametrize("change", [_rewrite_in_place, _append, _replace], ids=lambda c: c.__name__.strip("_"))
def test_verify_file_changed_mid_hash_raises_checkpoint_changed(tmp_path: Path, big_zip: Path, change: object) -> None:
    """A file rewritten, appended to or replaced while it is being hashed raises CheckpointChanged, not corrupt."""
    assert callable(change)
    path = tmp_path / "big.pt"
    shutil.copyfile(big_zip, path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an old mtime, so any write moves it
    calls: list[int] = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            change(path)

    with pytest.raises(CheckpointChanged) as caught:
        verify(path, progress=progress)
    assert len(calls) >= 2
    assert caught.value.path == str(path)


def test_verify_directory_changed_mid_hash_raises_checkpoint_changed(dcp: Path) -> None:
    """A directory checkpoint gaining a file while it is being hashed raises CheckpointChanged."""
    calls: list[int] = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            (dcp / "__1_0.distcp").write_bytes(b"late shard")

    with pytest.raises(CheckpointChanged):
        verify(dcp, progress=progress)


def test_verify_unchanged_file_does_not_raise_with_progress(big_zip: Path) -> None:
    """A progress callback that only watches does not make verify see a change."""
    assert verify(big_zip, progress=lambda n: None).status == "ok"


# ------------------------------------------------------------------------------------------ hostile input


def test_shared_nested_lists_are_walked_once_and_verify_at_once(tmp_path: Path) -> None:
    """A 2 KB checkpoint sharing one list 16 times at each of 8 levels (16^8 paths) verifies ok in well under a
    second: each container is walked once."""
    path = ck.shared_nested_lists(tmp_path / "nested.pt")
    assert path.stat().st_size < 4096
    result = verify(path, timeout=30)
    assert result.status == "ok" and result.seconds < 5
    assert result.tensors.count >= 2


def test_a_zip_bomb_is_unsupported_and_never_inflated(tmp_path: Path) -> None:
    """A deflated record of 256 MiB of zeros in a 250 KB file ends `unsupported` naming the record and the ratio;
    nothing is inflated or loaded (peak memory does not grow by the record's size)."""
    import resource

    path = ck.zip_bomb(tmp_path / "bomb.pt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = verify(path)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) << 10
    assert result.status == "unsupported" and result.sha256 == sha256(path)
    assert re.search(
        r"record 'bomb.pt/data/0' would inflate 268435456 bytes from \d+, beyond 100:1", result.problems[0]
    )
    assert grown < 64 << 20


def test_a_deflated_pickle_past_the_limits_is_never_inflated_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data.pkl declared at 512 MiB (deflated to 0.5 MB) is refused before inflation; one under the ratio but over
    MAX_PICKLE_BYTES is refused by size; neither is loaded."""
    import ckptd.verify as engine

    bomb = verify(ck.deflated_pickle(tmp_path / "pkl.pt"))
    assert bomb.status == "unsupported" and "data.pkl' would inflate 536870912 bytes" in bomb.problems[0]
    monkeypatch.setattr(engine, "MAX_PICKLE_BYTES", 100)
    plain = verify(ck.torch_zip(tmp_path / "plain.pt", size_floats=64))
    assert plain.status == "unsupported"
    assert re.search(r"record 'plain/data.pkl' is a \d+-byte pickle, over the limit of 100", plain.problems[0])


def test_a_safetensors_header_nested_200000_deep_is_corrupt_not_a_traceback(tmp_path: Path) -> None:
    """The header's depth is measured before parsing: a clear one-line problem, no RecursionError."""
    result = verify(ck.deep_safetensors_header(tmp_path / "deep.safetensors"))
    assert_corrupt(result, "deep.safetensors: header nests 200002 levels deep, over the limit of 8")


def test_a_million_metrics_are_cut_to_256_with_a_warning(tmp_path: Path) -> None:
    """A metrics mapping of 1,000,000 entries keeps 256 (a sidecar stays small) and says so in the warnings."""
    from ckptd.metadata import MAX_METRICS

    result = verify(ck.giant_metrics(tmp_path / "m.pt"))
    assert result.status == "ok" and len(result.metrics) == MAX_METRICS
    assert result.warnings == [f"1000000 metrics found; the first {MAX_METRICS} were kept"]


def test_a_verification_past_its_time_budget_is_unsupported_with_the_reason(tmp_path: Path) -> None:
    """The engine stops itself between pieces of work once its timeout passes: `unsupported`, saying why."""
    path = ck.torch_zip(tmp_path / "a.pt", size_floats=3_000_000)
    result = verify(path, timeout=0.0)
    assert result.status == "unsupported"
    assert result.problems == ["a.pt: verification stopped after 0 s (verify_timeout); not verified"]


def test_a_fifo_is_unsupported_and_never_opened(tmp_path: Path) -> None:
    """A FIFO named like a checkpoint, or inside a DCP folder, is `unsupported`; nothing blocks on it."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    alone = verify(fifo)
    assert (alone.status, alone.problems) == ("unsupported", ["pipe.pt: is a FIFO; only regular files are read"])
    folder = ck.dcp_checkpoint(tmp_path / "dcp")
    os.mkfifo(folder / "extra.distcp")
    inside = verify(folder)
    assert inside.status == "unsupported" and inside.problems == ["dcp: holds extra.distcp (a FIFO); never read"]


def test_a_dcp_metadata_naming_a_file_outside_its_folder_is_corrupt(tmp_path: Path) -> None:
    """An item's relative_path in .metadata is a name from disk: `../x` is refused, never opened."""
    import pickle as std_pickle

    from torch.distributed.checkpoint import metadata as meta

    folder = ck.dcp_checkpoint(tmp_path / "dcp")
    secret = tmp_path / "secret.distcp"
    shutil.copyfile(next(folder.glob("*.distcp")), secret)
    with open(folder / ".metadata", "rb") as handle:
        loaded = std_pickle.load(handle)  # the test's own, trusted file
    for info in loaded.storage_data.values():
        info.relative_path = "../secret.distcp"
    with open(folder / ".metadata", "wb") as handle:
        std_pickle.dump(loaded, handle)
    assert isinstance(loaded, meta.Metadata)
    assert_corrupt(verify(folder), ".metadata: a data file .metadata names '..'")
