"""Tests for pipeline/finetune/data.py: fast decoding of training images."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from features import settings
from features.settings import TRAIN_CROP_SCALE, Decoding
from features.transforms import Preprocessing
from pipeline import finetune
from pipeline.finetune import data as finetune_data
from tests.conftest import write_photo
from tests.pipeline.finetune.conftest import config, write_classes

FAST = Preprocessing(input_size=224, resize_size=256, decode="fast")


def train_side(prep: Preprocessing, augment: str) -> int | None:
    return finetune_data.train_decoding(Decoding(), prep, augment).side


def test_train_decode_side_keeps_random_crops_at_full_detail() -> None:
    side = train_side(FAST, "standard")
    assert side == math.ceil(224 / math.sqrt(TRAIN_CROP_SCALE[0] * 3 / 4))
    assert train_side(FAST, "none") == 512  # evaluation's
    assert train_side(Preprocessing(), "standard") is None


def test_labelled_images_decode_with_their_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = write_photo(tmp_path / "cat.jpg", (1600, 1200))
    seen: list[object] = []
    real = settings.decode_image

    def spy(path: Path, **kwargs: object) -> object:
        seen.append(kwargs["min_side"])
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(settings, "decode_image", spy)
    dataset = finetune_data.LabelledImages(
        [photo],
        [0],
        finetune_data.train_transform(FAST, "standard"),
        size=224,
        seed=0,
        decoding=finetune_data.train_decoding(
            Decoding(max_pixels=10**8), FAST, "standard"
        ),
    )
    image, label, _, ok = dataset[0]
    assert ok and label == 0 and tuple(image.shape) == (3, 224, 224)
    assert seen == [915]


def test_dropping_the_last_partial_batch_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_classes(tmp_path / "data")
    cfg = config(root, tmp_path / "run", "finetune.batch_size=5", "finetune.epochs=1")
    with caplog.at_level(logging.INFO):
        finetune.run(cfg)
    assert "each epoch trains on 15 of the 18 training images" in caplog.text
