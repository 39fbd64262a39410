"""The size question: the floor, the frozen learning curve, the pilot's forecast."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from features.errors import DataError
from pipeline import finetune
from pipeline.advisor.record import CurvePoint, Pilot
from pipeline.advisor.size import forecast_pilot, measure, nested_order
from pipeline.config import Config
from pipeline.inputs import load_images


def test_nested_order_is_stratified_nested_and_seeded() -> None:
    y = np.array([0] * 8 + [1] * 4 + [2] * 1)
    order = nested_order(y, seed=3)
    assert [np.bincount(y[order[f]], minlength=3).tolist() for f in (0.25, 0.5, 1)] == [
        [2, 1, 1],
        [4, 2, 1],
        [8, 4, 1],
    ]
    assert set(order[0.25]) <= set(order[0.5]) <= set(order[1.0])
    again = nested_order(y, seed=3)
    assert all(np.array_equal(order[f], again[f]) for f in order)


def _run(warmup: int, val: int = 1000) -> finetune.PilotRun:
    curve = ((100, 0.2), (200, 1 - 0.8 * 200**-0.5), (400, 1 - 0.8 * 400**-0.5))
    paths, correct = tuple(map(str, range(val))), (True,) * val
    return finetune.PilotRun(
        "pretrained", 400, 400, 1600, 1, curve, paths, correct, 1.0, True, warmup
    )


def test_the_forecast_uses_the_second_half_of_the_pilot_after_its_warm_up() -> None:
    # The first point would make the curve look steeper.
    forecast, points = forecast_pilot(_run(0), 0.95)
    assert points == 2 and forecast.mean == pytest.approx(1 - 0.8 / 40)
    assert forecast.low < forecast.mean < forecast.high
    # Fewer validation images, noisier points: a wider interval.
    noisy, _ = forecast_pilot(_run(0, val=100), 0.95)
    assert noisy.high - noisy.low > forecast.high - forecast.low
    # A pilot that ends inside its warm-up forecasts nothing: its last value.
    none, points = forecast_pilot(_run(400), 0.95)
    assert points == 1 and none.low == none.mean == none.high == 1 - 0.8 / 20


def test_below_the_floor_nothing_is_measured(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    cfg = make_config(image_folder)  # 10 images per class < 100
    size = measure(
        cfg, load_images(cfg), Path("unused.h5"), ("top", "none"), different=True
    )
    assert not size.measured and not size.finetune and size.rule == "floor"
    assert size.pilot is None and size.floor == 100


def test_above_the_floor_validation_images_are_required(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    cfg = make_config(image_folder, "advise.small_per_class=2", "data.val_fraction=0")
    with pytest.raises(DataError, match=r"class\(es\) \['cat', 'dog'\] have no vali"):
        measure(
            cfg, load_images(cfg), Path("unused.h5"), ("top", "none"), different=False
        )


def test_when_fine_tuning_wins_on_different_data_a_scratch_pilot_runs_too(
    image_folder: Path,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Case 4's question: a second, real pilot from random weights on the same
    budget, set against the pretrained pilot's forecast; not on similar data."""
    cfg = make_config(
        image_folder,
        "advise.small_per_class=2",
        "advise.pilot_share=0.5",
        "data.val_fraction=0.3",
        "finetune.epochs=2",
        "finetune.batch_size=4",
        "finetune.num_workers=0",
    )
    images = load_images(cfg)
    val = [r.path for r in images.records if r.split == "val"]
    # The frozen probe is stubbed (no cache needed); the pilots are real. Every
    # pilot "wins", so the decision reaches the scratch pilot and takes it.
    curve = (CurvePoint(images.counts()["train"].total(), 0.0),)
    monkeypatch.setattr(
        "pipeline.advisor.size.frozen_curve",
        lambda *a: (curve, None, {p: False for p in val}),
    )
    monkeypatch.setattr(Pilot, "wins", lambda self, margin: "ahead")
    code = ("top", "none")

    similar = measure(cfg, images, Path("unused.h5"), code, different=False)
    assert similar.finetune and similar.scratch is None and similar.init == "pretrained"
    assert not cfg.layout.pilot("scratch").exists()

    size = measure(cfg, images, Path("unused.h5"), code, different=True)
    assert size.pilot == similar.pilot  # the pretrained pilot is reused
    scratch = size.scratch
    assert scratch is not None and scratch.init == "scratch" and size.init == "scratch"
    assert scratch.budget == size.pilot.budget and scratch.images > 0
    assert scratch.reference == size.pilot.forecast
    record = json.loads((cfg.layout.pilot("scratch") / "pilot.json").read_text())
    assert record["pilot"]["init"] == "scratch"
    assert record["pilot"]["budget"] == scratch.budget
