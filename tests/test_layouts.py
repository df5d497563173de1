"""The trainer layouts' contract, run against real output of every trainer (tests/trainer_fixtures.py).

For each layout: one save is found as ONE checkpoint wherever its events come from, its run is the folder the
trainer writes into, a fresh save verifies ok with no --trust, a flipped byte in any member makes it corrupt
naming that member, a save the trainer has not finished is never taken, the trainer's own records give step,
epoch and metrics, and a hostile payload in a trainer's own pickle is unsafe and never runs.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import checkpoints as ck
import pytest
import torch
from trainer_fixtures import CopyOutput, Output

from ckptd import discover, layouts, sidecar
from ckptd.catalog import Catalog
from ckptd.layouts import nshtrainer
from ckptd.scan import reconcile
from ckptd.verify import verify

PATTERNS = ["*.pt", "*.pth", "*.ckpt", "*.bin", "*.safetensors"]


@dataclass(frozen=True)
class Sample:
    """What a trainer's output must look like to ckptd."""

    output: str  # the trainer_outputs name
    layout: str
    units: tuple[str, ...]  # the checkpoints, relative to the output folder ("." for the folder itself)
    run: str  # the run of every unit, relative to the output folder (".." for the folder holding it)
    steps: tuple[int | None, ...]
    sidecar_in_state: bool


SAMPLES = [
    Sample("hf", "hf_trainer", ("checkpoint-2", "checkpoint-4"), ".", (2, 4), False),
    Sample("hf_sharded", "hf_trainer", ("checkpoint-2",), ".", (2,), False),
    Sample("pretrained", "pretrained", (".",), "..", (None,), False),
    Sample("pretrained_bin", "pretrained", (".",), "..", (None,), False),
    Sample("accelerate", "accelerate", ("checkpoints/checkpoint_0", "checkpoints/checkpoint_1"), ".", (2, 4), True),
    Sample("dcp", "dcp", ("step-2", "step-4"), ".", (2, 4), True),
    Sample("deepspeed", "deepspeed", ("global_step2", "global_step4"), ".", (2, 4), False),
    Sample("lightning_sharded", "lightning_sharded", ("epoch=1-step=8-val_loss=0.3296.ckpt",), ".", (8,), False),
]  # fmt: skip


def _ids(sample: Sample) -> str:
    return sample.output


def _units(out: Output, sample: Sample) -> list[Path]:
    return [(out.root / unit).resolve() for unit in sample.units]


def _members(unit: Path) -> list[str]:
    return sorted(str(p.relative_to(unit)) for p in unit.rglob("*") if p.is_file())


@pytest.fixture(params=SAMPLES, ids=_ids)
def sample(request: pytest.FixtureRequest) -> Sample:
    """Each trainer layout in turn."""
    found: Sample = request.param
    return found


def test_one_save_is_found_as_one_checkpoint_of_its_run(trainer_outputs: dict[str, Output], sample: Sample) -> None:
    """Walking the output finds each save once, as a folder of the expected layout and run, and none of its
    files on its own (the shards, optimizer.pt, training_args.bin...)."""
    out = trainer_outputs[sample.output]
    run = (out.root / sample.run).resolve()
    found = {c.path.resolve(): c for c in discover.discover(out.root, PATTERNS)}
    assert sorted(found) == _units(out, sample)
    for unit in _units(out, sample):
        assert (found[unit].kind, found[unit].run.resolve()) == ("directory", run)
        assert layouts.detect(unit) is not None and layouts.detect(unit).name == sample.layout  # type: ignore[union-attr]
        assert discover.directory_complete(unit)


def test_the_one_walk_sees_each_save_as_seen_alone(trainer_outputs: dict[str, Output], sample: Sample) -> None:
    """The rescan's one walk (`sweep`) sums each save's identity and judges it complete from its own listing:
    it must agree with `identity` and `directory_complete`, which verification records, or every rescan would
    verify every folder checkpoint again (or skip a changed one)."""
    out = trainer_outputs[sample.output]
    swept = {f.candidate.path.resolve(): f for f in discover.sweep(out.root, PATTERNS) if isinstance(f, discover.Found)}
    assert sorted(swept) == _units(out, sample)
    for unit in _units(out, sample):
        assert swept[unit].identity == discover.identity(unit), unit
        assert swept[unit].complete is discover.directory_complete(unit) is True


