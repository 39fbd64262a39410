"""The layer sweep: which depth of the network transfers best to this data?

Every cached layer x pooling gets a cross-validated linear probe (standardise
+ logistic regression) and its LogME score, on the training split. The table,
a plot of accuracy against depth and the best layer (with its margin over
"top") land under run.out: `sweep.json`, `sweep.csv`, `sweep.png`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from features.atomic import read_json, write_csv, write_json
from features.cache import read_info
from features.codes import Codes, available_codes, check_finite, load_codes
from features.layers import TOP
from features.probes import ProbeResult, linear_probe, logme
from pipeline import extract, plots
from pipeline.config import Config, config_to_dict
from pipeline.stamps import stamp, stamp_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRow:
    """One layer x pooling: its probe accuracy, LogME and cost."""

    name: str
    layer: str
    pooling: str
    dims: int
    accuracy: float
    std: float
    logme: float
    seconds: float


@dataclass(frozen=True)
class SweepResult:
    """The sweep over every code array of one cache."""

    rows: tuple[SweepRow, ...]
    best: SweepRow
    cache: Path
    key: str
    images: int

    @property
    def top(self) -> SweepRow | None:
        return next((r for r in self.rows if r.layer == TOP), None)

    def margin_over_top(self) -> float | None:
        return None if self.top is None else self.best.accuracy - self.top.accuracy


def run(cfg: Config) -> SweepResult:
    """Probe every cached layer; write the table and the plot.

    Raises:
        DataError: one class only, a class with one training image, or
            non-finite codes.
    """
    path = extract.locate_codes(cfg, cfg.train.codes)
    key = read_info(path).key
    rows = []
    for name in available_codes(path):
        layer, pooling = name.rsplit("/", 1)
        codes = _subset(load_codes(path, layer, pooling, split="train"), cfg)
        rows.append(_probe(name, codes, cfg))
        log.info(
            "sweep %-24s acc %.3f ± %.3f  LogME %.3f",
            name,
            rows[-1].accuracy,
            rows[-1].std,
            rows[-1].logme,
        )
    best = max(rows, key=lambda r: (r.accuracy, r.logme))
    result = SweepResult(tuple(rows), best, path, key, len(codes))
    _write(cfg, result)
    return result


def _subset(codes: Codes, cfg: Config) -> Codes:
    """A stratified, seeded subset of at most sweep.max_images training images."""
    if len(codes) <= cfg.sweep.max_images:
        return codes
    keep, _ = train_test_split(
        np.arange(len(codes)),
        train_size=cfg.sweep.max_images,
        stratify=codes.y,
        random_state=cfg.run.seed,
    )
    return codes.take(np.sort(keep))


def probe_codes(codes: Codes, cfg: Config) -> ProbeResult:
    """The configured linear probe (sweep.C, sweep.cv_folds) on some codes."""
    return linear_probe(
        codes.X,
        codes.y,
        C=cfg.sweep.C,
        folds=cfg.sweep.cv_folds,
        seed=cfg.run.seed,
        n_jobs=cfg.train.n_jobs,
        max_iter=cfg.train.max_iter,
    )


def _probe(name: str, codes: Codes, cfg: Config) -> SweepRow:
    check_finite(codes.X, name)
    start = time.perf_counter()
    probe = probe_codes(codes, cfg)
    score = logme(codes.X, codes.y)
    return SweepRow(
        name,
        codes.layer,
        codes.pooling,
        codes.X.shape[1],
        probe.accuracy,
        probe.std,
        score,
        time.perf_counter() - start,
    )


def sweep_stamp(cfg: Config, cache_key: str) -> str:
    """The stamp of a sweep: the codes it probed and the probe's settings."""
    return stamp(cache_key, asdict(cfg.sweep), cfg.run.seed)


def _write(cfg: Config, result: SweepResult) -> None:
    layout = cfg.layout
    columns = list(asdict(result.rows[0]))
    write_csv(
        layout.sweep_csv,
        columns,
        ([asdict(r)[c] for c in columns] for r in result.rows),
    )
    plots.sweep_plot(
        [r.name for r in result.rows],
        [r.accuracy for r in result.rows],
        [r.std for r in result.rows],
        [r.logme for r in result.rows],
        result.best.name,
        layout.sweep_plot,
        title=f"{cfg.backbone.name} on {cfg.data.root.name}: "
        f"{result.images} training images",
    )
    summary = {
        "cache": str(result.cache),
        "key": result.key,
        "images": result.images,
        "best": asdict(result.best),
        "margin_over_top": result.margin_over_top(),
        "rows": [asdict(r) for r in result.rows],
        "stamp": sweep_stamp(cfg, result.key),
        "config": config_to_dict(cfg),
    }
    write_json(layout.sweep_json, summary)  # last: the record of a finished sweep


def is_fresh(cfg: Config, cache_key: str) -> bool:
    """Whether sweep.json is the sweep of these codes with these settings.

    The one freshness rule: `quadrant run` reuses the sweep, and `best_layer`
    reads its pick, only when its stamp is the one a sweep would make now.
    """
    return stamp_of(cfg.layout.sweep_json) == sweep_stamp(cfg, cache_key)


def best_layer(cfg: Config, cache: Path) -> tuple[str, str]:
    """The (layer, pooling) the sweep ranks first, sweeping if needed."""
    if is_fresh(cfg, read_info(cache).key):
        saved = read_json(cfg.layout.sweep_json, fix="run `quadrant sweep` again")
        return saved["best"]["layer"], saved["best"]["pooling"]
    best = run(cfg).best
    return best.layer, best.pooling
