"""Preprocessing a backbone carries: resize, crop, mean, std.

Images leave the data loader as uint8 tensors and are normalised on the device
(`Normalize` below): a uint8 batch is a quarter of the bytes of a float batch on
its way to the GPU, and the exported ONNX graph takes the same uint8 input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from features.settings import VIEW_CROP_SCALE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's mode for each of `names.INTERPOLATIONS`.
INTERPOLATION_MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    # NOTE: "full" is the default of the dataclass because a record written
    # before fast decoding existed (a model.json, an ONNX file's metadata)
    # has no "decode" entry and was made from fully decoded pixels; the
    # config's `data.decode` ("fast" by default) sets it for new work.
    decode: str = "full"

    def as_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }

    def updated(self, overrides: Mapping[str, Any]) -> Preprocessing:
        """A copy with the non-None entries of `overrides` applied.

        Overriding the input size alone keeps the backbone's resize/crop ratio.
        """
        given: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in overrides.items()
            if v is not None
        }
        if "input_size" in given and "resize_size" not in given:
            ratio = self.resize_size / self.input_size
            given["resize_size"] = round(given["input_size"] * ratio)
        return replace(self, **given)


def resize_crop(prep: Preprocessing) -> T.Compose:
    """Resize the shorter side to `resize_size`, centre-crop `input_size`.

    Works on PIL images and on uint8 tensors (N, 3, H, W) alike: the CPU
    path and GPU decoding share it.
    """
    mode = INTERPOLATION_MODES[prep.interpolation]
    return T.Compose(
        [
            T.Resize(prep.resize_size, interpolation=mode, antialias=True),
            T.CenterCrop(prep.input_size),
        ]
    )


def eval_transform(prep: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic resize + centre crop to a (3, S, S) uint8 tensor."""
    return T.Compose([*resize_crop(prep).transforms, T.PILToTensor()])


def view_transform(prep: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """A random crop and flip for augmented views; seed the torch RNG before use."""
    mode = INTERPOLATION_MODES[prep.interpolation]
    return T.Compose(
        [
            T.RandomResizedCrop(
                prep.input_size,
                scale=VIEW_CROP_SCALE,
                interpolation=mode,
                antialias=True,
            ),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


class Normalize(nn.Module):
    """uint8 or [0, 255] float images (N, 3, H, W) to normalised float input."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # Folding 1/255 into the constants keeps this at one multiply-add.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)])
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift.view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.scale.dtype) * self.scale + self.shift
