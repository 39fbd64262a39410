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
import math
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
from pipeline.advisor.candidates import (
    Costs,
    choose,
    finetune_options,
    options_with_costs,
    unit_costs,
    weigh,
)
from pipeline.advisor.reasons import announce, explain
from pipeline.advisor.record import (
    Advice,
    Candidate,
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
ADVICE_VERSION = 3


def run(cfg: Config) -> Advice:
    """Measure, decide, write `<run.out>/advice.json`; reuse it when unchanged.

    Raises:
        DataError, BackboneError: as the extraction stage; DataError also when
            the pilot needs validation images the data does not have.
    """
    images = inputs.load_images(cfg)
    images.require_classes("advice (it trains classifiers to measure)")
    backbone = inputs.load_backbone(cfg)
    wanted = advice_stamp(cfg, backbone, images)
    if stamp_of(cfg.layout.advice) == wanted:
        advice = read_advice(cfg.layout.advice)
        log.info("advice reused: settings, images and backbone are unchanged")
        announce(advice)
        return advice
    clock = _Clock(cfg.run.budget_seconds, cfg.advise.budget_share)
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
    settings = finetune_options(cfg, backbone, images, similarity)
    costs = _timed(
        seconds, "costs", lambda: _costs(cfg, images, settings, result, whole)
    )
    options = options_with_costs(cfg, settings, costs)
    size = _timed(
        seconds,
        "size",
        lambda: measure(
            cfg,
            images,
            result.path,
            similarity.code,
            options=options,
            allowance=clock.advice_left,
        ),
    )
    candidates = weigh(
        cfg, depths, similarity, size, options, costs, left=clock.run_left()
    )
    advice = decide(
        similarity, size, depths, domain, seconds, candidates, cfg.run.budget_seconds
    )
    announce(advice)
    write_advice(
        cfg.layout.advice,
        advice,
        reasons=explain(advice),
        config=config_to_dict(cfg),
        stamp=wanted,
    )
    return advice


class _Clock:
    """run.budget as the advice spends it: the share the advice may take,
    and what is left for the job the advice picks."""

    def __init__(self, budget: float | None, share: float) -> None:
        self.budget, self.share = budget, share
        self.start = time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def advice_left(self) -> float:
        if self.budget is None:
            return math.inf
        return self.share * self.budget - self.spent()

    def run_left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.spent()


def _costs(
    cfg: Config,
    images: ImageSet,
    settings: list[dict[str, Any]],
    result: ExtractResult,
    whole: bool,
) -> Costs:
    # NOTE: a cache hit computed nothing: its rate is unknown, and nothing is
    # left to extract when it holds every image.
    rate = result.images_per_second
    per_image = 1.0 / rate if rate > 0 else 0.0
    return unit_costs(
        cfg, images, settings, extract_per_image=per_image, extracted=whole
    )


def _timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = work()
    seconds[name] = time.perf_counter() - start
    return value


def advice_stamp(cfg: Config, backbone: Backbone, images: ImageSet) -> str:
    """What the advice depends on: its settings, the images, the backbone.

    The probes depend on the extraction and sweep settings, the pilot on the
    fine-tune settings, the choice on run.budget; run.strategy, run.out and
    how the run talks do not enter.
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
        asdict(cfg.train),
        cfg.run.seed,
        cfg.run.budget,
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
    candidates: tuple[Candidate, ...] = (),
    budget: float | None = None,
) -> Advice:
    """The case from the measurements, with recommended settings.

    With candidates, the chosen one (`candidates.choose`) sets the case and
    the settings; without, the size verdict and the similarity do.
    """
    chosen = (
        choose(candidates, size, similarity, similarity.margin) if candidates else None
    )
    case = _case(chosen, similarity, size)
    settings = (
        _chosen_settings(chosen, similarity)
        if chosen is not None
        else _settings(case, similarity)
    )
    return Advice(
        case,
        similarity,
        size,
        depths,
        max(depths, key=lambda d: d.logme).layer,
        domain,
        settings,
        dict(seconds or {}),
        candidates,
        chosen.name if chosen is not None else "",
        budget,
    )


def _case(chosen: Candidate | None, similarity: Similarity, size: Size) -> int:
    """Codes on top: 1, on an earlier layer: 2; a fine-tune: 3, or 4 when the
    data is different or the network is trained from scratch."""
    if chosen is None:
        finetuned = size.finetune
        layer = similarity.layer
    else:
        finetuned = chosen.path == "finetune"
        layer = chosen.settings.get("train.layer", TOP)
    if not finetuned:
        return 1 if layer == TOP else 2
    scratch = chosen is not None and chosen.settings.get("finetune.init") == "scratch"
    return 4 if similarity.verdict == "different" or scratch else 3


def _chosen_settings(chosen: Candidate, similarity: Similarity) -> dict[str, Any]:
    if chosen.path == "codes":
        settings = _codes_settings(2, similarity)
        settings.update(chosen.settings)
        return settings
    return {"path": "finetune", **chosen.settings, "note": chosen.name}


def _settings(case: int, similarity: Similarity) -> dict[str, Any]:
    if case in (1, 2):
        return _codes_settings(case, similarity)
    return {"path": "finetune", "finetune.init": "pretrained", "note": ""}


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
