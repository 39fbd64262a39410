"""The advisor: which of the four transfer-learning cases is this data in?

Two questions, each answered with measurements on the user's own images:

- size: training images per class (median and minimum) and in all, against
  `advise.large_per_class`;
- similarity to the backbone's original data: how the linear probe's
  cross-validated accuracy changes from earlier layers to the top layer
  (Yosinski et al., 2014: features of the top layers are specific to the
  original task, so a top layer beaten by an earlier one means the data is
  different), with LogME per layer, the shift of BatchNorm input statistics
  from what the backbone learned, and how confident and how spread the
  backbone's own original-class predictions are, as supporting evidence.

Then: small + similar = 1, small + different = 2, large + similar = 3,
large + different = 4. The decision, every figure and the threshold it met,
and the recommended settings go to `advice.json`.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from features.atomic import write_json
from features.codes import load_codes
from features.data import ImageSet
from features.extractor import CodeModel, extract_codes
from features.layers import TOP, spread_layers
from features.probes import DomainStatistics, domain_statistics, logme
from features.transforms import Normalize
from pipeline import inputs, sweep
from pipeline.config import Config, config_to_dict

log = logging.getLogger(__name__)

CASES = {
    1: "small, similar: a linear classifier on the top-layer codes",
    2: "small, different: a linear classifier on codes of an earlier layer",
    3: "large, similar: fine-tune the whole network from the pretrained weights",
    4: "large, different: fine-tune the whole network (pretrained init, or scratch)",
}


@dataclass(frozen=True)
class Depth:
    """One probed depth: its layer and how well its codes serve the task."""

    layer: str
    dims: int
    accuracy: float
    std: float
    logme: float


@dataclass(frozen=True)
class Advice:
    """The case, the evidence behind it, and the settings to run it with."""

    case: int
    large: bool
    similar: bool
    images: int
    per_class_median: float
    per_class_min: int
    large_per_class: int
    depths: tuple[Depth, ...]
    best_layer: str
    top_gap: float  # best layer's probe accuracy minus top's
    top_margin: float
    logme_best_layer: str
    domain: DomainStatistics
    sample: int
    settings: dict[str, Any]

    def reasons(self) -> list[str]:
        """The evidence in sentences, each with its figure and threshold."""
        size = "large" if self.large else "small"
        sim = "similar" if self.similar else "different"
        cmp = ">=" if self.large else "<"
        return [
            f"size: {size}: median {self.per_class_median:.0f} training images per "
            f"class (min {self.per_class_min}, {self.images} in all) {cmp} "
            f"advise.large_per_class = {self.large_per_class}",
            f"similarity: {sim}: the best layer {self.best_layer} scores "
            f"{100 * self.top_gap:+.1f} points over top in a linear probe on "
            f"{self.sample} images ({'<=' if self.similar else '>'} "
            f"advise.top_margin = {100 * self.top_margin:.1f} points)",
            f"LogME ranks {self.logme_best_layer} first",
            "BatchNorm input shift (mean KL to the backbone's running statistics): "
            + (
                f"{self.domain.bn_shift:.3f}"
                if math.isfinite(self.domain.bn_shift)
                else "none (the backbone has no BatchNorm layers)"
            ),
            (
                f"the backbone's own classifier: mean top-1 probability "
                f"{self.domain.confidence:.3f}, normalised entropy "
                f"{self.domain.entropy:.3f}, {self.domain.classes_used:.1f} of its "
                "classes in use"
            )
            if math.isfinite(self.domain.confidence)
            else "the backbone has no classifier of its own (its confidence is "
            "not measured)",
        ]


def run(cfg: Config) -> Advice:
    """Measure, decide, write `<run.out>/advice.json`.

    Raises:
        DataError, BackboneError: as the extraction stage.
    """
    backbone = inputs.load_backbone(cfg)
    images = inputs.load_images(cfg)
    train_counts = images.counts()["train"]
    per_class = [train_counts[name] for name in images.label_names]
    sample = _sample(images, cfg)
    depths = _probe_depths(cfg, backbone, images, sample)
    domain = _domain(cfg, backbone, sample)
    advice = decide(cfg, per_class, depths, domain, len(sample))
    _write(cfg, advice)
    return advice


def codes_layers(cfg: Config, backbone: Any) -> tuple[str, ...]:
    """Depths spread over the network, "top", and the configured layers.

    The advisor probes these and the codes path extracts these, so on small
    data the advisor's extraction is the codes path's cache hit.
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


