"""Sidecars: render/parse round trip, the JSON Schema against real scans, atomic writes and staleness."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import checkpoints
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd import sidecar
from ckptd.fsutil import TEMP_MARK
from ckptd.model import STATUSES, Format, TensorStats, Verification
from ckptd.verify import verify

CKPTD = Path(sys.executable).parent / "ckptd"
SCHEMA: dict[str, Any] = json.loads(
    resources.files("ckptd").joinpath("schemas/sidecar.schema.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
SIDECAR_ONLY_FIELDS = {"schema_version", "verified_at", "host", "ckptd_version", "engine", "pinned"}
WHEN = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def _strict_json(data: bytes | str) -> Any:
    """json.loads that refuses NaN and Infinity, as every non-Python JSON parser does."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(data, parse_constant=refuse)


def _render(v: Verification, **extra: Any) -> bytes:
    """Render a sidecar with fixed provenance fields."""
    fields: dict[str, Any] = {
        "verified_at": WHEN,
        "host": "node-1",
        "ckptd_version": "0.1.0",
        "engine": {"torch": "2.13.0"},
    }
    return sidecar.render(v, **(fields | extra))


def _write_verified(checkpoint: Path) -> Verification:
    """Verify a real checkpoint with the real engine and write its sidecar; return the record."""
    found = verify(checkpoint)
    sidecar.write(checkpoint, _render(found))
    return found


# ------------------------------------------------------------------------------------------------ hypothesis

_text = st.text(max_size=40)
_hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_count = st.integers(min_value=0, max_value=2**62)
_paths = st.lists(st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)


@st.composite
def verifications(draw: st.DrawFn) -> Verification:
    """Arbitrary verification records: every status, formats, None/int epochs, unicode paths, files or None."""
    return Verification(
        path=draw(_paths),
        status=draw(st.sampled_from(STATUSES)),
        format=draw(st.sampled_from([*get_args(Format), None])),
        size_bytes=draw(_count),
        sha256=draw(st.none() | _hex64),
        mtime=draw(st.floats(min_value=0, max_value=4e9, allow_nan=False)),
        inode=draw(_count),
        mtime_ns=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        problems=draw(st.lists(_text, max_size=3)),
        warnings=draw(st.lists(_text, max_size=3)),
        unsafe_globals=draw(st.lists(_text, max_size=3)),
        epoch=draw(st.none() | st.integers(min_value=-(2**40), max_value=2**40)),
        global_step=draw(st.none() | st.integers(min_value=0, max_value=2**62)),
        metrics=draw(st.dictionaries(_text, _finite, max_size=4)),
        producer=draw(st.none() | st.sampled_from(["torch", "lightning", "huggingface", "dcp"]) | _text),
        keys=draw(st.lists(_text, max_size=5)),
        tensors=TensorStats(
            count=draw(_count),
            parameters=draw(_count),
            bytes=draw(_count),
            dtypes=draw(st.dictionaries(_text, _count, max_size=3)),
            nonfinite=draw(_count),
        ),
        files=draw(st.none() | st.dictionaries(st.text(min_size=1, max_size=20), _hex64, max_size=4)),
        seconds=draw(st.floats(min_value=0, max_value=1e6, allow_nan=False)),
    )


@settings(max_examples=150, deadline=None)
@given(
    v=verifications(),
    when=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
    host=_text,
    engine=st.dictionaries(_text, _text, max_size=3),
    pinned=st.booleans(),
)
def test_render_then_parse_gives_back_the_record(
    v: Verification, when: datetime, host: str, engine: dict[str, str], pinned: bool
) -> None:
    """parse(render(v)) returns an equal Verification and the provenance fields, and the bytes fit the schema."""
    data = sidecar.render(v, verified_at=when, host=host, ckptd_version="9.9.9", engine=engine, pinned=pinned)
    parsed = sidecar.parse(data)
    assert parsed.verification == v
    assert parsed.verified_at == when.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (parsed.host, parsed.ckptd_version, parsed.engine, parsed.pinned) == (host, "9.9.9", engine, pinned)
    assert data.endswith(b"\n")
    VALIDATOR.validate(_strict_json(data))


