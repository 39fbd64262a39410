"""Tests for features/transforms.py: preprocessing and the shared resize + crop."""

from __future__ import annotations

import torch
from PIL import Image

from features.transforms import Preprocessing, eval_transform, resize_crop


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
