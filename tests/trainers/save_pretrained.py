"""Write a tiny GPT2 with PreTrainedModel.save_pretrained (optionally sharded), or load one back; print one JSON line.

Save:  python tests/trainers/save_pretrained.py --out DIR [--max-shard-size 40KB] [--bin]
Load:  python tests/trainers/save_pretrained.py --load DIR

--bin writes pytorch_model.bin, or pytorch_model-0000k-of-0000n.bin shards plus pytorch_model.bin.index.json.
transformers<5 writes these itself (safe_serialization=False). transformers>=5 can only write safetensors, so the
script writes the 4.x layout itself: it converts each safetensors shard to a torch.save'd .bin with the same
tensors, writes the index last, and removes the safetensors files. from_pretrained in v5 still loads that layout.
The JSON line has "bin_written_by": "transformers" or "script", so a test can tell which one happened.

The "checksum" is a SHA-256 over the sorted (name, dtype, shape, bytes) of the model's state_dict. It is the
same for the saved model and for the model loaded back from the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 64
MAJOR = int(transformers.__version__.split(".")[0])


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """The tiny GPT2 of the brief, initialised from a fixed seed."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def safetensors_to_bin(out: Path) -> None:
    """Turn a safetensors save_pretrained folder into the transformers 4.x pytorch_model*.bin layout."""
    index = out / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        rename = {}
        for shard in sorted(set(meta["weight_map"].values())):
            new = shard.replace("model-", "pytorch_model-", 1).replace(".safetensors", ".bin")
            torch.save(load_file(str(out / shard)), out / new)
            rename[shard] = new
        bin_index = {
            "metadata": {"total_size": meta["metadata"]["total_size"]},
            "weight_map": {k: rename[v] for k, v in meta["weight_map"].items()},
        }
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(bin_index, indent=2, sort_keys=True) + "\n")
        for shard in rename:
            (out / shard).unlink()
        index.unlink()
    else:
        torch.save(load_file(str(out / "model.safetensors")), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()


def save(a: argparse.Namespace) -> dict[str, Any]:
    model = tiny_gpt2(a.seed)
    kwargs: dict[str, Any] = {}
    if a.max_shard_size:
        kwargs["max_shard_size"] = a.max_shard_size
    written_by = None
    if a.bin and MAJOR < 5:
        kwargs["safe_serialization"] = False
        written_by = "transformers"
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(a.out), **kwargs)
    if a.bin and MAJOR >= 5:
        safetensors_to_bin(a.out)
        written_by = "script"
    return {
        "mode": "save",
        "dir": str(a.out),
        "files": sorted(p.name for p in a.out.iterdir()),
        "bin_written_by": written_by,
        "checksum": checksum(model),
    }


def load(a: argparse.Namespace) -> dict[str, Any]:
    model = GPT2LMHeadModel.from_pretrained(str(a.load))
    return {
        "mode": "load",
        "dir": str(a.load),
        "files": sorted(p.name for p in a.load.iterdir()),
        "checksum": checksum(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="folder to save_pretrained into")
    mode.add_argument("--load", type=Path, help="folder to from_pretrained and checksum")
    p.add_argument("--max-shard-size", default=None, help='e.g. "40KB" gives 4 shards (default: one file)')
    p.add_argument("--bin", action="store_true", help="pytorch_model*.bin instead of safetensors (see above)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    report = save(a) if a.out else load(a)
    report.update({"transformers": transformers.__version__, "torch": torch.__version__})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
