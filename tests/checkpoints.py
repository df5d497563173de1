"""Builders of real checkpoints on disk for the test suite, and the corruptions applied to them.

Every builder writes real files with the library that owns the format (torch.save, safetensors,
torch.distributed.checkpoint, a real Lightning Trainer) and returns what it wrote. Nothing here mocks
anything, and every file stays small (a few hundred KB at most) so the suite stays fast on 2 cores.

Heavy imports (lightning, torch.distributed.checkpoint) happen inside the builders that need them, so
importing this module costs only the torch import.
"""

import importlib
import json
import os
import shlex
import struct
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy
import torch
from safetensors.torch import save_file

# The globals torch.load(weights_only=True) must be allowed to load numpy_scalar_checkpoint().
NUMPY_SCALAR_SAFE_GLOBALS: list[Any] = [
    importlib.import_module("numpy._core.multiarray").scalar,
    numpy.dtype,
    numpy.dtypes.Float64DType,
]

# Lightning's ModelCheckpoint filename template used by lightning_run().
LIGHTNING_FILENAME = "{epoch}-{step}-{val_loss:.4f}"

_EOCD_SIGNATURE = b"PK\x05\x06"
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_LOCAL_HEADER_SIZE = 30


# --------------------------------------------------------------------------------------------------
# torch.save checkpoints
# --------------------------------------------------------------------------------------------------


def _generator() -> torch.Generator:
    """Return a CPU generator with a fixed seed, so builders never touch the global RNG."""
    return torch.Generator().manual_seed(0)


