"""The embedded default with the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from features import datasets, load_codes
from pipeline import commands
from pipeline.demo import DEMO_LAYERS, demo_config


@pytest.fixture(scope="module")
def digits_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten digits per class: enough to see the codes separate the classes."""
    full = datasets.write_digits(tmp_path_factory.mktemp("digits") / "all")
    subset = full.parent / "subset"
    for folder in sorted(full.iterdir()):
        (subset / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:10]:
            shutil.copy(file, subset / folder.name / file.name)
    return subset


def test_demo_extracts_every_layer_with_real_weights(
    digits_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = demo_config(
        [
            f"data.root='{digits_subset}'",
            f"run.out='{tmp_path / 'run'}'",
            "run.progress=false",
        ]
    )
    assert commands.demo(cfg) == 0
    out = capsys.readouterr().out
    assert f"results are in {tmp_path / 'run'}" in out
    for name in (
        "sweep.png",
        "model/model.json",
        "metrics.json",
        "confusion_matrix.png",
    ):
        assert (tmp_path / "run" / name).is_file()
    assert "best: _blocks" in out or "best: top" in out
    [cache] = (tmp_path / "run" / "cache").glob("codes-*.h5")
    dims = {
        "_blocks.2": 24,
        "_blocks.4": 40,
        "_blocks.7": 80,
        "_blocks.10": 112,
        "_blocks.14": 192,
        "top": 1280,
    }
    for layer in DEMO_LAYERS:
        codes = load_codes(cache, layer)
        assert codes.X.shape == (100, dims[layer])
        assert np.isfinite(codes.X).all()
    # Real ImageNet codes separate digits: nearest class mean beats chance (10%).
    top = load_codes(cache, "top")
    means = np.stack([top.X[top.y == c].mean(0) for c in range(10)])
    predicted = np.argmin(((top.X[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == top.y).mean() > 0.5


def test_demo_writes_the_digits_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import demo

    cfg = demo_config(
        [f"data.root='{tmp_path / 'digits'}'", f"run.out='{tmp_path / 'run'}'"]
    )
    for stage in ("extract", "sweep", "train", "evaluate"):
        monkeypatch.setattr(f"pipeline.{stage}.run", lambda cfg, s=stage: s)
    assert demo.run(cfg) == demo.DemoResult("extract", "sweep", "train", "evaluate")  # type: ignore[arg-type]
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797
