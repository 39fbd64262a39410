"""The whole job: advise (for `strategy = "auto"`), run the case, report.

Cases 1 and 2: extract -> sweep -> train -> evaluate -> export.
Cases 3 and 4: finetune -> evaluate -> export.
Then predict (when asked) and `report.html`.

Re-running reuses every valid artefact: codes by their cache key, and the
sweep, the trained model, the fine-tuned model and the export by a stamp of
the settings and inputs they were made from; only what changed is redone. A
fine-tune interrupted part-way resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from features.cache import atomic_write_text, read_info
from features.layers import TOP
from pipeline import advise, evaluate, export, extract, finetune, predict, report, sweep
from pipeline import train as train_stage
from pipeline.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunResult:
    """What the run did, stage by stage."""

    case: int
    advice: advise.Advice | None
    evaluation: evaluate.EvalResult
    export: export.ExportResult
    report: Path
    timings: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    predictions: Path | None = None


def run(cfg: Config, *, predict_paths: Sequence[Path] = ()) -> RunResult:
    """Run the configured (or advised) case end to end and write the report."""
    timings: dict[str, float] = {}
    reused: list[str] = []
    advice = None
    case = cfg.run.case
    if case is None:
        advice = _timed(timings, "advise", lambda: advise.run(cfg))
        case = advice.case
    if case in (1, 2):
        cfg = _codes_path(cfg, case, timings, reused)
    else:
        _finetune_path(cfg, case, advice, timings, reused)
    evaluation = _timed(timings, "evaluate", lambda: evaluate.run(cfg))
    exported = _export(cfg, timings, reused)
    predictions = None
    if predict_paths:
        out = cfg.run.out / "predictions.csv"
        _timed(
            timings,
            "predict",
            lambda: predict.run(exported.path, predict_paths, out=out),
        )
        predictions = out
    result = RunResult(
        case,
        advice,
        evaluation,
        exported,
        cfg.run.out / "report.html",
        timings,
        reused,
        predictions,
    )
    atomic_write_text(
        cfg.run.out / "run.json",
        json.dumps({"case": case, "timings": timings, "reused": reused}, indent=2)
        + "\n",
    )
    _timed(timings, "report", lambda: report.write(cfg, case, timings, reused))
    return result


def _timed(timings: dict[str, float], name: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = work()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    log.info("%s: %.1f s", name, timings[name])
    return value


def stamp(*parts: Any) -> str:
    """A digest of the settings and inputs an artefact was made from."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _stamp_of(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text()).get("stamp"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Cases 1 and 2


def _codes_path(
    cfg: Config, case: int, timings: dict[str, float], reused: list[str]
) -> Config:
    """Extract depths across the network, sweep them, train on top or the best."""
    layers = advise.codes_layers(cfg, extract.load_backbone(cfg))
    cfg = replace(
        cfg,
        extract=replace(cfg.extract, layers=tuple(layers)),
        train=replace(cfg.train, layer=TOP if case == 1 else "best"),
    )
    result = _timed(timings, "extract", lambda: extract.run(cfg))
    if result.reused:
        reused.append("codes")
    key = read_info(result.path).key
    sweep_stamp = stamp(key, asdict(cfg.sweep), cfg.run.seed)
    _unless_stamped(
        "sweep",
        cfg.run.out / "sweep.json",
        sweep_stamp,
        timings,
        reused,
        lambda: sweep.run(cfg),
    )
    train_stamp = stamp(
        key, asdict(cfg.train), cfg.run.seed, sweep_stamp if case == 2 else None
    )
    _unless_stamped(
        "model",
        cfg.run.out / "model" / "model.json",
        train_stamp,
        timings,
        reused,
        lambda: train_stage.run(cfg),
        stage="train",
    )
    return cfg


def _unless_stamped(
    name: str,
    path: Path,
    value: str,
    timings: dict[str, float],
    reused: list[str],
    work: Callable[[], Any],
    *,
    stage: str | None = None,
) -> None:
    """Reuse the artefact at `path` if its stamp is `value`; else make and stamp it."""
    if _stamp_of(path) == value:
        reused.append(name)
        return
    _timed(timings, stage or name, work)
    _add_stamp(path, value)


def _add_stamp(path: Path, value: str) -> None:
    data = json.loads(path.read_text())
    data["stamp"] = value
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------
# Cases 3 and 4


def _finetune_path(
    cfg: Config,
    case: int,
    advice: advise.Advice | None,
    timings: dict[str, float],
    reused: list[str],
) -> None:
    if case == 3:
        init = "pretrained"
    elif advice is not None:
        init = str(advice.settings["finetune.init"])
    else:  # a forced case 4 keeps the configured init
        init = cfg.finetune.init
    cfg = replace(cfg, finetune=replace(cfg.finetune, init=init))
    images = extract.load_images(cfg)
    ft_stamp = stamp(
        asdict(cfg.finetune), asdict(cfg.backbone), images.fingerprint, cfg.run.seed
    )
    model_json = cfg.run.out / "model" / "model.json"
    checkpoint = cfg.run.out / "finetune" / "last.pt"
    if _stamp_of(model_json) == ft_stamp and _complete(checkpoint, cfg):
        reused.append("model")
        return
    resume = (
        checkpoint.exists()
        and _stamp_of(cfg.run.out / "finetune" / "stamp.json") == ft_stamp
    )
    if checkpoint.exists() and not resume:
        log.warning("fine-tuning settings changed since %s: starting over", checkpoint)
    atomic_write_text(
        cfg.run.out / "finetune" / "stamp.json", json.dumps({"stamp": ft_stamp}) + "\n"
    )
    _timed(
        timings,
        "finetune",
        lambda: finetune.run(cfg, resume=resume, restart=not resume),
    )
    _add_stamp(model_json, ft_stamp)


def _complete(checkpoint: Path, cfg: Config) -> bool:
    if not checkpoint.exists():
        return False
    from pipeline.checkpoint import load

    state = load(checkpoint)
    history = state.get("history", [])
    stopped = (
        cfg.finetune.patience and state.get("bad_epochs", 0) >= cfg.finetune.patience
    )
    return bool(state["epoch"] >= cfg.finetune.epochs or (history and stopped))


def _export(
    cfg: Config, timings: dict[str, float], reused: list[str]
) -> export.ExportResult:
    model_json = cfg.run.out / "model" / "model.json"
    export_stamp = stamp(asdict(cfg.export), model_json.read_text())
    summary = cfg.run.out / "export.json"
    if _stamp_of(summary) == export_stamp and (cfg.run.out / "model.onnx").exists():
        reused.append("export")
        return export.load_result(summary)
    result = _timed(timings, "export", lambda: export.run(cfg))
    _add_stamp(summary, export_stamp)
    return result
