"""How well codes serve a new task, measured without fine-tuning.

- `logme`: the LogME transferability score (You, Liu, Wang and Long, "LogME:
  Practical Assessment of Pre-trained Models for Transfer Learning", ICML
  2021). It is the log marginal likelihood (evidence) per example of a
  Bayesian linear regression from the codes to each one-hot label column,
  maximised over the prior precision alpha and noise precision beta, averaged
  over classes. No classifier is trained, so it costs one SVD per layer.
- `linear_probe`: cross-validated accuracy of a standardised logistic
  regression: the direct, slower measure.
- `cv_splits` + `fold_accuracies`: the same probe on repeated stratified
  folds, shared between layers so their scores are paired;
  `corrected_interval` turns paired fold differences into a confidence
  interval (Nadeau and Bengio, 2003); `paired_interval` does the same for
  per-image differences on one validation split; `holdout_probe` fits on one
  split and scores another; `power_law_forecast` extrapolates a learning
  curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    RepeatedStratifiedKFold,
    StratifiedKFold,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features.errors import DataError

FloatArray = npt.NDArray[np.floating[Any]]


def logme(
    codes: FloatArray,
    labels: npt.NDArray[np.integer[Any]],
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> float:
    """LogME score of codes for integer labels (higher transfers better).

    The fixed-point updates of alpha and beta follow the paper's Algorithm 1
    and use the SVD of the codes, so each class costs O(min(n, d)) per step.

    Args:
        codes: (n, d) features.
        labels: (n,) class indices.
        max_iter: fixed-point iterations per class at most.
        tol: stop when alpha / beta changes by less than this share.

    Returns:
        The mean over classes of the maximised log evidence divided by n.
    """
    f = np.asarray(codes, dtype=np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    # NOTE: directions without energy (constant or all-zero codes, as a dead
    # layer gives) carry no evidence and would divide by zero below.
    keep = s > (s.max() * 1e-10 if s.size and s.max() > 0 else np.inf)
    u, s = u[:, keep], s[keep]
    sigma = s**2  # eigenvalues of F^T F (the non-zero ones)
    scores = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        z = u.T @ y
        column = _Spectrum(sigma, z**2, float(y @ y - z @ z), n, d)
        alpha, beta = column.maximise(max_iter, tol)
        scores.append(column.evidence(alpha, beta) / n)
    return float(np.mean(scores))


@dataclass(frozen=True)
class _Spectrum:
    """One label column seen through the SVD of the codes."""

    sigma: FloatArray  # eigenvalues of F^T F (the non-zero ones)
    z2: FloatArray  # energy of y along each singular direction
    outside: float  # energy of y outside the span of F
    n: int
    d: int

    def fit(self, alpha: float, beta: float) -> tuple[float, float, float]:
        """(gamma, |m|^2, |y - F m|^2) of the posterior mean m at alpha, beta."""
        denom = alpha + beta * self.sigma
        gamma = float((beta * self.sigma / denom).sum())
        m2 = float((beta**2 * self.sigma * self.z2 / denom**2).sum())
        res2 = float((self.z2 * (alpha / denom) ** 2).sum() + self.outside)
        return gamma, m2, res2

    def evidence(self, alpha: float, beta: float) -> float:
        """log p(y | alpha, beta) for y ~ N(F w, 1/beta), w ~ N(0, 1/alpha)."""
        _, m2, res2 = self.fit(alpha, beta)
        # log|A| with A = alpha I + beta F^T F: d - k eigenvalues are alpha alone.
        log_det = float(np.log(alpha + beta * self.sigma).sum()) + (
            self.d - len(self.sigma)
        ) * math.log(alpha)
        n, d = self.n, self.d
        return (
            n / 2 * math.log(beta)
            + d / 2 * math.log(alpha)
            - n / 2 * math.log(2 * math.pi)
            - beta / 2 * res2
            - alpha / 2 * m2
            - log_det / 2
        )

    def maximise(self, max_iter: int, tol: float) -> tuple[float, float]:
        """MacKay's fixed-point updates of alpha and beta."""
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            gamma, m2, res2 = self.fit(alpha, beta)
            # With no usable direction alpha has nothing to fit: keep it.
            new_alpha = gamma / (m2 + 1e-12) if gamma > 0 else alpha
            new_beta = max(self.n - gamma, 1e-12) / (res2 + 1e-12)
            done = abs(new_alpha / new_beta - alpha / beta) <= tol * alpha / beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        return alpha, beta


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of a linear probe, with its cost."""

    accuracy: float
    std: float
    folds: int
    seconds: float


def linear_probe(
    codes: FloatArray,
    labels: npt.NDArray[np.integer[Any]],
    *,
    C: float = 1.0,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int = -1,
    max_iter: int = 2000,
) -> ProbeResult:
    """Stratified k-fold accuracy of standardise + logistic regression.

    Raises:
        DataError: fewer than two classes, or a class with one example.
    """
    folds = _usable_folds(labels, folds)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    start = time.perf_counter()
    scores = cross_val_score(
        model,
        codes,
        labels,
        n_jobs=n_jobs,
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
    )
    return ProbeResult(
        float(scores.mean()), float(scores.std()), folds, time.perf_counter() - start
    )


def _usable_folds(labels: npt.NDArray[np.integer[Any]], folds: int) -> int:
    values, counts = np.unique(labels, return_counts=True)
    if len(values) < 2:
        raise DataError(
            f"only one class ({values.tolist()}) in the training codes; a classifier "
            "needs at least two"
        )
    if counts.min() < 2:
        raise DataError(
            f"class {values[counts.argmin()]} has one training example; "
            "cross-validation needs at least two per class"
        )
    return int(min(folds, counts.min()))


# ---------------------------------------------------------------------------
# Paired comparisons with their uncertainty

Split = tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]


@dataclass(frozen=True)
class Interval:
    """A mean difference with a two-sided confidence interval.

    Attributes:
        mean: the estimate.
        low, high: the interval's ends.
        confidence: its level (0.95 for 95%).
        method: how it was computed, in words.
        n: how many paired values it rests on (folds x repeats, or images).
    """

    mean: float
    low: float
    high: float
    confidence: float
    method: str
    n: int

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def cv_splits(
    labels: npt.NDArray[np.integer[Any]], *, folds: int, repeats: int, seed: int
) -> list[Split]:
    """Repeated stratified k-fold (train, test) index pairs, seeded.

    Every layer is scored on these same splits, so its fold scores pair with
    every other layer's.

    Raises:
        DataError: fewer than two classes, or a class with one example.
    """
    folds = _usable_folds(labels, folds)
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    return list(cv.split(np.zeros((len(labels), 1)), labels))


def fold_accuracies(
    codes: FloatArray,
    labels: npt.NDArray[np.integer[Any]],
    splits: list[Split],
    *,
    C: float = 1.0,
    n_jobs: int = -1,
    max_iter: int = 2000,
) -> npt.NDArray[np.float64]:
    """Accuracy of standardise + logistic regression on each given split."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    scores = cross_val_score(model, codes, labels, cv=splits, n_jobs=n_jobs)
    return np.asarray(scores, dtype=np.float64)


