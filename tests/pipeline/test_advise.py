"""The advisor: the decision table, and real measurements in two quadrants."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from features.probes import DomainStatistics
from pipeline import advise
from pipeline.config import Config, load_config
from tests.conftest import write_digits_subset

DOMAIN = DomainStatistics(0.1, (0.1,), 0.9, 0.2, 3.0, 10)


def depths(top: float, early: float) -> tuple[advise.Depth, ...]:
    return (
        advise.Depth("layer2", 128, early, 0.01, 0.2),
        advise.Depth("top", 512, top, 0.01, 0.3),
    )


@pytest.mark.parametrize(
    "per_class, top, early, case",
    [
        ([20, 30], 0.90, 0.90, 1),  # small, top as good as any layer
        ([20, 30], 0.905, 0.91, 1),  # an earlier layer ahead by less than 1 point
        ([20, 30], 0.80, 0.90, 2),  # small, an earlier layer clearly better
        ([900, 800], 0.90, 0.85, 3),  # large, similar
        ([900, 800], 0.70, 0.85, 4),  # large, different
    ],
)
def test_decide_follows_the_four_case_table(
    per_class: list[int], top: float, early: float, case: int
) -> None:
    cfg = load_config(None, ["advise.large_per_class=500", "advise.top_margin=0.01"])
    advice = advise.decide(cfg, per_class, depths(top, early), DOMAIN, sample=50)
    assert advice.case == case
    assert advice.large == (case >= 3) and advice.similar == (case in (1, 3))
    reasons = " ".join(advice.reasons())
    assert "advise.large_per_class = 500" in reasons and "advise.top_margin" in reasons
    if case == 2:
        assert advice.best_layer == "layer2"
        assert advice.settings["train.layer"] == "layer2"
    if case >= 3:
        assert advice.settings["path"] == "finetune"


def test_reasons_of_a_backbone_without_batchnorm_or_classifier() -> None:
    cfg = load_config(None, [])
    nan = float("nan")
    domain = DomainStatistics(nan, (), nan, nan, nan, 10)
    reasons = advise.decide(cfg, [20, 30], depths(0.9, 0.9), domain, 50).reasons()
    assert "none (the backbone has no BatchNorm layers)" in reasons[3]
    assert "the backbone has no classifier of its own" in reasons[4]


def test_decide_reports_the_figures_it_used() -> None:
    cfg = load_config(None, [])
    advice = advise.decide(cfg, [10, 30, 12], depths(0.7, 0.85), DOMAIN, sample=52)
    first, second = advice.reasons()[:2]
    assert "median 12 training images per class (min 10, 52 in all) < " in first
    assert "the best layer layer2 scores +15.0 points over top" in second
    assert "on 52 images" in second


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_subset(tmp_path_factory.mktemp("adv"), 30)


def test_advise_on_digits_with_imagenet_weights(digits: Path, tmp_path: Path) -> None:
    """Real measurements: 8x8 handwriting is small and far from ImageNet."""
    cfg = load_config(
        None,
        [
            f"data.root='{digits}'",
            f"run.out='{tmp_path}'",
            "run.progress=false",
            "sweep.cv_folds=3",
            "backbone.input_size=96",
        ],
    )
    advice = advise.run(cfg)
    assert not advice.large and advice.per_class_median == 21
    assert [d.layer for d in advice.depths][-1] == "top" and len(advice.depths) == 6
    assert all(0 <= d.accuracy <= 1 for d in advice.depths)
    assert advice.domain.images == 210 and advice.domain.bn_shift > 0
    saved = json.loads((tmp_path / "advice.json").read_text())
    assert saved["case"] == advice.case in (1, 2)
    assert saved["reasons"] == advice.reasons()
    # Same measurements, a lower bar for "large": the large half of the table.
    large = advise.decide(
        load_config(None, ["advise.large_per_class=20"]),
        [21] * 10,
        advice.depths,
        advice.domain,
        advice.sample,
    )
    assert large.case == advice.case + 2


def test_advise_skips_a_corrupt_image_instead_of_crashing(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    for i in range(4):  # whatever the split, some land in the training sample
        whole = (image_folder / "cat" / f"0{i}.png").read_bytes()
        (image_folder / "cat" / f"truncated-{i}.png").write_bytes(whole[:300])
    cfg = make_config(image_folder, "sweep.cv_folds=2", "advise.depths=2")
    advice = advise.run(cfg)
    assert advice.case in (1, 2)
    assert advice.domain.bn_shift >= 0  # measured on the readable images


def test_advise_probes_a_headless_vits_blocks(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    # A DINOv2 tower: no BatchNorm, no classifier, depths are its blocks.
    cfg = make_config(
        image_folder,
        "backbone.name='timm/vit_small_patch14_dinov2'",
        "backbone.input_size=28",
        "backbone.resize_size=28",
        "extract.pooling=['cls+patch_avg']",
        "sweep.cv_folds=2",
        "advise.depths=3",
    )
    advice = advise.run(cfg)
    assert [d.layer for d in advice.depths] == [
        "blocks.4/cls+patch_avg",
        "blocks.7/cls+patch_avg",
        "blocks.11/cls+patch_avg",
        "top",
    ]
    assert [d.dims for d in advice.depths] == [768, 768, 768, 384]
    reasons = " ".join(advice.reasons())
    assert "no BatchNorm layers" in reasons and "no classifier of its own" in reasons
