"""The advisor's similarity question: is this data like the backbone's own?

A linear probe on the codes of layers spread over the network and of the top
layer, all scored on the same repeated stratified folds, so that each earlier
layer's gain over top is a paired difference with a confidence interval (the
corrected resampled t test of Nadeau and Bengio, 2003). Top layers are
specific to the original task (Yosinski et al., 2014), so an earlier layer
that beats top by more than `advise.top_margin`, interval and all, means the
data is different. LogME per layer, the shift of BatchNorm input statistics
and the backbone's own confidence are reported as supporting evidence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from features.cache import CodeSpec
from features.codes import Codes, load_codes
from features.data import ImageSet
from features.errors import DataError
from features.extractor import ExtractResult
from features.layers import TOP
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
from pipeline import inputs
from pipeline.advisor.record import Depth, Similarity
from pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ProbeScores:
    """Every probed depth's paired fold scores: what the verdict is read from.

    Attributes:
        names: each depth's name (its layer, with the pooling unless plain).
        codes_of: each depth's (layer, pooling) in the code cache.
        scores: accuracy per depth (rows) and split (columns), paired.
        rows: (dims, LogME) per depth.
        folds: folds per repeat.
        ratio: test size over training size of a split.
        images: training images the folds split.
    """

    names: Sequence[str]
    codes_of: Sequence[tuple[str, str]]
    scores: np.ndarray
    rows: Sequence[tuple[int, float]]
    folds: int
    ratio: float
    images: int


@dataclass(frozen=True, eq=False)
class _Probe:
    """One depth's probe: its name, cache code, fold scores, dims and LogME."""

    name: str
    code: tuple[str, str]
    scores: np.ndarray
    dims: int
    logme: float


def probe_depths(
    cfg: Config, result: ExtractResult, sample: ImageSet, whole: bool
) -> tuple[tuple[Depth, ...], Similarity]:
    """Every depth's probe on the same repeated folds; the paired gains over top."""
    a = cfg.advise
    keep = {r.path for r in sample.records} if whole else None
    probes: list[_Probe] = []
    splits: list[Any] = []
    bar = progress_bar(
        len(result.specs), desc="advise: probes", enabled=cfg.run.progress, unit="layer"
    )
    with bar:
        for spec in result.specs:
            codes = load_codes(result.path, spec.layer, spec.pooling, split="train")
            if keep is not None:
                codes = codes.take(np.flatnonzero(np.isin(codes.paths, list(keep))))
            if not splits:
                splits = cv_splits(
                    codes.y, folds=a.cv_folds, repeats=a.cv_repeats, seed=cfg.run.seed
                )
            probes.append(_probe(cfg, spec, codes, splits))
            bar.update(1)
    scores = ProbeScores(
        names=[p.name for p in probes],
        codes_of=[p.code for p in probes],
        scores=np.stack([p.scores for p in probes]),
        rows=[(p.dims, p.logme) for p in probes],
        folds=len(splits) // a.cv_repeats,
        ratio=split_ratio(splits),
        images=len(codes),
    )
    return similarity_of(cfg, scores)


def _probe(cfg: Config, spec: CodeSpec, codes: Codes, splits: list[Any]) -> _Probe:
    """One depth's linear probe on the shared splits, and its LogME."""
    start = time.perf_counter()
    fold = fold_accuracies(
        codes.X,
        codes.y,
        splits,
        C=cfg.sweep.C,
        n_jobs=cfg.train.n_jobs,
        max_iter=cfg.train.max_iter,
    )
    plain = spec.pooling in ("avg", "none")
    name = spec.layer if plain else f"{spec.layer}/{spec.pooling}"
    probe = _Probe(
        name, (spec.layer, spec.pooling), fold, spec.dims, logme(codes.X, codes.y)
    )
    log.info(
        "advise %-14s probe %.3f ± %.3f over %d folds  LogME %.3f (%.1f s)",
        name,
        fold.mean(),
        fold.std(),
        len(fold),
        probe.logme,
        time.perf_counter() - start,
    )
    return probe


def similarity_of(
    cfg: Config, probes: ProbeScores
) -> tuple[tuple[Depth, ...], Similarity]:
    """Depths and the verdict from paired fold scores (depths x splits).

    Args:
        cfg: the configuration (advise.top_margin, advise.confidence, ...).
        probes: every depth's name, cache code, fold scores, dims and LogME.

    Raises:
        DataError: no top layer, or no earlier layer, among `probes.names`.
    """
    names = list(probes.names)
    if TOP not in names or len(names) < 2:
        raise DataError(
            f"the advisor compares earlier layers with top; it probed {names}. "
            "Set advise.depths >= 1."
        )
    top = names.index(TOP)
    gains = _gains(probes, top, cfg.advise.confidence)
    best = max(gains, key=lambda i: (probes.scores[i].mean(), -i))
    return _depths(probes, gains), _similarity(cfg, probes, gains, top, best)


def _gains(probes: ProbeScores, top: int, confidence: float) -> dict[int, Interval]:
    """Each earlier depth's paired gain over top, with its interval."""
    earlier = [i for i in range(len(probes.names)) if i != top]
    # NOTE: the best of m layers is picked after looking, so each layer's
    # interval is at level 1 - (1 - confidence) / m (Bonferroni).
    level = 1 - (1 - confidence) / len(earlier)
    scores = probes.scores
    return {
        i: corrected_interval(
            scores[i] - scores[top], test_train_ratio=probes.ratio, confidence=level
        )
        for i in earlier
    }


def _depths(probes: ProbeScores, gains: dict[int, Interval]) -> tuple[Depth, ...]:
    """Every depth's figures, top's without a gain."""
    return tuple(
        Depth(
            name,
            probes.rows[i][0],
            float(probes.scores[i].mean()),
            float(probes.scores[i].std()),
            probes.rows[i][1],
            gains.get(i),
        )
        for i, name in enumerate(probes.names)
    )


def _verdict(gain: Interval, margin: float) -> str:
    """The verdict on the best earlier depth's gain over top.

    Different when its interval's lower end clears the margin, similar when
    its upper end stays within it, undecided when it straddles it.
    """
    if gain.low > margin:
        return "different"
    if gain.high <= margin:
        return "similar"
    return "undecided"


def _similarity(
    cfg: Config,
    probes: ProbeScores,
    gains: dict[int, Interval],
    top: int,
    best: int,
) -> Similarity:
    """The verdict on the best earlier depth's gain, and the depth to train on."""
    a = cfg.advise
    verdict = _verdict(gains[best], a.top_margin)
    # NOTE: undecided takes the earlier layer: the network stops there.
    chosen = top if verdict == "similar" else best
    return Similarity(
        verdict,
        probes.names[best],
        gains[best],
        a.top_margin,
        a.confidence,
        probes.folds,
        a.cv_repeats,
        probes.images,
        len(gains),
        TOP if verdict == "similar" else probes.names[best],
        probes.codes_of[chosen],
    )


# ---------------------------------------------------------------------------
# BatchNorm shift and the backbone's own confidence


def domain_of(cfg: Config, backbone: Any, sample: ImageSet) -> DomainStatistics:
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
    cfg: Config, backbone: Any, files: list[Any], bar: Any, size: int = 8
) -> Iterator[torch.Tensor]:
    """Normalised pixel batches of the readable files, advancing the bar.

    Small batches: the statistics are sums, so the size changes nothing but
    the memory (a batch of 32 at 224 px peaked at 1.1 GB over the rest).

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