def test_an_event_on_any_member_concerns_the_whole_save(trainer_outputs: dict[str, Output], sample: Sample) -> None:
    """Whatever file of a save an event names, it is the save that is (re)verified, never the file alone."""
    out = trainer_outputs[sample.output]
    watched = out.root.parent if sample.units == (".",) else out.root
    for unit in _units(out, sample):
        for rel in _members(unit):
            candidate = discover.candidate_for(unit / rel, watched, PATTERNS)
            assert candidate is not None and candidate.path.resolve() == unit, rel


def test_a_fresh_save_verifies_ok_without_trust(trainer_outputs: dict[str, Output], sample: Sample) -> None:
    """Every save of every trainer is ok with no --trust and no trainer library needed to read it: each member
    hashed, its step read from the trainer's own records."""
    out = trainer_outputs[sample.output]
    for unit, step in zip(_units(out, sample), sample.steps, strict=True):
        result = verify(unit)
        assert (result.status, result.problems, result.unsafe_globals) == ("ok", [], []), unit
        assert result.layout == sample.layout
        assert result.files is not None and sorted(result.files) == _members(unit)
        assert result.global_step == step
        assert result.tensors.count > 0 and result.tensors.nonfinite == 0


def test_a_flipped_byte_in_any_torch_member_is_corrupt_naming_it(copy_output: CopyOutput, sample: Sample) -> None:
    """optimizer.pt beside the weights, scheduler.pt, rng_state.pth, training_args.bin, DeepSpeed's optimizer
    states, Lightning's meta.pt...: each torch zip member has its CRCs checked, so one flipped byte in its pickle
    makes the save corrupt with a problem that names that member."""
    out = copy_output(sample.output)
    unit = _units(out, sample)[-1]
    zips = [rel for rel in _members(unit) if zipfile.is_zipfile(unit / rel) and not rel.endswith(".distcp")]
    if sample.layout not in ("pretrained", "dcp"):
        assert zips, "a training save holds torch files"
    for rel in zips:
        original = (unit / rel).read_bytes()
        ck.flip_pickle_byte(unit / rel)
        result = verify(unit)
        assert result.status == "corrupt", rel
        assert any(p.startswith(f"{rel}: ") for p in result.problems), (rel, result.problems)
        (unit / rel).write_bytes(original)
    assert verify(unit).status == "ok"


def test_a_damaged_weights_member_is_corrupt_naming_it(copy_output: CopyOutput, sample: Sample) -> None:
    """A truncated weights file (a safetensors shard, model.safetensors, a DCP data file) is corrupt, named."""
    out = copy_output(sample.output)
    unit = _units(out, sample)[-1]
    weights = [rel for rel in _members(unit) if rel.endswith((".safetensors", ".distcp", "_model_states.pt"))]
    if not weights:
        weights = [rel for rel in _members(unit) if rel.endswith(".bin") and "optimizer" not in rel]
    rel = weights[0]
    ck.truncate(unit / rel)
    result = verify(unit)
    assert result.status == "corrupt"
    assert any(rel in p for p in result.problems), result.problems


def test_the_sidecar_goes_where_the_trainer_cannot_trip_over_it(trainer_outputs: dict[str, Output],
                                                                sample: Sample) -> None:  # fmt: skip
    """accelerate lists every entry of checkpoints/ and torchtitan counts every name holding step-N: their
    sidecars go to the state folder. The others go beside the save (never inside it), as for files."""
    out = trainer_outputs[sample.output]
    for unit in _units(out, sample):
        assert sidecar.placed_in_state("auto", unit, sample.layout) is sample.sidecar_in_state
        assert sidecar.placed_in_state("beside", unit, sample.layout) is False
        assert sidecar.placed_in_state("state", unit, sample.layout) is True


