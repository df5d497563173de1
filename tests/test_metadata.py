"""Specification of ckptd/metadata.py: epoch, step, metrics and producer from a checkpoint object and its name."""

import math
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from ckptd.metadata import Extracted, extract, name_values, scalar

NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,15}", fullmatch=True)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
FORMATS = st.sampled_from([repr, lambda x: f"{x:.4f}"])
SUFFIXES = st.sampled_from(["", ".ckpt", ".pt", ".pth", ".safetensors", ".bin"])

# Arbitrary checkpoint-like objects: nested dicts and lists of ints, floats, strings and None, with the keys
# extract looks at mixed in among arbitrary ones.
LEAVES = st.none() | st.integers() | st.floats() | st.text(max_size=20) | st.booleans()
KEYS = st.sampled_from(["epoch", "global_step", "step", "metrics", "best_metric", "callbacks", "monitor"])
KEYS |= st.sampled_from(["current_score", "ModelCheckpoint{'monitor': 'val_loss'}", "lightning_version"])
KEYS |= st.text(max_size=10)
TREES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(KEYS | st.integers(), children, max_size=6),
    max_leaves=30,
)


def epoch_step(found: Extracted) -> tuple[int | None, int | None]:
    """The (epoch, global_step) of an extraction."""
    return found.epoch, found.global_step


def callback_key(monitor: str) -> str:
    """The key Lightning gives a ModelCheckpoint callback's state in a checkpoint's `callbacks`."""
    return f"ModelCheckpoint{{'monitor': {monitor!r}, 'mode': 'min', 'every_n_train_steps': 0}}"


# ---------------------------------------------------------------------------------------------- file names


@given(
    pairs=st.dictionaries(NAMES, st.tuples(FINITE, FORMATS), min_size=1, max_size=6),
    suffix=SUFFIXES,
)
def test_name_values_round_trips_name_value_pairs_joined_by_dashes(
    pairs: dict[str, tuple[float, Any]], suffix: str
) -> None:
    """Any name=value pairs (repr or :.4f floats) joined by '-' come back as exactly those names and values."""
    texts = {name: fmt(value) for name, (value, fmt) in pairs.items()}
    filename = "-".join(f"{name}={text}" for name, text in texts.items()) + suffix
    assert name_values(filename) == {name: float(text) for name, text in texts.items()}


def test_name_values_reads_lightning_file_names() -> None:
    """Lightning's epoch=3-step=400-val_loss=0.8193.ckpt gives epoch, step and val_loss."""
    assert name_values("epoch=3-step=400-val_loss=0.8193.ckpt") == {"epoch": 3.0, "step": 400.0, "val_loss": 0.8193}
    assert name_values("last.ckpt") == {}
    assert name_values("model-v1.pt") == {}


def test_name_values_reads_underscored_names_as_their_words() -> None:
    """`epoch_001-step_1000.pt` names epoch 1 and step 1000 (it once gave metrics `epoch_` and `step_`)."""
    assert name_values("epoch_001-step_1000.pt") == {"epoch": 1.0, "step": 1000.0}
    found = extract({}, "epoch_001-step_1000.pt")
    assert (found.epoch, found.global_step, found.metrics) == (1, 1000, {})


@given(text=st.text(max_size=60))
def test_name_values_never_raises_and_returns_floats(text: str) -> None:
    """Any file name yields a mapping of names to floats, never an exception."""
    found = name_values(text)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in found.items())


@given(epoch=st.integers(0, 10**6), step=st.integers(0, 10**9), loss=FINITE)
def test_extract_takes_epoch_step_and_metrics_from_the_file_name(epoch: int, step: int, loss: float) -> None:
    """Without them in the object, epoch and step come from the name; other name=value parts are metrics."""
    found = extract({}, f"epoch={epoch}-step={step}-val_loss={loss!r}.ckpt")
    assert (found.epoch, found.global_step, found.metrics) == (epoch, step, {"val_loss": loss})


# ---------------------------------------------------------------------------------------------- robustness


@given(obj=TREES, filename=st.text(max_size=40))
@example(obj={"epoch": 10**400, "metrics": {"big": 10**400}, "best_metric": -(10**400)}, filename="x.ckpt")
@example(obj={"epoch": float("nan"), "global_step": float("inf"), "metrics": [1, 2]}, filename="step=1e999.pt")
def test_extract_never_raises_on_arbitrary_nested_data(obj: Any, filename: str) -> None:
    """extract returns an Extracted for any nested dicts and lists of ints, floats, strings and None."""
    found = extract(obj, filename)
    assert isinstance(found, Extracted)
    assert found.epoch is None or isinstance(found.epoch, int)
    assert found.global_step is None or isinstance(found.global_step, int)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in found.metrics.items())
    assert found.producer in ("torch", "lightning")
    assert len(found.keys) <= 200


