"""Tests for pipeline/finetune/loop.py: the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import finetune
from pipeline.finetune import loop, stage
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


STEM = ("conv1", "bn1", "layer1", "layer2")  # resnet18's layers before layer3


def test_partial_fine_tuning_leaves_the_frozen_layers_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_classes(tmp_path / "data")
    cfg = config(
        root,
        tmp_path / "run",
        "finetune.epochs=2",
        "finetune.train_from=layer3",
        "finetune.init=pretrained",
        "backbone.weights=random",
        "finetune.head_init=random",
    )
    prepared = stage.prepare(cfg, loop.Dist(), resume=False, restart=False)
    net = prepared.trainer.model.net
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2") for n in frozen
    )
    assert not any(n.startswith(("layer3", "layer4", "fc")) for n in frozen)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads: list[str] = []
    real = loop.Trainer._step

    def step(t, images, labels, criterion, *, sync):  # type: ignore[no-untyped-def]
        out = real(t, images, labels, criterion, sync=sync)
        grads.extend(n for n, p in net.named_parameters() if p.grad is not None)
        return out

    monkeypatch.setattr(loop.Trainer, "_step", step)
    prepared.trainer.fit()
    after = net.state_dict()
    stem = [
        k for k in before if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")
    ]
    assert stem and all(torch.equal(before[k], after[k]) for k in stem)  # and BN stats
    assert not set(grads) & set(frozen)
    assert any(
        not torch.equal(before[k], after[k]) for k in after if k.startswith("layer4")
    )
