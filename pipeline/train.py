"""The train stage: a scikit-learn classifier on cached codes (cases 1 and 2).

Reads the codes `quadrant extract` cached (extracting them first when they are
missing), chooses hyper-parameters by stratified cross-validation on the
training split, refits on all of it and publishes the model as one folder,
`<run.out>/models/codes/`: the model record (`model.json`), the head in skops
format (no pickle), the CV table (`train.json`) and the validation curve.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline

from features.atomic import staged_folder, write_json
from features.cache import CacheInfo, read_info
from features.classifiers import (
    GRID_KEYS,
    ClassifierSpec,
    build_pipeline,
    fit_streaming,
    param_grid,
)
from features.codes import (
    check_finite,
    load_codes,
    read_labels,
    resolve_codes,
    stream_codes,
)
from features.errors import ConfigError, DataError
from features.heads import PROBE_ROWS, save_head, score_kind
from features.transforms import Preprocessing
from pipeline import extract, plots, sweep
from pipeline.config import Config
from pipeline.layout import ModelFiles
from pipeline.models import new_record
from pipeline.stamps import stamp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What the train stage fitted and how it scored."""

    model_dir: Path
    classifier: str
    layer: str
    pooling: str
    best_params: dict[str, Any]
    cv_score: float
    cv_std: float
    val_score: float | None
    n_train: int
    seconds: float


def run(cfg: Config) -> TrainResult:
    """Fit, tune and publish the configured classifier on the configured codes.

    Raises:
        DataError: one class only, a class with a single training image,
            NaN or infinite codes.
        CacheMismatchError: train.codes holds codes of another configuration,
            or the layer is not in the cache.
    """
    start = time.perf_counter()
    cache = extract.locate_codes(cfg, cfg.train.codes)
    layer, pooling = resolve_layer(cfg, cache)
    pipeline, summary, probe, n = fit(cfg, cache, layer, pooling)
    val = _val_score(pipeline, cache, layer, pooling)
    result = TrainResult(
        cfg.layout.model("codes").folder,
        cfg.train.classifier,
        layer,
        pooling,
        summary["best_params"],
        summary["best_score"],
        summary["best_std"],
        val,
        n,
        time.perf_counter() - start,
    )
    _publish(cfg, result, pipeline, summary, probe, read_info(cache))
    return result


def resolve_layer(cfg: Config, cache: Path) -> tuple[str, str]:
    """The (layer, pooling) to train on: train.layer, or the sweep's best."""
    if cfg.train.layer == "best":
        return sweep.best_layer(cfg, cache)
    return resolve_codes(cache, cfg.train.layer, cfg.train.pooling)


def model_stamp(cfg: Config, cache_key: str, layer: str, pooling: str) -> str:
    """The stamp of a codes model: its codes, its layer and the train settings.

    `quadrant run` reuses a model whose record holds the same stamp.
    """
    return stamp(cache_key, layer, pooling, asdict(cfg.train), cfg.run.seed)


Fitted = tuple[Pipeline, dict[str, Any], npt.NDArray[Any], int]


def fit(cfg: Config, cache: Path, layer: str, pooling: str) -> Fitted:
    """Tune and fit the configured classifier on one code array of a cache.

    Returns:
        The fitted pipeline, a summary of the search, a few code rows that pin
        its predictions, and the number of training rows.
    """
    spec = classifier_spec(cfg)
    if cfg.train.classifier == "sgd":
        return _fit_streaming(cfg, spec, cache, layer, pooling)
    return _fit_grid(cfg, spec, cache, layer, pooling)


def classifier_spec(cfg: Config) -> ClassifierSpec:
    """The configured classifier, as [train] describes it."""
    t = cfg.train
    return ClassifierSpec(
        t.classifier,
        t.preprocess,
        t.pca_components,
        t.class_weight,
        t.max_iter,
        cfg.run.seed,
    )


def param_grids(cfg: Config) -> dict[str, Any]:
    """The values [train] searches: C, gamma, alpha."""
    return {"C": cfg.train.C, "gamma": cfg.train.gamma, "alpha": cfg.train.alpha}


def check_labels(y: npt.NDArray[np.int64], label_names: Sequence[str]) -> int:
    """Check training labels; return the images in the smallest class.

    Raises:
        DataError: one class only, a class without training rows, or a class
            with one image.
    """
    labels, counts = np.unique(y, return_counts=True)
    missing = sorted(set(range(len(label_names))) - set(labels.tolist()))
    if missing and len(labels) >= 2:
        raise DataError(
            f"class(es) {[label_names[i] for i in missing]} have no training rows; "
            "every class needs training images (add some, or remove the class)"
        )
    if len(labels) < 2:
        name = label_names[labels[0]] if len(labels) else "none"
        raise DataError(
            f"the training split has one class only ({name!r}); a classifier needs "
            "at least two classes of training images"
        )
    if counts.min() < 2:
        name = label_names[labels[counts.argmin()]]
        raise DataError(
            f"class {name!r} has a single training image; cross-validation needs "
            "at least two per class (add images or lower data.val_fraction / "
            "data.test_fraction)"
        )
    return int(counts.min())