def _training_state(
    *, epoch: int, global_step: int, metrics: dict[str, float] | None, nan: bool, size_floats: int
) -> dict[str, Any]:
    """Return a dict shaped like a plain PyTorch training checkpoint.

    model_state_dict holds float32 tensors (one of size_floats elements) and one int64 tensor; with nan=True
    "encoder.weight" holds a NaN and "head.weight" an Inf.
    """
    gen = _generator()
    model: dict[str, torch.Tensor] = {
        "encoder.weight": torch.randn(size_floats, generator=gen),
        "encoder.bias": torch.randn(16, generator=gen),
        "head.weight": torch.randn(4, 16, generator=gen),
        "head.bias": torch.zeros(4),
        "num_batches_tracked": torch.tensor(global_step, dtype=torch.int64),
    }
    if nan:
        model["encoder.weight"][size_floats // 2] = float("nan")
        model["head.weight"][0, 0] = float("inf")
    float_names = [name for name, t in model.items() if t.is_floating_point()]
    optimizer = {
        "state": {
            i: {
                "step": torch.tensor(float(global_step)),
                "exp_avg": torch.zeros_like(model[name]),
                "exp_avg_sq": torch.zeros_like(model[name]),
            }
            for i, name in enumerate(float_names)
        },
        "param_groups": [
            {
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "params": list(range(len(float_names))),
            }
        ],
    }
    return {
        "epoch": epoch,
        "global_step": global_step,
        "model_state_dict": model,
        "optimizer_state_dict": optimizer,
        "metrics": dict(metrics) if metrics is not None else {"val_loss": 0.5},
    }


def _prepare(path: str | os.PathLike[str]) -> Path:
    """Return path as a Path after creating its parent folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def torch_zip(
    path: str | os.PathLike[str],
    *,
    epoch: int = 3,
    global_step: int = 300,
    metrics: dict[str, float] | None = None,
    nan: bool = False,
    size_floats: int = 4096,
) -> Path:
    """Write a training checkpoint with torch.save (zip format) at path; return the path.

    The object is {"epoch", "global_step", "model_state_dict", "optimizer_state_dict", "metrics"}; metrics
    defaults to {"val_loss": 0.5}. nan=True puts a NaN in "encoder.weight" and an Inf in "head.weight".
    The zip's records live under "<path stem>/" (torch names the archive after the file).
    """
    target = _prepare(path)
    state = _training_state(epoch=epoch, global_step=global_step, metrics=metrics, nan=nan, size_floats=size_floats)
    torch.save(state, target)
    return target


def torch_legacy(
    path: str | os.PathLike[str],
    *,
    epoch: int = 3,
    global_step: int = 300,
    metrics: dict[str, float] | None = None,
    nan: bool = False,
    size_floats: int = 4096,
) -> Path:
    """Write the same object as torch_zip() in the legacy (pre-1.6, non-zip) torch.save format; return it."""
    target = _prepare(path)
    state = _training_state(epoch=epoch, global_step=global_step, metrics=metrics, nan=nan, size_floats=size_floats)
    torch.save(state, target, _use_new_zipfile_serialization=False)
    return target


class HostilePayload:
    """Pickles to a call of os.system(f"touch {marker}"): loading it unsafely creates marker."""

    def __init__(self, marker: str | os.PathLike[str]) -> None:
        """Remember the marker file that an unsafe load would create."""
        self.marker = os.fspath(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Make the unpickler call os.system to touch the marker."""
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def hostile_pickle(path: str | os.PathLike[str], marker: str | os.PathLike[str]) -> Path:
    """Write a torch.save zip checkpoint whose pickle runs `touch marker` if loaded unsafely; return path.

    The payload sits inside an otherwise normal checkpoint dict under "callbacks". Tests must never load
    this file with weights_only=False; inspect it with zipfile/pickletools instead.
    """
    target = _prepare(path)
    state = {
        "epoch": 1,
        "model_state_dict": {"w": torch.ones(8)},
        "callbacks": HostilePayload(marker),
    }
    torch.save(state, target)
    return target


def numpy_scalar_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Write torch.save({"epoch": 1, "best": numpy.float64(0.25), "w": torch.ones(3)}) at path; return path.

    torch.load(weights_only=True) refuses it unless NUMPY_SCALAR_SAFE_GLOBALS are allowed
    (numpy._core.multiarray.scalar, numpy.dtype and numpy.dtypes.Float64DType).
    """
    target = _prepare(path)
    torch.save({"epoch": 1, "best": numpy.float64(0.25), "w": torch.ones(3)}, target)
    return target


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------


def _safetensors_tensors(*, nan: bool) -> dict[str, torch.Tensor]:
    """Return a small model's tensors (float32 and one int64); nan=True adds a NaN and an Inf."""
    gen = _generator()
    tensors = {
        "embed.weight": torch.randn(64, 32, generator=gen),
        "layer.0.weight": torch.randn(32, 32, generator=gen),
        "layer.0.bias": torch.randn(32, generator=gen),
        "head.weight": torch.randn(8, 32, generator=gen),
        "position_ids": torch.arange(64, dtype=torch.int64),
    }
    if nan:
        tensors["embed.weight"][3, 5] = float("nan")
        tensors["head.weight"][0, 0] = float("inf")
    return tensors


def safetensors_file(path: str | os.PathLike[str], *, nan: bool = False) -> Path:
    """Write a single-file safetensors checkpoint with metadata {"format": "pt"} at path; return path.

    nan=True puts a NaN in "embed.weight" and an Inf in "head.weight".
    """
    target = _prepare(path)
    save_file(_safetensors_tensors(nan=nan), os.fspath(target), metadata={"format": "pt"})
    return target


def safetensors_sharded(folder: str | os.PathLike[str], *, shards: int = 3) -> Path:
    """Write a Hugging Face style sharded safetensors checkpoint into folder; return the index path.

    Shard i (1-based) is "model-0000i-of-0000N.safetensors" and holds "layers.{i-1}.weight" and
    "layers.{i-1}.bias"; "model.safetensors.index.json" holds {"metadata": {"total_size": <sum of tensor
    bytes>}, "weight_map": {tensor name: shard file name}}, as transformers writes it.
    """
    if shards < 1:
        raise ValueError("shards must be at least 1")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    gen = _generator()
    weight_map: dict[str, str] = {}
    total_size = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.weight": torch.randn(32, 32, generator=gen),
            f"layers.{i}.bias": torch.randn(32, generator=gen),
        }
        save_file(tensors, os.fspath(root / name), metadata={"format": "pt"})
        for tensor_name, tensor in tensors.items():
            weight_map[tensor_name] = name
            total_size += tensor.numel() * tensor.element_size()
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
    return index


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Return (header length in bytes, parsed JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return length, header


# --------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint
# --------------------------------------------------------------------------------------------------


def dcp_checkpoint(folder: str | os.PathLike[str], *, step: int = 7) -> Path:
    """Save {"model": {...}, "step": step, "epoch": 2} with torch.distributed.checkpoint into folder.

    Runs in this one process, without a process group. Returns the folder, which then holds ".metadata"
    and "__0_0.distcp" (all tensors and the pickled non-tensor values of rank 0).
    """
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    gen = _generator()
    state = {
        "model": {
            "encoder.weight": torch.randn(64, 16, generator=gen),
            "encoder.bias": torch.randn(64, generator=gen),
            "head.weight": torch.randn(4, 64, generator=gen),
        },
        "step": step,
        "epoch": 2,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp_save(state, checkpoint_id=root)
    return root


def dcp_template(*, step: int = 0) -> dict[str, Any]:
    """Return a state dict shaped like dcp_checkpoint()'s, with zero tensors, to dcp.load() into."""
    return {
        "model": {
            "encoder.weight": torch.zeros(64, 16),
            "encoder.bias": torch.zeros(64),
            "head.weight": torch.zeros(4, 64),
        },
        "step": step,
        "epoch": 0,
    }


# --------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------


def lightning_run(
    folder: str | os.PathLike[str],
    *,
    max_epochs: int = 3,
    save_top_k: int = -1,
    monitor: str | None = "val_loss",
    save_last: bool | str = True,
    epoch_sleep: float = 0.0,
    filename: str | None = None,
) -> list[Path]:
    """Train a tiny real LightningModule on CPU, checkpointing into folder; return the sorted .ckpt paths.

    ModelCheckpoint(dirpath=folder, monitor, mode="min", save_top_k, save_last,
    filename=filename or LIGHTNING_FILENAME) writes names like "epoch=0-step=4-val_loss=0.4312.ckpt" (4 steps
    an epoch) plus "last.ckpt" (a link to the newest with save_last="link"). epoch_sleep > 0 sleeps that many
    seconds before every epoch after the first, so a watcher sees each epoch's checkpoint land on its own.
    Global RNG state and the deterministic algorithms flag are restored afterwards.
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class TinyRegressor(L.LightningModule):
        """One nn.Linear fitted with MSE; logs val_loss each validation epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SleepBetweenEpochs(Callback):
        """Sleep before every training epoch except the first."""

        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch > 0 and self.seconds > 0:
                time.sleep(self.seconds)

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
            # torch 2.13 deprecates LeafSpec, which lightning 2.6 still calls: not ours to fix.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            torch.manual_seed(0)
            gen = _generator()
            x = torch.randn(64, 8, generator=gen)
            y = x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(64, 1, generator=gen)
            train = DataLoader(TensorDataset(x, y), batch_size=16)
            val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32)
            checkpoint = ModelCheckpoint(
                dirpath=root,
                monitor=monitor,
                mode="min",
                save_top_k=save_top_k,
                save_last=save_last,  # type: ignore[arg-type]  # True, False or "link"
                filename=filename or LIGHTNING_FILENAME,
            )
            trainer = L.Trainer(
                default_root_dir=root,
                max_epochs=max_epochs,
                accelerator="cpu",
                devices=1,
                callbacks=[checkpoint, SleepBetweenEpochs(epoch_sleep)],
                enable_progress_bar=False,
                enable_model_summary=False,
                logger=False,
                deterministic=True,
                num_sanity_val_steps=0,
            )
            trainer.fit(TinyRegressor(), train_dataloaders=train, val_dataloaders=val)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
    return sorted(root.glob("*.ckpt"))


# --------------------------------------------------------------------------------------------------
# Corruptions (all in place)
# --------------------------------------------------------------------------------------------------


def zip_record_span(zip_path: str | os.PathLike[str], name: str) -> tuple[int, int]:
    """Return (absolute offset of the first data byte, data length) of a stored record of a zip file.

    The data starts after the record's local header: header_offset + 30 + file name length + extra length,
    the lengths read from the local header itself (torch pads records with an alignment extra field).
    """
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed; only stored records can be patched in place")
    with open(zip_path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER_SIZE)
    if header[:4] != _LOCAL_HEADER_SIGNATURE:
        raise ValueError(f"no local file header for {name} at {info.header_offset}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length, info.compress_size


def _xor_byte(path: str | os.PathLike[str], offset: int, mask: int) -> int:
    """XOR the byte at offset of path with mask, in place; return offset."""
    with open(path, "r+b") as f:
        f.seek(offset)
        (value,) = f.read(1)
        f.seek(offset)
        f.write(bytes([value ^ mask]))
    return offset


def _records(zip_path: str | os.PathLike[str], suffix: str) -> list[zipfile.ZipInfo]:
    """Return the zip records whose names match "<archive>/<suffix>" (suffix ending in "/" for a prefix)."""
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
    if suffix.endswith("/"):
        return [i for i in infos if i.filename.split("/", 1)[-1].startswith(suffix)]
    return [i for i in infos if i.filename.split("/", 1)[-1] == suffix]


def flip_tensor_byte(zip_checkpoint_path: str | os.PathLike[str]) -> int:
    """Flip one bit in the middle of the largest tensor storage record of a torch zip checkpoint.

    Returns the absolute file offset changed. torch.load does not check zip CRCs, so the file still loads
    (with one changed value); zipfile.ZipFile.testzip() reports the record.
    """
    storages = _records(zip_checkpoint_path, "data/")
    if not storages:
        raise ValueError(f"{zip_checkpoint_path} has no <archive>/data/<n> records")
    largest = max(storages, key=lambda i: i.file_size)
    start, length = zip_record_span(zip_checkpoint_path, largest.filename)
    return _xor_byte(zip_checkpoint_path, start + length // 2, 0x01)


def flip_pickle_byte(zip_checkpoint_path: str | os.PathLike[str]) -> int:
    """Invert (XOR 0xFF) the byte in the middle of the data.pkl record of a torch zip checkpoint.

    Returns the absolute file offset changed; the record's CRC no longer matches.
    """
    pickles = _records(zip_checkpoint_path, "data.pkl")
    if not pickles:
        raise ValueError(f"{zip_checkpoint_path} has no <archive>/data.pkl record")
    start, length = zip_record_span(zip_checkpoint_path, pickles[0].filename)
    return _xor_byte(zip_checkpoint_path, start + length // 2, 0xFF)


def truncate(path: str | os.PathLike[str], keep_fraction: float = 0.5) -> int:
    """Cut path down to int(size * keep_fraction) bytes, in place; return the new size."""
    if not 0 <= keep_fraction < 1:
        raise ValueError("keep_fraction must be in [0, 1)")
    keep = int(Path(path).stat().st_size * keep_fraction)
    os.truncate(path, keep)
    return keep


def zero_bytes(path: str | os.PathLike[str]) -> int:
    """Empty path (size 0) in place; return 0, the offset where the data now ends."""
    os.truncate(path, 0)
    return 0


def break_central_directory(zip_path: str | os.PathLike[str]) -> int:
    """Overwrite the zip's end-of-central-directory signature and the central directory's first bytes.

    Returns the offset of the end-of-central-directory record. Neither zipfile nor torch.load can open the
    file afterwards; the local records are intact.
    """
    data = Path(zip_path).read_bytes()
    eocd = data.rfind(_EOCD_SIGNATURE)
    if eocd < 0:
        raise ValueError(f"{zip_path} has no end-of-central-directory record")
    (central_directory,) = struct.unpack("<I", data[eocd + 16 : eocd + 20])
    with open(zip_path, "r+b") as f:
        if central_directory != 0xFFFFFFFF and central_directory < eocd:
            f.seek(central_directory)
            f.write(b"\x00" * 4)
        f.seek(eocd)
        f.write(b"\x00" * 4)
    return eocd


def corrupt_safetensors_header(path: str | os.PathLike[str]) -> int:
    """Shrink the last tensor (first dimension minus one) in the header so offsets stop short of the file.

    The header keeps its length (padded with spaces) and each tensor entry stays self-consistent (shape
    and dtype match data_offsets), but the data section is now longer than the offsets cover; the
    safetensors reader rejects the file. Returns the absolute file offset where the covered data now ends.
    """
    target = Path(path)
    length, header = _safetensors_header(target)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    last_name = max(tensors, key=lambda k: tensors[k]["data_offsets"][1])
    entry = tensors[last_name]
    begin: int = entry["data_offsets"][0]
    end: int = entry["data_offsets"][1]
    shape: list[int] = entry["shape"]
    if not shape or shape[0] < 2:
        raise ValueError(f"cannot shrink tensor {last_name} of shape {shape}")
    row_bytes = (end - begin) // shape[0]
    entry["shape"] = [shape[0] - 1, *shape[1:]]
    entry["data_offsets"] = [begin, end - row_bytes]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if len(encoded) > length:
        raise ValueError("rewritten header is longer than the original")
    with open(target, "r+b") as f:
        f.seek(8)
        f.write(encoded.ljust(length, b" "))
    return 8 + length + end - row_bytes


def flip_safetensors_data_byte(path: str | os.PathLike[str]) -> int:
    """Flip one bit in the middle of a safetensors file's data section; return the absolute offset.

    safetensors has no checksum, so the file still loads with one changed value.
    """
    target = Path(path)
    length, _ = _safetensors_header(target)
    data_start = 8 + length
    data_length = target.stat().st_size - data_start
    if data_length <= 0:
        raise ValueError(f"{path} has no tensor data")
    return _xor_byte(target, data_start + data_length // 2, 0x01)


def delete_shard(folder: str | os.PathLike[str]) -> Path:
    """Delete the last shard named in folder's model.safetensors.index.json; return the deleted path."""
    root = Path(folder)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    shard_names: set[str] = set(index["weight_map"].values())
    shard = root / sorted(shard_names)[-1]
    shard.unlink()
    return shard


def _distcp_file(folder: str | os.PathLike[str]) -> Path:
    """Return the first .distcp file (by name) of a torch.distributed.checkpoint folder."""
    files = sorted(Path(folder).glob("*.distcp"))
    if not files:
        raise ValueError(f"{folder} has no .distcp file")
    return files[0]


def truncate_distcp(folder: str | os.PathLike[str], keep_fraction: float = 0.5) -> Path:
    """Cut the first .distcp file of a DCP folder to keep_fraction of its size; return its path."""
    target = _distcp_file(folder)
    truncate(target, keep_fraction)
    return target


def delete_distcp(folder: str | os.PathLike[str]) -> Path:
    """Delete the first .distcp file of a DCP folder (".metadata" still names it); return its path."""
    target = _distcp_file(folder)
    target.unlink()
    return target


# --------------------------------------------------------------------------------------------------
# Hostile checkpoints: small files that cost a naive reader hours, gigabytes or a traceback
# --------------------------------------------------------------------------------------------------


def shared_nested_lists(path: str | os.PathLike[str], *, width: int = 16, depth: int = 8) -> Path:
    """Write a torch.save checkpoint of one list shared `width` times at each of `depth` levels; return path.

    The pickle memoizes the shared lists, so the file is about 2 KB, and it loads under weights_only; but a
    walk that follows every path visits width**depth (16**8 = 4 billion) leaves.
    """
    target = _prepare(path)
    nested: Any = [torch.ones(2)]
    for _ in range(depth):
        nested = [nested] * width
    torch.save({"epoch": 1, "model_state_dict": {"w": torch.ones(4)}, "history": nested}, target)
    return target


def _rezip(source: Path, target: Path, replace: dict[str, tuple[int, int]]) -> None:
    """Copy the zip at source to target, replacing records named in `replace` ({suffix: (bytes of zeros,
    compression)}) by that many zero bytes, deflated as they stream (never held in memory)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            match = next((r for r in replace if info.filename.endswith(r)), None)
            if match is None:
                new.writestr(info, old.read(info.filename))
                continue
            size, method = replace[match]
            fresh = zipfile.ZipInfo(info.filename, info.date_time)
            fresh.compress_type = method
            with new.open(fresh, "w", force_zip64=size >= 1 << 31) as out:
                piece = bytes(16 << 20)
                for at in range(0, size, len(piece)):
                    out.write(piece[: min(len(piece), size - at)])


def _deflated_record(path: str | os.PathLike[str], suffix: str, inflated: int) -> Path:
    """A small torch checkpoint whose record ending in `suffix` is replaced by `inflated` zero bytes, deflated."""
    target = _prepare(path)
    plain = target.with_name(target.name + ".plain")
    torch.save({"epoch": 1, "model_state_dict": {"w": torch.ones(4)}}, plain)
    _rezip(plain, target, {suffix: (inflated, zipfile.ZIP_DEFLATED)})
    plain.unlink()
    return target


def zip_bomb(path: str | os.PathLike[str], *, inflated: int = 256 << 20) -> Path:
    """Write a torch checkpoint whose tensor record holds `inflated` zero bytes deflated (about 1000:1)."""
    return _deflated_record(path, "/data/0", inflated)


def deflated_pickle(path: str | os.PathLike[str], *, inflated: int = 512 << 20) -> Path:
    """Write a torch checkpoint whose data.pkl record is `inflated` bytes deflated (zeros after the real pickle
    would not load, but nothing should inflate it whole to find out)."""
    return _deflated_record(path, "/data.pkl", inflated)


def deep_safetensors_header(path: str | os.PathLike[str], *, depth: int = 200_000) -> Path:
    """Write a safetensors file whose JSON header nests `depth` arrays in its __metadata__ (a RecursionError for
    a naive json.loads)."""
    target = _prepare(path)
    header = b'{"__metadata__": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    target.write_bytes(struct.pack("<Q", len(header)) + header)
    return target


def giant_metrics(path: str | os.PathLike[str], *, count: int = 1_000_000) -> Path:
    """Write a torch.save checkpoint with `count` entries in its metrics mapping."""
    target = _prepare(path)
    metrics = {f"metric_{i}": float(i) for i in range(count)}
    torch.save({"epoch": 1, "model_state_dict": {"w": torch.ones(4)}, "metrics": metrics}, target)
    return target
