"""timm backbones: names, the missing extra, weights (hub cache, offline, files)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from features.backbones import build_backbone, sha256_of
from features.backbones.registry import check_backbone_name
from features.errors import BackboneError, ConfigError, WeightsNotFoundError
from features.transforms import Normalize, eval_transform
from pipeline.config import load_config
from tests.conftest import REVISION, Planted, write_hub_cache


def _timm_resnet18(classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=classes).eval()


@pytest.mark.parametrize(
    "name, pattern",
    [
        (
            "timm/resnt18",
            r"timm has no model 'resnt18'.*Did you mean \['timm/resnet18'",
        ),
        (
            "timm/resnet18.no_such_tag",
            r"resnet18 has no pretrained tag 'no_such_tag'; its tags: \[.*'a1_in1k'",
        ),
        ("vit_small_patch14_dinov2", r"Did you mean 'timm/vit_small_patch14_dinov2'"),
    ],
)
def test_unknown_names_say_what_timm_has(name: str, pattern: str) -> None:
    with pytest.raises(BackboneError, match=pattern):
        check_backbone_name(name)
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [f"backbone.name='{name}'"])


def test_timm_names_pass_the_config_and_registry_checks() -> None:
    check_backbone_name("timm/convnext_tiny.fb_in22k")
    cfg = load_config(None, ["backbone.name='timm/vit_small_patch14_dinov2.lvd142m'"])
    assert cfg.backbone.name == "timm/vit_small_patch14_dinov2.lvd142m"


def test_without_timm_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    install = r'pip install "quadrant\[timm\]"'
    with pytest.raises(
        BackboneError, match=f"needs timm, an optional extra.*{install}"
    ):
        build_backbone("timm/resnet18", "random")
    with pytest.raises(ConfigError, match=install):
        load_config(None, ["backbone.name='timm/resnet18'"])
    # Other backbones do not need it.
    assert build_backbone("resnet18", "random").name == "resnet18"


def test_preprocessing_is_timms_pretrained_config() -> None:
    backbone = build_backbone("timm/resnet18.a1_in1k", "random")
    prep = backbone.preprocessing
    # crop_pct 0.95: the shorter side goes to floor(224 / 0.95) = 235.
    assert (prep.input_size, prep.resize_size, prep.interpolation) == (
        224,
        235,
        "bicubic",
    )
    assert prep.mean == (0.485, 0.456, 0.406) and prep.std == (0.229, 0.224, 0.225)
    identity = backbone.identity()
    assert identity["timm_model"] == "resnet18.a1_in1k"
    assert identity["pretrained_data"]["crop_pct"] == 0.95
    # Overrides work as for every backbone; the size alone keeps the ratio.
    small = build_backbone(
        "timm/resnet18.a1_in1k", "random", preprocessing={"input_size": 112}
    )
    assert (small.preprocessing.input_size, small.preprocessing.resize_size) == (
        112,
        118,
    )


def test_preprocessed_pixels_equal_timms_own_transform() -> None:
    import skimage.data
    from timm.data import create_transform, resolve_data_config

    backbone = build_backbone("timm/convnext_atto.d2_in1k", "random")
    image = Image.fromarray(skimage.data.chelsea())
    prep = backbone.preprocessing
    ours = Normalize(prep.mean, prep.std)(eval_transform(prep)(image)[None])[0]
    config = resolve_data_config(model=backbone.model)
    theirs = create_transform(**config)(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_random_timm_weights_are_seeded() -> None:
    a = build_backbone("timm/resnet18", "random", seed=1).model.conv1.weight
    b = build_backbone("timm/resnet18", "random", seed=1).model.conv1.weight
    c = build_backbone("timm/resnet18", "random", seed=2).model.conv1.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_local_checkpoint_loads_without_pickle(tmp_path: Path, suffix: str) -> None:
    model = _timm_resnet18(classes=5)
    file = tmp_path / f"five.{suffix}"
    if suffix == "safetensors":
        save_file(model.state_dict(), file)
    else:  # as timm's train script saves it
        torch.save({"epoch": 3, "state_dict": model.state_dict()}, file)
    backbone = build_backbone("timm/resnet18", str(file))
    assert backbone.model.fc.out_features == 5  # the file's head is kept
    assert torch.equal(backbone.model.fc.weight, model.fc.weight)
    identity = backbone.identity()
    assert identity["weights_sha256"] == sha256_of(file)
    assert identity["weights_file"] == str(file.resolve())
    assert identity["num_classes"] == 5
    rehead = build_backbone("timm/resnet18", str(file), num_classes=3)
    assert rehead.model.fc.out_features == 3
    assert torch.equal(rehead.model.conv1.weight, model.conv1.weight)
    assert rehead.model.fc.weight.std() < 0.02  # a small new head


def test_a_pth_file_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    file = tmp_path / "planted.pth"
    torch.save({"epoch": 3, "state_dict": Planted(marker)}, file)
    with pytest.raises(BackboneError, match="planted.pth is not a PyTorch weights"):
        build_backbone("timm/resnet18", str(file))
    assert not marker.exists()


def test_checkpoints_without_a_head_and_of_another_network(tmp_path: Path) -> None:
    headless = tmp_path / "body.safetensors"
    save_file(_timm_resnet18(classes=0).state_dict(), headless)
    backbone = build_backbone("timm/resnet18", str(headless))
    assert backbone.identity()["num_classes"] == 0
    other = tmp_path / "resnet34.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("resnet34").state_dict(), other)
    with pytest.raises(BackboneError, match="do not fit backbone 'timm/resnet18'"):
        build_backbone("timm/resnet18", str(other))


def test_offline_without_the_file_names_model_file_and_cache() -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("timm/resnet18.a1_in1k", "default")
    message = str(err.value)
    assert "pretrained weights for timm/resnet18.a1_in1k" in message
    assert "model.safetensors or pytorch_model.bin" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert str(Path(constants.HF_HUB_CACHE) / "models--timm--resnet18.a1_in1k") in (
        message
    )
    assert "backbone.weights" in message


def test_weights_come_from_the_hub_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = _timm_resnet18(seed=3)
    file = write_hub_cache(
        tmp_path / "hub", "timm/resnet18.a1_in1k", model.state_dict()
    )
    backbone = build_backbone("timm/resnet18.a1_in1k", "default", num_classes=4)
    assert torch.equal(backbone.model.conv1.weight, model.conv1.weight)
    assert backbone.model.fc.out_features == 4
    identity = backbone.identity()
    assert identity["weights_source"] == (
        f"hf-hub:timm/resnet18.a1_in1k@{REVISION}/model.safetensors"
    )
    assert identity["weights_sha256"] == sha256_of(file)
    # "timm/resnet18" is timm's default tag: the same file.
    assert build_backbone("timm/resnet18", "default").weights_file == file


def test_vit_is_built_for_the_input_size_in_whole_patches() -> None:
    vit = build_backbone(
        "timm/vit_tiny_patch16_224", "random", preprocessing={"input_size": 48}
    )
    assert vit.model.patch_embed.num_patches == 9
    with pytest.raises(BackboneError, match="must be a multiple of 16; got 40"):
        build_backbone(
            "timm/vit_tiny_patch16_224", "random", preprocessing={"input_size": 40}
        )


def test_weights_tags_belong_in_the_name() -> None:
    with pytest.raises(BackboneError, match="chosen by the tag in the name"):
        build_backbone("timm/resnet18", "IMAGENET1K_V1")


def test_pretrained_vit_weights_follow_another_input_size(tmp_path: Path) -> None:
    # timm's checkpoint filter resamples position embeddings for the new size.
    torch.manual_seed(0)
    native = timm.create_model("vit_tiny_patch16_224").eval()
    file = tmp_path / "vit.safetensors"
    save_file(native.state_dict(), file)
    small = build_backbone(
        "timm/vit_tiny_patch16_224", str(file), preprocessing={"input_size": 64}
    ).model
    assert small.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(
        small.blocks[3].attn.qkv.weight, native.blocks[3].attn.qkv.weight
    )
    pixels = np.zeros((1, 3, 64, 64), dtype=np.float32)
    assert small(torch.from_numpy(pixels)).shape == (1, 1000)
