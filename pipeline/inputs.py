"""What every stage reads from the config: backbone, images, pixels, options.

One home for these, so that stages share inputs through this module instead
of importing each other's helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from features.backbones import Backbone, build_backbone
from features.data import ImageSet, discover
from features.errors import DataError, ImageDecodeError
from features.extractor import ExtractOptions
from features.images import decode_image
from features.transforms import Preprocessing, decode_side, eval_transform
from pipeline.config import Config


def load_backbone(cfg: Config) -> Backbone:
    """The configured backbone with its preprocessing overrides applied."""
    b = cfg.backbone
    return build_backbone(
        b.name, b.weights, seed=cfg.run.seed, preprocessing=preprocessing_overrides(cfg)
    )


def preprocessing_overrides(cfg: Config) -> dict[str, Any]:
    """`[backbone]`'s preprocessing overrides plus `data.decode`.

    NOTE: the decoding mode travels inside the preprocessing, so the cache
    key, model.json, the ONNX metadata and `quadrant predict` all carry the
    pixels' recipe the model was trained on.
    """
    return {**cfg.backbone.preprocessing(), "decode": cfg.data.decode}


def load_images(cfg: Config) -> ImageSet:
    """List, probe and split the configured images."""
    d = cfg.data
    return discover(
        d.root,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.seed,
        max_pixels=d.max_pixels,
        fingerprint=d.fingerprint,
    )


def load_pixels(
    cfg: Config, files: Sequence[Path], prep: Preprocessing
) -> npt.NDArray[np.uint8]:
    """The readable `files` decoded and resized as `prep` says: (N, 3, S, S) uint8.

    Unreadable files are left out: extraction reports them (file and reason).

    Raises:
        DataError: not one of `files` is readable.
    """
    return decode_pixels(cfg, files, prep)[0]


def decode_pixels(
    cfg: Config, files: Sequence[Path], prep: Preprocessing
) -> tuple[npt.NDArray[np.uint8], list[int]]:
    """`load_pixels`, and the index in `files` of each image it kept.

    Raises:
        DataError: not one of `files` is readable.
    """
    transform = eval_transform(prep)
    side = decode_side(prep)
    batch, kept = [], []
    for i, file in enumerate(files):
        try:
            image = decode_image(
                file,
                max_pixels=cfg.data.max_pixels,
                background=cfg.data.background,
                min_side=side,
            )
        except ImageDecodeError:
            continue
        batch.append(transform(image).numpy())
        kept.append(i)
    if not batch:
        raise DataError(
            f"none of the {len(files)} images could be read; `quadrant extract` "
            "lists each unreadable file and why"
        )
    return np.stack(batch), kept


def extract_options(cfg: Config) -> ExtractOptions:
    """The `[extract]` table plus the decoding and seed settings it depends on."""
    e = cfg.extract
    return ExtractOptions(
        batch_size=e.batch_size,
        device=e.device,
        precision=e.precision,
        channels_last=e.channels_last,
        num_workers=e.num_workers,
        dtype=e.dtype,
        compression=e.compression,
        views=e.views,
        shard_size=e.shard_size,
        seed=cfg.run.seed,
        background=cfg.data.background,
        max_pixels=cfg.data.max_pixels,
        progress=cfg.run.progress,
        engine=e.engine,
        decoder=e.decoder,
        threads=e.threads,
    )
