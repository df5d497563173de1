"""`ckptd list --json` of a whole tree streams: each checkpoint is printed as it is read, never all held."""

from __future__ import annotations

import json
from pathlib import Path

import checkpoints
import click
import pytest
from cli_fixtures import Ckptd

from ckptd import sidecar
from ckptd.scan import sidecar_bytes
from ckptd.verify import verify


def _tree(root: Path, runs: int, per_run: int) -> list[Path]:
    seed = checkpoints.torch_zip(root / "seed" / "seed.pt", size_floats=64)
    record = verify(seed)
    made = []
    for r in range(runs):
        for i in range(per_run):
            path = root / "runs" / f"run{r}" / f"epoch_{i}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(seed.read_bytes())
            found = path.stat()
            mine = record.__class__(**{**record.__dict__, "path": str(path), "mtime_ns": found.st_mtime_ns,
                                       "mtime": found.st_mtime_ns / 1e9, "inode": found.st_ino})  # fmt: skip
            sidecar.write(path, sidecar_bytes(mine, {}, 0.0))
            made.append(path)
    return made


def test_list_json_of_a_tree_prints_each_row_as_it_reads_it(
    tmp_path: Path, ckptd: Ckptd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first row reaches stdout after one sidecar is parsed, not after all of them: memory stays flat at a
    million checkpoints (benchmarks/scale.py measures it). The output is still one strict JSON array."""
    made = _tree(tmp_path, runs=3, per_run=4)
    parsed: list[int] = []
    real_parse, real_echo = sidecar.parse, click.echo
    first_echo_after: list[int] = []

    def counting_parse(data: bytes) -> sidecar.Sidecar:
        parsed.append(1)
        return real_parse(data)

    def noting_echo(*args: object, **kwargs: object) -> None:
        if not first_echo_after:
            first_echo_after.append(len(parsed))
        real_echo(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sidecar, "parse", counting_parse)
    monkeypatch.setattr("ckptd.cli.click.echo", noting_echo)
    done = ckptd("list", tmp_path / "runs", "--json")
    assert done.code == 0, done.err
    rows = json.loads(done.out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in made)
    assert all(r["current"] and r["status"] == "ok" for r in rows)
    assert first_echo_after == [1] and len(parsed) == len(made)


def test_list_json_of_an_empty_tree_is_an_empty_array(tmp_path: Path, ckptd: Ckptd) -> None:
    (tmp_path / "runs").mkdir()
    done = ckptd("list", tmp_path / "runs", "--json")
    assert (done.code, json.loads(done.out)) == (0, [])
