"""The advice record: a pilot's win rule; advice.json read back as written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from features.probes import DomainStatistics, Interval
from pipeline.advisor.record import (
    Advice,
    Candidate,
    CurvePoint,
    Depth,
    Pilot,
    Reference,
    Similarity,
    Size,
    read_advice,
    write_advice,
)

# NOTE: records built by hand; test_stage.py and test_reasons.py use them too.
DOMAIN = DomainStatistics(0.1, (0.1,), 0.9, 0.2, 3.0, 10)


def interval(mean: float, low: float, high: float) -> Interval:
    return Interval(mean, low, high, 0.975, "corrected resampled t", 15)


def similarity(verdict: str, gain: Interval) -> Similarity:
    layer = "top" if verdict == "similar" else "layer2"
    pooling = "none" if verdict == "similar" else "avg"
    return Similarity(
        verdict, "layer2", gain, 0.01, 0.95, 5, 3, 120, 2, layer, (layer, pooling)
    )


def size(finetune: bool) -> Size:
    return Size(
        images=900,
        per_class_median=450.0,
        per_class_min=400,
        floor=100,
        measured=False,
        layer="layer2/avg",
        frozen_curve=(),
        frozen_gain=None,
        reference=None,
        pilots=(),
        finetune=finetune,
        rule="ahead" if finetune else "floor",
    )


DEPTHS = (
    Depth("layer2", 128, 0.9, 0.01, 0.2, interval(0.05, 0.02, 0.08)),
    Depth("top", 512, 0.85, 0.01, 0.3),
)


def _pilot(versus: tuple[float, float, float], forecast: float | None) -> Pilot:
    return Pilot(
        name="fine-tune pretrained 32 px",
        settings={"finetune.init": "pretrained", "finetune.input_size": 32},
        init="pretrained",
        budget=100,
        images=100,
        full=400,
        share=0.25,
        epochs=1,
        seconds=1.0,
        curve=(CurvePoint(50, 0.8), CurvePoint(100, 0.85)),
        accuracy=0.85,
        forecast=forecast,
        forecast_low=None if forecast is None else forecast - 0.005,
        forecast_high=None if forecast is None else forecast + 0.005,
        forecast_points=2 if forecast is not None else 0,
        versus=Interval(*versus, 0.95, "paired normal", 200),
        reference=0.9,
        resumable=True,
        folder="x",
        images_per_second=50.0,
    )


@pytest.mark.parametrize(
    "versus, forecast, rule",
    [
        ((0.03, 0.01, 0.05), 0.85, "ahead"),  # the interval is above 0
        ((-0.05, -0.08, -0.02), 0.92, "forecast"),  # passes by 2 > 1, low end +1.5
        ((-0.05, -0.08, -0.02), 0.912, "forecast"),  # by 1.2, low end +0.7 >= -1
        ((-0.05, -0.08, -0.02), 0.908, None),  # passes by 0.8 only
        ((0.01, -0.01, 0.03), 0.90, None),  # a tie now, no gain ahead
        ((-0.05, -0.08, -0.02), None, None),  # no forecast: the pilot alone
        ((0.03, 0.01, 0.05), None, "ahead"),  # ... which is ahead here
    ],
)
def test_pilot_wins_when_ahead_or_forecast_to_pass_by_the_margin(
    versus: tuple[float, float, float], forecast: float | None, rule: str | None
) -> None:
    assert _pilot(versus, forecast).wins(0.01) == rule


def test_advice_json_reads_back_what_was_written(tmp_path: Path) -> None:
    pilot = _pilot((0.03, 0.01, 0.05), 0.85)
    measured = replace(
        size(True),
        measured=True,
        frozen_curve=(CurvePoint(50, 0.7), CurvePoint(100, 0.8)),
        frozen_gain=interval(0.1, 0.05, 0.15),
        reference=Reference(
            "layer2/avg", "logistic", 1.0, interval(0.9, 0.88, 0.92), 0.9, 2.0
        ),
        pilots=(pilot, replace(pilot, name="train from scratch 32 px", init="scratch")),
    )
    candidate = Candidate(
        pilot.name,
        "finetune",
        dict(pilot.settings),
        0.93,
        0.92,
        0.94,
        "pilot",
        60.0,
        True,
    )
    advice = Advice(
        3,
        similarity("similar", interval(0.0, -0.004, 0.006)),
        measured,
        DEPTHS,
        "top",
        DOMAIN,
        {"path": "finetune", "finetune.init": "pretrained", "note": ""},
        {"size": 1.5},
        (candidate,),
        candidate.name,
        600.0,
    )
    path = tmp_path / "advice.json"
    write_advice(path, advice, reasons=["why"], config={"run": {}}, stamp="abc")
    assert read_advice(path) == advice
