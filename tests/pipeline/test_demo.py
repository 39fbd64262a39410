"""The embedded default and `quadrant run`, with the real EfficientNet-Lite0."""

from __future__ import annotations

import csv
import json
import re
from html import escape
from pathlib import Path

import pytest

from pipeline import commands
from pipeline import run as run_stage
from pipeline.demo import demo_config
from tests.conftest import write_digits_subset


@pytest.fixture(scope="module")
def digits_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve digits per class: enough to measure, quick to run."""
    return write_digits_subset(tmp_path_factory.mktemp("digits"), 12)


def demo(root: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return demo_config(
        [
            f"data.root='{root}'",
            f"run.out='{out}'",
            "run.progress=false",
            "sweep.cv_folds=3",
            "train.cv_folds=3",
            "train.C=[0.1, 1.0]",
            "backbone.input_size=96",
            *extra,
        ]
    )


def test_demo_runs_the_whole_job_and_reports_it(
    digits_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = demo(digits_subset, tmp_path / "run")
    assert commands.demo(cfg) == 0
    out = capsys.readouterr().out
    case = int(re.search(r"^case (\d):", out, re.M).group(1))  # type: ignore[union-attr]
    assert case in (1, 2)  # 12 images per class is small
    run = tmp_path / "run"
    assert f"report: {run / 'report.html'}" in out and f"results are in {run}" in out
    model = run / "models" / "codes"
    for name in (
        "advice.json",
        "sweep.png",
        "models/codes/model.json",
        "models/codes/metrics.json",
        "models/codes/model.onnx",
        "models/codes/predictions.csv",
        "report.html",
        "run.json",
        "config.toml",
    ):
        assert (run / name).is_file(), name
    assert f"onnx: {model / 'model.onnx'}" in out
    with open(model / "predictions.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 120

    html = (run / "report.html").read_text()
    metrics = json.loads((model / "metrics.json").read_text())
    advice = json.loads((run / "advice.json").read_text())
    assert f"Case {case}:" in html
    assert f"{metrics['accuracy']:.4f}" in html
    assert escape(advice["reasons"][0]) in html  # the evidence, with its figures
    assert html.count("data:image/png;base64,") >= 4  # samples, sweep, curve, matrix
    assert "Layer sweep" in html and "Timings" in html and "Export" in html
    assert "No file was skipped." in html


def test_a_second_run_reuses_everything_still_valid(
    digits_subset: Path, tmp_path: Path
) -> None:
    cfg = demo(digits_subset, tmp_path / "run", "run.strategy=2")
    first = run_stage.run(cfg)
    assert first.reused == []
    again = run_stage.run(cfg)
    assert again.reused == ["codes", "sweep", "model", "export"]
    assert again.evaluation.accuracy == first.evaluation.accuracy
    # A changed classifier setting retrains, and only that (and what follows).
    changed = run_stage.run(
        demo(digits_subset, tmp_path / "run", "run.strategy=2", "train.C=[1.0]")
    )
    assert changed.reused == ["codes", "sweep"]


def test_demo_writes_the_digits_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import demo as demo_module

    cfg = demo_config(
        [f"data.root='{tmp_path / 'digits'}'", f"run.out='{tmp_path / 'run'}'"]
    )
    calls = []
    monkeypatch.setattr(
        run_stage,
        "run",
        lambda cfg, predict_paths: calls.append(predict_paths) or "done",
    )
    assert demo_module.run(cfg) == "done"
    assert calls == [[tmp_path / "digits"]]
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797
