"""`quadrant run`: the case is said before its stages run; the pilot is continued."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import advisor
from pipeline import run as run_stage
from pipeline.config import Config, load_config
from pipeline.finetune.loop import Trainer
from tests.conftest import TINY, write_png


class _Stop(Exception):
    pass


def test_the_case_is_logged_before_the_first_stage_of_the_case(
    image_folder: Path,
    make_config: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = make_config(image_folder, "advise.depths=2", "train.n_jobs=1")
    seen: list[str] = []

    def first_stage(cfg: Config) -> None:
        seen.extend(caplog.messages)
        raise _Stop

    monkeypatch.setattr(run_stage.extract, "run", first_stage)
    monkeypatch.setattr(run_stage.finetune, "run", first_stage)
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(_Stop):
        run_stage.run(cfg)
    cases = [m for m in seen if m.startswith("case ")]
    assert len(cases) == 1 and cases[0][5] in "12"
    # The figures come with it: the similarity interval and the size reason.
    after = seen[seen.index(cases[0]) :]
    assert any("similarity: " in m and "points over top [" in m for m in after)
    assert any("size: " in m for m in after)


def test_a_forced_case_is_logged_before_its_stages(
    image_folder: Path,
    make_config: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        run_stage.extract, "run", lambda cfg: (_ for _ in ()).throw(_Stop)
    )
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(_Stop):
        run_stage.run(make_config(image_folder, "run.strategy=1"))
    assert "case 1 (run.strategy = '1')" in caplog.messages


def test_the_fine_tune_continues_the_advisors_pilot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(20):
            write_png(root / name / f"{i:02d}.png", seed=100 * c + i)
    cfg = load_config(
        None,
        [
            f"data.root='{root}'",
            f"run.out='{tmp_path / 'run'}'",
            *TINY,
            "train.n_jobs=1",
            "advise.small_per_class=5",
            "advise.depths=1",
            "advise.cv_folds=2",
            "advise.cv_repeats=1",
            "advise.pilot_share=0.5",
            "finetune.epochs=2",
            "finetune.batch_size=8",
            "finetune.num_workers=0",
            "data.val_fraction=0.2",
        ],
    )
    advice = advisor.run(cfg)
    pilot = advice.size.pilot("fine-tune pretrained 32 px")
    assert pilot is not None and pilot.resumable
    pilot_weights = torch.load(
        Path(pilot.folder) / "finetune" / "last.pt", weights_only=True
    )
    # Whatever the pilot said on random images, say fine-tune: the run must
    # continue the pilot's first epoch instead of training it again.
    large = replace(
        advice,
        case=3,
        size=replace(advice.size, finetune=True),
        settings={"path": "finetune", **pilot.settings, "note": ""},
        chosen=pilot.name,
    )
    epochs: list[int] = []
    real = Trainer.train_one_epoch
    monkeypatch.setattr(
        Trainer,
        "train_one_epoch",
        lambda t, **k: epochs.append(t.epoch) or real(t, **k),
    )
    with caplog.at_level(logging.INFO, logger="pipeline"):
        run_stage._finetune_path(cfg, 3, large, {}, [])
    assert epochs == [1]  # only the second epoch was trained here
    assert any(
        "continues the advisor's pilot after epoch 1" in m for m in caplog.messages
    )
    state = torch.load(cfg.layout.checkpoint, weights_only=True)
    assert state["epoch"] == 2 and state["history"][0] == pilot_weights["history"][0]
    assert (cfg.layout.model("finetune").record).exists()
    # The report shows the pilot's settings, cost and outcome from advice.json.
    from pipeline import report

    page = report.write(replace(cfg, run=replace(cfg.run, model="finetune")))
    html = page.read_text()
    p = pilot
    assert "Size, measured" in html and "2 folds × 1 repeats" in html
    assert f"{p.images} (50% of {p.full})" in html
    forecast = "the pilot alone decides" if p.forecast is None else f"{p.forecast:.3f}"
    assert forecast in html and "Cost of the advice" in html
    assert "Candidates weighed" in html and p.name in html


def test_the_report_says_a_forced_case_was_the_users_choice(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    cfg = make_config(image_folder, "run.strategy=2", "train.cv_folds=2")
    result = run_stage.run(cfg)
    html = result.report.read_text()
    assert re.search(
        r'class="case">Case 2: small, different: [^<]*, as set by run.strategy = '
        r"&#39;2&#39; \(the advisor did not measure size or similarity\)<",
        html,
    )
    codes = json.loads(result.model.record.read_text())["codes"]
    assert codes["layer"] and codes["pooling"]
    assert f"on <code>{codes['layer']}/{codes['pooling']}</code>" in html
