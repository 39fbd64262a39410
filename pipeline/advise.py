"""The advisor: which of the four transfer-learning cases is this data in?

Two questions, each answered with measurements on the user's own images, and
each answer given with its uncertainty:

- similarity to the backbone's original data: a linear probe on the codes of
  layers spread over the network and of the top layer, all scored on the same
  repeated stratified folds, so that each earlier layer's gain over top is a
  paired difference with a confidence interval (the corrected resampled t
  test of Nadeau and Bengio, 2003). Top layers are specific to the original
  task (Yosinski et al., 2014), so an earlier layer that beats top by more
  than `advise.top_margin`, interval and all, means the data is different.
  LogME per layer, the shift of BatchNorm input statistics and the
  backbone's own confidence are reported as supporting evidence.
- size: below `advise.small_per_class` images per class the data is small;
  above it, a learning curve of the frozen probe and a budgeted pilot
  fine-tune decide whether fine-tuning pays off (`pipeline.sizing`).

Then: codes path + similar = 1, codes path + different = 2, fine-tune +
similar = 3, fine-tune + different = 4 (pretrained or scratch, by a second
pilot). "Undecided" (the interval straddles the margin) picks the cheaper
side. The decision, every figure with its interval and the settings go to
`advice.json`, stamped with the settings, the images and the backbone it
was made from: an unchanged rerun reuses it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from features.atomic import write_json
from features.backbones import Backbone
from features.codes import load_codes
from features.data import ImageSet
from features.errors import DataError
from features.extractor import CodeModel, ExtractResult
from features.layers import TOP, spread_layers
from features.probes import (
    DomainStatistics,
    Interval,
    corrected_interval,
    cv_splits,
    domain_statistics,
    fold_accuracies,
    logme,
    split_ratio,
)
from features.progress import progress_bar
from features.transforms import Normalize
from pipeline import inputs, sizing
from pipeline.config import Config, config_to_dict
from pipeline.stamps import stamp, stamp_of

log = logging.getLogger(__name__)
T = TypeVar("T")

# NOTE: bump when the advice's meaning changes, so old advice.json is redone.
ADVICE_VERSION = 2

CASES = {
    1: "small, similar: a linear classifier on the top-layer codes",
    2: "small, different: a linear classifier on codes of an earlier layer",
    3: "large, similar: fine-tune the whole network from the pretrained weights",
    4: "large, different: fine-tune the whole network (pretrained init, or scratch)",
}
VERDICTS = ("similar", "different", "undecided")


@dataclass(frozen=True)
class Depth:
    """One probed depth: its layer and how well its codes serve the task.

    `accuracy` and `std` are the mean and spread over every fold of every
    repeat; `gain` is its paired gain over top with its interval (None for
    top itself).
    """

    layer: str
    dims: int
    accuracy: float
    std: float
    logme: float
    gain: Interval | None = None


@dataclass(frozen=True)
class Similarity:
    """The similarity verdict and the paired evidence behind it.

    Attributes:
        verdict: "similar", "different" or "undecided".
        best_layer: the earlier layer with the highest mean probe accuracy.
        gain: its accuracy minus top's on the same folds, with the interval
            the verdict reads (at the Bonferroni level for `layers` earlier
            layers, so that picking the best of them keeps the overall level
            at `confidence`).
        margin: advise.top_margin.
        confidence: advise.confidence (family-wise over the earlier layers).
        folds, repeats: the cross-validation the gain rests on.
        images: training images in the probe's sample.
        layer: the depth the codes path trains on: top when similar, else the
            best earlier layer (undecided: the cheaper one, which stops the
            network earlier).
        code: (layer, pooling) of that depth in the code cache.
    """

    verdict: str
    best_layer: str
    gain: Interval
    margin: float
    confidence: float
    folds: int
    repeats: int
    images: int
    layers: int
    layer: str
    code: tuple[str, str]


@dataclass(frozen=True)
class Advice:
    """The case, the evidence behind it, and the settings to run it with."""

    case: int
    similarity: Similarity
    size: sizing.Size
    depths: tuple[Depth, ...]
    logme_best_layer: str
    domain: DomainStatistics
    settings: dict[str, Any]
    seconds: dict[str, float]

    @property
    def large(self) -> bool:
        return self.size.finetune

    @property
    def similar(self) -> bool:
        return self.similarity.verdict != "different"

    def reasons(self) -> list[str]:
        """The evidence in sentences, each with its figure and threshold."""
        return [
            size_reason(self.size, self.similarity.margin),
            similarity_reason(self.similarity),
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
    """Measure, decide, write `<run.out>/advice.json`; reuse it when unchanged.

    Raises:
        DataError, BackboneError: as the extraction stage; DataError also when
            the pilot needs validation images the data does not have.
    """
    backbone = inputs.load_backbone(cfg)
    images = inputs.load_images(cfg)
    wanted = advice_stamp(cfg, backbone, images)
    if stamp_of(cfg.layout.advice) == wanted:
        advice = load(cfg.layout.advice)
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
        seconds, "similarity", lambda: _probe_depths(cfg, result, sample, whole)
    )
    domain = _timed(seconds, "domain", lambda: _domain(cfg, backbone, sample))
    size = _timed(
        seconds,
        "size",
        lambda: sizing.measure(
            cfg,
            images,
            result.path,
            similarity.code,
            different=similarity.verdict == "different",
        ),
    )
    advice = decide(similarity, size, depths, domain, seconds)
    announce(advice)
    _write(cfg, advice, wanted)
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
# Similarity


def _probe_depths(
    cfg: Config, result: ExtractResult, sample: ImageSet, whole: bool
) -> tuple[tuple[Depth, ...], Similarity]:
    """Every depth's probe on the same repeated folds; the paired gains over top."""
    a = cfg.advise
    keep = {r.path for r in sample.records}
    names, codes_of, scores, rows = [], [], [], []
    splits: list[Any] = []
    bar = progress_bar(
        len(result.specs), desc="advise: probes", enabled=cfg.run.progress, unit="layer"
    )
    with bar:
        for spec in result.specs:
            codes = load_codes(result.path, spec.layer, spec.pooling, split="train")
            if whole:
                codes = codes.take(np.flatnonzero(np.isin(codes.paths, list(keep))))
            if not splits:
                splits = cv_splits(
                    codes.y, folds=a.cv_folds, repeats=a.cv_repeats, seed=cfg.run.seed
                )
            start = time.perf_counter()
            fold = fold_accuracies(
                codes.X,
                codes.y,
                splits,
                C=cfg.sweep.C,
                n_jobs=cfg.train.n_jobs,
                max_iter=cfg.train.max_iter,
            )
            name = (
                spec.layer
                if spec.pooling in ("avg", "none")
                else f"{spec.layer}/{spec.pooling}"
            )
            names.append(name)
            codes_of.append((spec.layer, spec.pooling))
            scores.append(fold)
            rows.append((spec.dims, logme(codes.X, codes.y)))
            log.info(
                "advise %-14s probe %.3f ± %.3f over %d folds  LogME %.3f (%.1f s)",
                name,
                fold.mean(),
                fold.std(),
                len(fold),
                rows[-1][1],
                time.perf_counter() - start,
            )
            bar.update(1)
    return similarity_of(
        cfg,
        names,
        codes_of,
        np.stack(scores),
        rows,
        folds=len(splits) // a.cv_repeats,
        ratio=split_ratio(splits),
        images=len(codes),
    )


