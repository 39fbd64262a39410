from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from features.backbones import (
    available_backbones,
    build_backbone,
    check_input_size,
    fixed_input_size,
    registry,
)
from features.backbones.torchvision_weights import cache_path, weights_enum
from features.errors import BackboneError, WeightsNotFoundError


def test_available_backbones_lists_torchvision_and_lite() -> None:
    names = available_backbones()
    assert {"resnet50", "convnext_tiny", "vit_b_16", "efficientnet_lite0"} <= set(names)


@pytest.mark.parametrize(
    "name, weights, side",
    [
        ("vit_b_16", "default", 224),
        ("vit_b_16", "random", 224),
        ("vit_h_14", "default", 518),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 384),
        ("maxvit_t", "default", 224),
        ("resnet18", "default", None),
        ("swin_t", "default", None),
        ("efficientnet_lite0", "default", None),
        ("timm/vit_tiny_patch16_224", "default", None),
    ],
)
def test_fixed_input_size_names_the_side_a_vit_takes(
    name: str, weights: str, side: int | None
) -> None:
    assert fixed_input_size(name, weights) == side


def test_a_vit_at_another_side_is_refused_before_it_is_built() -> None:
    check_input_size("vit_b_16", "default", 224)
    with pytest.raises(BackboneError, match=r"vit_b_16 takes only 224x224 inputs"):
        build_backbone("vit_b_16", "random", preprocessing={"input_size": 32})


def test_a_vit_is_built_for_the_side_of_its_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # vit_h_14's default weights are for 518 px, not torchvision's 224 default
    # (building the real 632M-parameter model here would take a minute).
    built: dict[str, object] = {}

    def spy(name: str, **kwargs: object) -> torch.nn.Module:
        built.update(kwargs, name=name)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(registry, "get_model", spy)
    backbone = build_backbone("vit_h_14", "random")
    assert backbone.preprocessing.input_size == 518
    assert built == {"name": "vit_h_14", "weights": None, "image_size": 518}


def test_torchvision_weights_offline_error_names_file_and_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(url: str, dst: str, hash_prefix: str | None = None) -> None:
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = cache_path(weights_enum("resnet18", "IMAGENET1K_V1").url)
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("resnet18", "IMAGENET1K_V1")
    message = str(err.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "TORCH_HOME" in message and "backbone.weights" in message


def test_torchvision_weights_load_from_the_hub_cache() -> None:
    # A file in torch hub's cache is used as is, as torchvision itself does.
    torch.manual_seed(5)
    state = resnet18().state_dict()
    file = cache_path(weights_enum("resnet18", "default").url)
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    backbone = build_backbone("resnet18", "default")
    assert torch.equal(backbone.model.conv1.weight, state["conv1.weight"])
    assert backbone.weights_file == file
    assert backbone.preprocessing.input_size == 224
    assert backbone.preprocessing.resize_size == 256
    assert len(backbone.weights_sha256) == 64


def test_unknown_weights_tag_lists_the_valid_ones() -> None:
    with pytest.raises(
        BackboneError,
        match=r"resnet50 has no weights 'IMAGENET2K'.*"
        r"'IMAGENET1K_V1', 'IMAGENET1K_V2'",
    ):
        build_backbone("resnet50", "IMAGENET2K")


def test_random_weights_are_seeded() -> None:
    a = build_backbone("resnet18", "random", seed=1).model.conv1.weight
    b = build_backbone("resnet18", "random", seed=1).model.conv1.weight
    c = build_backbone("resnet18", "random", seed=2).model.conv1.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_local_checkpoint_with_another_head_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=5)
    file = tmp_path / "five.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, file
    )
    backbone = build_backbone("resnet18", str(file))
    assert backbone.model.fc.out_features == 5
    assert torch.equal(backbone.model.fc.weight, model.fc.weight)
    assert backbone.identity()["num_classes"] == 5
    rehead = build_backbone("resnet18", str(file), num_classes=3)
    assert rehead.model.fc.out_features == 3
    assert torch.equal(rehead.model.conv1.weight, model.conv1.weight)


def test_a_weights_file_replaced_in_place_gets_its_new_identity(
    tmp_path: Path,
) -> None:
    file = tmp_path / "w.pth"
    torch.save(resnet18().state_dict(), file)
    first = build_backbone("resnet18", str(file)).weights_sha256
    stat = file.stat()
    torch.manual_seed(1)
    torch.save(resnet18().state_dict(), file)  # same size
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, as cp -p
    assert file.stat().st_size == stat.st_size
    assert build_backbone("resnet18", str(file)).weights_sha256 != first


BAD_FILES = [
    ("missing.pth", None, WeightsNotFoundError, r"missing.pth not found"),
    ("text.pth", b"hello", BackboneError, r"is not a PyTorch weights file"),
    ("list.pth", [torch.zeros(1)], BackboneError, r"holds a list, not a state_dict"),
    (
        "other.pth",
        "resnet34",
        BackboneError,
        r"does not fit backbone 'resnet18': .*unexpected key.*check that backbone.name",
    ),
]


@pytest.mark.parametrize("name, content, error, pattern", BAD_FILES)
def test_wrong_model_files_get_clear_errors(
    tmp_path: Path, name: str, content: object, error: type[Exception], pattern: str
) -> None:
    file = tmp_path / name
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content == "resnet34":
        from torchvision.models import resnet34

        torch.save(resnet34().state_dict(), file)
    elif content is not None:
        torch.save(content, file)
    with pytest.raises(error, match=pattern):
        build_backbone("resnet18", str(file))


def test_preprocessing_overrides_keep_the_crop_ratio() -> None:
    backbone = build_backbone("resnet18", "random", preprocessing={"input_size": 112})
    assert backbone.preprocessing.input_size == 112
    assert backbone.preprocessing.resize_size == 128


def test_efficientnet_lite0_default_weights_are_the_real_ones() -> None:
    backbone = build_backbone("efficientnet_lite0")
    assert backbone.weights_file is not None
    assert backbone.weights_file.name == "efficientnet-lite0-57934424.pth"
    assert backbone.weights_sha256.startswith("57934424")
    assert backbone.preprocessing.mean == pytest.approx((127 / 255,) * 3)
    with pytest.raises(BackboneError, match="efficientnet_lite0 has weights 'default'"):
        build_backbone("efficientnet_lite0", "IMAGENET1K_V2")


def test_a_fine_tuned_quadrant_model_serves_as_backbone(tmp_path: Path) -> None:
    from features.transforms import Preprocessing
    from pipeline.models import ImageClassifier

    torch.manual_seed(0)
    net = resnet18(num_classes=5)
    file = tmp_path / "model.pt"
    torch.save(ImageClassifier(net, Preprocessing()).state_dict(), file)
    backbone = build_backbone("resnet18", str(file))
    assert backbone.model.fc.out_features == 5
    assert torch.equal(
        backbone.model.layer1[0].conv1.weight, net.layer1[0].conv1.weight
    )
