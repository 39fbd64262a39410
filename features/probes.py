"""How well codes serve a new task, measured without fine-tuning.

- `logme`: the LogME transferability score (You, Liu, Wang and Long, "LogME:
  Practical Assessment of Pre-trained Models for Transfer Learning", ICML
  2021). It is the log marginal likelihood (evidence) per example of a
  Bayesian linear regression from the codes to each one-hot label column,
  maximised over the prior precision alpha and noise precision beta, averaged
  over classes. No classifier is trained, so it costs one SVD per layer.
- `linear_probe`: cross-validated accuracy of a standardised logistic
  regression: the direct, slower measure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
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
            new_alpha = gamma / (m2 + 1e-12)
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
        x = inputs[0].detach().double()
        count = x.shape[0] * x.shape[2] * x.shape[3]
        stats = sums[id(module)]
        part = torch.stack([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))])
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