def similarity_of(
    cfg: Config,
    names: list[str],
    codes_of: list[tuple[str, str]],
    scores: np.ndarray,
    rows: list[tuple[int, float]],
    *,
    folds: int,
    ratio: float,
    images: int,
) -> tuple[tuple[Depth, ...], Similarity]:
    """Depths and the verdict from paired fold scores (layers x splits).

    Args:
        cfg: the configuration (advise.top_margin, advise.confidence, ...).
        names: each depth's name; `codes_of`: its (layer, pooling).
        scores: accuracy per depth (rows) and split (columns), paired.
        rows: (dims, LogME) per depth.
        folds: folds per repeat; ratio: test size over training size.
        images: training images the folds split.

    Raises:
        DataError: no top layer, or no earlier layer, among `names`.
    """
    a = cfg.advise
    if TOP not in names or len(names) < 2:
        raise DataError(
            f"the advisor compares earlier layers with top; it probed {names}. "
            "Set advise.depths >= 1."
        )
    top = names.index(TOP)
    earlier = [i for i in range(len(names)) if i != top]
    # NOTE: the best of m layers is picked after looking, so each layer's
    # interval is at level 1 - (1 - confidence) / m (Bonferroni).
    level = 1 - (1 - a.confidence) / len(earlier)
    gains = {
        i: corrected_interval(
            scores[i] - scores[top], test_train_ratio=ratio, confidence=level
        )
        for i in earlier
    }
    depths = tuple(
        Depth(
            names[i],
            rows[i][0],
            float(scores[i].mean()),
            float(scores[i].std()),
            rows[i][1],
            gains.get(i),
        )
        for i in range(len(names))
    )
    best = max(earlier, key=lambda i: (scores[i].mean(), -i))
    gain = gains[best]
    verdict = (
        "different"
        if gain.low > a.top_margin
        else "similar"
        if gain.high <= a.top_margin
        else "undecided"
    )
    return depths, Similarity(
        verdict,
        names[best],
        gain,
        a.top_margin,
        a.confidence,
        folds,
        a.cv_repeats,
        images,
        len(earlier),
        TOP if verdict == "similar" else names[best],
        codes_of[top] if verdict == "similar" else codes_of[best],
    )


