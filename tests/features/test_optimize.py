from __future__ import annotations

import copy

import pytest
import torch

from features.backbones import build_backbone
from features.layers import build_feature_extractor, resolve_layers
from features.optimize import fold_batchnorm


@pytest.mark.parametrize(
    "name, layers, folded",
    [("resnet18", ["top", "layer2", "bn1"], 20), ("mobilenet_v3_small", ["top"], 34)],
)
def test_fold_batchnorm_keeps_every_layer_value(
    name: str, layers: list[str], folded: int
) -> None:
    model = build_backbone(name, "random", seed=3).model
    with torch.no_grad():  # non-trivial BN statistics, as trained weights have
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    plain = build_feature_extractor(model, resolve_layers(model, layers))
    fused = build_feature_extractor(copy.deepcopy(model), resolve_layers(model, layers))
    assert fold_batchnorm(fused) == folded
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), fused(x)
    for layer in layers:
        torch.testing.assert_close(a[layer], b[layer], rtol=1e-4, atol=1e-4)
    # The original model's modules are untouched.
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(torch.nn.BatchNorm2d) >= folded