def split_ratio(splits: list[Split]) -> float:
    """Mean test-set size over mean training-set size (1/(k-1) for k folds)."""
    test = float(np.mean([len(te) for _, te in splits]))
    train = float(np.mean([len(tr) for tr, _ in splits]))
    return test / train


def corrected_interval(
    differences: npt.ArrayLike, *, test_train_ratio: float, confidence: float
) -> Interval:
    """Corrected resampled t interval for a paired difference of CV scores.

    Nadeau and Bengio (2003), "Inference for the Generalization Error": the J
    fold differences of two models scored on the same resampled splits are
    correlated (their training sets overlap), so the plain variance of their
    mean, s^2 / J, is too small. Their correction uses
    (1 / J + n_test / n_train) * s^2 instead, with a t distribution of J - 1
    degrees of freedom; for repeated k-fold CV it is the corrected repeated
    k-fold t test of Bouckaert and Frank (2004).

    Args:
        differences: one paired difference per split (model A - model B).
        test_train_ratio: mean test size over mean training size of the splits.
        confidence: the interval's level, e.g. 0.95.

    Raises:
        ValueError: fewer than two differences.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        raise ValueError(f"a t interval needs at least two differences, got {d.size}")
    mean = float(d.mean())
    se = math.sqrt((1.0 / d.size + test_train_ratio) * float(d.var(ddof=1)))
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * se
    return Interval(
        mean,
        mean - half,
        mean + half,
        confidence,
        "corrected resampled t (Nadeau & Bengio 2003)",
        int(d.size),
    )


def paired_interval(
    a_correct: npt.ArrayLike, b_correct: npt.ArrayLike, *, confidence: float
) -> Interval:
    """Interval for accuracy(A) - accuracy(B) of two models on the same images.

    The per-image differences (1, 0 or -1) are independent across images, so
    their mean is approximately normal: mean +- z * s / sqrt(n).

    Raises:
        ValueError: the two arrays differ in length or are empty.
    """
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"paired correctness needs two equal, non-empty arrays, got {a.shape} "
            f"and {b.shape}"
        )
    d = a - b
    mean = float(d.mean())
    spread = float(d.std(ddof=1)) if d.size > 1 else 0.0
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * spread / math.sqrt(d.size)
    return Interval(
        mean, mean - half, mean + half, confidence, "paired normal", int(d.size)
    )


def holdout_probe(
    train_X: FloatArray,
    train_y: npt.NDArray[np.integer[Any]],
    test_X: FloatArray,
    test_y: npt.NDArray[np.integer[Any]],
    *,
    C: float = 1.0,
    max_iter: int = 2000,
) -> npt.NDArray[np.bool_]:
    """Fit standardise + logistic regression on one split; correct per test row.

    Raises:
        DataError: fewer than two classes in the training rows.
    """
    if len(np.unique(train_y)) < 2:
        raise DataError(
            f"only one class ({np.unique(train_y).tolist()}) in the training codes; "
            "a classifier needs at least two"
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    model.fit(train_X, train_y)
    return np.asarray(model.predict(test_X) == test_y)


def power_law_forecast(
    points: Sequence[tuple[float, float]], target: float, *, floor: float = 1e-3
) -> float:
    """Accuracy at `target` from a power law fitted to (cost, accuracy) points.

    The error is modelled as err(t) = c * t^-alpha (the learning-curve shape
    of Hestness et al., 2017): alpha is the least-squares slope of log error
    against log t over the points, and the forecast continues from the last
    point: 1 - err_last * (target / t_last)^-alpha. A curve that does not
    improve (alpha <= 0) forecasts the last accuracy.

    Args:
        points: (cost, accuracy) pairs in increasing cost, at least one.
        target: the cost to forecast at (>= the last point's).
        floor: the smallest error the fit takes (keeps log finite at 100%).

    Raises:
        ValueError: no points.
    """
    if not points:
        raise ValueError("a forecast needs at least one (cost, accuracy) point")
    t = np.array([p[0] for p in points], dtype=np.float64)
    err = np.clip(1.0 - np.array([p[1] for p in points], dtype=np.float64), floor, 1)
    if len(points) < 2 or np.ptp(np.log(t)) == 0:
        return float(points[-1][1])
    slope = float(np.polyfit(np.log(t), np.log(err), 1)[0])
    alpha = -slope
    if alpha <= 0:
        return float(points[-1][1])
    return float(1.0 - err[-1] * (target / t[-1]) ** -alpha)


def forecast_interval(
    points: Sequence[tuple[float, float]],
    target: float,
    *,
    images: int,
    confidence: float,
    draws: int = 2000,
    seed: int = 0,
    floor: float = 1e-3,
) -> Interval:
    """`power_law_forecast` with an interval from the points' sampling noise.

    Each accuracy was measured on `images` validation images, so it carries
    binomial noise; a parametric bootstrap redraws every point from
    Binomial(images, accuracy) / images, refits the power law and forecasts
    again. The interval holds the central `confidence` of the redrawn
    forecasts; its mean is the forecast of the measured points.

    Raises:
        ValueError: no points, or `images` < 1.
    """
    if images < 1:
        raise ValueError(f"the points need at least one validation image, got {images}")
    mean = power_law_forecast(points, target, floor=floor)
    rng = np.random.default_rng(seed)
    acc = np.array([p[1] for p in points], dtype=np.float64)
    redrawn = rng.binomial(images, np.clip(acc, 0, 1), size=(draws, len(acc))) / images
    t = [p[0] for p in points]
    forecasts = np.array(
        [power_law_forecast(list(zip(t, row, strict=True)), target) for row in redrawn]
    )
    tail = (1 - confidence) / 2
    low, high = np.quantile(forecasts, [tail, 1 - tail])
    return Interval(
        mean,
        float(min(low, mean)),
        float(max(high, mean)),
        confidence,
        "power law, parametric bootstrap",
        images,
    )


# ---------------------------------------------------------------------------
# Similarity to the backbone's original data, without any training


@dataclass(frozen=True)
class DomainStatistics:
    """How the backbone itself reacts to the new images.

    Attributes:
        bn_shift: mean over BatchNorm layers of the KL divergence, per channel
            and averaged, from a Gaussian with the new images' input statistics
            to one with the running statistics the layer learned on the
            original data (the shift AdaBN corrects). About 0 for data like
            the original; larger for other domains.
        bn_shift_layers: the same per layer, input to output.
        confidence: mean top-1 probability of the backbone's own classifier.
        entropy: mean normalised entropy of its predictions (0 sure, 1 uniform).
        classes_used: effective number of its original classes it predicts
            (exp of the entropy of the predicted-class histogram).
        images: how many images were measured.
    """

    bn_shift: float
    bn_shift_layers: tuple[float, ...]
    confidence: float
    entropy: float
    classes_used: float
    images: int


def domain_statistics(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    classifier: bool = True,
) -> DomainStatistics:
    """Measure BatchNorm input shift and original-class predictions.

    Args:
        model: the backbone (its original classifier on), taking normalised
            float images.
        batches: normalised image batches (N, 3, S, S).
        classifier: False for backbones built without a classifier (timm's
            DINOv2, SigLIP): their outputs are features, not class scores, so
            confidence, entropy and classes used are NaN.
    """
    model = model.eval()
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        and m.track_running_stats
        and m.running_mean is not None
    ]
    sums: dict[int, list[torch.Tensor]] = {id(m): [] for m in norms}

    def hook(
        module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _: object
    ) -> None:
        # NOTE: sums in float64 without a float64 copy of the activation: at
        # 224 px the first layers' inputs are 100 MB per batch of 32.
        x = inputs[0].detach()
        count = x.shape[0] * x.shape[2] * x.shape[3]
        stats = sums[id(module)]
        part = torch.stack(
            [
                x.sum(dim=(0, 2, 3), dtype=torch.float64),
                x.square().sum(dim=(0, 2, 3), dtype=torch.float64),
            ]
        )
        if stats:
            stats[0] += part
            stats[1] += count
        else:
            stats.extend([part, torch.tensor(float(count), dtype=torch.float64)])

    handles = [m.register_forward_hook(hook) for m in norms]
    probs = []
    try:
        with torch.inference_mode():
            for batch in batches:
                out = model(batch).double()
                probs.append(torch.softmax(out, dim=1) if classifier else out[:, :0])
    finally:
        for handle in handles:
            handle.remove()
    return _summarise(norms, sums, torch.cat(probs))


def _summarise(
    norms: list[torch.nn.BatchNorm2d],
    sums: dict[int, list[torch.Tensor]],
    probs: torch.Tensor,
) -> DomainStatistics:
    shifts = []
    for m in norms:
        (total, squares), count = sums[id(m)][0], sums[id(m)][1]
        mean = total / count
        var = (squares / count - mean**2).clamp_min(1e-12)
        assert m.running_mean is not None and m.running_var is not None
        run_mean = m.running_mean.double()
        run_var = m.running_var.double() + m.eps
        # KL(N(mean, var) || N(run_mean, run_var)) per channel, averaged.
        kl = 0.5 * (
            torch.log(run_var / var) + (var + (mean - run_mean) ** 2) / run_var - 1
        )
        shifts.append(float(kl.mean()))
    k = probs.shape[1]
    if k == 0:  # no classifier: nothing to say about its predictions
        nan = float("nan")
        return DomainStatistics(
            float(np.mean(shifts)) if shifts else nan,
            tuple(shifts),
            nan,
            nan,
            nan,
            len(probs),
        )
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(k)
    top = probs.argmax(1)
    share = torch.bincount(top, minlength=k).double() / len(top)
    used = math.exp(float(-(share * share.clamp_min(1e-12).log()).sum()))
    return DomainStatistics(
        bn_shift=float(np.mean(shifts)) if shifts else float("nan"),
        bn_shift_layers=tuple(shifts),
        confidence=float(probs.max(1).values.mean()),
        entropy=float(entropy.mean()),
        classes_used=used,
        images=len(probs),
    )