# ---------------------------------------------------------------------------
# BatchNorm shift and the backbone's own confidence


def _domain(cfg: Config, backbone: Any, sample: ImageSet) -> DomainStatistics:
    """The backbone's own reaction to (a seeded subset of) the sample."""
    rng = np.random.default_rng(cfg.run.seed)
    count = min(cfg.advise.statistics_images, len(sample))
    chosen = rng.choice(len(sample), size=count, replace=False)
    files = [sample.absolute(sample.records[i]) for i in sorted(chosen)]
    log.info(
        "advise: BatchNorm input shift and the backbone's confidence on %d images",
        count,
    )
    start = time.perf_counter()
    bar = progress_bar(count, desc="advise: BatchNorm shift", enabled=cfg.run.progress)
    with bar:
        stats = domain_statistics(
            backbone.model,
            _batches(cfg, backbone, files, bar),
            classifier=backbone.identity()["num_classes"] > 0,
        )
    log.info(
        "advise: BatchNorm shift %.3f, mean top-1 probability %.3f on %d images "
        "(%.1f s)",
        stats.bn_shift,
        stats.confidence,
        stats.images,
        time.perf_counter() - start,
    )
    return stats


def _batches(
    cfg: Config, backbone: Any, files: list[Any], bar: Any, size: int = 32
) -> Iterator[torch.Tensor]:
    """Normalised pixel batches of the readable files, advancing the bar.

    Raises:
        DataError: not one of the files is readable.
    """
    prep = backbone.preprocessing
    normalize = Normalize(prep.mean, prep.std)
    readable = 0
    for i in range(0, len(files), size):
        chunk = files[i : i + size]
        try:
            pixels = inputs.load_pixels(cfg, chunk, prep)
        except DataError:  # a whole chunk unreadable: the others still count
            pixels = None
        bar.update(len(chunk))
        if pixels is not None:
            readable += len(pixels)
            yield normalize(torch.from_numpy(pixels))
    if not readable:
        raise DataError(
            f"none of the {len(files)} images could be read; `quadrant extract` "
            "lists each unreadable file and why"
        )


