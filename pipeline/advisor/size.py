"""The advisor's size question, answered by measurement: fine-tune or codes?

Whether fine-tuning pays off depends on the network, the data and the time
there is, so above a floor (`advise.small_per_class`: with fewer images per
class the data is small, unmeasured) the advisor measures:

- the reference every fine-tune is judged against: what the codes path will
  deliver, its tuned classifier (train.classifier, C chosen by
  cross-validation over train.C) on the advised layer: its cross-validated
  accuracy, and, refitted on every training image, which validation images
  it gets right;
- that classifier's learning curve: validation accuracy trained on 1/4, 1/2
  and all of the training images, and the gain of the last doubling with its
  interval: do the frozen codes still gain from more data?
- pilot fine-tunes, one per fine-tune candidate the advice's share of
  run.budget can pay for, cheapest first (`pilot_candidates`): each the first
  `advise.pilot_share` of that candidate's full fine-tune (images processed),
  validated at `advise.pilot_points` even steps (`pipeline.finetune.pilot`),
  set against the reference on the same validation images (a paired
  interval).

A pilot wins when it is ahead (the interval's lower end above 0), or when
the lower end of its forecast's interval at the full budget passes the
reference by more than `advise.top_margin`. The forecast fits a power law of
the validation error against images processed to the pilot's points after
its warm-up and in its second half, and continues it to the full budget; its
interval comes from the points' binomial noise, widened by `FORECAST_WIDEN`
(`features.probes.forecast_interval`). With fewer than two such points (a
pilot that ends inside its warm-up) there is no forecast, and the measured
pilot alone decides.

Each pilot is recorded with a stamp (`pilot.json` in its folder under
`<run.out>/advise/`), so an unchanged rerun reuses it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

from features.atomic import read_json, write_json
from features.classifiers import build_pipeline, param_grid
from features.codes import Codes, load_codes
from features.data import ImageSet
from features.errors import DataError
from features.probes import Interval, forecast_interval, paired_interval
from pipeline import finetune
from pipeline.advisor.record import CurvePoint, Pilot, Reference, Size
from pipeline.config import Config
from pipeline.inputs import load_images
from pipeline.stamps import stamp, stamp_of
from pipeline.train import classifier_spec, param_grids

log = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 1.0)
# NOTE: bump when what a pilot records changes, so old pilot.json is redone.
PILOT_VERSION = 3
# The forecast interval's half-widths are the binomial noise of the pilot's
# points times this, calibrated on the four-case benchmark's runs so that the
# interval covers the full fine-tune's accuracy (docs/four_cases.md).
FORECAST_WIDEN = 1.0


@dataclass(frozen=True)
class FinetuneOption:
    """A fine-tune candidate the advisor may pilot: its settings and cost.

    Attributes:
        name: how it is shown, e.g. "fine-tune pretrained 32 px".
        key: its folder name under `<run.out>/advise/`.
        settings: the [finetune] keys that make it (init, input_size ...).
        seconds: its expected wall time in full (training, evaluation and
            export).
        pilot_seconds: the expected wall time of its pilot.
    """

    name: str
    key: str
    settings: dict[str, Any]
    seconds: float
    pilot_seconds: float


def measure(
    cfg: Config,
    images: ImageSet,
    cache: Path,
    code: tuple[str, str],
    *,
    options: Sequence[FinetuneOption],
    allowance: Callable[[], float],
) -> Size:
    """Answer the size question for these images (see the module docstring).

    Args:
        cfg: the configuration.
        images: the whole image set.
        cache: the code cache holding every image's codes of `code`.
        code: (layer, pooling) the codes path trains on.
        options: the fine-tune candidates, cheapest first.
        allowance: seconds the advice may still spend (inf: no budget).

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
        "= %d: measuring the codes path's classifier and pilot fine-tunes",
        median,
        cfg.advise.small_per_class,
    )
    reference, curve, gain, frozen = codes_reference(cfg, cache, code)
    pilots = pilot_candidates(cfg, options, frozen, reference, allowance)
    winners = [p for p in pilots if p.wins(cfg.advise.top_margin)]
    rule = winners[0].wins(cfg.advise.top_margin) if winners else "codes"
    return Size(
        **counted,
        measured=True,
        frozen_curve=curve,
        frozen_gain=gain,
        reference=reference,
        pilots=tuple(pilots),
        finetune=bool(winners),
        rule=rule or "codes",
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
        reference=None,
        pilots=(),
        finetune=False,
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
# The codes path's tuned classifier: the reference, and its learning curve


def codes_reference(
    cfg: Config, cache: Path, code: tuple[str, str]
) -> tuple[Reference, tuple[CurvePoint, ...], Interval, dict[str, bool]]:
    """The codes path's tuned classifier and its learning curve.

    Returns:
        The reference, its validation accuracy trained on 1/4, 1/2 and all
        training images, the gain of the last doubling (paired on the
        validation images), and whether the classifier trained on all images
        got each validation image (by relative path) right.
    """
    start = time.perf_counter()
    layer, pooling = code
    train = load_codes(cache, layer, pooling, split="train")
    val = load_codes(cache, layer, pooling, split="val")
    search, cv = _tuned(cfg, train)
    order = nested_order(train.y, cfg.run.seed)
    correct = [
        _holdout(search.best_estimator_, train.take(order[f]), val, code=code)
        for f in FRACTIONS
    ]
    points = tuple(
        CurvePoint(len(order[f]), float(right.mean()))
        for f, right in zip(FRACTIONS, correct, strict=True)
    )
    gain = paired_interval(correct[-1], correct[-2], confidence=cfg.advise.confidence)
    reference = Reference(
        "/".join(code),
        cfg.train.classifier,
        float(search.best_params_.get("clf__C", math.nan)),
        cv,
        points[-1].accuracy,
        time.perf_counter() - start,
    )
    _log_reference(reference)
    by_path = dict(zip(_paths(val), correct[-1].tolist(), strict=True))
    return reference, points, gain, by_path


def _tuned(cfg: Config, train: Codes) -> tuple[GridSearchCV, Interval]:
    """The configured classifier tuned by cross-validation, as `quadrant train`
    tunes it, on at most `advise.sample` training rows; its fold accuracies."""
    t = cfg.train
    rows = train
    if len(train) > cfg.advise.sample:
        keep, _ = train_test_split(
            np.arange(len(train)),
            train_size=cfg.advise.sample,
            stratify=train.y,
            random_state=cfg.run.seed,
        )
        rows = train.take(np.sort(keep))
    spec = classifier_spec(cfg)
    folds = min(t.cv_folds, int(np.bincount(rows.y).min()))
    cv = StratifiedKFold(max(2, folds), shuffle=True, random_state=cfg.run.seed)
    search = GridSearchCV(
        build_pipeline(spec),
        param_grid(spec.classifier, param_grids(cfg)),
        cv=cv,
        scoring="accuracy",
        n_jobs=t.n_jobs,
    ).fit(rows.X, rows.y)
    best = search.best_index_
    scores = np.array(
        [search.cv_results_[f"split{k}_test_score"][best] for k in range(cv.n_splits)]
    )
    return search, _mean_interval(scores, cfg.advise.confidence)


def _mean_interval(scores: np.ndarray, confidence: float) -> Interval:
    """A t interval for the mean of fold scores."""
    mean, k = float(scores.mean()), len(scores)
    half = float(
        stats.t.ppf((1 + confidence) / 2, k - 1) * scores.std(ddof=1) / math.sqrt(k)
    )
    return Interval(
        mean, mean - half, min(1.0, mean + half), confidence, f"t over {k} folds", k
    )


def _holdout(
    estimator: Any, train: Codes, val: Codes, *, code: tuple[str, str]
) -> np.ndarray:
    """Whether the classifier trained on `train` gets each validation image right."""
    start = time.perf_counter()
    right = clone(estimator).fit(train.X, train.y).predict(val.X) == val.y
    log.info(
        "advise: codes %s/%s on %d training images: val accuracy %.4f (%.1f s)",
        *code,
        len(train),
        float(right.mean()),
        time.perf_counter() - start,
    )
    return np.asarray(right)


def _log_reference(r: Reference) -> None:
    log.info(
        "advise: the codes path's %s (C = %g) on %s: CV accuracy %.4f [%.4f, %.4f], "
        "val %.4f (%.1f s)",
        r.classifier,
        r.C,
        r.layer,
        r.cv.mean,
        r.cv.low,
        r.cv.high,
        r.val_accuracy,
        r.seconds,
    )


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


def pilot_candidates(
    cfg: Config,
    options: Sequence[FinetuneOption],
    reference: dict[str, bool],
    codes: Reference,
    allowance: Callable[[], float],
) -> list[Pilot]:
    """Pilot each option, cheapest first, while the advice's allowance lasts."""
    pilots = []
    for option in options:
        left = allowance()
        if option.pilot_seconds > left:
            log.info(
                "advise: no pilot for %s: it would take about %.0f s, the advice "
                "has %.0f s of run.budget left",
                option.name,
                option.pilot_seconds,
                max(0.0, left),
            )
            continue
        pilots.append(_compare(cfg, option, reference, codes.val_accuracy))
    return pilots


def pilot_config(cfg: Config, option: FinetuneOption) -> Config:
    """The config of a pilot: its own run folder, the option's settings."""
    return replace(
        cfg,
        run=replace(cfg.run, out=cfg.layout.pilot(option.key)),
        finetune=replace(cfg.finetune, **finetune_keys(option.settings)),
    )


def finetune_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """`finetune.x` settings as the [finetune] section's keyword arguments."""
    return {
        key.removeprefix("finetune."): value
        for key, value in settings.items()
        if key.startswith("finetune.")
    }


def run_pilot(cfg: Config, option: FinetuneOption) -> finetune.PilotRun:
    """The pilot of `option`: reused when its stamp is unchanged, else run."""
    pcfg = pilot_config(cfg, option)
    record = pcfg.layout.pilot_record
    wanted = pilot_stamp(pcfg)
    if stamp_of(record) == wanted:
        saved = read_json(record, fix="delete it: the pilot runs again")
        run = _pilot_run(saved["pilot"])
        if not run.resumable or pcfg.layout.checkpoint.exists():
            log.info("advise: pilot of %s reused from %s", option.name, record)
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
    cfg: Config, option: FinetuneOption, reference: dict[str, bool], target: float
) -> Pilot:
    """Run (or reuse) a pilot and set it against the codes path.

    Args:
        cfg: the configuration.
        option: the fine-tune candidate it pilots.
        reference: the codes path's correctness per validation image.
        target: what the pilot's forecast must pass (by the margin): the
            codes path's validation accuracy.

    Raises:
        DataError: the pilot and the reference share no validation image.
    """
    run = run_pilot(cfg, option)
    mine = dict(zip(run.val_paths, run.val_correct, strict=True))
    accuracy, versus = _versus(mine, reference, cfg.advise.confidence)
    forecast, used = forecast_pilot(run, cfg.advise.confidence)
    pilot = Pilot(
        name=option.name,
        settings=dict(option.settings),
        init=run.init,
        budget=run.budget,
        images=run.images,
        full=run.full,
        share=run.images / run.full,
        epochs=run.epochs,
        seconds=run.seconds,
        curve=tuple(CurvePoint(int(t), float(acc)) for t, acc in run.curve),
        accuracy=accuracy,
        forecast=None if forecast is None else forecast.mean,
        forecast_low=None if forecast is None else forecast.low,
        forecast_high=None if forecast is None else forecast.high,
        forecast_points=used,
        versus=versus,
        reference=target,
        resumable=run.resumable,
        folder=str(cfg.layout.pilot(option.key)),
        images_per_second=run.images_per_second,
    )
    _log_pilot(pilot)
    return pilot


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
    forecast = (
        "no forecast (too few points after the warm-up)"
        if pilot.forecast is None
        else f"forecast at the full budget {pilot.forecast:.4f} "
        f"[{pilot.forecast_low:.4f}, {pilot.forecast_high:.4f}]"
    )
    log.info(
        "advise: pilot of %s, %d of %d images (%.0f%%) in %.0f s: val accuracy "
        "%.4f, %+.1f points [%+.1f, %+.1f] against the codes path; %s",
        pilot.name,
        pilot.images,
        pilot.full,
        100 * pilot.share,
        pilot.seconds,
        pilot.accuracy,
        100 * versus.mean,
        100 * versus.low,
        100 * versus.high,
        forecast,
    )


def forecast_pilot(
    run: finetune.PilotRun, confidence: float
) -> tuple[Interval | None, int]:
    """The forecast at the full budget with its interval, and its points.

    Only points after the learning-rate warm-up and in the pilot's second
    half count: during the warm-up the rate is still rising and the new head
    finds its feet, so the curve climbs faster than it will later. With fewer
    than two such points there is no forecast (None): the measured pilot
    alone decides. The interval comes from the validation points' binomial
    noise (`features.probes.forecast_interval`), widened by `FORECAST_WIDEN`.
    """
    start = max(run.warmup, run.images / 2)
    points = [(float(t), acc) for t, acc in run.curve if t >= start]
    if len(points) < 2:
        return None, len(points)
    forecast = forecast_interval(
        points,
        float(run.full),
        images=max(1, len(run.val_correct)),
        confidence=confidence,
    )
    low = forecast.mean - FORECAST_WIDEN * (forecast.mean - forecast.low)
    high = forecast.mean + FORECAST_WIDEN * (forecast.high - forecast.mean)
    capped = Interval(
        min(1.0, forecast.mean),
        min(1.0, max(0.0, low)),
        min(1.0, high),
        forecast.confidence,
        forecast.method,
        forecast.n,
    )
    return capped, len(points)
