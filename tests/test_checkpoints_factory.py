"""Tests of tests/checkpoints.py: every builder writes a real, loadable checkpoint; every corruption bites."""

import hashlib
import json
import math
import pickletools
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import checkpoints as ck
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


def sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(path: Path) -> dict:
    """Load a torch checkpoint the safe way (weights_only=True)."""
    return torch.load(path, weights_only=True, map_location="cpu")


def test_torch_zip_is_a_training_checkpoint(tmp_path: Path) -> None:
    """torch_zip writes a small zip checkpoint that loads with weights_only and carries the given fields."""
    path = ck.torch_zip(tmp_path / "sub" / "ckpt.pt", epoch=5, global_step=500, metrics={"acc": 0.9})
    assert zipfile.is_zipfile(path)
    assert path.stat().st_size < 200_000
    state = load(path)
    assert (state["epoch"], state["global_step"], state["metrics"]) == (5, 500, {"acc": 0.9})
    model = state["model_state_dict"]
    assert model["encoder.weight"].numel() == 4096
    assert model["encoder.weight"].dtype == torch.float32
    assert model["num_batches_tracked"].dtype == torch.int64
    assert all(torch.isfinite(t).all() for t in model.values())
    assert set(state["optimizer_state_dict"]) == {"state", "param_groups"}
    assert load(ck.torch_zip(tmp_path / "d.pt"))["metrics"] == {"val_loss": 0.5}


def test_torch_zip_nan_puts_nan_and_inf_in_weights(tmp_path: Path) -> None:
    """torch_zip(nan=True) stores one tensor with a NaN and another with an Inf."""
    model = load(ck.torch_zip(tmp_path / "nan.pt", nan=True, size_floats=64))["model_state_dict"]
    assert torch.isnan(model["encoder.weight"]).sum() == 1
    assert torch.isinf(model["head.weight"]).sum() == 1


def test_torch_legacy_is_not_a_zip_but_loads(tmp_path: Path) -> None:
    """torch_legacy writes the pre-zip format, which still loads with weights_only to the same values."""
    path = ck.torch_legacy(tmp_path / "legacy.pt", epoch=2)
    assert not zipfile.is_zipfile(path)
    state = load(path)
    reference = load(ck.torch_zip(tmp_path / "zip.pt", epoch=2))
    assert state["epoch"] == 2
    assert torch.equal(state["model_state_dict"]["encoder.weight"], reference["model_state_dict"]["encoder.weight"])


