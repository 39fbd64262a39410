"""The similarity question: the verdict from paired folds, its progress."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from features.probes import cv_splits, fold_accuracies, split_ratio
from pipeline.advisor import similarity, stage
from pipeline.advisor.record import Similarity
from pipeline.advisor.similarity import ProbeScores, similarity_of
from pipeline.config import Config, load_config

CFG = load_config(None, ["advise.top_margin=0.01", "advise.confidence=0.95"])


# ---------------------------------------------------------------------------
# Synthetic codes at the probes level: the verdict from paired folds


def _verdict(early: np.ndarray, top: np.ndarray, y: np.ndarray) -> Similarity:
    splits = cv_splits(y, folds=5, repeats=3, seed=0)
    scores = np.stack([fold_accuracies(X, y, splits, n_jobs=1) for X in (early, top)])
    _, sim = similarity_of(
        CFG,
        ProbeScores(
            ["layer2", "top"],
            [("layer2", "avg"), ("top", "none")],
            scores,
            [(early.shape[1], 0.0), (top.shape[1], 0.0)],
            folds=5,
            ratio=split_ratio(splits),
            images=len(y),
        ),
    )
    return sim


def _codes(y: np.ndarray, separation: float, rng: np.random.Generator) -> np.ndarray:
    centres = np.eye(3, 6)[y] * separation
    return centres + rng.normal(size=(len(y), 6))


@pytest.mark.parametrize("seed", range(4))
def test_layers_equal_by_construction_are_never_called_different(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], 30)
    # The same signal with fresh noise of the same size: equal in expectation.
    sim = _verdict(_codes(y, 1.5, rng), _codes(y, 1.5, rng), y)
    assert sim.verdict in ("similar", "undecided")
    assert sim.gain.low <= CFG.advise.top_margin


def test_identical_layers_are_similar() -> None:
    rng = np.random.default_rng(9)
    y = np.repeat([0, 1, 2], 30)
    codes = _codes(y, 1.5, rng)
    sim = _verdict(codes, codes, y)
    assert sim.verdict == "similar" and sim.layer == "top" and sim.code[0] == "top"
    assert (sim.gain.low, sim.gain.high) == (0.0, 0.0)


def test_a_clearly_better_earlier_layer_is_different() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 30)
    sim = _verdict(_codes(y, 4.0, rng), _codes(y, 0.7, rng), y)
    assert sim.verdict == "different" and sim.layer == "layer2"
    assert sim.gain.low > CFG.advise.top_margin  # the interval excludes the margin
    assert sim.folds == 5 and sim.repeats == 3 and sim.gain.n == 15


def test_the_batchnorm_step_shows_progress_and_logs(
    image_folder: Path,
    make_config: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bars: dict[str, list[int]] = {}
    real = similarity.progress_bar

    def recording(total: int, **kwargs: Any) -> Any:
        bar = real(total, **kwargs)
        steps = bars.setdefault(kwargs["desc"], [total])
        update = bar.update
        bar.update = lambda n=1: (steps.append(n), update(n))[1]
        return bar

    monkeypatch.setattr(similarity, "progress_bar", recording)
    cfg = make_config(image_folder, "advise.depths=2", "train.n_jobs=1")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        stage.run(cfg)
    total, *steps = bars["advise: BatchNorm shift"]
    assert sum(steps) == total > 0 and len(steps) >= 1
    assert bars["advise: probes"][0] == 3 and sum(bars["advise: probes"][1:]) == 3
    text = caplog.text
    assert f"BatchNorm input shift and the backbone's confidence on {total} images" in (
        text
    )
    assert "advise: BatchNorm shift " in text and "mean top-1 probability" in text