def _fit_grid(
    cfg: Config, spec: ClassifierSpec, cache: Path, layer: str, pooling: str
) -> Fitted:
    codes = load_codes(cache, layer, pooling, split="train", views=cfg.train.views)
    check_finite(codes.X, f"{layer}/{pooling}")
    smallest = check_labels(codes.y[codes.views == 0], codes.label_names)
    folds = min(cfg.train.cv_folds, smallest)
    if folds < cfg.train.cv_folds:
        log.warning(
            "the smallest class allows %d CV folds, not %d", folds, cfg.train.cv_folds
        )
    # Views of one image must stay in one fold, or CV scores leak.
    cv = (
        StratifiedGroupKFold(folds, shuffle=True, random_state=cfg.run.seed)
        if cfg.train.views == "all"
        else StratifiedKFold(folds, shuffle=True, random_state=cfg.run.seed)
    )
    search = GridSearchCV(
        build_pipeline(spec),
        param_grid(spec.classifier, param_grids(cfg)),
        cv=cv,
        scoring=cfg.train.scoring,
        n_jobs=cfg.train.n_jobs,
        refit=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        search.fit(codes.X, codes.y, groups=codes.groups)
    _report_convergence(caught, cfg)
    return search.best_estimator_, _summary(search), codes.X[:PROBE_ROWS], len(codes)


def _report_convergence(caught: list[warnings.WarningMessage], cfg: Config) -> None:
    count = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    if count:
        log.warning(
            "%d fits stopped at train.max_iter = %d before converging; raise it or "
            "keep 'standardize' in train.preprocess",
            count,
            cfg.train.max_iter,
        )


def _summary(search: GridSearchCV) -> dict[str, Any]:
    results = search.cv_results_
    best = search.best_index_
    return {
        "best_params": {
            k.removeprefix("clf__"): _plain(v) for k, v in search.best_params_.items()
        },
        "best_score": float(results["mean_test_score"][best]),
        "best_std": float(results["std_test_score"][best]),
        "folds": int(search.n_splits_),
        "candidates": [
            {
                "params": {k.removeprefix("clf__"): _plain(v) for k, v in p.items()},
                "mean": float(m),
                "std": float(s),
                "fit_seconds": float(t),
            }
            for p, m, s, t in zip(
                results["params"],
                results["mean_test_score"],
                results["std_test_score"],
                results["mean_fit_time"],
                strict=True,
            )
        ],
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _fit_streaming(
    cfg: Config, spec: ClassifierSpec, cache: Path, layer: str, pooling: str
) -> Fitted:
    """SGD with partial_fit over HDF5 chunks; alpha chosen on a held-out tenth.

    Only one shuffle buffer of codes is in memory at a time, so this path
    trains on code sets larger than memory.
    """
    if set(spec.preprocess) - {"standardize"}:
        raise ConfigError(
            "[train] classifier = 'sgd' streams codes and supports preprocess = "
            f"['standardize'] or []; got {list(spec.preprocess)}"
        )
    info = read_info(cache)
    check_labels(read_labels(cache, split="train")[0], info.label_names)
    dims = info.datasets[f"{layer}/{pooling}"][1]
    buffer_rows = max(1024, cfg.train.buffer_mib * 2**20 // (4 * dims))
    source = _ChunkSource(cache, layer, pooling, cfg.train.views, buffer_rows)
    classes = np.arange(len(info.label_names))
    trials = []
    for alpha in cfg.train.alpha:
        pipeline = build_pipeline(spec).set_params(clf__alpha=alpha)
        fit_streaming(
            pipeline,
            source.part(False),
            classes,
            epochs=cfg.train.epochs,
            seed=cfg.run.seed,
        )
        trials.append((alpha, _stream_accuracy(pipeline, source.part(True))))
        log.info("sgd alpha=%g: held-out accuracy %.4f", alpha, trials[-1][1])
    alpha, score = max(trials, key=lambda t: t[1])
    final = build_pipeline(spec).set_params(clf__alpha=alpha)
    fit_streaming(
        final, source.part(None), classes, epochs=cfg.train.epochs, seed=cfg.run.seed
    )
    probe, n = _first_rows_and_count(source.part(None))
    summary = {
        "best_params": {"alpha": alpha},
        "best_score": score,
        "best_std": 0.0,
        "folds": 1,
        "validation": "held-out tenth of the training images",
        "candidates": [
            {"params": {"alpha": a}, "mean": s, "std": 0.0} for a, s in trials
        ],
    }
    return final, summary, probe, n


@dataclass(frozen=True)
class _ChunkSource:
    """Blocks of training codes streamed from a cache, one buffer at a time."""

    cache: Path
    layer: str
    pooling: str
    views: str
    buffer_rows: int

    def part(self, holdout: bool | None) -> Any:
        """`chunks(rng)`: the held-out tenth (True), the rest (False) or all."""

        def chunks(rng: np.random.Generator | None) -> Any:
            for X, y, groups in stream_codes(
                self.cache,
                self.layer,
                self.pooling,
                split="train",
                views=self.views,
                buffer_rows=self.buffer_rows,
                rng=rng,
            ):
                check_finite(X, f"{self.layer}/{self.pooling}")
                keep = np.ones(len(y), dtype=bool)
                if holdout is not None:
                    keep = _held_out(groups) == holdout
                if keep.any():
                    yield X[keep], y[keep]

        return chunks


def _held_out(groups: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """A fixed tenth of the images (by image index), all views together."""
    return (groups * 2654435761 % 2**32) % 10 == 0


def _stream_accuracy(pipeline: Pipeline, chunks: Any) -> float:
    right = total = 0
    for X, y in chunks(None):
        right += int((pipeline.predict(X) == y).sum())
        total += len(y)
    return right / max(total, 1)


def _first_rows_and_count(chunks: Any) -> tuple[npt.NDArray[Any], int]:
    probe: npt.NDArray[Any] | None = None
    count = 0
    for X, _ in chunks(None):
        if probe is None:
            probe = X[:PROBE_ROWS].copy()  # a view would keep the block alive
        count += len(X)
    assert probe is not None  # check_labels refused an empty training split
    return probe, count


def _val_score(
    pipeline: Pipeline, cache: Path, layer: str, pooling: str
) -> float | None:
    val = load_codes(cache, layer, pooling, split="val")
    if len(val) == 0:
        return None
    return float(accuracy_score(val.y, pipeline.predict(val.X)))


def _publish(
    cfg: Config,
    result: TrainResult,
    pipeline: Pipeline,
    summary: dict[str, Any],
    probe: npt.NDArray[Any],
    info: CacheInfo,
) -> None:
    """Write the model's folder as a whole: record, head, CV table, plot."""
    codes = {
        "layer": result.layer,
        "pooling": result.pooling,
        "dims": int(info.datasets[f"{result.layer}/{result.pooling}"][1]),
        "cache": str(info.path),
        "cache_key": info.key,
        "provenance": info.provenance,
    }
    with staged_folder(cfg.layout.model("codes").folder) as folder:
        files = ModelFiles(folder, "codes")
        record = new_record(
            "codes",
            cfg,
            label_names=info.label_names,
            preprocessing=Preprocessing().updated(info.provenance["preprocessing"]),
            backbone=info.provenance["backbone"],
            stamp=model_stamp(cfg, info.key, result.layer, result.pooling),
            classifier=result.classifier,
            score_kind=score_kind(pipeline),
            codes=codes,
            head=save_head(files.head, pipeline, probe),
            params=result.best_params,
            cv_score=result.cv_score,
            val_score=result.val_score,
            n_train=result.n_train,
            views=cfg.train.views,
        )
        write_json(files.record, record)
        train_summary = {**record, "cv": summary, "seconds": result.seconds}
        write_json(files.train_summary, train_summary)
        _cv_plot(cfg, summary, files.train_plot)


def _cv_plot(cfg: Config, summary: dict[str, Any], path: Path) -> None:
    """Score against the first tuned hyper-parameter, the others at their best.

    The chosen value is marked; when it sits at an end of a grid of several
    values, the best may lie beyond it, which the log says.
    """
    param = GRID_KEYS[cfg.train.classifier][0]
    best = summary["best_params"]
    rows = [
        c
        for c in summary["candidates"]
        if all(c["params"][k] == v for k, v in best.items() if k != param)
    ]
    values = [r["params"][param] for r in rows]
    chosen = values.index(best[param])
    if len(values) > 2 and best[param] in (min(values), max(values)):
        end = "smallest" if best[param] == min(values) else "largest"
        log.warning(
            "the chosen %s = %s is the %s value of train.%s %s: the best may lie "
            "beyond it; extend the grid that way and train again",
            param,
            best[param],
            end,
            param,
            values,
        )
    plots.cv_plot(
        values,
        [r["mean"] for r in rows],
        [r["std"] for r in rows],
        param,
        path,
        chosen=chosen,
        title=f"{cfg.train.classifier}: {cfg.train.scoring} by {param}",
    )
