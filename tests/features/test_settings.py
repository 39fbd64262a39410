"""Tests for features/settings.py: the decode recipe and the extraction options."""

from __future__ import annotations

import math

import pytest

from features.errors import ConfigError
from features.settings import (
    TRAIN_CROP_SCALE,
    VIEW_CROP_SCALE,
    Decoding,
    ExtractOptions,
    decode_side,
)
from features.transforms import Preprocessing


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


def test_the_decode_recipe_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'gpu' is not one of"):
        Decoding().for_input(Preprocessing(decode="gpu"))


def test_the_decode_recipe_takes_the_mode_and_side_of_its_input() -> None:
    recipe = Decoding(decode="full", max_pixels=1000, background=(0, 0, 0))
    fast = recipe.for_input(Preprocessing(decode="fast"))
    assert (fast.decode, fast.side) == ("fast", 2 * 256)
    assert (fast.max_pixels, fast.background) == (1000, (0, 0, 0))
    assert Decoding().for_input(Preprocessing()).side is None  # full: every pixel


def test_extraction_options_check_their_limits() -> None:
    with pytest.raises(ConfigError, match=r"\[extract\] batch_size must be > 0, got 0"):
        ExtractOptions(batch_size=0)