# ---------------------------------------------------------------------------
# The decision


def decide(
    similarity: Similarity,
    size: sizing.Size,
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


def _settings(case: int, similarity: Similarity, size: sizing.Size) -> dict[str, Any]:
    if case in (1, 2):
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
    note = ""
    if similarity.verdict == "undecided":
        note = "undecided similarity: case 3 (no scratch pilot needed)"
    elif case == 4 and size.scratch is not None:
        note = f"init by the scratch pilot: {size.init}"
    return {"path": "finetune", "finetune.init": size.init, "note": note}


def similarity_reason(s: Similarity) -> str:
    """The similarity verdict in one sentence with its figures."""
    g = s.gain
    low, high, margin = 100 * g.low, 100 * g.high, 100 * s.margin
    what, cmp = {
        "different": ("its lower end clears", f"{low:+.1f} > {margin:.1f}"),
        "similar": ("its upper end stays within", f"{high:+.1f} <= {margin:.1f}"),
        "undecided": (
            "both within noise: it straddles",
            f"{low:+.1f} <= {margin:.1f} < {high:+.1f}",
        ),
    }[s.verdict]
    return (
        f"similarity: {s.verdict}: the best earlier layer {s.best_layer} scores "
        f"{100 * g.mean:+.1f} points over top [{low:+.1f}, {high:+.1f}] "
        f"({100 * g.confidence:.1f}% interval, {s.folds} "
        f"folds x {s.repeats} repeats on {s.images} images, {g.method}); "
        f"{what} advise.top_margin = {margin:.1f} points ({cmp})"
    )


def size_reason(z: sizing.Size, margin: float) -> str:
    """The size verdict in one sentence with its figures."""
    head = (
        f"median {z.per_class_median:.0f} training images per class (min "
        f"{z.per_class_min}, {z.images} in all)"
    )
    if not z.measured:
        return (
            f"size: small: {head} < advise.small_per_class = {z.floor}: too few "
            "to fine-tune, no pilot"
        )
    p = z.pilot
    assert p is not None  # measured implies a pilot
    frozen = z.frozen_curve[-1].accuracy
    figures = (
        f"pilot fine-tune ({p.images} of {p.full} images, {100 * p.share:.0f}%): "
        f"val {p.accuracy:.3f}, {100 * p.versus.mean:+.1f} points "
        f"[{100 * p.versus.low:+.1f}, {100 * p.versus.high:+.1f}] against the "
        f"frozen {z.layer} probe ({frozen:.3f}); {_forecast_text(p)}"
    )
    verdict = {
        "ahead": "large: fine-tune: the pilot is ahead",
        "forecast": f"large: fine-tune: the forecast's lower end passes the frozen "
        f"codes by {100 * (p.forecast_low - frozen):.1f} > {100 * margin:.1f} points",
        "codes": f"codes path: the pilot is not ahead and its forecast's lower end "
        f"does not pass the frozen codes by more than {100 * margin:.1f} points",
    }[z.rule]
    text = f"size: {verdict}: {head}; {figures}"
    if z.scratch is not None:
        s = z.scratch
        text += (
            f"; scratch pilot val {s.accuracy:.3f}, {100 * s.versus.mean:+.1f} "
            f"points [{100 * s.versus.low:+.1f}, {100 * s.versus.high:+.1f}] "
            f"against pretrained, {_forecast_text(s)}: {z.init}"
        )
    return text


def _forecast_text(p: sizing.Pilot) -> str:
    if p.forecast_points < 2:
        return (
            f"no forecast ({p.forecast_points} validation point(s) after the "
            "warm-up; the pilot's last accuracy stands)"
        )
    return (
        f"forecast at the full budget {p.forecast:.3f} [{p.forecast_low:.3f}, "
        f"{p.forecast_high:.3f}]"
    )


def announce(advice: Advice) -> None:
    """Log the case and its evidence at INFO, as soon as it is decided."""
    log.info("case %d: %s", advice.case, CASES[advice.case])
    for reason in advice.reasons()[:2]:
        log.info("  %s", reason)


# ---------------------------------------------------------------------------
# advice.json


def _write(cfg: Config, advice: Advice, wanted: str) -> None:
    data = asdict(advice)
    data["description"] = CASES[advice.case]
    data["reasons"] = advice.reasons()
    data["config"] = config_to_dict(cfg)
    data["stamp"] = wanted
    write_json(cfg.layout.advice, data)


def load(path: Path) -> Advice:
    """The Advice an advice.json holds."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    sim = data["similarity"]
    return Advice(
        int(data["case"]),
        Similarity(
            **{**sim, "gain": _interval(sim["gain"]), "code": tuple(sim["code"])}
        ),
        _size(data["size"]),
        tuple(
            Depth(**{**d, "gain": _interval(d["gain"]) if d["gain"] else None})
            for d in data["depths"]
        ),
        data["logme_best_layer"],
        DomainStatistics(
            **{
                **data["domain"],
                "bn_shift_layers": tuple(data["domain"]["bn_shift_layers"]),
            }
        ),
        dict(data["settings"]),
        dict(data["seconds"]),
    )


def _interval(data: dict[str, Any]) -> Interval:
    return Interval(**data)


def _size(data: dict[str, Any]) -> sizing.Size:
    def pilot(p: dict[str, Any] | None) -> sizing.Pilot | None:
        if p is None:
            return None
        return sizing.Pilot(
            **{
                **p,
                "curve": tuple(sizing.CurvePoint(**c) for c in p["curve"]),
                "versus": _interval(p["versus"]),
            }
        )

    return sizing.Size(
        **{
            **data,
            "frozen_curve": tuple(sizing.CurvePoint(**c) for c in data["frozen_curve"]),
            "frozen_gain": _interval(data["frozen_gain"])
            if data["frozen_gain"]
            else None,
            "pilot": pilot(data["pilot"]),
            "scratch": pilot(data["scratch"]),
        }
    )


def summary_lines(advice: Advice) -> list[str]:
    """What `quadrant advise` prints."""
    lines = [f"case {advice.case}: {CASES[advice.case]}"]
    lines += [f"  - {reason}" for reason in advice.reasons()]
    lines.append(
        "  depth   layer             dims   probe accuracy   gain over top "
        "[interval]      LogME"
    )
    best = advice.similarity.best_layer
    for i, d in enumerate(advice.depths):
        gain = (
            f"{100 * d.gain.mean:+5.1f} [{100 * d.gain.low:+5.1f}, "
            f"{100 * d.gain.high:+5.1f}]"
            if d.gain
            else " " * 22
        )
        mark = "  <- best earlier" if d.layer == best else ""
        lines.append(
            f"  {i:>5}   {d.layer:<16} {d.dims:>5}   {d.accuracy:.3f} ± "
            f"{d.std:.3f}   {gain}   {d.logme:7.3f}{mark}"
        )
    z = advice.size
    if z.measured:
        curve = ", ".join(f"{p.images}: {p.accuracy:.3f}" for p in z.frozen_curve)
        lines.append(f"  frozen {z.layer} learning curve (val accuracy): {curve}")
        for p in (z.pilot, z.scratch):
            if p is not None:
                points = ", ".join(f"{c.images}: {c.accuracy:.3f}" for c in p.curve)
                lines.append(
                    f"  pilot ({p.init}) {p.seconds:.0f} s, val accuracy: {points}"
                )
    settings = ", ".join(
        f"{k} = {v!r}"
        for k, v in advice.settings.items()
        if k not in ("path", "note") and v != ""
    )
    lines.append(f"recommended: {settings}")
    if advice.settings.get("note"):
        lines.append(f"  note: {advice.settings['note']}")
    if advice.seconds:
        cost = ", ".join(f"{k} {v:.1f} s" for k, v in advice.seconds.items())
        lines.append(f"  advice cost: {cost}")
    return lines