# ------------------------------------------------------------------------------- what the trainer knows


def test_hf_trainer_state_gives_step_epoch_eval_metrics_and_its_best(trainer_outputs: dict[str, Output]) -> None:
    """trainer_state.json gives the step, the epoch and the eval metrics logged at that step; the latest save
    names the Trainer's best_model_checkpoint, which `best --metric eval_loss` agrees with."""
    out = trainer_outputs["hf"]
    best = Path(out.report["best_model_checkpoint"]).name
    for name in ("checkpoint-2", "checkpoint-4"):
        state = json.loads((out.root / name / "trainer_state.json").read_text())
        result = verify(out.root / name)
        logged = [r for r in state["log_history"] if r.get("step") == state["global_step"] and "eval_loss" in r]
        assert result.metrics["eval_loss"] == pytest.approx(logged[0]["eval_loss"])
        assert (result.global_step, result.epoch, result.producer) == (state["global_step"], 0, "huggingface")
    assert verify(out.root / "checkpoint-4").needs == [best] == ["checkpoint-2"]
    assert verify(out.root / best).needs == []  # a save never names itself


def test_accelerate_deepspeed_and_lightning_records_give_step_and_epoch(trainer_outputs: dict[str, Output]) -> None:
    """accelerate: the step a registered object saved (custom_checkpoint_0.pkl, read as plain values without
    unpickling); DeepSpeed: global_steps from the model states; Lightning: epoch, step and ModelCheckpoint's
    score from meta.pt."""
    acc = trainer_outputs["accelerate"]
    for save in acc.report["saves"]:
        assert verify(Path(save["path"])).global_step == save["step"]
    ds = trainer_outputs["deepspeed"]
    assert [verify(ds.root / tag).global_step for tag in ds.report["tags"]] == [2, 4]
    assert ds.report["global_steps"] == 4
    sharded = verify(Path(trainer_outputs["lightning_sharded"].report["checkpoint"]))
    assert (sharded.epoch, sharded.global_step, sharded.producer) == (1, 8, "lightning")
    assert sharded.metrics["val_loss"] == pytest.approx(0.3296, abs=1e-4)


# ------------------------------------------------------------------------------- saves not finished


def _incomplete_cases(copy_output: CopyOutput, tmp_path: Path) -> dict[str, Path]:
    """A save of each layout as it is before the trainer's last file lands, or after a crash."""
    cases = {
        "hf crashed before trainer_state.json": _units(copy_output("hf_crashed"), SAMPLES[0])[0],
        "dcp crashed before .metadata": copy_output("dcp_crashed").root / "step-2",
    }
    ds = copy_output("deepspeed")
    (ds.root / "latest").write_text("global_step2")  # global_step4 written, `latest` not yet moved on
    cases["deepspeed tag that latest does not name yet"] = ds.root / "global_step4"
    pretrained = shutil.move(copy_output("pretrained").root, tmp_path / "alone" / "pretrained")  # its own parent
    (pretrained / "model.safetensors.index.json").unlink()  # the index is written after every shard
    cases["save_pretrained shards before their index"] = pretrained
    acc = copy_output("accelerate")
    (acc.root / "checkpoints/checkpoint_1/random_states_0.pkl").unlink()
    cases["accelerate before its RNG state"] = acc.root / "checkpoints/checkpoint_1"
    sharded = copy_output("lightning_sharded")
    meta = next(sharded.root.glob("*.ckpt")) / "meta.pt"
    meta.unlink()
    cases["lightning sharded before meta.pt"] = meta.parent
    return cases


