"""The extraction stage: images in, cached CNN codes out."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from features.backbones import Backbone, build_backbone
from features.cache import (
    atomic_write_text,
    diff_provenance,
    find_compatible,
    read_provenance,
    same_codes,
)
from features.data import ImageSet, discover
from features.errors import CacheMismatchError, DataError, ImageDecodeError
from features.extractor import (
    CodeModel,
    ExtractOptions,
    ExtractResult,
    extract_codes,
    plan_codes,
)
from features.images import decode_image
from features.transforms import Preprocessing, eval_transform
from pipeline.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config) -> ExtractResult:
    """Write (or reuse) the codes of every image under `cfg.data.root`.

    The backbone and its layers are checked first, then the images are listed
    and probed, and only then does the forward pass start, so a wrong layer
    name or a bad data layout fails in seconds.

    Raises:
        StageInputError: data.root does not exist.
        DataError: no usable images, an empty class, a class too small to split.
        BackboneError: unknown weights or layer.
    """
    model, images = prepare(cfg)
    return _extract(cfg, model, images)


def prepare(cfg: Config) -> tuple[CodeModel, ImageSet]:
    """The code model (backbone cut at the layers) and the checked images."""
    backbone = load_backbone(cfg)
    model = CodeModel(backbone, cfg.extract.layers, cfg.extract.pooling)
    return model, load_images(cfg)


def _extract(cfg: Config, model: CodeModel, images: ImageSet) -> ExtractResult:
    log.info(
        "extracting %d images (%d classes) at %dpx, layers %s",
        len(images),
        len(images.label_names),
        model.preprocessing.input_size,
        list(cfg.extract.layers),
    )
    result = extract_codes(
        images, model, options=extract_options(cfg), cache_dir=cfg.cache_dir
    )
    _write_summary(cfg, images, result)
    for path, reason in result.skipped:
        log.warning("skipped %s: %s", path, reason)
    return result


def locate_codes(cfg: Config, explicit: Path | None = None) -> Path:
    """The code cache a training stage should read, extracting it if needed.

    In order: `explicit` (checked against the configuration), the exact
    cache, a cache holding the same codes computed elsewhere (another device,
    precision or batch size: rounding differences only), a fresh extraction.

    Raises:
        CacheMismatchError: `explicit` holds codes of another configuration,
            listing every difference.
    """
    model, images = prepare(cfg)
    plan = plan_codes(images, model, extract_options(cfg), cfg.cache_dir)
    if explicit is not None:
        found = read_provenance(explicit)
        if not same_codes(plan.provenance, found):
            raise CacheMismatchError(
                f"{explicit} holds other codes than conf.toml asks for:\n  "
                + "\n  ".join(diff_provenance(plan.provenance, found))
                + "\nFix the config, or drop train.codes to extract matching codes."
            )
        return explicit
    if plan.path.exists():
        return plan.path
    compatible = find_compatible(cfg.cache_dir, plan.provenance)
    if compatible is not None:
        log.info("using %s: the same codes, computed with other settings", compatible)
        return compatible
    return _extract(cfg, model, images).path


def load_backbone(cfg: Config) -> Backbone:
    """The configured backbone with its preprocessing overrides applied."""
    b = cfg.backbone
    return build_backbone(
        b.name, b.weights, seed=cfg.run.seed, preprocessing=b.preprocessing()
    )


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
    transform = eval_transform(prep)
    batch = []
    for file in files:
        try:
            image = decode_image(
                file, max_pixels=cfg.data.max_pixels, background=cfg.data.background
            )
        except ImageDecodeError:
            continue
        batch.append(transform(image).numpy())
    if not batch:
        raise DataError(
            f"none of the {len(files)} images could be read; `quadrant extract` "
            "lists each unreadable file and why"
        )
    return np.stack(batch)


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
    )


def _write_summary(cfg: Config, images: ImageSet, result: ExtractResult) -> None:
    summary = {
        "cache": str(result.path),
        "key": result.key,
        "reused": result.reused,
        "images": result.n_images,
        "rows": result.n_rows,
        "classes": list(images.label_names),
        "splits": {s: sum(c.values()) for s, c in images.counts().items()},
        "codes": {
            s.name: {
                "node": s.node,
                "dims": s.dims,
                "source_shape": list(s.source_shape),
            }
            for s in result.specs
        },
        "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2),
        "skipped": [{"path": p, "reason": r} for p, r in result.skipped],
    }
    atomic_write_text(
        cfg.run.out / "extract.json", json.dumps(summary, indent=2) + "\n"
    )
