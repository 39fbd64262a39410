"""The new head of a fine-tune, started from a linear probe (LP-FT).

Kumar et al. (ICLR 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution") fine-tune from a head that already
classifies: first a linear probe on the frozen network's codes, then the
whole network. A random head's large early gradients otherwise reach back
and distort the pretrained features before the head has learned anything.

The probe is a logistic regression on the top-layer codes, at the
fine-tune's input size, with C chosen from `train.C` on the validation
split; its weights become the head's, so the network's logits at step 0 are
the probe's decision function.

NOTE: the codes are not standardised, unlike the codes path's classifier:
folding a scaler into the head divides by each code's spread, and codes
that barely vary (many do at small input sizes) got weights of several
hundred, whose logits exploded as soon as training-mode BatchNorm and
augmentation moved those codes (a training loss of 129 in the first epoch
on the digits at 32 px). Raw codes gave weights below 5 and the same
validation accuracy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from torch import nn

from features.backbones import Backbone, head_name
from features.codes import Codes, load_codes
from features.data import ImageSet
from features.extractor import CodeModel
from features.layers import TOP
from pipeline.config import Config
from pipeline.inputs import extract_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeHead:
    """The probe a fine-tune's head started from, and how well it did.

    Attributes:
        C: the inverse regularisation chosen on the validation split.
        val_accuracy: the probe's validation accuracy (where the fine-tune
            starts from).
        rows: training rows it was fitted on (at most `sweep.max_images`).
        seconds: codes and fits.
    """

    C: float
    val_accuracy: float
    rows: int
    seconds: float


def init_from_probe(
    cfg: Config, backbone: Backbone, images: ImageSet, *, seed: int
) -> ProbeHead:
    """Fit the probe on `backbone`'s top codes and copy it into its head.

    `backbone.model` is the network with its new head, at the fine-tune's
    preprocessing; its head is overwritten in place.
    """
    start = time.perf_counter()
    train, val = _top_codes(cfg, backbone, images)
    train = _capped(train, cfg.sweep.max_images, seed)
    C, probe, accuracy = _best_probe(cfg, train, val)
    _copy_into_head(probe, backbone.model, len(images.label_names))
    head = ProbeHead(C, accuracy, len(train), time.perf_counter() - start)
    log.info(
        "LP-FT: the new head starts from a logistic probe on the top codes "
        "(C = %g, %d training rows): val accuracy %.4f (%.1f s)",
        head.C,
        head.rows,
        head.val_accuracy,
        head.seconds,
    )
    return head


def _top_codes(
    cfg: Config, backbone: Backbone, images: ImageSet
) -> tuple[Codes, Codes]:
    """Top-layer codes of the training and validation images (cached)."""
    model = CodeModel(backbone, [TOP], ["avg"])
    labelled = images.subset([r for r in images.records if r.split != "test"])
    options = replace(cfg.extract, views=1)
    result = extract_for(cfg, labelled, model, options=options)
    spec = model.specs[0]
    return (
        load_codes(result.path, spec.layer, spec.pooling, split="train"),
        load_codes(result.path, spec.layer, spec.pooling, split="val"),
    )


def _capped(codes: Codes, rows: int, seed: int) -> Codes:
    """A stratified, seeded subset of at most `rows` rows."""
    if len(codes) <= rows:
        return codes
    keep, _ = train_test_split(
        np.arange(len(codes)), train_size=rows, stratify=codes.y, random_state=seed
    )
    return codes.take(np.sort(keep))


def _best_probe(cfg: Config, train: Codes, val: Codes) -> tuple[float, Pipeline, float]:
    """(C, fitted probe, val accuracy) of the C of `train.C` best on validation."""
    best: tuple[float, Pipeline, float] | None = None
    for C in sorted(cfg.train.C):
        probe = make_pipeline(LogisticRegression(C=C, max_iter=cfg.train.max_iter)).fit(
            train.X, train.y
        )
        accuracy = float((probe.predict(val.X) == val.y).mean())
        if best is None or accuracy > best[2]:
            best = (C, probe, accuracy)
    assert best is not None  # the C grid is never empty (config limits)
    return best


def head_weights(
    probe: Pipeline, num_classes: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(weight, bias) of a linear layer computing the probe's decision function.

    A scaler before the logistic regression, if any, is folded in:
    ((x - mean) / scale) . coef + b equals x . (coef / scale) + (b - coef .
    mean / scale). A binary probe's one decision value d becomes the logits
    (0, d): the same probabilities.
    """
    logistic = probe.steps[-1][1]
    coef, bias = logistic.coef_, logistic.intercept_
    if len(probe.steps) > 1:
        scaler = probe.steps[0][1]
        coef = coef / scaler.scale_
        bias = bias - coef @ scaler.mean_
    if coef.shape[0] == 1:  # binary: one decision value for class 1
        coef = np.vstack([np.zeros_like(coef), coef])
        bias = np.concatenate([[0.0], bias])
    weight = np.zeros((num_classes, coef.shape[1]))
    full_bias = np.zeros(num_classes)
    rows = logistic.classes_.astype(int)
    weight[rows], full_bias[rows] = coef, bias
    return weight, full_bias


def _copy_into_head(probe: Pipeline, net: nn.Module, num_classes: int) -> None:
    head = dict(net.named_modules())[head_name(net)]
    weight, bias = head_weights(probe, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
