"""Tests for pipeline/finetune/checkpoints.py: the objects that keep training state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from features.errors import CheckpointError
from pipeline.finetune import checkpoints
from pipeline.finetune.checkpoints import (
    BestModel,
    CheckpointSaver,
    EarlyStopping,
)


def test_best_model_keeps_the_weights_of_the_best_epoch(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    best = BestModel("accuracy", tmp_path / "best.pt")
    assert best.update(0.5, 1, model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not best.update(0.4, 2, model)  # worse: best.pt keeps epoch 1
    kept = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.equal(kept[k], saved[k]) for k in saved)
    assert (best.epoch, best.value) == (1, 0.5)
    loss = BestModel("loss", tmp_path / "best-loss.pt")
    assert loss.update(0.9, 1, model) and loss.update(0.8, 2, model)


def test_early_stopping_counts_epochs_without_improvement() -> None:
    stopping = EarlyStopping(patience=2)
    assert [stopping.update(i) for i in (True, False, True, False, False)] == [
        False,
        False,
        False,
        False,
        True,
    ]
    never = EarlyStopping(patience=0)
    assert not any(never.update(False) for _ in range(5))


def test_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    best = BestModel("accuracy", tmp_path / "best.pt", value=0.7, epoch=3)
    stopping = EarlyStopping(patience=4, bad_epochs=2)
    saver = CheckpointSaver(tmp_path / "last.pt", {"backbone": "x"}, ("a", "b"))
    saver.save([best, stopping], epoch=3)
    again = BestModel("accuracy", tmp_path / "best.pt")
    waiting = EarlyStopping(patience=4)
    assert saver.restore([again, waiting]) == 3
    assert (again.value, again.epoch, waiting.bad_epochs) == (0.7, 3, 2)
    assert checkpoints.load(tmp_path / "last.pt")["format"] == "quadrant-finetune"


def test_a_checkpoint_of_another_setup_is_refused(tmp_path: Path) -> None:
    CheckpointSaver(tmp_path / "last.pt", {"backbone": "x"}, ("a",)).save([], 1)
    other = CheckpointSaver(tmp_path / "last.pt", {"backbone": "y"}, ("a",))
    with pytest.raises(CheckpointError, match="belongs to another setup"):
        other.restore([])
    with pytest.raises(CheckpointError, match="after epoch 1 exists"):
        other.check_unasked(resume=False, restart=False)
