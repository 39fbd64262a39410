"""Tests for pipeline/finetune/head.py: the new head from a linear probe (LP-FT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from features.codes import Codes
from features.transforms import Preprocessing
from pipeline.config import Config
from pipeline.finetune import head, stage
from pipeline.finetune.loop import Dist
from pipeline.inputs import load_pixels
from tests.pipeline.finetune.conftest import config, write_classes

PRETRAINED = ("finetune.init=pretrained", "backbone.weights=random")


def test_an_lp_ft_model_starts_with_the_probes_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_classes(tmp_path / "data", classes=3, per_class=14)
    cfg = config(root, tmp_path / "run", *PRETRAINED, "finetune.epochs=1")
    seen: list[tuple[Pipeline, Codes]] = []
    real = head._best_probe

    def keep(cfg: Config, train: Codes, val: Codes) -> tuple[float, Pipeline, float]:
        found = real(cfg, train, val)
        seen.append((found[1], val))
        return found

    monkeypatch.setattr(head, "_best_probe", keep)
    prepared = stage.prepare(cfg, Dist(), resume=False, restart=False)
    assert cfg.finetune.probe_head and prepared.head is not None
    probe, val = seen[0]
    prep = Preprocessing().updated(prepared.identity["preprocessing"])
    files = [prepared.images.base / p for p in val.paths]
    pixels = load_pixels(prepared.cfg, files, prep)
    with torch.no_grad():
        logits = prepared.trainer.model.eval()(torch.from_numpy(pixels)).numpy()
    # NOTE: the codes come from the BatchNorm-folded code model: rounding only.
    np.testing.assert_allclose(logits, probe.decision_function(val.X), atol=1e-3)


def test_a_binary_probe_becomes_the_logits_zero_and_its_decision() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)) * [1, 2, 3, 4, 5] + 7
    y = (X[:, 0] + X[:, 1] > 16).astype(int)
    probe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    weight, bias = head.head_weights(probe, 2)
    logits = X @ weight.T + bias
    np.testing.assert_allclose(logits[:, 0], 0.0)
    np.testing.assert_allclose(logits[:, 1], probe.decision_function(X), atol=1e-9)
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(soft, probe.predict_proba(X), atol=1e-9)
