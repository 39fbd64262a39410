"""Tests for pipeline/finetune/pilot.py: the advisor's budgeted pilot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import finetune
from pipeline.finetune import loop
from tests.pipeline.finetune.conftest import (
    config,
    final_weights,
    write_classes,
)


def _counting_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every training batch that reaches the network."""
    seen: list[int] = []
    real = loop.Trainer._step

    def step(t, images, labels, criterion, *, sync):  # type: ignore[no-untyped-def]
        seen.append(len(labels))
        return real(t, images, labels, criterion, sync=sync)

    monkeypatch.setattr(loop.Trainer, "_step", step)
    return seen


def test_pilot_keeps_its_budget_and_is_the_start_of_the_full_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_classes(tmp_path / "data", per_class=20)
    extra = ("finetune.epochs=2", "finetune.deterministic=true")
    finetune.run(config(root, tmp_path / "straight", *extra))
    cfg = config(root, tmp_path / "pilot", *extra)
    seen = _counting_steps(monkeypatch)
    run = finetune.pilot(cfg, share=0.5, points=4)
    # A share of half of 2 epochs: exactly the first epoch, batch by batch.
    assert sum(seen) == run.images == run.budget == run.full // 2
    assert run.epochs == 1 and run.resumable
    steps = [t for t, _ in run.curve]
    assert steps == sorted(set(steps)) and steps[-1] == run.images and len(steps) >= 3
    assert all(0 <= acc <= 1 for _, acc in run.curve)
    assert len(run.val_paths) == len(run.val_correct) > 0
    assert run.curve[-1][1] == pytest.approx(
        sum(run.val_correct) / len(run.val_correct)
    )
    # The full fine-tune continues the pilot's checkpoint to the same weights
    # as a straight run: the pilot's validations changed nothing.
    finetune.run(cfg, resume=True)
    straight, continued = (
        final_weights(tmp_path / "straight"),
        final_weights(tmp_path / "pilot"),
    )
    for key in straight:
        assert torch.equal(straight[key], continued[key]), key


def test_a_pilot_under_one_epoch_stops_part_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_classes(tmp_path / "data")
    cfg = config(root, tmp_path / "pilot", "finetune.epochs=2")
    seen = _counting_steps(monkeypatch)
    run = finetune.pilot(cfg, share=0.25, points=2)
    assert sum(seen) == run.images == run.budget == 8 <= run.full // 4
    assert run.epochs == 0 and not run.resumable
    assert not (tmp_path / "pilot" / "finetune" / "last.pt").exists()


@pytest.mark.parametrize(
    "share, epochs, per_epoch, batch, budget",
    [
        (0.25, 4, 100, 10, 100),  # one whole epoch
        (0.25, 10, 100, 10, 200),  # 2.5 epochs -> 2 whole epochs, never more
        (0.25, 2, 100, 10, 50),  # half an epoch, in whole batches
        (0.25, 2, 100, 32, 32),
        (0.01, 1, 100, 32, 32),  # at least one batch
    ],
)
def test_pilot_budget(
    share: float, epochs: int, per_epoch: int, batch: int, budget: int
) -> None:
    assert finetune.pilot_budget(share, epochs, per_epoch, batch) == budget
