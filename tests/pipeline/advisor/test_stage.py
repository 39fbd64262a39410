"""The advisor stage: the four-case table, real runs, reuse of advice and pilot."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from pipeline import finetune
from pipeline.advisor import stage
from pipeline.advisor.reasons import explain
from pipeline.config import Config, load_config
from pipeline.finetune.loop import Trainer
from tests.conftest import TINY, write_digits_subset, write_png
from tests.pipeline.advisor.test_record import (
    DEPTHS,
    DOMAIN,
    interval,
    similarity,
    size,
)


@pytest.mark.parametrize(
    "verdict, gain, finetune, case",
    [
        ("similar", (0.0, -0.004, 0.006), False, 1),
        ("different", (0.05, 0.02, 0.08), False, 2),
        ("undecided", (0.01, -0.02, 0.04), False, 2),  # cheaper
        ("similar", (0.0, -0.004, 0.006), True, 3),
        ("undecided", (0.01, -0.02, 0.04), True, 3),
        ("different", (0.05, 0.02, 0.08), True, 4),
    ],
)
def test_decide_follows_the_four_case_table(
    verdict: str, gain: tuple[float, float, float], finetune: bool, case: int
) -> None:
    advice = stage.decide(
        similarity(verdict, interval(*gain)), size(finetune), DEPTHS, DOMAIN
    )
    assert advice.case == case
    assert advice.large == finetune and advice.similar == (verdict != "different")
    if case in (1, 2):
        layer = "top" if case == 1 else "layer2"
        assert advice.settings["train.layer"] == layer
    else:
        assert advice.settings["finetune.init"] == "pretrained"
    if verdict == "undecided" and case == 2:
        assert "undecided: layer2 and top are within noise" in advice.settings["note"]


# ---------------------------------------------------------------------------
# Real runs


def tiny(root: Path, out: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{root}'",
            f"run.out='{out}'",
            *TINY,
            "train.n_jobs=1",
            "advise.cv_folds=3",
            "advise.cv_repeats=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_subset(tmp_path_factory.mktemp("adv"), 12)


@pytest.fixture(scope="module")
def dead_top(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-18 weights whose last stage outputs a constant (random otherwise)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for name, param in net.layer4.named_parameters():
            if "bn2" in name or "downsample.1" in name:
                param.zero_()
    path = tmp_path_factory.mktemp("weights") / "dead-top.pt"
    torch.save(net.state_dict(), path)
    return path


def test_advise_end_to_end_says_different_when_the_top_layer_is_useless(
    digits: Path, dead_top: Path, tmp_path: Path
) -> None:
    """Real images, a real extraction: earlier layers keep the digits, top not."""
    cfg = tiny(digits, tmp_path, f"backbone.weights='{dead_top}'", "advise.depths=2")
    advice = stage.run(cfg)
    sim = advice.similarity
    assert sim.verdict == "different" and sim.gain.low > cfg.advise.top_margin
    assert advice.case == 2 and advice.settings["train.layer"] != "top"
    saved = json.loads((tmp_path / "advice.json").read_text())
    assert saved["similarity"]["gain"]["low"] == sim.gain.low
    assert saved["similarity"]["folds"] == 3 and saved["similarity"]["repeats"] == 2
    assert saved["reasons"] == advice.reasons() and saved["stamp"]


def test_advise_on_digits_with_imagenet_weights(digits: Path, tmp_path: Path) -> None:
    """Real measurements: 8x8 handwriting is small and far from ImageNet."""
    cfg = load_config(
        None,
        [
            f"data.root='{digits}'",
            f"run.out='{tmp_path}'",
            "run.progress=false",
            "train.n_jobs=1",
            "advise.cv_folds=3",
            "advise.cv_repeats=1",
            "advise.depths=3",
            "backbone.input_size=64",
        ],
    )
    advice = stage.run(cfg)
    assert not advice.large and advice.size.per_class_median == 9
    assert not advice.size.measured and advice.size.rule == "floor"
    assert [d.layer for d in advice.depths][-1] == "top" and len(advice.depths) == 4
    assert all(0 <= d.accuracy <= 1 for d in advice.depths)
    assert advice.domain.images == 90 and advice.domain.bn_shift > 0
    assert advice.case in (1, 2)


def test_advise_skips_a_corrupt_image_instead_of_crashing(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    for i in range(4):  # whatever the split, some land in the training sample
        whole = (image_folder / "cat" / f"0{i}.png").read_bytes()
        (image_folder / "cat" / f"truncated-{i}.png").write_bytes(whole[:300])
    cfg = make_config(
        image_folder, "advise.cv_folds=2", "advise.depths=2", "train.n_jobs=1"
    )
    advice = stage.run(cfg)
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
    advice = stage.run(cfg)
    assert [d.layer for d in advice.depths] == [
        "blocks.4/cls+patch_avg",
        "blocks.7/cls+patch_avg",
        "blocks.11/cls+patch_avg",
        "top",
    ]
    assert [d.dims for d in advice.depths] == [768, 768, 768, 384]
    reasons = " ".join(explain(advice))
    assert "no BatchNorm layers" in reasons and "no classifier of its own" in reasons


# ---------------------------------------------------------------------------
# Above the floor: the pilot, its budget, and reuse


@pytest.fixture(scope="module")
def piloted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny set above a low floor: the learning curve and the pilot run."""
    base = tmp_path_factory.mktemp("piloted")
    root = base / "data"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(30):
            write_png(root / name / f"{i:02d}.png", seed=100 * c + i)
    cfg = tiny(
        root,
        base / "run",
        "advise.small_per_class=5",
        "advise.depths=1",
        "advise.pilot_share=0.5",
        "finetune.epochs=2",
        "finetune.batch_size=8",
        "finetune.num_workers=0",
        "data.val_fraction=0.2",
    )
    seen: list[int] = []
    real = Trainer._step

    def step(t, images, labels, criterion, *, sync):  # type: ignore[no-untyped-def]
        seen.append(len(labels))
        return real(t, images, labels, criterion, sync=sync)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_step", step)
        advice = stage.run(cfg)
    return {"cfg": cfg, "advice": advice, "seen": seen, "root": root}


