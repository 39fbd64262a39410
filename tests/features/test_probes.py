from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.stats import multivariate_normal

from features.errors import DataError
from features.probes import (
    _Spectrum,
    corrected_interval,
    cv_splits,
    fold_accuracies,
    forecast_interval,
    holdout_probe,
    linear_probe,
    logme,
    paired_interval,
    power_law_forecast,
    split_ratio,
)


def _spectrum(f: np.ndarray, y: np.ndarray) -> _Spectrum:
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    z = u.T @ y
    return _Spectrum(s**2, z**2, float(y @ y - z @ z), *f.shape)


@pytest.mark.parametrize("n, d", [(30, 5), (12, 40)])  # n > d and n < d
def test_evidence_equals_the_gaussian_marginal_likelihood(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = (rng.random(n) > 0.5).astype(float)
    alpha, beta = 0.7, 2.5
    # y ~ N(0, F F^T / alpha + I / beta) when w ~ N(0, I / alpha).
    cov = f @ f.T / alpha + np.eye(n) / beta
    direct = multivariate_normal(np.zeros(n), cov).logpdf(y)
    assert _spectrum(f, y).evidence(alpha, beta) == pytest.approx(direct, rel=1e-9)


def test_maximised_evidence_beats_nearby_hyperparameters() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(80, 10))
    y = (f[:, 0] + 0.3 * rng.normal(size=80) > 0).astype(float)
    spectrum = _spectrum(f, y)
    alpha, beta = spectrum.maximise(max_iter=500, tol=1e-9)
    best = spectrum.evidence(alpha, beta)
    for a, b in [(2, 1), (0.5, 1), (1, 2), (1, 0.5)]:
        assert best >= spectrum.evidence(alpha * a, beta * b)


def test_logme_prefers_informative_codes() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=300)
    informative = np.eye(3)[y] * 3 + rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    assert logme(informative, y) > logme(noise, y) + 0.1


def test_logme_of_dead_codes_is_finite_and_worse() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, size=60)
    informative = np.eye(3)[y] * 3 + rng.normal(size=(60, 3))
    for dead in (np.zeros((60, 4)), np.ones((60, 4))):
        assert np.isfinite(logme(dead, y)) and logme(dead, y) < logme(informative, y)


def test_linear_probe_scores_separable_codes() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 50)
    X = rng.normal(size=(100, 4)) + y[:, None] * 4
    result = linear_probe(X, y, folds=5, n_jobs=1)
    assert result.accuracy > 0.95 and result.folds == 5 and result.seconds > 0


@pytest.mark.parametrize(
    "y, pattern",
    [
        (np.zeros(6, int), r"only one class"),
        (np.array([0, 0, 0, 1]), r"class 1 has one"),
    ],
)
def test_linear_probe_explains_unusable_labels(y: np.ndarray, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        linear_probe(np.ones((len(y), 2)), y)


def test_linear_probe_uses_fewer_folds_for_small_classes() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    X = np.arange(16, dtype=float).reshape(8, 2)
    assert linear_probe(X, y, folds=5, n_jobs=1).folds == 3


def test_domain_statistics_of_a_backbone_without_classifier() -> None:
    # timm's DINOv2 and SigLIP towers output features: no confidence to measure.
    import torch

    from features.probes import domain_statistics

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    batches = [torch.randn(5, 3, 2, 2)]
    stats = domain_statistics(model, batches, classifier=False)
    assert np.isnan(stats.confidence) and np.isnan(stats.entropy)
    assert np.isnan(stats.bn_shift) and stats.images == 5
    assert 0 < domain_statistics(model, batches).confidence <= 1


# ---------------------------------------------------------------------------
# Paired comparisons with their uncertainty


def test_corrected_interval_equals_the_nadeau_bengio_formula() -> None:
    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.00, 0.06, 0.01, 0.02, 0.03])
    ratio = 1 / 4  # 5-fold CV: n_test / n_train
    got = corrected_interval(d, test_train_ratio=ratio, confidence=0.9)
    # Direct: mean +- t_{J-1, 0.95} * sqrt((1/J + n2/n1) * s^2), J = 10.
    mean, s2, j = d.sum() / 10, ((d - d.sum() / 10) ** 2).sum() / 9, 10
    half = stats.t(df=j - 1).ppf(0.95) * np.sqrt((1 / j + ratio) * s2)
    assert got.mean == pytest.approx(mean)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half))
    assert got.n == 10 and got.confidence == 0.9 and "Nadeau" in got.method
    # The correction widens the naive interval of s / sqrt(J) by sqrt(1 + J r).
    naive = stats.t(df=j - 1).ppf(0.95) * np.sqrt(s2 / j)
    assert half / naive == pytest.approx(np.sqrt(1 + j * ratio))


