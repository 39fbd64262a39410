from __future__ import annotations

import pytest
import torch

from features.backbones import Backbone, build_backbone
from features.errors import BackboneError
from features.extractor import CodeModel
from features.layers import (
    OutputLayout,
    as_nchw,
    code_dims,
    layer_names,
    layer_shapes,
    pool,
    resolve_layers,
    resolve_top,
    spread_layers,
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
        ("cls", Pooling("cls")),
        ("patch_avg", Pooling("patch_avg")),
        ("cls+patch_avg", Pooling("cls+patch_avg")),
    ],
)
def test_parse_pooling(spec: str, expected: Pooling) -> None:
    assert parse_pooling(spec) == expected
    assert expected.spec == spec


@pytest.mark.parametrize("spec", ["mean", "grid:", "grid:0", "grid:x", "avg+min"])
def test_parse_pooling_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match=r"use avg, max, avg\+max, grid:K with K >= 1"):
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


# ---------------------------------------------------------------------------
# timm networks: stages, top, spread depths, transformer tokens


@pytest.fixture(scope="module")
def timm_resnet() -> Backbone:
    return build_backbone("timm/resnet18", "random", preprocessing={"input_size": 32})


@pytest.fixture(scope="module")
def timm_vit() -> Backbone:
    return build_backbone(
        "timm/vit_tiny_patch16_224", "random", preprocessing={"input_size": 32}
    )


def test_timm_cnn_layers_are_its_stages_then_the_head(timm_resnet: Backbone) -> None:
    model = timm_resnet.model
    names = layer_names(model)
    assert names == [
        "act1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "global_pool.pool",
        "global_pool.flatten",
        "fc",
    ]
    assert resolve_top(model) == "global_pool.flatten"
    assert spread_layers(model, 32) == ["layer1", "layer2", "layer3", "layer4", "top"]
    assert layer_shapes(model, ["layer2", "top"], 32) == {
        "layer2": (128, 4, 4),
        "top": (512,),
    }


def test_timm_vit_layers_are_its_blocks_and_top_its_pre_logits(
    timm_vit: Backbone,
) -> None:
    model = timm_vit.model
    names = layer_names(model)
    assert names[:12] == [f"blocks.{i}" for i in range(12)]
    assert names[12:] == ["norm", "fc_norm", "head_drop", "head"]
    assert resolve_top(model) == "fc_norm"
    # Depths spread over the blocks, whose outputs are tokens (L, D).
    spread = spread_layers(model, 32)
    assert spread == [
        "blocks.2",
        "blocks.4",
        "blocks.7",
        "blocks.9",
        "blocks.11",
        "top",
    ]
    assert layer_shapes(model, ["blocks.4"], 32) == {"blocks.4": (5, 192)}


def test_vit_poolings_give_class_token_patch_mean_or_both(timm_vit: Backbone) -> None:
    model = CodeModel(
        timm_vit, ["blocks.3", "top"], ["cls", "patch_avg", "cls+patch_avg", "avg"]
    )
    dims = {s.name: s.dims for s in model.specs}
    assert dims == {
        "blocks.3/cls": 192,
        "blocks.3/patch_avg": 192,
        "blocks.3/cls+patch_avg": 384,
        "blocks.3/avg": 192,
        "top/none": 192,
    }
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        codes = model(pixels)
        tokens = model.features(model.normalize(pixels))["blocks.3"]
    assert codes["blocks.3/cls+patch_avg"].shape == (3, 384)
    torch.testing.assert_close(codes["blocks.3/cls"], tokens[:, 0])
    torch.testing.assert_close(codes["blocks.3/patch_avg"], tokens[:, 1:].mean(1))
    torch.testing.assert_close(
        codes["blocks.3/cls+patch_avg"],
        torch.cat([codes["blocks.3/cls"], codes["blocks.3/patch_avg"]], 1),
    )


def test_vit_class_token_equals_timms_forward_features(timm_vit: Backbone) -> None:
    model = CodeModel(timm_vit, ["norm", "top"], ["cls"])
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        codes = model(pixels)
        features = timm_vit.model.forward_features(model.normalize(pixels))
        pre_logits = timm_vit.model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(codes["norm/cls"], features[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(codes["top/none"], pre_logits, rtol=0, atol=1e-6)


def test_token_poolings_refuse_spatial_layers(timm_resnet: Backbone) -> None:
    with pytest.raises(
        BackboneError,
        match=r"layer 'layer2': pooling 'cls' takes a transformer block's tokens",
    ):
        CodeModel(timm_resnet, ["layer2"], ["cls"])


def test_token_pooling_values_follow_the_layout() -> None:
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    registers = OutputLayout(prefix_tokens=5, tokens=7)  # class + 4 registers
    torch.testing.assert_close(
        pool(tokens, Pooling("patch_avg"), registers), tokens[:, 5:].mean(1)
    )
    assert pool(tokens, Pooling("cls+patch_avg"), registers).shape == (2, 6)
    with pytest.raises(BackboneError, match="no class token; use patch_avg"):
        pool(tokens, Pooling("cls"), OutputLayout(0, class_token=False))
    with pytest.raises(BackboneError, match="of the 9 tokens; this layer outputs"):
        pool(tokens, Pooling("cls"), OutputLayout(tokens=9))
    nhwc = torch.rand(2, 4, 4, 8)
    assert as_nchw(nhwc, OutputLayout(nhwc=True)).shape == (2, 8, 4, 4)


@pytest.mark.parametrize(
    "shape, spec, dims",
    [((64, 4, 4), "avg+max", 128), ((5, 192), "cls+patch_avg", 384)],
)
def test_code_dims(shape: tuple[int, ...], spec: str, dims: int) -> None:
    assert code_dims(shape, parse_pooling(spec)) == dims
    assert code_dims((64, 4, 4), parse_pooling("cls")) is None
