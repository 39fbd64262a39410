"""Settings declared once, without torch: the extraction options, the decode recipe.

`ExtractOptions` are the `[extract]` keys of conf.toml that the forward pass
and the cache act on, with their limits; the config's `[extract]` section
extends the class (layers, poolings, cache folder) instead of copying it.
`Decoding` is the decode recipe (mode, decompression-bomb limit, background,
the side to decode to), validated when it is made and passed whole to every
place that opens an image file. Nothing here imports torch, so reading
conf.toml checks both before the network stack loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from features.images import DEFAULT_MAX_PIXELS, decode_image
from features.limits import Check, Interval, Limits, OneOf, Pattern, check_limits
from features.names import (
    COMPRESSIONS,
    DECODE_MODES,
    DECODERS,
    DEVICES,
    ENGINES,
    PRECISIONS,
    STORAGE_DTYPES,
)

if TYPE_CHECKING:
    from PIL import Image

    from features.transforms import Preprocessing

# Augmented views (extract.views > 1) crop at least this share of the image, a
# milder range than Inception's 0.08: codes of a frozen network should stay
# recognisably the same object.
VIEW_CROP_SCALE = (0.35, 1.0)
# Fine-tuning's RandomResizedCrop: Inception's range (torchvision's default).
TRAIN_CROP_SCALE = (0.08, 1.0)
# NOTE: fast decoding keeps twice the resize target (Pillow's reducing_gap
# of 2), so the final antialiased resize still does most of the shrinking.
# Keeping just the target (a 4000x3000 photo decoded at 1/8 scale) blurred
# enough to bring 10 of the 200 benchmark photos' codes below cosine 0.995
# to full decoding's (min 0.9936); twice the target (1/4 scale) gave min
# 0.9991 for 15% more decoding time (docs/benchmarks.md).
FAST_DECODE_GAP = 2
# RandomResizedCrop's aspect ratios: 3/4 to 4/3 (torchvision's default).
_CROP_RATIO = (3 / 4, 4 / 3)


def _is_rgb(value: Any) -> bool:
    return len(value) == 3 and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value
    )


# The decode recipe's limits, shared with the [data] keys of the same names.
DECODING_LIMITS: Limits = {
    "decode": OneOf(DECODE_MODES),
    "max_pixels": Interval(0, None, closed="neither"),
    "background": Check(
        _is_rgb, "must be three integers in 0..255 (an RGB colour)", (0, 0)
    ),
}

# A device name as torch spells it; `features.devices` resolves it.
DEVICE = Pattern(r"auto|cpu|cuda(:\d+)?|mps", ", ".join(DEVICES))


@dataclass(frozen=True)
class ExtractOptions:
    """How the forward pass runs and how codes are stored.

    These are the `[extract]` keys of conf.toml, declared here once with
    their limits: the config's `[extract]` section extends this class with
    the layers, poolings and cache folder.
    """

    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    num_workers: int = -1
    dtype: str = "float32"
    compression: str = "none"
    views: int = 1
    shard_size: int = 1024
    engine: str = "auto"
    decoder: str = "auto"
    threads: int = -1

    LIMITS: ClassVar[Limits] = {
        "batch_size": Interval(0, None, closed="neither"),
        "device": DEVICE,
        "precision": OneOf(PRECISIONS),
        "num_workers": Check(
            lambda n: n >= -1, "must be -1 (auto), 0 (main process) or more", -2
        ),
        "dtype": OneOf(STORAGE_DTYPES),
        "compression": OneOf(COMPRESSIONS),
        "views": Interval(1, None),
        "shard_size": Interval(0, None, closed="neither"),
        "engine": OneOf(ENGINES),
        "decoder": OneOf(DECODERS),
        "threads": Check(
            lambda n: n == -1 or n >= 1,
            "must be -1 (chosen with the loader workers) or >= 1",
            0,
        ),
    }

    def __post_init__(self) -> None:
        check_limits("[extract]", self, ExtractOptions.LIMITS)


def decode_side(
    prep: Preprocessing, *, crop_scale: tuple[float, float] | None = None
) -> int | None:
    """The shorter side fast decoding keeps for this preprocessing (None: full).

    For the evaluation transform that is `FAST_DECODE_GAP` times the resize
    target. For a random resized crop (`crop_scale`: its range of area
    shares) it is the side at which even the smallest crop, at the narrowest
    aspect ratio, still holds `input_size` pixels on its shorter side, so no
    crop is upsampled (augmentation has no full-decoding result to match).
    `Decoding.for_input` checks the mode before it asks.
    """
    if prep.decode == "full":
        return None
    if crop_scale is None:
        return FAST_DECODE_GAP * max(prep.resize_size, prep.input_size)
    # NOTE: a crop of area share s and aspect ratio r has a shorter side of
    # sqrt(s * min(r, 1/r)) * sqrt(W * H) >= sqrt(s * 3/4) * min(W, H).
    narrowest = crop_scale[0] * min(_CROP_RATIO[0], 1 / _CROP_RATIO[1])
    return math.ceil(prep.input_size / math.sqrt(narrowest))


@dataclass(frozen=True)
class Decoding:
    """The decode recipe: how an image file becomes RGB pixels, passed whole.

    Attributes:
        decode: "fast" (large images decoded small, for the resize that
            follows) or "full" (every pixel).
        max_pixels: larger images are refused as decompression bombs.
        background: the RGB colour transparent pixels are composited over.
        side: the shorter side fast decoding keeps (None: every pixel); set
            by `for_input` from the network's preprocessing.
    """

    decode: str = "fast"
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, ...] = (255, 255, 255)
    side: int | None = None

    LIMITS: ClassVar[Limits] = DECODING_LIMITS

    def __post_init__(self) -> None:
        check_limits("decoding:", self, self.LIMITS)

    def for_input(
        self, prep: Preprocessing, *, crop_scale: tuple[float, float] | None = None
    ) -> Decoding:
        """The recipe for a network fed as `prep` says (`crop_scale`: random crops).

        The mode is the preprocessing's own: a model is fed its images decoded
        as its training images were, whatever `data.decode` says now.
        """
        side = decode_side(prep, crop_scale=crop_scale)
        return replace(self, decode=prep.decode, side=side)

    def open(self, path: Path) -> Image.Image:
        """The file decoded to RGB as this recipe says.

        Raises:
            ImageDecodeError: the file is unreadable, refused or corrupt.
        """
        return decode_image(
            path,
            max_pixels=self.max_pixels,
            background=self.background,
            min_side=self.side,
        )
