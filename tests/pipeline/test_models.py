"""Models rebuilt from their records: timm hub weights by the revision trained on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from features.errors import CacheMismatchError
from pipeline import export, train
from pipeline.config import Config
from pipeline.models import load_model
from tests.conftest import write_hub_cache

NEWER = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "timm/resnet18.a1_in1k"


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("resnet18").state_dict()


def test_a_codes_model_keeps_the_hub_revision_it_was_trained_on(
    image_folder: Path,
    make_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    trained_on = write_hub_cache(hub, REPO, _weights(0))
    cfg = make_config(
        image_folder,
        f"backbone.name='{REPO}'",
        "backbone.weights=default",
        "train.cv_folds=2",
        "train.C=[1.0]",
        "export.parity_images=8",
    )
    train.run(cfg)
    files = cfg.layout.model("codes")
    assert (
        load_model(files)
        .record["backbone"]["weights_source"]
        .endswith("/model.safetensors")
    )
    # The hub publishes a newer revision, and the cache's main follows it.
    write_hub_cache(hub, REPO, _weights(1), revision=NEWER)
    backbone = load_model(files).backbone()
    assert backbone.weights_file == trained_on
    assert torch.equal(backbone.model.conv1.weight, _weights(0)["conv1.weight"])
    assert export.run(cfg).labels_equal
    # Without the file it was trained on, the newer weights are refused.
    trained_on.unlink()
    with pytest.raises(CacheMismatchError, match="changed since the model was trained"):
        load_model(files).backbone()