def test_nonfinite_metrics_render_as_strict_json_and_parse_back() -> None:
    """NaN and +/-Infinity metrics are stored as the strings "NaN"/"Infinity"/"-Infinity" and parsed back."""
    v = Verification(
        path="/r/diverged.pt", status="ok", format="torch_zip", size_bytes=1, sha256=None, mtime=1.0, inode=1,
        metrics={"val_loss": math.nan, "grad_norm": math.inf, "low": -math.inf, "acc": 0.5},
    )  # fmt: skip
    body = _strict_json(_render(v))
    assert body["metrics"] == {"val_loss": "NaN", "grad_norm": "Infinity", "low": "-Infinity", "acc": 0.5}
    VALIDATOR.validate(body)
    metrics = sidecar.parse(_render(v)).verification.metrics
    assert math.isnan(metrics["val_loss"])
    assert (metrics["grad_norm"], metrics["low"], metrics["acc"]) == (math.inf, -math.inf, 0.5)


# ---------------------------------------------------------------------------------------------------- schema


def test_schema_is_valid_draft_2020_12() -> None:
    """The shipped schema is itself a valid draft 2020-12 schema, loadable as package data."""
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_requires_exactly_the_fields_render_writes() -> None:
    """The schema's required keys are every Verification field plus the sidecar's own, nothing else."""
    verification_fields = {f.name for f in dataclasses.fields(Verification)}
    assert set(SCHEMA["required"]) == verification_fields | SIDECAR_ONLY_FIELDS
    assert set(SCHEMA["properties"]) == set(SCHEMA["required"])
    tensors = SCHEMA["properties"]["tensors"]
    assert set(tensors["required"]) == {f.name for f in dataclasses.fields(TensorStats)}
    assert SCHEMA["properties"]["format"]["enum"] == [*get_args(Format), None]
    assert SCHEMA["properties"]["status"]["enum"] == list(STATUSES)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"surprise": 1}, "unknown top-level key"),
        ({"schema_version": 2}, "other schema version"),
        ({"status": "fine"}, "unknown status"),
        ({"format": "onnx"}, "unknown format"),
        ({"pinned": "no"}, "pinned not a bool"),
        ({"verified_at": "yesterday"}, "verified_at not a date-time"),
        ({"tensors": {"count": 1}}, "tensors missing fields"),
        ({"files": ["a"]}, "files neither a map nor null"),
        ({"metrics": {"val_loss": "low"}}, "a metric neither a number nor a non-finite marker"),
    ],
)
def test_schema_rejects_drift(change: dict[str, Any], why: str) -> None:
    """A sidecar with an unknown key or a wrongly typed field fails validation."""
    body = json.loads(_render(Verification(path="/r/a.pt", status="ok", format=None, size_bytes=0, sha256=None,
                                           mtime=0.0, inode=0)))  # fmt: skip
    VALIDATOR.validate(body)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(body | change)


