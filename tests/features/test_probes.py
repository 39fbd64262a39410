from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from features.errors import DataError
from features.probes import _Spectrum, linear_probe, logme


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