def test_a_save_the_trainer_has_not_finished_is_never_taken(copy_output: CopyOutput, tmp_path: Path) -> None:
    """Each layout's last file missing: the folder is still one checkpoint (none of its files is taken alone),
    incomplete, left alone by `scan` (never cataloged, so never `latest` and never deleted), and `verify` by hand
    says it is incomplete."""
    for what, unit in _incomplete_cases(copy_output, tmp_path).items():
        assert layouts.detect(unit) is not None, what
        assert not discover.directory_complete(unit), what
        root = unit.parent
        found = [c.path for c in discover.discover(root, PATTERNS)]
        assert unit in found and all(c.is_dir() for c in found), what  # complete saves beside it, no file alone
        with Catalog(tmp_path / f"state-{unit.parent.name}-{unit.name}") as catalog:
            report = reconcile(root, watch="w", patterns=PATTERNS, catalog=catalog, verifier=verify,
                               engine=dict)  # fmt: skip
            assert report.busy == [str(unit)], what
            assert sorted(v.path for v in report.verified) == sorted(str(p) for p in found if p != unit), what
            assert str(unit) not in {row.path for row in catalog.present()}, what
        result = verify(unit)
        assert result.status == "corrupt", what
        assert any("incomplete" in p and "has not finished this save" in p for p in result.problems), what


def test_a_trainers_final_model_beside_its_checkpoints_is_left_alone(copy_output: CopyOutput) -> None:
    """`trainer.save_model()` leaves model.safetensors in output_dir beside checkpoint-<step>/: it has no step,
    so as a checkpoint of the run it would be the first that retention deletes. It is the run's product and
    ckptd leaves it alone (`ckptd verify` still checks it by hand)."""
    out = copy_output("hf")
    shutil.copy(out.root / "checkpoint-4" / "model.safetensors", out.root / "model.safetensors")
    found = [c.path.name for c in discover.discover(out.root, PATTERNS)]
    assert found == ["checkpoint-2", "checkpoint-4"]
    assert discover.candidate_for(out.root / "model.safetensors", out.root, PATTERNS) is None
    assert verify(out.root / "model.safetensors").status == "ok"


# ------------------------------------------------------------------------------- pickles trainers write


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_hostile_trainer_files_are_unsafe_and_never_run(copy_output: CopyOutput, tmp_path: Path) -> None:
    """An os.system payload in training_args.bin, in rng_state.pth, in accelerate's random_states, in a DCP
    item (written by DCP itself) and in DeepSpeed's optimizer states: each save is unsafe, the global is named,
    and the payload never runs, though each file is one that a trainer pickles on purpose."""
    marker = tmp_path / "marker"
    hf = copy_output("hf")
    torch.save(_Payload(marker), hf.root / "checkpoint-4" / "training_args.bin")
    rng = torch.load(hf.root / "checkpoint-2" / "rng_state.pth", weights_only=False)  # the trainer's own file
    torch.save({**rng, "python": _Payload(marker)}, hf.root / "checkpoint-2" / "rng_state.pth")
    acc = copy_output("accelerate")
    torch.save({"step": 0, "random_state": _Payload(marker)}, acc.root / "checkpoints/checkpoint_1/random_states_0.pkl")
    with open(acc.root / "checkpoints/checkpoint_0/random_states_0.pkl", "wb") as f:  # a bare pickle, not torch's
        pickle.dump({"step": 0, "random_state": _Payload(marker)}, f)
    ds = copy_output("deepspeed")
    optim = ds.root / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload(marker)}, optim)
    dcp_folder = tmp_path / "titan" / "step-9"
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.ones(4)}, "dataloader": {"dp_rank_0": _Payload(marker)}}, checkpoint_id=dcp_folder)
    for unit in (hf.root / "checkpoint-4", hf.root / "checkpoint-2", acc.root / "checkpoints/checkpoint_1",
                 acc.root / "checkpoints/checkpoint_0", ds.root / "global_step4", dcp_folder):  # fmt: skip
        result = verify(unit)
        assert (result.status, result.unsafe_globals) == ("unsafe", ["posix.system"]), (unit, result.problems)
        assert any("posix.system" in w for w in result.warnings)
    assert not marker.exists()