def test_the_documented_example_validates_and_documents_every_field() -> None:
    """docs/sidecar.md's full example is a valid sidecar, and its field table names every schema key."""
    doc = (Path(__file__).parent.parent / "docs" / "sidecar.md").read_text(encoding="utf-8")
    example = doc.split("## Full example", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    body = _strict_json(example)
    VALIDATOR.validate(body)
    assert sidecar.parse(example.encode()).verification.global_step == body["global_step"]
    for key in SCHEMA["properties"]:
        assert f"| `{key}` |" in doc, key
    for key in SCHEMA["properties"]["tensors"]["properties"]:
        assert f"| `tensors.{key}` |" in doc, key


def test_every_sidecar_of_a_real_scan_validates(tmp_path: Path) -> None:
    """`ckptd scan` over real checkpoints of every format and status writes only schema-valid sidecars."""
    run = tmp_path / "runs" / "exp1"
    checkpoints.torch_zip(run / "epoch=1-step=100.pt", epoch=1, global_step=100)
    checkpoints.torch_zip(run / "diverged.pt", metrics={"val_loss": math.nan}, nan=True)
    checkpoints.torch_legacy(run / "legacy.pth")
    checkpoints.safetensors_file(run / "model.safetensors")
    checkpoints.safetensors_sharded(run / "hf")
    checkpoints.dcp_checkpoint(run / "dcp")
    checkpoints.hostile_pickle(run / "evil.pt", tmp_path / "pwned")
    checkpoints.truncate(checkpoints.torch_zip(run / "truncated.pt"))
    (run / "orbax").mkdir()
    (run / "orbax" / "commit_success.txt").write_text("ok\n")
    (run / "ünïcode ckpt.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n\n[[watch]]\nname = "runs"\npath = "runs"\n')

    done = subprocess.run([CKPTD, "scan", tmp_path / "runs", "--config", config, "--json"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 1, done.stderr  # some checkpoints are corrupt or unsafe, on purpose

    found = sorted(run.glob("*" + sidecar.SIDECAR_SUFFIX))
    assert len(found) == 10
    formats, statuses = set(), set()
    for path in found:
        body = _strict_json(path.read_bytes())
        VALIDATOR.validate(body)
        assert Path(body["path"]) == sidecar.checkpoint_of(path)
        formats.add(body["format"])
        statuses.add(body["status"])
    assert formats == set(get_args(Format))
    assert statuses == set(STATUSES)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------- files on disk


def test_sidecar_lives_beside_the_checkpoint_and_beside_a_directory_checkpoint(tmp_path: Path) -> None:
    """A file's sidecar is `<file>.ckptd.json` beside it; a directory checkpoint's is beside the folder."""
    assert sidecar.sidecar_path(tmp_path / "a.pt") == tmp_path / "a.pt.ckptd.json"
    assert sidecar.sidecar_path(tmp_path / "dcp") == tmp_path / "dcp.ckptd.json"
    assert sidecar.checkpoint_of(tmp_path / "dcp.ckptd.json") == tmp_path / "dcp"
    folder = checkpoints.dcp_checkpoint(tmp_path / "dcp")
    sidecar.write(folder, _render(Verification(path=str(folder), status="ok", format="dcp", size_bytes=1,
                                               sha256=None, mtime=0.0, inode=0, files={})))  # fmt: skip
    assert (tmp_path / "dcp.ckptd.json").is_file()
    assert not any(p.name.endswith(sidecar.SIDECAR_SUFFIX) for p in folder.iterdir())


def test_atomic_write_replaces_the_sidecar_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """write() replaces an existing sidecar with the new bytes and leaves no temp file behind."""
    checkpoint = checkpoints.safetensors_file(tmp_path / "m.safetensors")
    first = sidecar.write(checkpoint, b'{"old": true}\n')
    v = verify(checkpoint)
    second = sidecar.write(checkpoint, _render(v))
    assert first == second == tmp_path / "m.safetensors.ckptd.json"
    assert second.read_bytes() == _render(v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.ckptd.json"]
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


def test_write_into_a_folder_that_is_a_file_raises_and_creates_nothing(tmp_path: Path) -> None:
    """A sidecar whose folder is really a file cannot be written: OSError, and nothing appears."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    with pytest.raises(OSError):
        sidecar.write(blocker / "a.pt", b"{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]
    assert blocker.read_bytes() == b"x"


def test_a_write_that_fails_midway_keeps_the_old_sidecar(tmp_path: Path) -> None:
    """A write that fails after the temp file was created (file size limit hit) keeps the old sidecar intact."""
    checkpoint = tmp_path / "a.pt"
    checkpoint.write_bytes(b"x")
    old = sidecar.write(checkpoint, b'{"old": true}\n').read_bytes()
    # A real failed write: RLIMIT_FSIZE makes write(2) fail with EFBIG, even for root. In a child process,
    # so that the limit cannot touch pytest's own files.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from ckptd import sidecar
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        try:
            sidecar.write(Path({str(checkpoint)!r}), b"{{}}" + b" " * 4096)
        except OSError as exc:
            sys.exit(f"failed: {{exc.strerror}}")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "failed: File too large" in done.stderr, done.stderr
    assert sidecar.sidecar_path(checkpoint).read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.pt.ckptd.json"]


def test_find_marks_a_rewritten_checkpoint_not_current(tmp_path: Path) -> None:
    """find() reports a sidecar current until its checkpoint's size or mtime changes."""
    checkpoint = checkpoints.torch_zip(tmp_path / "run" / "a.pt")
    _write_verified(checkpoint)
    assert [(s.checkpoint, current) for s, current in sidecar.find(tmp_path)] == [(checkpoint, True)]

    checkpoints.torch_zip(checkpoint, global_step=301)  # rewritten in place: same size, new bytes
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert [(s.checkpoint, current) for s, current in sidecar.find(tmp_path)] == [(checkpoint, False)]


def test_find_marks_a_changed_directory_checkpoint_not_current(tmp_path: Path) -> None:
    """A directory checkpoint's sidecar stops being current when a file inside it changes."""
    folder = tmp_path / "hf"
    checkpoints.safetensors_sharded(folder)
    _write_verified(folder)
    assert [c for _s, c in sidecar.find(tmp_path)] == [True]
    with open(folder / "model-00001-of-00003.safetensors", "ab") as shard:
        shard.write(b"\0")
    assert [c for _s, c in sidecar.find(tmp_path)] == [False]


def test_find_skips_gone_checkpoints_hidden_folders_and_garbage(tmp_path: Path) -> None:
    """find() leaves out sidecars without a checkpoint, in hidden folders, or that do not parse."""
    kept = checkpoints.safetensors_file(tmp_path / "kept.safetensors")
    _write_verified(kept)
    gone = checkpoints.safetensors_file(tmp_path / "gone.safetensors")
    _write_verified(gone)
    gone.unlink()
    hidden = checkpoints.safetensors_file(tmp_path / ".state" / "h.safetensors")
    _write_verified(hidden)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"x")
    sidecar.sidecar_path(garbage).write_text("{not json")
    future = tmp_path / "future.pt"
    future.write_bytes(b"x")
    sidecar.sidecar_path(future).write_text('{"schema_version": 2}')
    assert [(s.checkpoint, c) for s, c in sidecar.find(tmp_path)] == [(kept, True)]


def test_read_names_the_checkpoint_by_the_sidecars_location(tmp_path: Path) -> None:
    """After a run folder moves, read() reports the checkpoint's new path, and it is still current."""
    checkpoint = checkpoints.safetensors_file(tmp_path / "old" / "m.safetensors")
    _write_verified(checkpoint)
    (tmp_path / "old").rename(tmp_path / "new")
    found = sidecar.read(tmp_path / "new" / "m.safetensors")
    assert found is not None and found.verification.path == str(tmp_path / "new" / "m.safetensors")
    assert [c for _s, c in sidecar.find(tmp_path / "new")] == [True]


def test_a_name_too_long_for_the_suffix_gets_a_shortened_sidecar_found_again(tmp_path: Path) -> None:
    """A 255-byte checkpoint name gets `<start>~<hash>.ckptd.json` (within NAME_MAX): written, found, read, and not
    taken for an orphan; once the checkpoint is gone, the scan's orphan sweep removes it."""
    from ckptd import discover

    long_name = "e" * 240 + "-step=12.pt"[: 255 - 240]
    checkpoint = checkpoints.torch_zip(tmp_path / long_name, size_floats=64)
    side = sidecar.write(checkpoint, _render(verify(checkpoint)))
    assert len(os.fsencode(side.name)) == 255 and side.name.endswith(sidecar.SIDECAR_SUFFIX) and "~" in side.name
    assert sidecar.checkpoint_of(side) == checkpoint
    [(found, current)] = sidecar.find(tmp_path)
    assert found.checkpoint == checkpoint and current
    assert list(discover.orphan_sidecars(tmp_path)) == []
    checkpoint.unlink()
    assert list(discover.orphan_sidecars(tmp_path)) == [side]


def test_a_sidecar_behind_a_link_or_a_fifo_is_not_read(tmp_path: Path) -> None:
    """A sidecar path that is a symbolic link (to a file elsewhere) or a FIFO reads as missing, never followed or
    blocked on: anyone who can write the run folder can plant one."""
    checkpoint = checkpoints.torch_zip(tmp_path / "a.pt", size_floats=64)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(_render(verify(checkpoint)))
    sidecar.sidecar_path(checkpoint).symlink_to(elsewhere)
    assert sidecar.read(checkpoint) is None
    sidecar.sidecar_path(checkpoint).unlink()
    os.mkfifo(sidecar.sidecar_path(checkpoint))
    assert sidecar.read(checkpoint) is None
