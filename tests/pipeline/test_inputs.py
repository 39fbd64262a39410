"""Tests for pipeline/inputs.py: the shared stage inputs carry the decoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from features.images import decode_image
from features.settings import decode_side
from features.transforms import eval_transform
from pipeline import inputs
from pipeline.config import Config
from tests.conftest import write_photo

MakeConfig = Callable[..., Config]


def test_load_backbone_carries_data_decode(
    image_folder: Path, make_config: MakeConfig
) -> None:
    assert (
        inputs.load_backbone(make_config(image_folder)).preprocessing.decode == "fast"
    )
    full = make_config(image_folder, "data.decode='full'")
    assert inputs.load_backbone(full).preprocessing.decode == "full"


def test_decode_pixels_decodes_photos_as_the_preprocessing_says(
    tmp_path: Path, image_folder: Path, make_config: MakeConfig
) -> None:
    photo = write_photo(tmp_path / "cat.jpg", (1600, 1200))
    cfg = make_config(image_folder)
    prep = inputs.load_backbone(cfg).preprocessing
    pixels, kept = inputs.decode_pixels(cfg, [photo, tmp_path / "missing.jpg"], prep)
    assert kept == [0]
    expected = eval_transform(prep)(decode_image(photo, min_side=decode_side(prep)))
    np.testing.assert_array_equal(pixels[0], expected.numpy())
