"""The whole job: advise (for `strategy = "auto"`), run the case, report.

Cases 1 and 2: extract -> sweep -> train -> evaluate -> export.
Cases 3 and 4: finetune -> evaluate -> export.
Then predict (when asked) and `report.html`.

Re-running reuses every valid artefact: codes by their cache key, and the
sweep, the trained model, the fine-tuned model and the export by the stamp
their records keep of the settings and inputs they were made from; only what
changed is redone. A fine-tune interrupted part-way resumes from its
checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from features.atomic import read_optional_json, staged_folder, write_json
from features.cache import read_info
from features.layers import TOP
from pipeline import (
    advisor,
    evaluate,
    export,
    extract,
    finetune,
    predict,
    report,
    sweep,
)
from pipeline import train as train_stage
from pipeline.config import Config, FinetuneConfig
from pipeline.inputs import load_backbone, load_images
from pipeline.layout import ModelFiles
from pipeline.models import load_model
from pipeline.stamps import stamp_of

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunResult:
    """What the run did, stage by stage."""

    case: int
    advice: advisor.Advice | None
    model: ModelFiles
    evaluation: evaluate.EvalResult
    export: export.ExportResult
    report: Path
    timings: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    predictions: Path | None = None


def run(cfg: Config, *, predict_paths: Sequence[Path] = ()) -> RunResult:
    """Run the configured (or advised) case end to end and write the report.

    With run.budget, a fine-tune stops at its best epoch when the next would
    end too late to leave time for evaluation and export.
    """
    timings: dict[str, float] = {}
    reused: list[str] = []
    budget = cfg.run.budget_seconds
    end = None if budget is None else time.monotonic() + budget
    advice = None
    case = cfg.run.case
    if case is None:
        advice = _timed(timings, "advise", lambda: advisor.run(cfg))
        case = advice.case
    else:
        log.info("case %d (run.strategy = %r)", case, cfg.run.strategy)
    if case in (1, 2):
        cfg = _codes_path(cfg, case, advice, timings, reused)
    else:
        deadline = None if end is None else end - _AFTER_TRAINING_SECONDS
        cfg = _finetune_path(cfg, case, advice, timings, reused, deadline)
    evaluation = _timed(timings, "evaluate", lambda: evaluate.run(cfg))
    model = load_model(cfg.layout.model(cfg.run.model))  # the path set run.model
    exported = _export(cfg, timings, reused)
    predictions = None
    if predict_paths:
        out = model.files.predictions
        _timed(
            timings,
            "predict",
            lambda: predict.run(
                exported.path,
                predict_paths,
                out=out,
                options=predict.PredictOptions(progress=cfg.run.progress),
            ),
        )
        predictions = out
    summary = {
        "case": case,
        "chosen_by": "advisor" if advice is not None else "run.strategy",
        "strategy": cfg.run.strategy,
        "model": {"kind": model.kind, "created": model.record["created"]},
        "timings": timings,
        "reused": reused,
    }
    write_json(cfg.layout.summary, summary)
    path = _timed(timings, "report", lambda: report.write(cfg))
    return RunResult(
        case,
        advice,
        model.files,
        evaluation,
        exported,
        path,
        timings,
        reused,
        predictions,
    )


def _timed(timings: dict[str, float], name: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = work()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    log.info("%s: %.1f s", name, timings[name])
    return value


# ---------------------------------------------------------------------------
# Cases 1 and 2


def _codes_path(
    cfg: Config,
    case: int,
    advice: advisor.Advice | None,
    timings: dict[str, float],
    reused: list[str],
) -> Config:
    """Extract depths across the network, sweep them, train on the chosen layer.

    The advised layer when there is advice; else top (case 1) or the sweep's
    best (case 2).
    """
    if advice is None:  # the advisor has checked the classes before it extracted
        load_images(cfg).require_classes(f"case {case}'s classifier")
    layers = advisor.codes_layers(cfg, load_backbone(cfg))
    train = replace(cfg.train, layer=TOP if case == 1 else "best")
    if advice is not None:
        settings = advice.settings
        train = replace(
            cfg.train, layer=settings["train.layer"], pooling=settings["train.pooling"]
        )
    cfg = replace(
        cfg,
        extract=replace(cfg.extract, layers=tuple(layers)),
        train=train,
        run=replace(cfg.run, model="codes"),
    )
    result = _timed(timings, "extract", lambda: extract.run(cfg))
    if result.reused:
        reused.append("codes")
    key = read_info(result.path).key
    if sweep.is_fresh(cfg, key):
        reused.append("sweep")
    else:
        _timed(timings, "sweep", lambda: sweep.run(cfg))
    layer, pooling = train_stage.resolve_layer(cfg, result.path)
    wanted = train_stage.model_stamp(cfg, key, layer, pooling)
    if stamp_of(cfg.layout.model("codes").record) == wanted:
        reused.append("model")
    else:
        _timed(timings, "train", lambda: train_stage.run(cfg))
    return cfg


# ---------------------------------------------------------------------------
# Cases 3 and 4


# Seconds a fine-tune leaves of run.budget for evaluation, export and the
# report (measured at 20-40 s for EfficientNet-Lite0 on two CPU cores).
_AFTER_TRAINING_SECONDS = 45.0


def _finetune_path(
    cfg: Config,
    case: int,
    advice: advisor.Advice | None,
    timings: dict[str, float],
    reused: list[str],
    deadline: float | None = None,
) -> Config:
    cfg = replace(
        cfg,
        finetune=_finetune_settings(cfg, case, advice),
        run=replace(cfg.run, model="finetune"),
    )
    wanted = finetune.model_stamp(cfg, load_images(cfg))
    layout = cfg.layout
    if stamp_of(layout.model("finetune").record) == wanted and _complete(cfg):
        reused.append("model")
        return cfg
    if advice is not None and not layout.checkpoint.exists():
        _adopt_pilot(cfg, advice, wanted)
    resume = layout.checkpoint.exists() and stamp_of(layout.finetune_stamp) == wanted
    if layout.checkpoint.exists() and not resume:
        log.warning(
            "fine-tuning settings changed since %s: starting over", layout.checkpoint
        )
    _timed(
        timings,
        "finetune",
        lambda: finetune.run(cfg, resume=resume, restart=not resume, deadline=deadline),
    )
    return cfg


def _finetune_settings(
    cfg: Config, case: int, advice: advisor.Advice | None
) -> FinetuneConfig:
    """The advised candidate's [finetune] keys; a forced case 3 fine-tunes the
    pretrained network, a forced case 4 keeps the configured init."""
    if advice is not None:
        keys = {
            k.removeprefix("finetune."): v
            for k, v in advice.settings.items()
            if k.startswith("finetune.")
        }
        return replace(cfg.finetune, **keys)
    if case == 3:
        return replace(cfg.finetune, init="pretrained")
    return cfg.finetune


def _complete(cfg: Config) -> bool:
    """Whether the published fine-tune ran all its epochs (not cut by run.budget)."""
    record = read_optional_json(cfg.layout.model("finetune").record)
    return not (record or {}).get("training", {}).get("out_of_time", False)


def _adopt_pilot(cfg: Config, advice: advisor.Advice, wanted: str) -> None:
    """Continue from the advisor's pilot: it is this fine-tune's first epochs.

    The pilot ran the same settings, schedule and seed; when it ended on an
    epoch boundary its checkpoint is where this run would be after those
    epochs, so its cost is not paid twice.
    """
    pilot = advice.size.pilot(advice.chosen)
    if pilot is None or not pilot.resumable:
        return
    source = replace(cfg, run=replace(cfg.run, out=Path(pilot.folder))).layout
    if not source.checkpoint.exists() or stamp_of(source.finetune_stamp) != wanted:
        return
    with staged_folder(cfg.layout.finetune_work) as folder:
        for path in (source.checkpoint, source.best_weights, source.finetune_stamp):
            shutil.copyfile(path, folder / path.name)
    log.info(
        "fine-tuning continues the advisor's pilot after epoch %d (%s)",
        pilot.epochs,
        pilot.folder,
    )


def _export(
    cfg: Config, timings: dict[str, float], reused: list[str]
) -> export.ExportResult:
    model = load_model(cfg.layout.model(cfg.run.model))
    files = model.files
    if (
        stamp_of(files.export_summary) == export.export_stamp(cfg, model)
        and files.onnx.exists()
    ):
        reused.append("export")
        return export.load_result(files.export_summary)
    return _timed(timings, "export", lambda: export.run(cfg))