def test_extract_ignores_epochs_and_steps_that_are_not_whole_numbers() -> None:
    """An epoch that is not a finite whole number, or a bool, is ignored in favour of the file name's."""
    for bad in (1.5, float("nan"), float("inf"), True, "3", None, [3]):
        assert epoch_step(extract({"epoch": bad, "step": bad}, "epoch=2-step=9.ckpt")) == (2, 9)


# ---------------------------------------------------------------------------------------------- precedence


@given(name=NAMES, from_file=FINITE, declared=FINITE)
def test_extract_metrics_mapping_wins_over_the_file_name(name: str, from_file: float, declared: float) -> None:
    """A value in the checkpoint's `metrics` mapping replaces the same name's value in the file name."""
    found = extract({"metrics": {name: declared}}, f"run-{name}={from_file!r}.ckpt")
    assert found.metrics[name] == declared


@given(from_file=FINITE, best=FINITE, score=FINITE, declared=FINITE)
def test_extract_metric_sources_rank_name_then_best_then_callback_then_metrics(
    from_file: float, best: float, score: float, declared: float
) -> None:
    """For one metric name, the file name loses to best_metric, which loses to the callback, which loses to metrics."""
    name = "best_metric"
    callbacks = {callback_key(name): {"monitor": name, "current_score": score}}
    filename = f"{name}={from_file!r}.ckpt"
    assert extract({}, filename).metrics == {name: from_file}
    assert extract({"best_metric": best}, filename).metrics == {name: best}
    assert extract({"best_metric": best, "callbacks": callbacks}, filename).metrics == {name: score}
    both = {"best_metric": best, "callbacks": callbacks, "metrics": {name: declared}}
    assert extract(both, filename).metrics == {name: declared}


def test_extract_epoch_and_step_in_the_object_win_over_the_file_name() -> None:
    """Epoch and global_step (or step) stored in the checkpoint replace those in its file name."""
    assert epoch_step(extract({"epoch": 5, "global_step": 50}, "epoch=1-step=10.ckpt")) == (5, 50)
    assert epoch_step(extract({"epoch": 5, "step": 60}, "epoch=1-step=10.ckpt")) == (5, 60)
    assert extract({"global_step": 70, "step": 60}, "x.ckpt").global_step == 70
    assert epoch_step(extract({}, "epoch=1-global_step=10.ckpt")) == (1, 10)


# ---------------------------------------------------------------------------------------------- Lightning


@given(monitor=NAMES, score=FINITE)
def test_extract_reads_modelcheckpoint_current_score_under_its_monitor(monitor: str, score: float) -> None:
    """Lightning's ModelCheckpoint state gives its current_score as the metric named by its monitor."""
    obj = {
        "epoch": 2,
        "global_step": 12,
        "pytorch-lightning_version": "2.6.0",
        "callbacks": {callback_key(monitor): {"monitor": monitor, "current_score": score, "best_model_score": 0.0}},
    }
    found = extract(obj, "last.ckpt")
    assert (found.epoch, found.global_step, found.producer) == (2, 12, "lightning")
    assert found.metrics == {monitor: score}


def test_extract_reads_a_tensor_current_score() -> None:
    """A current_score stored as a one-element tensor, as Lightning saves it, is read as a float."""
    callbacks = {callback_key("val_loss"): {"monitor": "val_loss", "current_score": torch.tensor(0.25)}}
    assert extract({"callbacks": callbacks}, "a.ckpt").metrics == {"val_loss": 0.25}


@pytest.mark.parametrize(
    "callbacks",
    [
        {"EarlyStopping{'monitor': 'val_loss'}": {"monitor": "val_loss", "current_score": 0.5}},
        {callback_key("val_loss"): {"monitor": None, "current_score": 0.5}},
        {callback_key("val_loss"): {"monitor": "val_loss", "current_score": None}},
        {callback_key("val_loss"): {"monitor": "val_loss", "current_score": torch.ones(3)}},
        {callback_key("val_loss"): {"monitor": "val_loss", "current_score": "0.5"}},
        {callback_key("val_loss"): ["monitor", "val_loss"]},
        ["ModelCheckpoint", {"monitor": "val_loss", "current_score": 0.5}],
        None,
    ],
    ids=[
        "not-modelcheckpoint",
        "no-monitor",
        "no-score",
        "score-not-one-element",
        "score-a-string",
        "state-not-a-mapping",
        "callbacks-not-a-mapping",
        "callbacks-none",
    ],
)
def test_extract_ignores_callback_states_without_a_usable_monitor_and_score(callbacks: Any) -> None:
    """Callbacks other than ModelCheckpoint, or without a monitor name and a numeric score, give no metric."""
    assert extract({"callbacks": callbacks}, "last.ckpt").metrics == {}


def test_extract_reads_every_modelcheckpoint_callback() -> None:
    """Two ModelCheckpoint callbacks monitoring different metrics give both metrics."""
    callbacks = {
        callback_key("val_loss"): {"monitor": "val_loss", "current_score": 0.5},
        callback_key("val_acc"): {"monitor": "val_acc", "current_score": 0.9},
    }
    assert extract({"callbacks": callbacks}, "last.ckpt").metrics == {"val_loss": 0.5, "val_acc": 0.9}