def test_above_the_floor_the_pilot_runs_within_its_budget(
    piloted: dict[str, Any],
) -> None:
    advice, cfg = piloted["advice"], piloted["cfg"]
    z = advice.size
    assert z.measured and z.pilots and z.rule in ("ahead", "forecast", "codes")
    p = z.pilot("fine-tune pretrained 32 px")
    assert p is not None  # and partly frozen (from layer4.1), cheaper, first
    assert [q.name for q in z.pilots][-1] == p.name
    # Images processed, counted at the network: within the budget, half the full.
    assert sum(piloted["seen"]) == sum(q.images for q in z.pilots)
    assert p.images <= p.budget == p.full // 2
    assert p.share == 0.5 and p.epochs == 1 and p.resumable
    assert [c.images for c in p.curve][-1] == p.images and len(p.curve) >= 2
    assert [c.images for c in z.frozen_curve] == sorted(
        c.images for c in z.frozen_curve
    )
    assert z.frozen_curve[-1].images == advice.size.images
    assert p.versus.low <= p.versus.mean <= p.versus.high
    saved = json.loads(cfg.layout.advice.read_text())
    first = saved["size"]["pilots"][-1]
    assert first["budget"] == p.budget  # settings, cost, outcome
    assert first["seconds"] > 0 and saved["seconds"]["size"] > 0
    assert saved["size"]["rule"] == z.rule and "pilot of" in saved["reasons"][0]
    assert (cfg.layout.pilot("pretrained-32") / "finetune" / "last.pt").exists()
    # Every candidate weighed is in the record, with its expected time.
    names = [c["name"] for c in saved["candidates"]]
    assert "fine-tune pretrained 32 px" in names and saved["chosen"] in names
    assert all(c["seconds"] > 0 for c in saved["candidates"])


def test_a_rerun_reuses_the_advice_and_the_pilot_until_something_changes(
    piloted: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, first = piloted["cfg"], piloted["advice"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again")

    # Nothing changed: the advice is read back, nothing is measured.
    with monkeypatch.context() as patch:
        patch.setattr(stage, "probe_depths", refuse)
        patch.setattr(finetune, "pilot", refuse)
        again = stage.run(cfg)
    assert again == first
    # A decision setting changed: advised again, the pilot reused.
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "pilot", refuse)
        looser = stage.run(replace(cfg, advise=replace(cfg.advise, top_margin=0.5)))
    assert looser.similarity.margin == 0.5 and looser.size.pilots == first.size.pilots
    # An image changed: advised again, pilot included.
    before = json.loads(cfg.layout.advice.read_text())["stamp"]
    write_png(piloted["root"] / "cat" / "00.png", seed=999)
    calls = []
    real = finetune.pilot
    monkeypatch.setattr(
        finetune, "pilot", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    changed = stage.run(cfg)
    assert calls == [1] * len(first.size.pilots) and changed.size.pilots
    assert json.loads(cfg.layout.advice.read_text())["stamp"] != before
