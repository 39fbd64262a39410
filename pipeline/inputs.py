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
from features.distributed import World
from features.errors import DataError, ImageDecodeError
from features.extractor import (
    CodeModel,
    CodePlan,
    ExtractResult,
    extract_codes,
    plan_codes,
)
from features.settings import ExtractOptions
from features.transforms import Preprocessing, eval_transform
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
    decoding = cfg.data.decoding.for_input(prep)
    batch, kept = [], []
    for i, file in enumerate(files):
        try:
            image = decoding.open(file)
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


def plan_for(
    cfg: Config,
    images: ImageSet,
    model: CodeModel,
    options: ExtractOptions | None = None,
) -> CodePlan:
    """Where `extract_for` keeps these codes, and their key (no compute)."""
    return plan_codes(
        images,
        model,
        options or cfg.extract,
        cfg.cache_dir,
        decoding=cfg.data.decoding,
        seed=cfg.run.seed,
    )


def extract_for(
    cfg: Config,
    images: ImageSet | None,
    model: CodeModel,
    *,
    options: ExtractOptions | None = None,
    world: World | None = None,
) -> ExtractResult:
    """`extract_codes` with the configured options, decode recipe, seed, cache.

    `options` replaces `[extract]` (the same class, e.g. with other views).
    """
    return extract_codes(
        images,
        model,
        options=options or cfg.extract,
        cache_dir=cfg.cache_dir,
        decoding=cfg.data.decoding,
        seed=cfg.run.seed,
        progress=cfg.run.progress,
        world=world,
    )
