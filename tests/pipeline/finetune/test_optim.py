"""Tests for pipeline/finetune/optim.py: parameter groups and the schedule."""

from __future__ import annotations

import pytest
import torch

from pipeline.finetune import optim


def test_param_groups_decay_the_learning_rate_towards_the_input() -> None:
    from torchvision.models import resnet18

    model = resnet18()
    groups = optim.param_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.fc.weight)]["lr"] == 1.0
    assert by_param[id(model.layer4[1].conv1.weight)]["lr"] == 0.5
    assert (
        by_param[id(model.conv1.weight)]["lr"]
        < by_param[id(model.layer1[0].conv1.weight)]["lr"]
    )
    assert by_param[id(model.fc.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.fc.weight)]["weight_decay"] == 0.1


def test_scheduler_warms_up_linearly_then_decays_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = optim.build_scheduler(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[3] > lrs[6] > lrs[9] >= 0


def test_param_groups_of_a_timm_vit_decay_by_block() -> None:
    # timm's own helper groups a ViT: embeddings, one group per block, head.
    from features.backbones import build_backbone

    net = build_backbone(
        "timm/vit_tiny_patch16_224",
        "random",
        preprocessing={"input_size": 32},
        num_classes=3,
    ).model
    groups = optim.param_groups(net, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}

    def lr(param: torch.nn.Parameter) -> float:
        return float(by_param[id(param)]["lr"])

    assert lr(net.head.weight) == 1.0
    assert lr(net.blocks[11].mlp.fc1.weight) == 0.5
    assert lr(net.blocks[10].mlp.fc1.weight) == 0.25
    assert lr(net.blocks[0].attn.qkv.weight) == 0.5**12
    assert lr(net.patch_embed.proj.weight) == lr(net.cls_token) == 0.5**13
    assert by_param[id(net.pos_embed)]["weight_decay"] == 0.0  # timm's no-decay list
    assert by_param[id(net.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
