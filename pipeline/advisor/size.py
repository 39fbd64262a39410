"""The advisor's size question, answered by measurement: fine-tune or codes?

"Large" used to be one threshold on images per class. Whether fine-tuning
pays off depends on the network, the data and the budget, so above a floor
(`advise.small_per_class`: with fewer images per class the data is small,
unmeasured) the advisor measures:

- a learning curve of the frozen probe (standardise + logistic regression
  on the codes of the layer the codes path would use): validation accuracy
  when trained on 1/4, 1/2 and all of the training images, and the gain of
  the last doubling with its interval: do the frozen codes still gain from
  more data?
- a pilot fine-tune from the pretrained weights: the first
  `advise.pilot_share` of the full fine-tune (images processed), validated
  at `advise.pilot_points` even steps (`pipeline.finetune.pilot`), set
  against the frozen probe on the same validation images (a paired
  interval).

Fine-tune when the pilot is ahead (the interval's lower end above 0), or
when the lower end of its forecast's interval at the full budget passes the
frozen codes by more than `advise.top_margin`. The forecast fits a power law
of the validation error against images processed to the pilot's points
after its warm-up and in its second half, and continues it to the full
budget; its interval comes from the points' binomial noise
(`features.probes.forecast_interval`). With fewer than two such points
there is no forecast.
Otherwise: the codes path, with the figures. When fine-tuning wins and the
data is different, a second pilot from random weights (same budget) decides
between pretrained and scratch by the same rule; pretrained stays unless
scratch wins it.

Each pilot is recorded with a stamp (`pilot.json` in its folder under
`<run.out>/advise/`), so an unchanged rerun reuses it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from features.atomic import read_json, write_json
from features.codes import Codes, load_codes
from features.data import ImageSet
from features.errors import DataError
from features.probes import (
    Interval,
    forecast_interval,
    holdout_probe,
    paired_interval,
)
from pipeline import finetune
from pipeline.advisor.record import CurvePoint, Pilot, Size
from pipeline.config import Config
from pipeline.inputs import load_images
from pipeline.stamps import stamp, stamp_of

log = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 1.0)
# NOTE: bump when what a pilot records changes, so old pilot.json is redone.
PILOT_VERSION = 2


def measure(
    cfg: Config,
    images: ImageSet,
    cache: Path,
    code: tuple[str, str],
    *,
    different: bool,
) -> Size:
    """Answer the size question for these images (see the module docstring).

    Args:
        cfg: the configuration.
        images: the whole image set.
        cache: the code cache holding every image's codes of `code`.
        code: (layer, pooling) of the frozen probe.
        different: the similarity verdict; a large and different set also gets
            the scratch pilot.

    Raises:
        DataError: above the floor, a class without validation images.
    """
    counted = _counted(cfg, images, code)
    median = counted["per_class_median"]
    if median < cfg.advise.small_per_class:
        return _unmeasured(counted)
    _check_validation(images)
    log.info(
        "advise: median %.0f training images per class >= advise.small_per_class "
        "= %d: measuring the frozen learning curve and a pilot fine-tune",
        median,
        cfg.advise.small_per_class,
    )
    curve, gain, frozen = frozen_curve(cfg, cache, code)
    pretrained, mine = _compare(cfg, "pretrained", frozen, curve[-1].accuracy)
    rule = pretrained.wins(cfg.advise.top_margin) or "codes"
    scratch, init = None, "pretrained"
    if rule != "codes" and different:
        scratch, _ = _compare(cfg, "scratch", mine, pretrained.forecast)
        init = "scratch" if scratch.wins(cfg.advise.top_margin) else "pretrained"
    return Size(
        **counted,
        measured=True,
        frozen_curve=curve,
        frozen_gain=gain,
        pilot=pretrained,
        scratch=scratch,
        finetune=rule != "codes",
        init=init,
        rule=rule,
    )


def _counted(cfg: Config, images: ImageSet, code: tuple[str, str]) -> dict[str, Any]:
    """The Size fields every verdict shares: the training images per class."""
    counts = images.counts()["train"]
    per_class = [counts[name] for name in images.label_names]
    return dict(
        images=sum(per_class),
        per_class_median=float(np.median(per_class)),
        per_class_min=min(per_class),
        floor=cfg.advise.small_per_class,
        layer="/".join(code),
    )


def _unmeasured(counted: dict[str, Any]) -> Size:
    """Below the floor: small, the codes path, nothing measured."""
    return Size(
        **counted,
        measured=False,
        frozen_curve=(),
        frozen_gain=None,
        pilot=None,
        scratch=None,
        finetune=False,
        init="pretrained",
        rule="floor",
    )


def _check_validation(images: ImageSet) -> None:
    val = images.counts()["val"]
    missing = [name for name in images.label_names if val[name] == 0]
    if missing:
        raise DataError(
            f"the advisor's pilot fine-tune is scored on the validation split, and "
            f"class(es) {missing} have no validation images; set data.val_fraction "
            "> 0 (or add val/ images), or raise advise.small_per_class above the "
            "median images per class to skip the pilot"
        )


# ---------------------------------------------------------------------------
# The frozen probe's learning curve


def frozen_curve(
    cfg: Config, cache: Path, code: tuple[str, str]
) -> tuple[tuple[CurvePoint, ...], Interval, dict[str, bool]]:
    """Validation accuracy of the frozen probe on 1/4, 1/2 and all training images.

    Returns:
        The curve, the gain of the last doubling (paired on the validation
        images), and whether the probe trained on all images got each
        validation image (by relative path) right.
    """
    layer, pooling = code
    train = load_codes(cache, layer, pooling, split="train")
    val = load_codes(cache, layer, pooling, split="val")
    order = nested_order(train.y, cfg.run.seed)
    correct = [
        _frozen_probe(cfg, train.take(order[f]), val, code=code) for f in FRACTIONS
    ]
    points = tuple(
        CurvePoint(len(order[f]), float(right.mean()))
        for f, right in zip(FRACTIONS, correct, strict=True)
    )
    gain = paired_interval(correct[-1], correct[-2], confidence=cfg.advise.confidence)
    return points, gain, dict(zip(_paths(val), correct[-1].tolist(), strict=True))


def _frozen_probe(
    cfg: Config, train: Codes, val: Codes, *, code: tuple[str, str]
) -> np.ndarray:
    """Whether the probe trained on `train` gets each validation image right."""
    start = time.perf_counter()
    right = holdout_probe(
        train.X, train.y, val.X, val.y, C=cfg.sweep.C, max_iter=cfg.train.max_iter
    )
    log.info(
        "advise: frozen %s/%s on %d training images: val accuracy %.4f (%.1f s)",
        *code,
        len(train),
        float(right.mean()),
        time.perf_counter() - start,
    )
    return right


def nested_order(
    labels: np.ndarray, seed: int, fractions: tuple[float, ...] = FRACTIONS
) -> dict[float, np.ndarray]:
    """Row indices of nested, stratified, seeded subsets: each fraction of each class.

    Every class keeps ceil(fraction x its count) rows (one at least), and a
    smaller subset is part of every larger one.
    """
    rng = np.random.default_rng(seed)
    shuffled = {
        c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)
    }
    out = {}
    for fraction in fractions:
        keep = [
            rows[: max(1, math.ceil(fraction * len(rows)))]
            for rows in shuffled.values()
        ]
        out[fraction] = np.sort(np.concatenate(keep))
    return out


def _paths(codes: Codes) -> list[str]:
    return [str(p) for p in codes.paths]


# ---------------------------------------------------------------------------
# Pilots


def pilot_config(cfg: Config, init: str) -> Config:
    """The config of a pilot: its own run folder, the given init."""
    return replace(
        cfg,
        run=replace(cfg.run, out=cfg.layout.pilot(init)),
        finetune=replace(cfg.finetune, init=init),
    )


def run_pilot(cfg: Config, init: str) -> finetune.PilotRun:
    """The pilot with this init: reused when its stamp is unchanged, else run."""
    pcfg = pilot_config(cfg, init)
    record = pcfg.layout.pilot_record
    wanted = pilot_stamp(pcfg)
    if stamp_of(record) == wanted:
        saved = read_json(record, fix="delete it: the pilot runs again")
        run = _pilot_run(saved["pilot"])
        if not run.resumable or pcfg.layout.checkpoint.exists():
            log.info("advise: pilot (%s init) reused from %s", init, record)
            return run
    run = finetune.pilot(
        pcfg, share=cfg.advise.pilot_share, points=cfg.advise.pilot_points
    )
    write_json(record, {"stamp": wanted, "pilot": asdict(run)})
    return run


def pilot_stamp(pcfg: Config) -> str:
    """The fine-tune's own stamp (settings, images, seed) and the pilot's budget."""
    a = pcfg.advise
    return stamp(
        PILOT_VERSION,
        finetune.model_stamp(pcfg, load_images(pcfg)),
        a.pilot_share,
        a.pilot_points,
    )


def _pilot_run(data: dict[str, Any]) -> finetune.PilotRun:
    return finetune.PilotRun(
        **{
            **data,
            "curve": tuple(tuple(p) for p in data["curve"]),
            "val_paths": tuple(data["val_paths"]),
            "val_correct": tuple(data["val_correct"]),
        }
    )


def _compare(
    cfg: Config, init: str, reference: dict[str, bool], target: float
) -> tuple[Pilot, dict[str, bool]]:
    """Run (or reuse) a pilot and set it against a reference.

    Args:
        cfg: the configuration.
        init: the pilot's init.
        reference: the reference's correctness per validation image.
        target: what the pilot's forecast must pass (by the margin): the
            frozen probe's accuracy, or the pretrained pilot's forecast.

    Returns:
        The pilot's summary, and its own correctness per validation image.

    Raises:
        DataError: the pilot and the reference share no validation image.
    """
    run = run_pilot(cfg, init)
    mine = dict(zip(run.val_paths, run.val_correct, strict=True))
    accuracy, versus = _versus(mine, reference, cfg.advise.confidence)
    forecast, used = forecast_pilot(run, cfg.advise.confidence)
    pilot = Pilot(
        init=init,
        budget=run.budget,
        images=run.images,
        full=run.full,
        share=run.images / run.full,
        epochs=run.epochs,
        seconds=run.seconds,
        curve=tuple(CurvePoint(int(t), float(acc)) for t, acc in run.curve),
        accuracy=accuracy,
        forecast=forecast.mean,
        forecast_low=forecast.low,
        forecast_high=forecast.high,
        forecast_points=used,
        versus=versus,
        reference=target,
        resumable=run.resumable,
        folder=str(cfg.layout.pilot(init)),
    )
    _log_pilot(pilot)
    return pilot, mine


def _versus(
    mine: dict[str, bool], reference: dict[str, bool], confidence: float
) -> tuple[float, Interval]:
    """The pilot's accuracy and its paired gain over the reference.

    Both are read on the validation images the two were scored on.

    Raises:
        DataError: they share no validation image.
    """
    shared = sorted(set(mine) & set(reference))
    if not shared:
        raise DataError(
            "the pilot and its reference share no readable validation image; "
            "`quadrant extract` lists the unreadable files"
        )
    a = np.array([mine[p] for p in shared])
    b = np.array([reference[p] for p in shared])
    return float(a.mean()), paired_interval(a, b, confidence=confidence)


def _log_pilot(pilot: Pilot) -> None:
    versus = pilot.versus
    log.info(
        "advise: pilot (%s init) %d of %d images (%.0f%%) in %.0f s: val accuracy "
        "%.4f, %+.1f points [%+.1f, %+.1f] against its reference; forecast at the "
        "full budget %.4f [%.4f, %.4f] against %.4f",
        pilot.init,
        pilot.images,
        pilot.full,
        100 * pilot.share,
        pilot.seconds,
        pilot.accuracy,
        100 * versus.mean,
        100 * versus.low,
        100 * versus.high,
        pilot.forecast,
        pilot.forecast_low,
        pilot.forecast_high,
        pilot.reference,
    )


def forecast_pilot(run: finetune.PilotRun, confidence: float) -> tuple[Interval, int]:
    """The forecast at the full budget with its interval, and its points.

    Only points after the learning-rate warm-up and in the pilot's second
    half count: during the warm-up the rate is still rising and the new head
    finds its feet, so the curve climbs faster than it will later. With fewer
    than two such points there is no forecast: the last accuracy stands.
    The interval comes from the validation points' binomial noise
    (`features.probes.forecast_interval`).
    """
    start = max(run.warmup, run.images / 2)
    points = [(float(t), acc) for t, acc in run.curve if t >= start]
    if len(points) < 2:
        last = run.curve[-1][1]
        return Interval(last, last, last, confidence, "no forecast", 0), len(points)
    forecast = forecast_interval(
        points,
        float(run.full),
        images=max(1, len(run.val_correct)),
        confidence=confidence,
    )
    capped = Interval(
        min(1.0, forecast.mean),
        min(1.0, forecast.low),
        min(1.0, forecast.high),
        forecast.confidence,
        forecast.method,
        forecast.n,
    )
    return capped, len(points)
