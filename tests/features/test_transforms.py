"""Tests for features/transforms.py: decode sides and the shared resize + crop."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from features.transforms import (
    TRAIN_CROP_SCALE,
    VIEW_CROP_SCALE,
    Preprocessing,
    decode_side,
    eval_transform,
    resize_crop,
)


def test_decode_side_is_none_for_full_decoding() -> None:
    assert Preprocessing().decode == "full"  # records without "decode" are full
    assert decode_side(Preprocessing()) is None


def test_decode_side_keeps_twice_the_resize_target_for_evaluation() -> None:
    prep = Preprocessing(input_size=224, resize_size=256, decode="fast")
    assert decode_side(prep) == 2 * 256


@pytest.mark.parametrize("scale", [VIEW_CROP_SCALE, TRAIN_CROP_SCALE])
def test_decode_side_keeps_the_smallest_random_crop_at_full_detail(
    scale: tuple[float, float],
) -> None:
    prep = Preprocessing(input_size=224, resize_size=256, decode="fast")
    side = decode_side(prep, crop_scale=scale)
    assert side is not None
    # The narrowest, smallest crop of a side x side image still has 224 px.
    assert math.sqrt(scale[0] * 3 / 4) * side >= 224
    assert math.sqrt(scale[0] * 3 / 4) * (side - 1) < 224


def test_decode_side_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'gpu' is not one of"):
        decode_side(Preprocessing(decode="gpu"))


def test_preprocessing_records_and_restores_the_decode_mode() -> None:
    prep = Preprocessing(decode="fast")
    assert prep.as_dict()["decode"] == "fast"
    assert Preprocessing().updated(prep.as_dict()) == prep
    # A record written before fast decoding existed means full decoding.
    old = {k: v for k, v in prep.as_dict().items() if k != "decode"}
    assert Preprocessing().updated(old).decode == "full"


def test_resize_crop_gives_the_same_pixels_for_pil_images_and_tensors() -> None:
    prep = Preprocessing(input_size=24, resize_size=32)
    gradient = torch.arange(80 * 60 * 3, dtype=torch.int64).reshape(60, 80, 3) % 251
    image = Image.fromarray(gradient.to(torch.uint8).numpy())
    from_pil = eval_transform(prep)(image)
    from_tensor = resize_crop(prep)(gradient.to(torch.uint8).permute(2, 0, 1))
    assert from_pil.shape == from_tensor.shape == (3, 24, 24)
    diff = (from_pil.int() - from_tensor.int()).abs()
    assert diff.float().mean() < 1.0
