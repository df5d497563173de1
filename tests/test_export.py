"""`ckptd export`: inference-only files from real training checkpoints (torch.save, a real Lightning run, tied weights).

Every export is loaded back with the reader a user would use (safetensors.torch.load_file, or
torch.load(weights_only=True)) and compared tensor by tensor with the source's weights. The command runs in
this process (`ckptd.cli.main`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import checkpoints
import pytest
import torch
from cli_fixtures import Ckptd
from safetensors import safe_open
from safetensors.torch import load_file

from ckptd import tables
from ckptd.export import ExportError, export, find_weights, untie
from ckptd.verify import verify

FORMATS = ["safetensors", "pt"]


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The epoch-0 checkpoint of a real one-epoch Lightning run (written by ModelCheckpoint)."""
    paths = checkpoints.lightning_run(tmp_path_factory.mktemp("lightning"), max_epochs=1, save_last=False)
    (path,) = paths
    return path


class Tied(torch.nn.Module):
    """An embedding whose weight the output head shares (tied weights, as in most language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight


def tied_checkpoint(path: Path) -> Path:
    """A training checkpoint of Tied: model_state_dict (two names, one storage), Adam state, epoch, step."""
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.Adam(model.parameters())
    loss = model.head(model.norm(model.embed(torch.arange(4)))).sum()
    loss.backward()
    optimizer.step()
    torch.save({"epoch": 2, "global_step": 40, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "metrics": {"val_loss": 1.25}}, path)  # fmt: skip
    return path


def sha(path: Path) -> str:
    """SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_export(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an exported file, read the way a user reads them."""
    if fmt == "safetensors":
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata())
        return load_file(str(path)), metadata
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"state_dict", "metadata"}
    return loaded["state_dict"], loaded["metadata"]


def assert_same_tensors(exported: dict[str, torch.Tensor], source: dict[str, Any]) -> None:
    """Same names, dtypes, shapes and values."""
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_only_the_weights_with_provenance_metadata(tmp_path: Path, ckptd: Ckptd, fmt: str) -> None:
    """A torch.save checkpoint exports model_state_dict only; metadata has source sha256, epoch, step, metrics."""
    source = checkpoints.torch_zip(tmp_path / "epoch=3-step=300.pt", metrics={"val_loss": 0.25, "acc": 0.875})
    out = tmp_path / "export" / f"model.{fmt}"
    done = ckptd("export", source, "--to", out, *(["--format", fmt] if fmt != "safetensors" else []))
    assert done.code == 0, done.err

    tensors, metadata = load_export(out, fmt)
    original = torch.load(source, weights_only=True)
    assert_same_tensors(tensors, original["model_state_dict"])
    assert metadata["ckptd_source_sha256"] == sha(source)
    assert (metadata["epoch"], metadata["step"]) == ("3", "300")
    assert json.loads(metadata["metrics"]) == {"val_loss": 0.25, "acc": 0.875}
    assert out.stat().st_size < source.stat().st_size  # the optimizer state is gone
    before, after = tables.human_bytes(source.stat().st_size), tables.human_bytes(out.stat().st_size)
    assert f"{before} -> {after}" in done.out
    assert f"5 tensors to {out}" in done.out
    result = verify(out)
    assert result.status == "ok" and result.sha256 == sha(out) and result.sha256 in done.out
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_of_a_real_lightning_checkpoint(tmp_path: Path, ckptd: Ckptd, lightning_ckpt: Path, fmt: str) -> None:
    """A Lightning .ckpt exports its state_dict (no optimizer or loop state) with Lightning's epoch and step."""
    out = tmp_path / f"lightning.{fmt}"
    done = ckptd("export", lightning_ckpt, "--to", out, "--format", fmt)
    assert done.code == 0, done.err
    tensors, metadata = load_export(out, fmt)
    original = torch.load(lightning_ckpt, weights_only=True)
    assert_same_tensors(tensors, original["state_dict"])
    assert sorted(tensors) == ["layer.bias", "layer.weight"]
    assert (metadata["epoch"], metadata["step"]) == (str(original["epoch"]), str(original["global_step"]))
    assert metadata["ckptd_source_sha256"] == sha(lightning_ckpt)
    assert "val_loss" in json.loads(metadata["metrics"])
    assert verify(out).status == "ok"


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_of_tied_weights_keeps_both_names(tmp_path: Path, ckptd: Ckptd, fmt: str) -> None:
    """Tied weights (two names, one storage) export to a file that loads with both names and the same values."""
    source = tied_checkpoint(tmp_path / "tied.pt")
    original = torch.load(source, weights_only=True)["model_state_dict"]
    shared = original["embed.weight"].untyped_storage().data_ptr()
    assert original["head.weight"].untyped_storage().data_ptr() == shared  # really tied in the source
    out = tmp_path / f"tied.{fmt}"
    done = ckptd("export", source, "--to", out, "--format", fmt)
    assert done.code == 0, done.err
    tensors, metadata = load_export(out, fmt)
    assert_same_tensors(tensors, original)
    assert torch.equal(tensors["embed.weight"], tensors["head.weight"])
    assert (metadata["epoch"], metadata["step"]) == ("2", "40")


def test_export_key_names_where_the_weights_are(tmp_path: Path, ckptd: Ckptd) -> None:
    """--key picks the weights under another key (an EMA copy); an unknown key fails naming the keys there are."""
    gen = torch.Generator().manual_seed(1)
    ema = {"encoder": {"weight": torch.randn(8, 4, generator=gen), "bias": torch.randn(8, generator=gen)}}
    raw = {"w": torch.randn(8, 4, generator=gen)}
    source = tmp_path / "ema.pt"
    torch.save({"epoch": 1, "ema_state": ema, "model_state_dict": raw, "optimizer_state_dict": {}}, source)

    done = ckptd("export", source, "--to", tmp_path / "ema.safetensors", "--key", "ema_state")
    assert done.code == 0, done.err
    tensors = load_file(str(tmp_path / "ema.safetensors"))
    assert_same_tensors(tensors, {"encoder.weight": ema["encoder"]["weight"], "encoder.bias": ema["encoder"]["bias"]})

    default = ckptd("export", source, "--to", tmp_path / "raw.safetensors")
    assert default.code == 0, default.err
    assert_same_tensors(load_file(str(tmp_path / "raw.safetensors")), raw)

    missing = ckptd("export", source, "--to", tmp_path / "none.safetensors", "--key", "nope")
    assert missing.code == 1
    assert "no key 'nope'" in missing.err and "ema_state" in missing.err
    assert not (tmp_path / "none.safetensors").exists()


def test_export_refuses_a_corrupt_checkpoint_and_writes_nothing(tmp_path: Path, ckptd: Ckptd) -> None:
    """A source with a flipped byte is not ok: export exits 1, says why, and leaves no file."""
    source = checkpoints.torch_zip(tmp_path / "bad.pt")
    checkpoints.flip_tensor_byte(source)
    out = tmp_path / "out" / "bad.safetensors"
    done = ckptd("export", source, "--to", out)
    assert done.code == 1
    assert "corrupt" in done.err
    assert not out.exists()


def test_export_of_a_checkpoint_without_weights_fails(tmp_path: Path, ckptd: Ckptd) -> None:
    """A checkpoint with only optimizer state has no weights to export: exit 1, the keys listed."""
    source = tmp_path / "optim.pt"
    torch.save({"epoch": 1, "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(3)}}}}, source)
    done = ckptd("export", source, "--to", tmp_path / "o.safetensors")
    assert done.code == 1
    assert "no weights found" in done.err and "optimizer_state_dict" in done.err


def test_export_of_a_safetensors_file_to_a_weights_only_pt(tmp_path: Path) -> None:
    """A safetensors checkpoint (a flat dict of tensors) exports to a .pt that torch.load(weights_only=True) reads."""
    source = checkpoints.safetensors_file(tmp_path / "model.safetensors")
    result = export(source, tmp_path / "model.pt", fmt="pt")
    tensors, metadata = load_export(tmp_path / "model.pt", "pt")
    assert_same_tensors(tensors, load_file(str(source)))
    assert metadata["ckptd_source_sha256"] == sha(source) and metadata["epoch"] == ""
    assert result.tensors == 5 and result.source_bytes == source.stat().st_size


def test_find_weights_and_untie_on_loaded_checkpoints(tmp_path: Path) -> None:
    """find_weights prefers model_state_dict, flattens nesting, refuses non-dicts; untie gives each its storage."""
    state = torch.load(checkpoints.torch_zip(tmp_path / "a.pt"), weights_only=True)
    assert sorted(find_weights(state)) == sorted(state["model_state_dict"])
    with pytest.raises(ExportError, match="not a dict"):
        find_weights([torch.ones(1)])
    base = torch.arange(12.0)
    view = base.view(3, 4).t()  # shares base's storage, not contiguous
    untied = untie({"base": base, "view": view, "same": base})
    pointers = {name: t.untyped_storage().data_ptr() for name, t in untied.items()}
    assert len(set(pointers.values())) == 3
    assert untied["base"] is base  # the first owner is not copied
    assert torch.equal(untied["view"], view) and untied["view"].is_contiguous()