# ---------------------------------------------------------------------------------------------- producer, keys


def test_extract_producer_is_lightning_torch_or_the_one_given() -> None:
    """Lightning's version key marks lightning; other mappings are torch; a producer passed in is kept."""
    assert extract({"pytorch-lightning_version": "2.6"}, "a.ckpt").producer == "lightning"
    assert extract({"lightning_version": "2.6"}, "a.ckpt").producer == "lightning"
    assert extract({"state_dict": {}}, "a.pt").producer == "torch"
    assert extract([1, 2], "a.pt").producer == "torch"
    assert extract({"step": 1}, "a", producer="dcp").producer == "dcp"


def test_extract_keys_are_the_first_200_top_level_keys_as_strings() -> None:
    """keys lists the mapping's top-level keys in order, as strings, at most 200 of them."""
    assert extract({"b": 1, 2: 2, "a": 3}, "x").keys == ["b", "2", "a"]
    assert extract({f"k{i}": i for i in range(500)}, "x").keys == [f"k{i}" for i in range(200)]
    assert extract([("a", 1)], "x").keys == []


@given(value=st.integers(-(10**18), 10**18) | FINITE)
def test_scalar_reads_plain_numbers_and_one_element_tensors(value: float) -> None:
    """scalar gives the float of an int, a float or a one-element tensor."""
    assert scalar(value) == float(value)
    assert scalar(torch.tensor([value], dtype=torch.float64)) == float(torch.tensor(value, dtype=torch.float64))


def test_scalar_refuses_bools_strings_big_tensors_and_out_of_range_ints() -> None:
    """Bools, strings, multi-element tensors and ints beyond float range are not scalars."""
    for value in (True, "1.0", torch.ones(2), None, [1.0], 10**400):
        assert scalar(value) is None
    assert math.isnan(scalar(float("nan")) or 0.0)


# ------------------------------------------------------------------------------ where loops keep their metrics


def test_extract_reads_metrics_where_plain_loops_keep_them() -> None:
    """A plain loop's checkpoint: top-level numbers (`best_map`, `val_acc`), the last value of each series in
    `history`, and HF's `log_history` records; a state dict's buffers and epoch/step are no metrics; holding an
    optimizer's state makes it resumable."""
    loop = {
        "epoch": 12, "model_state_dict": {"w": torch.ones(2)}, "optimizer_state_dict": {"state": {}},
        "scheduler": {"last_epoch": 12}, "best_map": 0.61, "val_acc": torch.tensor(0.9), "lr": 1e-3,
        "history": {"val_dice": [0.2, 0.4, 0.45], "train_loss": [1.0, 0.5], "epoch": [10, 11, 12]},
        "log_history": [{"step": 5, "eval_loss": 0.9}, {"step": 10, "eval_loss": 0.7, "loss": 0.8}],
        "bn.num_batches_tracked": torch.tensor(100),
    }  # fmt: skip
    found = extract(loop, "latest_checkpoint.pt")
    assert found.metrics == pytest.approx({"best_map": 0.61, "val_acc": 0.9, "lr": 1e-3, "val_dice": 0.45,
                                           "train_loss": 0.5, "eval_loss": 0.7, "loss": 0.8})  # fmt: skip
    assert (found.epoch, found.resumable) == (12, True)
    weights = extract({"layer.weight": torch.ones(2), "layer.bias": torch.ones(1)}, "best_model.pt")
    assert (weights.metrics, weights.resumable) == ({}, False)


def test_extract_reads_a_metric_at_a_configured_key() -> None:
    """`[watch.metric] key`: a dotted path with list indices, for a metric kept anywhere else."""
    obj = {"state": {"scores": [{"map50": 0.3}, {"map50": 0.5}]}, "history.val_dice": [0.1, 0.2]}
    found = extract(obj, "x.pt", keys_of={"map50": "state.scores[-1].map50", "dice": "history.val_dice[0]",
                                          "absent": "state.nothing[3]"})  # fmt: skip
    assert (found.metrics["map50"], found.metrics["dice"]) == (0.5, 0.1)
    assert "absent" not in found.metrics


def test_name_values_reads_nshtrainers_name_value_parts() -> None:
    """nshtrainer writes `epoch1-step8-val_loss4.1627.ckpt` (and `duration3s` parts, skipped); a name that is not
    made only of such parts (`model_v2`, `epoch_010_checkpoint`) yields nothing."""
    assert name_values("epoch1-step8-val_loss4.1627.ckpt") == {"epoch": 1.0, "step": 8.0, "val_loss": 4.1627}
    assert name_values("epoch2-step12-duration3s.ckpt") == {"epoch": 2.0, "step": 12.0}
    assert name_values("model_v2.pt") == name_values("epoch_010_checkpoint.pt") == {}
    found = extract({}, "epoch1-step8-val_loss4.1627.ckpt")
    assert (found.epoch, found.global_step, found.metrics) == (1, 8, {"val_loss": 4.1627})
