from __future__ import annotations

import pytest
import torch

from features.backbones import build_backbone
from features.errors import BackboneError
from features.layers import (
    layer_names,
    layer_shapes,
    pool,
    resolve_layers,
    resolve_top,
)
from features.pooling import Pooling, parse_pooling


@pytest.mark.parametrize(
    "name, top",
    [
        ("resnet18", "flatten"),
        ("efficientnet_lite0", "_flatten"),
        ("mobilenet_v3_small", "classifier.1"),  # skips classifier.2, a dropout
        ("efficientnet_b0", "flatten"),
        ("vgg11", "classifier.4"),
    ],
)
def test_resolve_top_is_the_classifier_input(name: str, top: str) -> None:
    model = build_backbone(name, "random").model
    assert resolve_top(model) == top


def test_top_has_the_classifier_width() -> None:
    model = build_backbone("resnet18", "random", preprocessing={"input_size": 64}).model
    assert layer_shapes(model, ["top", "layer3"], 64) == {
        "top": (512,),
        "layer3": (256, 4, 4),
    }


def test_layer_names_lists_modules_in_forward_order() -> None:
    names = layer_names(build_backbone("resnet18", "random").model)
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert names.index("layer1.0") < names.index("layer4.1") < names.index("fc")
    every = layer_names(build_backbone("resnet18", "random").model, all_nodes=True)
    assert "layer1.0.relu_1" in every and len(every) > len(names)


def test_unknown_layer_suggests_names_and_the_command() -> None:
    model = build_backbone("resnet18", "random").model
    with pytest.raises(
        BackboneError,
        match=r"layer 'layer5' is not in ResNet\. Did you "
        r"mean \[.*'layer1'.*\]\? Hint: run `quadrant layers`",
    ):
        resolve_layers(model, ["layer5"])


def test_model_without_linear_head_has_no_top() -> None:
    model = build_backbone("squeezenet1_0", "random").model
    with pytest.raises(
        BackboneError, match=r'does not end in a linear classifier.*"top"'
    ):
        resolve_top(model)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("avg", Pooling("avg")),
        ("max", Pooling("max")),
        ("avg+max", Pooling("avg+max")),
        ("grid:3", Pooling("grid", 3)),
    ],
)
def test_parse_pooling(spec: str, expected: Pooling) -> None:
    assert parse_pooling(spec) == expected
    assert expected.spec == spec


@pytest.mark.parametrize("spec", ["mean", "grid:", "grid:0", "grid:x", "avg+min"])
def test_parse_pooling_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="use avg, max, avg\\+max or grid:K"):
        parse_pooling(spec)


def test_pool_values() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(pool(x, Pooling("avg")), x.mean(dim=(2, 3)))
    assert torch.equal(pool(x, Pooling("max")), x.amax(dim=(2, 3)))
    both = pool(x, Pooling("avg+max"))
    assert both.shape == (2, 6) and torch.equal(both[:, 3:], x.amax(dim=(2, 3)))
    grid = pool(x, Pooling("grid", 2))
    assert grid.shape == (2, 12)
    assert grid[0, 0] == x[0, 0, :2, :2].mean()
    flat = torch.ones(2, 5)
    assert pool(flat, Pooling("max")) is flat  # vectors pass through
    tokens = torch.ones(2, 7, 5)  # (N, L, D) from a transformer
    assert pool(tokens, Pooling("avg")).shape == (2, 5)
    with pytest.raises(BackboneError, match="cannot pool a layer output of shape"):
        pool(torch.ones(2, 3, 4, 4, 4), Pooling("avg"))