def test_corrected_interval_of_identical_scores_is_a_point() -> None:
    got = corrected_interval(np.zeros(15), test_train_ratio=0.25, confidence=0.95)
    assert (got.mean, got.low, got.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least two"):
        corrected_interval([0.1], test_train_ratio=0.25, confidence=0.95)


def test_paired_interval_equals_a_direct_computation() -> None:
    a = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
    b = np.array([1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0], bool)
    got = paired_interval(a, b, confidence=0.95)
    d = a.astype(float) - b
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))
    assert got.mean == pytest.approx(a.mean() - b.mean())
    assert (got.low, got.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert got.covers(got.mean) and not got.covers(got.high + 0.01)
    with pytest.raises(ValueError, match="two equal, non-empty arrays"):
        paired_interval(a, b[:3], confidence=0.95)


def test_cv_splits_are_repeated_stratified_seeded_and_shared() -> None:
    y = np.repeat([0, 1, 2], 10)
    splits = cv_splits(y, folds=5, repeats=3, seed=7)
    assert len(splits) == 15
    for train, test in splits:
        assert np.bincount(y[test]).tolist() == [2, 2, 2]
        assert len(np.intersect1d(train, test)) == 0
    again = cv_splits(y, folds=5, repeats=3, seed=7)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    # Each repeat covers every row once in its test folds.
    for r in range(3):
        rows = np.concatenate([te for _, te in splits[5 * r : 5 * r + 5]])
        assert sorted(rows.tolist()) == list(range(30))
    assert split_ratio(splits) == pytest.approx(6 / 24)
    assert len(cv_splits(np.array([0, 0, 0, 1, 1, 1]), folds=5, repeats=2, seed=0)) == 6


def test_fold_accuracies_score_each_given_split() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 3)) + y[:, None] * 5
    splits = cv_splits(y, folds=4, repeats=2, seed=0)
    scores = fold_accuracies(X, y, splits, n_jobs=1)
    assert scores.shape == (8,) and scores.min() > 0.85


def test_holdout_probe_says_which_test_rows_it_got_right() -> None:
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 30)
    X = rng.normal(size=(60, 2)) + y[:, None] * 6
    right = holdout_probe(X[::2], y[::2], X[1::2], y[1::2])
    assert right.dtype == bool and right.shape == (30,) and right.mean() > 0.9
    with pytest.raises(DataError, match="only one class"):
        holdout_probe(X[:5], np.zeros(5, int), X, y)


def test_power_law_forecast_continues_a_power_law() -> None:
    # err(t) = 0.8 t^-0.5: the forecast at t = 1600 is 1 - 0.8 / 40.
    points = [(t, 1 - 0.8 * t**-0.5) for t in (100.0, 200.0, 400.0)]
    assert power_law_forecast(points, 1600) == pytest.approx(0.98)
    # A curve that does not improve forecasts its last value.
    assert power_law_forecast([(1, 0.7), (2, 0.6)], 10) == 0.6
    assert power_law_forecast([(5, 0.4)], 10) == 0.4
    with pytest.raises(ValueError, match="at least one"):
        power_law_forecast([], 10)


def test_forecast_interval_is_seeded_and_narrows_with_more_images() -> None:
    points = [(t, 1 - 0.8 * t**-0.5) for t in (200.0, 400.0)]
    small = forecast_interval(points, 1600, images=100, confidence=0.9)
    again = forecast_interval(points, 1600, images=100, confidence=0.9)
    large = forecast_interval(points, 1600, images=10_000, confidence=0.9)
    assert small == again and small.mean == pytest.approx(0.98)
    assert small.low < large.low <= 0.98 <= large.high < small.high
    assert large.high - large.low < 0.02 and small.method.startswith("power law")
    with pytest.raises(ValueError, match="at least one validation image"):
        forecast_interval(points, 1600, images=0, confidence=0.9)
