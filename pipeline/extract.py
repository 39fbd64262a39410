"""The extraction stage: images in, cached CNN codes out."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from features.atomic import write_json
from features.cache import (
    diff_provenance,
    find_compatible,
    read_provenance,
    same_codes,
)
from features.data import ImageSet, Skipped, warn_skipped
from features.distributed import World, join_world, leave_world, run_on_main
from features.errors import CacheMismatchError
from features.extractor import CodeModel, ExtractResult, image_identity
from pipeline.config import Config, config_to_dict
from pipeline.inputs import extract_for, load_backbone, load_images, plan_for
from pipeline.models import CodesModel

log = logging.getLogger(__name__)


def run(cfg: Config) -> ExtractResult:
    """Write (or reuse) the codes of every image under `cfg.data.root`.

    The backbone and its layers are checked first, then the images are listed
    and probed, and only then does the forward pass start, so a wrong layer
    name or a bad data layout fails in seconds.

    Under torchrun every process runs this: rank 0 lists the images once,
    the ranks split the shards, and rank 0 finishes the cache.

    Raises:
        StageInputError: data.root does not exist.
        DataError: no usable images, an empty class, a class too small to split.
        BackboneError: unknown weights or layer.
        DistributedError: another rank of a torchrun job failed first.
    """
    world = join_world()
    try:
        model = code_model(cfg)
        images = run_on_main(world, lambda: load_images(cfg))
        return _extract(cfg, model, images, world)
    finally:
        leave_world(world)


def prepare(cfg: Config) -> tuple[CodeModel, ImageSet]:
    """The code model (backbone cut at the layers) and the checked images."""
    return code_model(cfg), load_images(cfg)


def code_model(cfg: Config) -> CodeModel:
    """The configured backbone cut at the configured layers, with pooling."""
    backbone = load_backbone(cfg)
    return CodeModel(backbone, cfg.extract.layers, cfg.extract.pooling)


def _extract(
    cfg: Config, model: CodeModel, images: ImageSet | None, world: World | None = None
) -> ExtractResult:
    """Extract; rank 0 (or the only process) logs and writes the summary."""
    if images is not None:
        log.info(
            "extracting %d images (%d classes) at %dpx, layers %s",
            len(images),
            len(images.label_names),
            model.preprocessing.input_size,
            list(cfg.extract.layers),
        )
    result = extract_for(cfg, images, model, world=world)
    if images is not None:
        _write_summary(cfg, images, result)
        # Files the listing skipped were warned about then; these failed to decode.
        warn_skipped(images.root, [Skipped(p, r) for p, r in result.skipped])
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
    plan = plan_for(cfg, images, model)
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
    write_json(cfg.layout.extract_summary, {**summary, "config": config_to_dict(cfg)})


def codes_for_model(cfg: Config, model: CodesModel, images: ImageSet) -> Path:
    """A code cache holding `model`'s layer for `images`, found from its record.

    The cache the model was trained on when the images are still those it
    was made from; else the same codes found in the cache folder; else a new
    extraction of the model's layer with the model's own backbone and
    preprocessing, whatever `[backbone]` and `[extract]` say now.

    Raises:
        CacheMismatchError: the backbone's weights changed since training
            (found before any image is read).
    """
    recorded = Path(model.record["codes"]["cache"])
    if recorded.is_file() and read_provenance(recorded)["images"] == image_identity(
        images
    ):
        return recorded
    code_model = model.code_model()
    trained = model.record["codes"]["provenance"]
    options = replace(cfg.extract, views=1, dtype=trained["dtype"])
    plan = plan_for(cfg, images, code_model, options)
    if plan.path.exists():
        return plan.path
    compatible = find_compatible(cfg.cache_dir, plan.provenance)
    if compatible is not None:
        return compatible
    log.info(
        "the images changed since the model was trained: extracting its layer %s/%s",
        model.layer,
        model.pooling,
    )
    return extract_for(cfg, images, code_model, options=options).path
