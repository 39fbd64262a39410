"""The advisor stage: measure, decide, write `<run.out>/advice.json`.

`run` extracts the codes of depths spread over the network, asks the
similarity question (`similarity.probe_depths`, with `similarity.domain_of`
as supporting evidence) and the size question (`size.measure`); `decide`
maps the answers to a case and its settings. The record goes through
`record.write_advice`, stamped with the settings, the images and the
backbone it was made from, so an unchanged rerun reads it back instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np
from sklearn.model_selection import train_test_split

from features.backbones import Backbone
from features.data import ImageSet
from features.extractor import CodeModel, ExtractResult
from features.layers import TOP, spread_layers
from features.probes import DomainStatistics
from pipeline import inputs
from pipeline.advisor.reasons import announce, explain
from pipeline.advisor.record import (
    Advice,
    Depth,
    Similarity,
    Size,
    read_advice,
    write_advice,
)
from pipeline.advisor.similarity import domain_of, probe_depths
from pipeline.advisor.size import measure
from pipeline.config import Config, config_to_dict
from pipeline.stamps import stamp, stamp_of

log = logging.getLogger(__name__)
T = TypeVar("T")

# NOTE: bump when the advice's meaning changes, so old advice.json is redone.
ADVICE_VERSION = 2


def run(cfg: Config) -> Advice:
    """Measure, decide, write `<run.out>/advice.json`; reuse it when unchanged.

    Raises:
        DataError, BackboneError: as the extraction stage; DataError also when
            the pilot needs validation images the data does not have.
    """
    backbone = inputs.load_backbone(cfg)
    images = inputs.load_images(cfg)
    wanted = advice_stamp(cfg, backbone, images)
    if stamp_of(cfg.layout.advice) == wanted:
        advice = read_advice(cfg.layout.advice)
        log.info("advice reused: settings, images and backbone are unchanged")
        announce(advice)
        return advice
    seconds: dict[str, float] = {}
    sample = _sample(images, cfg)
    whole = _extract_whole(cfg, images, sample)
    result = _timed(
        seconds, "extract", lambda: _extract(cfg, backbone, images, sample, whole)
    )
    depths, similarity = _timed(
        seconds, "similarity", lambda: probe_depths(cfg, result, sample, whole)
    )
    domain = _timed(seconds, "domain", lambda: domain_of(cfg, backbone, sample))
    different = similarity.verdict == "different"
    size = _timed(
        seconds,
        "size",
        lambda: measure(cfg, images, result.path, similarity.code, different=different),
    )
    advice = decide(similarity, size, depths, domain, seconds)
    announce(advice)
    write_advice(
        cfg.layout.advice,
        advice,
        reasons=explain(advice),
        config=config_to_dict(cfg),
        stamp=wanted,
    )
    return advice


def _timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = work()
    seconds[name] = time.perf_counter() - start
    return value


def advice_stamp(cfg: Config, backbone: Backbone, images: ImageSet) -> str:
    """What the advice depends on: its settings, the images, the backbone.

    The probes depend on the extraction and sweep settings, the pilot on the
    fine-tune settings; run.strategy, run.out and how the run talks do not
    enter.
    """
    d = cfg.data
    return stamp(
        ADVICE_VERSION,
        asdict(cfg.advise),
        asdict(cfg.extract),
        asdict(cfg.sweep),
        asdict(cfg.finetune),
        asdict(cfg.backbone),
        backbone.identity(),
        images.fingerprint,
        [d.max_pixels, d.background],
        cfg.train.max_iter,
        cfg.run.seed,
    )


def codes_layers(cfg: Config, backbone: Any) -> tuple[str, ...]:
    """Depths spread over the network, "top", and the configured layers.

    The advisor probes these and the codes path extracts these, so the
    advisor's extraction is the codes path's cache hit whenever it extracts
    every image.
    """
    size = backbone.preprocessing.input_size
    layers = spread_layers(backbone.model, size, cfg.advise.depths)
    return (*layers, *(layer for layer in cfg.extract.layers if layer not in layers))


def _sample(images: ImageSet, cfg: Config) -> ImageSet:
    """At most advise.sample training images, stratified and seeded."""
    train = [r for r in images.records if r.split == "train"]
    if len(train) <= cfg.advise.sample:
        return images.subset(train)
    keep, _ = train_test_split(
        train,
        train_size=cfg.advise.sample,
        stratify=[r.label for r in train],
        random_state=cfg.run.seed,
    )
    return images.subset(keep)


def _extract_whole(cfg: Config, images: ImageSet, sample: ImageSet) -> bool:
    """Extract every image (not just the sample)?

    Yes when the sample is the whole training split (small data: this is the
    extraction the codes path runs next) and above the size floor (the
    learning curve needs every training and validation image).
    """
    counts = images.counts()["train"]
    median = float(np.median([counts[n] for n in images.label_names]))
    return len(sample) == counts.total() or median >= cfg.advise.small_per_class


def _extract(
    cfg: Config, backbone: Any, images: ImageSet, sample: ImageSet, whole: bool
) -> ExtractResult:
    model = CodeModel(backbone, codes_layers(cfg, backbone), cfg.extract.pooling)
    log.info(
        "advise: codes of %d layers for %d images",
        len(model.specs),
        len(images if whole else sample),
    )
    return inputs.extract_for(cfg, images if whole else sample, model)


# ---------------------------------------------------------------------------
# The decision


def decide(
    similarity: Similarity,
    size: Size,
    depths: tuple[Depth, ...],
    domain: DomainStatistics,
    seconds: dict[str, float] | None = None,
) -> Advice:
    """The case from the measurements, with recommended settings."""
    different = similarity.verdict == "different"
    if size.finetune:
        case = 4 if different else 3
    else:
        case = 1 if similarity.layer == TOP else 2
    return Advice(
        case,
        similarity,
        size,
        depths,
        max(depths, key=lambda d: d.logme).layer,
        domain,
        _settings(case, similarity, size),
        dict(seconds or {}),
    )


def _settings(case: int, similarity: Similarity, size: Size) -> dict[str, Any]:
    if case in (1, 2):
        return _codes_settings(case, similarity)
    note = ""
    if similarity.verdict == "undecided":
        note = "undecided similarity: case 3 (no scratch pilot needed)"
    elif case == 4 and size.scratch is not None:
        note = f"init by the scratch pilot: {size.init}"
    return {"path": "finetune", "finetune.init": size.init, "note": note}


def _codes_settings(case: int, similarity: Similarity) -> dict[str, Any]:
    layer, pooling = similarity.code
    settings: dict[str, Any] = {
        "path": "codes",
        "train.layer": layer,
        "train.pooling": pooling,
        "train.classifier": "logistic",
        "note": "",
    }
    if similarity.verdict == "undecided":
        settings["note"] = (
            f"undecided: {similarity.best_layer} and top are within noise; "
            f"{similarity.best_layer} is the cheaper (the network stops there)"
        )
    elif case == 2:
        settings["note"] = "train.classifier = 'svm' is the alternative to try"
    return settings
