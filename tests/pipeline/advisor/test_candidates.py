"""The candidates: expected accuracy and time, and the choice within run.budget."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from features.probes import Interval
from pipeline.advisor import decide, summary_lines
from pipeline.advisor.candidates import (
    Costs,
    choose,
    input_sizes,
    options_with_costs,
    unit_costs,
    weigh,
)
from pipeline.advisor.record import CurvePoint, Reference
from pipeline.config import load_config
from pipeline.finetune import StepRate, memory
from pipeline.finetune.stage import build_model
from pipeline.inputs import load_images
from tests.pipeline.advisor.test_record import (
    DEPTHS,
    DOMAIN,
    _pilot,
    interval,
    similarity,
    size,
)
from tests.pipeline.finetune.conftest import write_classes

CFG = load_config(None, ["finetune.epochs=10", "advise.pilot_share=0.25"])
SETTINGS = [
    {"finetune.init": "pretrained", "finetune.input_size": 32},
    {"finetune.init": "pretrained", "finetune.input_size": 224},
]
# A stubbed cost table: 1,000 training images; 32 px trains at 100 images/s,
# 224 px at 5.
COSTS = Costs(
    counts={"train": 1000, "val": 100, "test": 200},
    extract_per_image=0.02,
    extracted=True,
    rates={
        "pretrained-32": StepRate(100.0, 500.0),
        "pretrained-224": StepRate(5.0, 25.0),
    },
)


def _measured_size() -> object:
    reference = Reference(
        "layer2/avg", "logistic", 1.0, interval(0.90, 0.88, 0.92), 0.90, 3.0
    )
    pilot = replace(
        _pilot((-0.01, -0.04, 0.02), 0.95),
        reference=0.90,
        images_per_second=80.0,
    )
    return replace(
        size(True),
        measured=True,
        frozen_curve=(CurvePoint(1000, 0.9),),
        reference=reference,
        pilots=(pilot,),
    )


def _advice(budget_left: float) -> object:
    z = _measured_size()
    sim = similarity("undecided", interval(0.01, -0.02, 0.04))
    options = options_with_costs(CFG, SETTINGS, COSTS)
    candidates = weigh(CFG, DEPTHS, sim, z, options, COSTS, left=budget_left)
    return decide(sim, z, DEPTHS, DOMAIN, {"size": 10.0}, candidates, budget_left)


def test_a_tiny_budget_picks_the_codes_path_and_a_large_one_the_fine_tune() -> None:
    tight = _advice(budget_left=60.0)  # the 32 px fine-tune needs about 2 minutes
    assert tight.chosen == "codes on layer2" and tight.case == 2
    roomy = _advice(budget_left=math.inf)
    assert roomy.chosen == "fine-tune pretrained 32 px" and roomy.case == 3
    assert roomy.settings["finetune.input_size"] == 32
    # Both show every candidate, best first, with its expected time.
    names = [c.name for c in roomy.candidates]
    assert names[0] == "fine-tune pretrained 32 px"
    assert "fine-tune pretrained 224 px" in names
    times = {c.name: c.seconds for c in roomy.candidates}
    assert (
        times["fine-tune pretrained 224 px"] > 10 * times["fine-tune pretrained 32 px"]
    )


def test_the_table_says_what_a_larger_budget_would_buy() -> None:
    tight = _advice(budget_left=60.0)
    text = "\n".join(summary_lines(tight))
    assert "* codes on layer2" in text
    assert "a larger budget: run.budget = '" in text
    assert (
        "would allow fine-tune pretrained 32 px: expected 0.950 (+5.0 points)" in text
    )


def test_an_unpiloted_fine_tune_is_never_chosen() -> None:
    z = replace(_measured_size(), pilots=())
    sim = similarity("undecided", interval(0.01, -0.02, 0.04))
    options = options_with_costs(CFG, SETTINGS, COSTS)
    candidates = weigh(CFG, DEPTHS, sim, z, options, COSTS, left=math.inf)
    unmeasured = [c for c in candidates if c.path == "finetune"]
    assert all(c.accuracy is None and "not measured" in c.basis for c in unmeasured)
    assert choose(candidates, z, sim, 0.01).name == "codes on layer2"


@pytest.mark.parametrize(
    "native, backbone, sizes",
    [(8, 224, [32, 224]), (28, 224, [64, 224]), (500, 224, [224]), (28, 32, [32])],
)
def test_small_images_are_fine_tuned_small(
    native: float, backbone: int, sizes: list[int]
) -> None:
    assert input_sizes(native, backbone) == sizes


def test_the_forecast_interval_is_the_candidates_interval() -> None:
    roomy = _advice(budget_left=math.inf)
    first = roomy.candidates[0]
    assert (first.low, first.accuracy, first.high) == pytest.approx(
        (0.945, 0.95, 0.955)
    )
    assert isinstance(first.low, float) and Interval


def test_an_option_whose_step_cannot_fit_in_memory_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(
        None,
        [
            f"data.root='{write_classes(tmp_path / 'data')}'",
            "backbone.name=resnet18",
            "finetune.init=scratch",
            "finetune.head_init=random",
            "finetune.batch_size=16",
        ],
    )
    images = load_images(cfg)
    needs = {}
    for px in (32, 224):
        ft = replace(cfg.finetune, input_size=px)
        model, _, _ = build_model(replace(cfg, finetune=ft), 2, torch.device("cpu"))
        needs[px] = memory.step_memory(model, px, ft, torch.device("cpu"))
    # Room for the 32 px step, not for the 224 px one.
    room = (needs[32].bytes_for(16) + needs[224].bytes_for(16)) / 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(room))
    settings = [dict(s, **{"finetune.init": "scratch"}) for s in SETTINGS]
    costs = unit_costs(cfg, images, settings, extract_per_image=0.0, extracted=True)
    assert list(costs.rates) == ["scratch-32"]
    assert [o.name for o in options_with_costs(cfg, settings, costs)] == [
        "train from scratch 32 px"
    ]
    assert "train from scratch 224 px left out: a training step of 16" in caplog.text