def _probe_depths(
    cfg: Config, backbone: Any, images: ImageSet, sample: ImageSet
) -> tuple[Depth, ...]:
    model = CodeModel(backbone, codes_layers(cfg, backbone), cfg.extract.pooling)
    # Small data: the sample is the whole training split, so extracting every
    # image now is the extraction the codes path would run next.
    whole = len(sample) == images.counts()["train"].total()
    result = extract_codes(
        images if whole else sample,
        model,
        options=inputs.extract_options(cfg),
        cache_dir=cfg.cache_dir,
    )
    depths = []
    for spec in result.specs:
        codes = load_codes(result.path, spec.layer, spec.pooling, split="train")
        probe = sweep.probe_codes(codes, cfg)
        depths.append(
            Depth(
                spec.layer
                if spec.pooling in ("avg", "none")
                else f"{spec.layer}/{spec.pooling}",
                spec.dims,
                probe.accuracy,
                probe.std,
                logme(codes.X, codes.y),
            )
        )
        log.info(
            "advise %-14s probe %.3f ± %.3f  LogME %.3f",
            depths[-1].layer,
            probe.accuracy,
            probe.std,
            depths[-1].logme,
        )
    return tuple(depths)


def _domain(cfg: Config, backbone: Any, sample: ImageSet) -> DomainStatistics:
    """The backbone's own reaction to (a seeded subset of) the sample."""
    rng = np.random.default_rng(cfg.run.seed)
    count = min(cfg.advise.statistics_images, len(sample))
    chosen = rng.choice(len(sample), size=count, replace=False)
    normalize = Normalize(backbone.preprocessing.mean, backbone.preprocessing.std)
    files = [sample.absolute(sample.records[i]) for i in sorted(chosen)]
    pixels = torch.from_numpy(inputs.load_pixels(cfg, files, backbone.preprocessing))
    batches = (normalize(pixels[i : i + 32]) for i in range(0, len(pixels), 32))
    classifier = backbone.identity()["num_classes"] > 0
    return domain_statistics(backbone.model, batches, classifier=classifier)


def decide(
    cfg: Config,
    per_class: list[int],
    depths: tuple[Depth, ...],
    domain: DomainStatistics,
    sample: int,
) -> Advice:
    """The case from the measurements, with recommended settings."""
    median = float(statistics.median(per_class))
    large = median >= cfg.advise.large_per_class
    top = next(d for d in depths if d.layer == TOP)
    best = max(depths, key=lambda d: (d.accuracy, d.layer == TOP))
    gap = best.accuracy - top.accuracy
    similar = gap <= cfg.advise.top_margin
    case = {(False, True): 1, (False, False): 2, (True, True): 3, (True, False): 4}[
        (large, similar)
    ]
    return Advice(
        case,
        large,
        similar,
        sum(per_class),
        median,
        min(per_class),
        cfg.advise.large_per_class,
        depths,
        best.layer,
        gap,
        cfg.advise.top_margin,
        max(depths, key=lambda d: d.logme).layer,
        domain,
        sample,
        _settings(case, best.layer),
    )


def _settings(case: int, best_layer: str) -> dict[str, Any]:
    if case in (1, 2):
        layer, _, pooling = (TOP if case == 1 else best_layer).partition("/")
        settings: dict[str, Any] = {
            "path": "codes",
            "train.layer": layer,
            "train.classifier": "logistic",
        }
        if pooling:
            settings["train.pooling"] = pooling
        if case == 2:
            settings["note"] = "train.classifier = 'svm' is the alternative to try"
        return settings
    return {
        "path": "finetune",
        "finetune.init": "pretrained",
        "finetune.head_epochs": 1,
        "finetune.layer_decay": 0.75 if case == 3 else 1.0,
        "note": "case 4: compare with finetune.init = 'scratch' when the data is far "
        "from the backbone's (docs/four_cases.md)"
        if case == 4
        else "",
    }


def _write(cfg: Config, advice: Advice) -> None:
    data = asdict(advice)
    data["description"] = CASES[advice.case]
    data["reasons"] = advice.reasons()
    data["config"] = config_to_dict(cfg)
    write_json(cfg.layout.advice, data)


def summary_lines(advice: Advice) -> list[str]:
    """What `quadrant advise` prints."""
    lines = [f"case {advice.case}: {CASES[advice.case]}"]
    lines += [f"  - {reason}" for reason in advice.reasons()]
    lines.append("  depth   layer             dims   probe accuracy   LogME")
    for i, d in enumerate(advice.depths):
        mark = "  <- best" if d.layer == advice.best_layer else ""
        lines.append(
            f"  {i:>5}   {d.layer:<16} {d.dims:>5}   {d.accuracy:.3f} ± "
            f"{d.std:.3f}   {d.logme:7.3f}{mark}"
        )
    settings = ", ".join(
        f"{k} = {v!r}"
        for k, v in advice.settings.items()
        if k not in ("path", "note") and v != ""
    )
    lines.append(f"recommended: {settings}")
    if advice.settings.get("note"):
        lines.append(f"  note: {advice.settings['note']}")
    return lines
