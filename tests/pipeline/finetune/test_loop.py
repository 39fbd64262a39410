"""Tests for pipeline/finetune/loop.py: the training loop."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import finetune
from pipeline.finetune import loop
from tests.pipeline.finetune.conftest import (
    config,
    write_classes,
)


def test_head_only_epochs_leave_the_body_untouched(tmp_path: Path) -> None:
    root = write_classes(tmp_path / "data")
    cfg = config(
        root,
        tmp_path / "run",
        "finetune.epochs=2",
        "finetune.head_epochs=1",
        "finetune.init=pretrained",
        "backbone.weights=random",
    )
    model, _, _ = finetune.build_model(cfg, 2, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with loop.frozen_body(model):
        trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
        assert trainable == ["fc.weight", "fc.bias"]
        assert not model.net.bn1.training or not model.training
        model.train()
        with loop.frozen_body(model):
            assert not model.net.layer1[0].bn1.training  # statistics frozen
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
