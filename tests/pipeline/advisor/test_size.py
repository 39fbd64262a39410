"""The size question: the floor, the codes path's reference, pilots, forecasts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from features.errors import DataError
from features.probes import Interval
from pipeline import finetune
from pipeline.advisor.record import CurvePoint, Reference
from pipeline.advisor.size import (
    FinetuneOption,
    forecast_pilot,
    measure,
    nested_order,
)
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
    assert forecast is not None
    assert points == 2 and forecast.mean == pytest.approx(1 - 0.8 / 40)
    assert forecast.low < forecast.mean < forecast.high
    # Fewer validation images, noisier points: a wider interval.
    noisy, _ = forecast_pilot(_run(0, val=100), 0.95)
    assert noisy is not None
    assert noisy.high - noisy.low > forecast.high - forecast.low


def test_a_pilot_that_ends_in_its_warm_up_gives_no_forecast() -> None:
    none, points = forecast_pilot(_run(400), 0.95)
    assert none is None and points == 1


def test_below_the_floor_nothing_is_measured(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    cfg = make_config(image_folder)  # 10 images per class < 100
    size = measure(
        cfg,
        load_images(cfg),
        Path("unused.h5"),
        ("top", "none"),
        options=[_option(32, 1.0)],
        allowance=lambda: math.inf,
    )
    assert not size.measured and not size.finetune and size.rule == "floor"
    assert size.pilots == () and size.reference is None and size.floor == 100


def test_above_the_floor_validation_images_are_required(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    cfg = make_config(image_folder, "advise.small_per_class=2", "data.val_fraction=0")
    with pytest.raises(DataError, match=r"class\(es\) \['cat', 'dog'\] have no vali"):
        measure(
            cfg,
            load_images(cfg),
            Path("unused.h5"),
            ("top", "none"),
            options=[],
            allowance=lambda: math.inf,
        )


def _option(size: int, pilot_seconds: float) -> FinetuneOption:
    settings = {"finetune.init": "pretrained", "finetune.input_size": size}
    return FinetuneOption(
        f"fine-tune pretrained {size} px",
        f"pretrained-{size}",
        settings,
        10.0,
        pilot_seconds,
    )


def test_pilots_run_cheapest_first_while_the_advice_may_spend(
    image_folder: Path,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each candidate's pilot runs with its own settings in its own folder;
    a pilot that would overrun the advice's share of run.budget is skipped."""
    cfg = make_config(
        image_folder,
        "advise.small_per_class=2",
        "advise.pilot_share=0.5",
        "data.val_fraction=0.3",
        "finetune.epochs=2",
        "finetune.batch_size=4",
        "finetune.num_workers=0",
        "finetune.init=pretrained",
    )
    images = load_images(cfg)
    val = [r.path for r in images.records if r.split == "val"]
    # The codes path's classifier is stubbed (no cache needed); the pilots are
    # real, at 32 and 48 px.
    reference = Reference(
        "top/none", "logistic", 1.0, Interval(0.5, 0.4, 0.6, 0.95, "t", 5), 0.5, 1.0
    )
    curve = (CurvePoint(images.counts()["train"].total(), 0.5),)
    monkeypatch.setattr(
        "pipeline.advisor.size.codes_reference",
        lambda *a: (reference, curve, None, {p: False for p in val}),
    )
    left = iter([100.0, 0.5])  # then 0.5 s: less than the second pilot's 1 s
    size = measure(
        cfg,
        images,
        Path("unused.h5"),
        ("top", "none"),
        options=[_option(32, 1.0), _option(48, 1.0)],
        allowance=lambda: next(left),
    )
    assert size.measured and size.reference == reference
    assert [p.name for p in size.pilots] == ["fine-tune pretrained 32 px"]
    pilot = size.pilots[0]
    assert pilot.settings["finetune.input_size"] == 32 and pilot.images > 0
    assert pilot.reference == 0.5 and pilot.images_per_second > 0
    record = json.loads((cfg.layout.pilot("pretrained-32") / "pilot.json").read_text())
    assert record["pilot"]["budget"] == pilot.budget
    assert not cfg.layout.pilot("pretrained-48").exists()
