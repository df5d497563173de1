"""Which checkpoint is a run's latest and which its best: the rules a resume script and a deploy rely on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ckptd import selection
from ckptd.model import Entry

NOW = 1_700_000_000.0


def _entry(name: str, **fields: object) -> Entry:
    values: dict[str, object] = {"path": f"/runs/loop/{name}", "run": "/runs/loop", "status": "ok", "size": 1,
                                 "mtime": NOW}  # fmt: skip
    return Entry(**(values | fields))  # type: ignore[arg-type]


def _loop() -> list[Entry]:
    """What a plain PyTorch loop leaves after epoch 12: the full state rewritten every epoch, a milestone every
    10 epochs, and the weights alone whenever validation improved (newest of all by mtime)."""
    return [
        _entry("latest_checkpoint.pt", epoch=12, resumable=True, mtime=NOW - 5, metrics={"best_map": 0.61}),
        _entry("epoch_010_checkpoint.pt", epoch=10, resumable=True, mtime=NOW - 50, metrics={"best_map": 0.61}),
        _entry("best_model.pt", resumable=False, mtime=NOW),
    ]


def test_latest_is_the_newest_checkpoint_training_can_resume_from() -> None:
    """Weights only (`best_model.pt`, newest by mtime, no epoch) is never `latest`; with `weights` it may be."""
    loop = _loop()
    assert selection.latest(loop).path.endswith("latest_checkpoint.pt")  # type: ignore[union-attr]
    assert selection.latest(loop, weights=True).path.endswith("latest_checkpoint.pt")  # type: ignore[union-attr]
    only_weights = [_entry("best_model.pt", resumable=False)]
    assert selection.latest(only_weights) is None
    assert selection.latest(only_weights, weights=True) == only_weights[0]
    older_sidecar = [_entry("model.pt", resumable=None)]  # written before ckptd recorded it: counts
    assert selection.latest(older_sidecar) == older_sidecar[0]


def test_an_epoch_orders_checkpoints_that_have_no_step() -> None:
    """Step, then epoch, then mtime: the epoch-12 state beats an epoch-10 milestone written later."""
    loop = [_entry("latest_checkpoint.pt", epoch=12, mtime=NOW - 100), _entry("epoch_010.pt", epoch=10, mtime=NOW)]
    assert selection.latest(loop) == loop[0]
    stepped = [*loop, _entry("s.pt", step=5, mtime=NOW - 999)]
    assert selection.latest(stepped) == stepped[2]


def test_a_best_so_far_metric_picks_where_it_was_reached() -> None:
    """`best_map` is the best so far: every later checkpoint repeats it, so the earliest with the best value is
    the best; an ordinary metric's tie still goes to the newer checkpoint."""
    entries = [
        _entry("epoch_3.pt", epoch=3, metrics={"best_map": 0.5, "val_acc": 0.9}),
        _entry("epoch_4.pt", epoch=4, metrics={"best_map": 0.7, "val_acc": 0.8}),
        _entry("epoch_5.pt", epoch=5, metrics={"best_map": 0.7, "val_acc": 0.9}),
        _entry("epoch_6.pt", epoch=6, metrics={"best_map": 0.7, "val_acc": 0.7}),
    ]
    assert selection.best(entries, "best_map", "max") == entries[1]
    assert selection.best(entries, "val_acc", "max") == entries[2]


@pytest.mark.parametrize(
    ("name", "slot", "best"),
    [
        ("latest_checkpoint.pt", True, False), ("latest.pt", True, False), ("last.pt", True, False),
        ("last.ckpt", True, False), ("best.pt", True, True), ("best_model.pt", True, True),
        ("best_val_loss.ckpt", True, True), ("model_best.pth.tar", True, True), ("checkpoint_last.pt", True, False),
        ("epoch_010_checkpoint.pt", False, False), ("best_epoch_3.pt", False, False), ("model.pt", False, False),
        ("lastlayer.pt", False, False), ("bestiary.pt", False, False),
        ("checkpoint/best_val_loss/epoch1-step8-val_loss0.5.ckpt", False, True),
    ],
)  # fmt: skip
def test_the_names_a_trainer_rewrites_in_place(name: str, slot: bool, best: bool) -> None:
    """No digit, and latest, last or best as a word: a slot; best as a word: the trainer's own best."""
    assert (selection.is_slot(name), selection.is_best_slot(name)) == (slot, best)


def test_with_no_metric_to_rank_by_the_trainers_best_slot_is_the_best() -> None:
    """No metric configured, or none of the run's checkpoints holds it: the trainer's own best file answers."""
    loop = _loop()
    assert selection.best(loop, None, "min") == loop[2]
    assert selection.best(loop, "val_dice", "max") == loop[2]
    assert selection.best([replace(loop[0])], None, "min") is None
    assert selection.metric_names(loop) == ["best_map"]
