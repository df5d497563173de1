"""Pieces the benchmark scripts share (they run as `python benchmarks/NAME.py`, so this imports as `common`)."""

from __future__ import annotations

import os

# Writes a torch checkpoint of `n_big` float32 tensors of `big_elements` plus `n_small` of `small_elements`, in a
# subprocess (argv: path n_big big_elements n_small small_elements), renamed into place when complete.
CREATE_CODE = """
import os, sys, torch
path, n_big, big_elements, n_small, small_elements = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
state = {}
for i in range(n_big):
    state[f"layers.{i}.weight"] = torch.randn(big_elements, dtype=torch.float32).view(-1, 4096)
for i in range(n_small):
    state[f"layers.{i}.bias"] = torch.randn(small_elements, dtype=torch.float32)
tmp = path + ".partial"
torch.save({"epoch": 7, "global_step": 12345, "state_dict": state}, tmp)
os.replace(tmp, path)
"""


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants, through /proc/<pid>/task/*/children."""
    seen: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        seen.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return seen