def test_a_code_running_global_is_unsafe_even_in_a_file_with_an_allow_list(tmp_path: Path) -> None:
    """The allow-lists name plain classes only: builtins.eval or exec, subprocess, and getattr chains stay unsafe
    in training_args.bin too."""
    folder = tmp_path / "out" / "checkpoint-1"
    folder.mkdir(parents=True)
    ck.safetensors_file(folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    marker = tmp_path / "marker"

    def payload(*reduced: object) -> object:
        return type("Payload", (), {"__reduce__": lambda self: reduced})()

    payloads = {  # torch.save's protocol 2 writes `__builtin__.eval`, `commands.call`: named as they would run
        "builtins.eval": payload(eval, (f"open({str(marker)!r}, 'w')",)),
        "builtins.getattr": payload(getattr, (collections.OrderedDict, "fromkeys")),  # from an allowed class
        "subprocess.call": payload(subprocess.call, (["touch", str(marker)],)),
    }
    for name, payload in payloads.items():
        torch.save({"args": payload}, folder / "training_args.bin")
        result = verify(folder)
        assert result.status == "unsafe" and name in result.unsafe_globals, (name, result.unsafe_globals)
    assert not marker.exists()


def test_an_nshtrainer_run_is_its_checkpoint_folder(trainer_outputs: dict[str, Output]) -> None:
    """nshtrainer keeps its best and last checkpoints in `checkpoint/best_<metric>/` and `checkpoint/last/`, with
    links to them in `checkpoint/`: all of them belong to one run, that `checkpoint/` folder. The metrics come
    from nshtrainer's `.metadata.json` beside each checkpoint, and an event on that record concerns the
    checkpoint it describes (it lands after the checkpoint)."""
    out = trainer_outputs["nshtrainer"]
    folder = Path(out.report["checkpoint_dir"])
    found = {c.path.relative_to(folder).as_posix(): c for c in discover.discover(out.root, PATTERNS)}
    best, last = Path(out.report["best"]), Path(out.report["last"])
    assert sorted(found) == sorted(["best_val_loss.ckpt", "last.ckpt", best.relative_to(folder).as_posix(),
                                    last.relative_to(folder).as_posix()])  # fmt: skip
    assert {c.run for c in found.values()} == {folder}
    assert {k: c.kind for k, c in found.items() if c.kind == "link"} == {
        "best_val_loss.ckpt": "link",
        "last.ckpt": "link",
    }
    for checkpoint in (best, last):
        record = json.loads(nshtrainer.metadata_of(checkpoint).read_text())
        result = verify(checkpoint)
        assert (result.status, result.epoch, result.global_step) == ("ok", record["epoch"], record["global_step"])
        assert result.metrics["val_loss"] == pytest.approx(record["metrics"]["val_loss"])
        event = discover.candidate_for(nshtrainer.metadata_of(checkpoint), out.root, PATTERNS)
        assert event is not None and (event.path, event.run) == (checkpoint, folder)


def test_nshtrainers_recorded_checksum_holds_the_checkpoint(copy_output: CopyOutput) -> None:
    """nshtrainer records the SHA-256 of each checkpoint in its `.metadata.json`: a checkpoint whose bytes
    disagree with it is corrupt, and the problem names nshtrainer's file. A flipped byte is corrupt too."""
    out = copy_output("nshtrainer")
    folder = Path(out.report["checkpoint_dir"].replace(str(trainer_root(out)), str(out.root)))
    best = next((folder / "best_val_loss").glob("*.ckpt"))
    record_path = nshtrainer.metadata_of(best)
    assert verify(best).status == "ok"
    record = json.loads(record_path.read_text())
    record["checkpoint_checksum"] = "0" * 64
    record_path.write_text(json.dumps(record))
    result = verify(best)
    assert result.status == "corrupt"
    assert any(record_path.name in p and "checkpoint_checksum" in p for p in result.problems), result.problems
    last = next((folder / "last").glob("*.ckpt"))
    ck.flip_tensor_byte(last)
    flipped = verify(last)
    assert flipped.status == "corrupt"
    assert any(nshtrainer.metadata_of(last).name in p for p in flipped.problems), flipped.problems


def trainer_root(out: Output) -> Path:
    """The folder the trainer wrote into, as its report names it (copies keep the same layout below it)."""
    checkpoint_dir = Path(out.report["checkpoint_dir"])
    return next(p for p in checkpoint_dir.parents if p.name == "nshtrainer")