def test_safetensors_file_loads_with_format_metadata(tmp_path: Path) -> None:
    """safetensors_file writes a file the safetensors reader opens, with metadata format=pt."""
    path = ck.safetensors_file(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "position_ids" in set(f.keys())
    tensors = load_file(path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    nan = load_file(ck.safetensors_file(tmp_path / "nan.safetensors", nan=True))
    assert torch.isnan(nan["embed.weight"]).any()
    assert torch.isinf(nan["head.weight"]).any()


def test_safetensors_sharded_index_matches_shards(tmp_path: Path) -> None:
    """safetensors_sharded writes N shards whose tensors and byte total match the index."""
    index_path = ck.safetensors_sharded(tmp_path / "hf", shards=3)
    index = json.loads(index_path.read_text())
    shards = sorted(p.name for p in index_path.parent.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    total = 0
    for name, shard in index["weight_map"].items():
        tensor = load_file(index_path.parent / shard)[name]
        total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"].values()) == set(shards)


def test_dcp_checkpoint_round_trips(tmp_path: Path) -> None:
    """dcp_checkpoint writes .metadata plus one .distcp file that dcp.load reads back, step included."""
    import torch.distributed.checkpoint as dcp

    folder = ck.dcp_checkpoint(tmp_path / "dcp", step=11)
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp"]
    state = ck.dcp_template()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=folder)
    assert (state["step"], state["epoch"]) == (11, 2)
    assert state["model"]["encoder.weight"].abs().sum() > 0


def test_lightning_run_writes_one_checkpoint_per_epoch_and_last(tmp_path: Path) -> None:
    """lightning_run trains for real and leaves epoch=..-step=..-val_loss=.. checkpoints plus last.ckpt."""
    paths = ck.lightning_run(tmp_path / "run", max_epochs=2)
    names = [p.name for p in paths]
    assert names[-1] == "last.ckpt"
    assert [n.split("-val_loss=")[0] for n in names[:-1]] == ["epoch=0-step=4", "epoch=1-step=8"]
    state = load(paths[-1])
    assert (state["epoch"], state["global_step"]) == (1, 8)
    val_loss = float(names[1].removesuffix(".ckpt").split("val_loss=")[1])
    assert math.isfinite(val_loss)
    assert not torch.are_deterministic_algorithms_enabled()


def test_lightning_top_k_keeps_only_best(tmp_path: Path) -> None:
    """lightning_run(save_top_k=1, save_last=False) leaves exactly one checkpoint, the best one."""
    paths = ck.lightning_run(tmp_path / "run", max_epochs=2, save_top_k=1, save_last=False)
    assert len(paths) == 1
    assert paths[0].name.startswith("epoch=1-step=8-val_loss=")


def test_lightning_train_script_runs_as_subprocess(tmp_path: Path) -> None:
    """tests/lightning_train.py trains in its own process and prints the checkpoint paths it left."""
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(TESTS / "lightning_train.py"),
            "--dir",
            str(run),
            "--epochs",
            "2",
            "--save-top-k",
            "-1",
            "--epoch-sleep",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in printed][-1] == "last.ckpt"
    assert len(printed) == 3
    assert all(p.exists() for p in printed)
    first, second = (p.stat().st_mtime for p in printed[:2])
    assert second - first >= 0.1  # --epoch-sleep separates the epochs' checkpoints


def test_hostile_pickle_calls_system_and_is_never_run(tmp_path: Path) -> None:
    """hostile_pickle's data.pkl references os.system with the touch command; without loading, no marker."""
    marker = tmp_path / "pwned"
    path = ck.hostile_pickle(tmp_path / "evil.pt", marker)
    with zipfile.ZipFile(path) as archive:
        pickle_bytes = archive.read("evil/data.pkl")
    strings = [arg for _, arg, _ in pickletools.genops(pickle_bytes) if isinstance(arg, str)]
    assert {"posix system", "nt system", "os system"} & set(strings)  # torch pickles with protocol 2: GLOBAL
    assert f"touch {marker}" in strings
    assert not marker.exists()


def test_numpy_scalar_checkpoint_needs_numpy_globals(tmp_path: Path) -> None:
    """numpy_scalar_checkpoint refuses weights_only loading until the numpy scalar globals are allowed."""
    path = ck.numpy_scalar_checkpoint(tmp_path / "np.pt")
    with pytest.raises(Exception, match="numpy"):
        load(path)
    with torch.serialization.safe_globals(ck.NUMPY_SCALAR_SAFE_GLOBALS):
        state = load(path)
    assert state["epoch"] == 1
    assert float(state["best"]) == 0.25


def test_flip_tensor_byte_is_silent_for_torch_but_breaks_crc(tmp_path: Path) -> None:
    """flip_tensor_byte changes one weight: torch.load still succeeds, the zip CRC check names the record."""
    path = ck.torch_zip(tmp_path / "ckpt.pt")
    before, weights = sha256(path), load(path)["model_state_dict"]["encoder.weight"]
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    offset = ck.flip_tensor_byte(path)
    assert sha256(path) != before
    assert 0 < offset < path.stat().st_size
    after = load(path)["model_state_dict"]["encoder.weight"]
    assert (after != weights).sum() == 1
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip().startswith("ckpt/data/")


def test_flip_pickle_byte_breaks_the_pickle_record(tmp_path: Path) -> None:
    """flip_pickle_byte changes a byte inside data.pkl, so that record's CRC no longer matches."""
    path = ck.torch_zip(tmp_path / "ckpt.pt")
    start, length = ck.zip_record_span(path, "ckpt/data.pkl")
    before = sha256(path)
    offset = ck.flip_pickle_byte(path)
    assert start <= offset < start + length
    assert sha256(path) != before
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() == "ckpt/data.pkl"


def test_truncate_and_zero_bytes_shrink_the_file(tmp_path: Path) -> None:
    """truncate keeps the given fraction and breaks loading; zero_bytes empties the file."""
    path = ck.torch_zip(tmp_path / "ckpt.pt")
    size = path.stat().st_size
    assert ck.truncate(path, 0.5) == size // 2 == path.stat().st_size
    with pytest.raises((RuntimeError, OSError)):  # torch 2.13 raises OSError(EINVAL) here
        load(path)
    assert ck.zero_bytes(path) == 0
    assert path.stat().st_size == 0


def test_break_central_directory_makes_zip_unreadable(tmp_path: Path) -> None:
    """break_central_directory overwrites the EOCD record so neither zipfile nor torch.load can open it."""
    path = ck.torch_zip(tmp_path / "ckpt.pt")
    before = sha256(path)
    offset = ck.break_central_directory(path)
    assert path.read_bytes()[offset : offset + 4] == b"\x00" * 4
    assert sha256(path) != before
    assert not zipfile.is_zipfile(path)
    with pytest.raises((RuntimeError, OSError)):
        load(path)


def test_corrupt_safetensors_header_leaves_uncovered_bytes(tmp_path: Path) -> None:
    """corrupt_safetensors_header keeps valid JSON of the same length, but offsets end short of the file."""
    path = ck.safetensors_file(tmp_path / "model.safetensors")
    size, before = path.stat().st_size, sha256(path)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    end = ck.corrupt_safetensors_header(path)
    assert path.stat().st_size == size
    assert sha256(path) != before
    assert int.from_bytes(path.read_bytes()[:8], "little") == header_length
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    covered = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert end == 8 + header_length + covered < size
    with pytest.raises(SafetensorError):
        load_file(path)


def test_flip_safetensors_data_byte_still_loads(tmp_path: Path) -> None:
    """flip_safetensors_data_byte changes exactly one stored value; safetensors has no checksum to notice."""
    path = ck.safetensors_file(tmp_path / "model.safetensors")
    before = {name: t.clone() for name, t in load_file(path).items()}  # load_file aliases the file's mmap
    offset = ck.flip_safetensors_data_byte(path)
    assert offset > 8
    after = load_file(path)
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    assert changed == 1


def test_delete_shard_removes_a_shard_named_in_the_index(tmp_path: Path) -> None:
    """delete_shard removes one shard file that the index still names."""
    index_path = ck.safetensors_sharded(tmp_path / "hf", shards=2)
    removed = ck.delete_shard(index_path.parent)
    assert not removed.exists()
    assert removed.name in json.loads(index_path.read_text())["weight_map"].values()
    assert len(list(index_path.parent.glob("*.safetensors"))) == 1


def test_truncate_and_delete_distcp_break_dcp_load(tmp_path: Path) -> None:
    """truncate_distcp and delete_distcp damage the data file so dcp.load fails."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    for corrupt in (ck.truncate_distcp, ck.delete_distcp):
        folder = ck.dcp_checkpoint(tmp_path / corrupt.__name__)
        size = (folder / "__0_0.distcp").stat().st_size
        target = corrupt(folder)
        assert target.name == "__0_0.distcp"
        assert not target.exists() or target.stat().st_size == size // 2
        with warnings.catch_warnings(), pytest.raises(CheckpointException):  # a BaseException, not Exception
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(ck.dcp_template(), checkpoint_id=folder)
