"""`report.html`: one self-contained page about one trained model, plots embedded.

Everything is read back from the files under run.out: the run's records
(extract.json, advice.json, sweep.json, run.json) and the model folder's
(model.json, train.json or finetune.json, metrics.json, export.json and the
PNGs), so the report shows exactly what the folder holds. It describes the
model `run.model` selects (the latest trained by default); the case, the
timings and what was reused come from run.json only when `quadrant run`
made that very model. The page is rendered with Jinja2 (autoescaped) from
`pipeline/templates/report.html`.
"""

from __future__ import annotations

import base64
import csv
import time
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import jinja2

from features.atomic import read_optional_json, write_text
from features.data import SPLITS, ImageSet
from pipeline import __version__, plots
from pipeline.advisor.record import CASES
from pipeline.config import Config, config_to_dict, dump_toml
from pipeline.inputs import load_images
from pipeline.layout import ModelFiles
from pipeline.models import CodesModel, TrainedModel, load_model, select_model

SAMPLES_PER_CLASS = 6
MISTAKES_SHOWN = 10


def write(cfg: Config) -> Path:
    """Render `<run.out>/report.html` about the selected model.

    Raises:
        StageInputError: no trained model under run.out.
    """
    layout = cfg.layout
    model = load_model(select_model(layout, cfg.run.model))
    images = load_images(cfg)
    run = _run_of(layout.summary, model)
    context = {
        "title": f"{model.record['backbone']['name']} on {cfg.data.root.name}",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "out": str(layout.root),
        "version": __version__,
        "headline": _headline(model, run),
        "model": {
            "kind": model.kind,
            "title": model.title,
            "folder": str(model.files.folder),
        },
        **_data(cfg, images),
        "advice": _json(layout.advice),
        **_sweep(cfg, model),
        **_training(model),
        "metrics": _json(model.files.metrics),
        "confusion_png": _png(model.files.confusion),
        "misclassified": _mistakes(model.files.misclassified),
        "export": _json(model.files.export_summary),
        "timings": run.get("timings", {}),
        "reused": run.get("reused", []),
        "config": dump_toml(config_to_dict(cfg)),
    }
    template = _environment().get_template("report.html")
    write_text(layout.report, template.render(**context))
    return layout.report


def _run_of(summary: Path, model: TrainedModel) -> dict[str, Any]:
    """run.json, when `quadrant run` made this very model; else nothing."""
    run = _json(summary) or {}
    made = run.get("model", {})
    if (
        made.get("kind") == model.kind
        and made.get("created") == model.record["created"]
    ):
        return dict(run)
    return {}


def _headline(model: TrainedModel, run: dict[str, Any]) -> str:
    if "case" in run:
        case = f"Case {run['case']}: {CASES[int(run['case'])]}"
        if run.get("chosen_by") == "run.strategy":
            # NOTE: a forced case has no measurement behind "small, different".
            return (
                f"{case}, as set by run.strategy = {run.get('strategy')!r} (the "
                "advisor did not measure size or similarity)"
            )
        return f"{case}, chosen by the advisor"
    made_by = "quadrant train" if model.kind == "codes" else "quadrant finetune"
    return f"Model: {model.title} (made by `{made_by}`)"


def _environment() -> jinja2.Environment:
    source = package_files("pipeline").joinpath("templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(source)),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.ChainableUndefined,
    )


def _json(path: Path) -> Any:
    return read_optional_json(path, fix="run the command that writes it again")


def _png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _sweep(cfg: Config, model: TrainedModel) -> dict[str, Any]:
    """The layer sweep, when it probed the codes this model was trained on."""
    sweep = _json(cfg.layout.sweep_json)
    if not isinstance(model, CodesModel) or sweep is None:
        return {"sweep": None}
    if sweep.get("key") != model.record["codes"]["cache_key"]:
        return {"sweep": None}
    return {"sweep": sweep, "sweep_png": _png(cfg.layout.sweep_plot)}


def _training(model: TrainedModel) -> dict[str, Any]:
    files: ModelFiles = model.files
    if isinstance(model, CodesModel):
        data = _json(files.train_summary)
        # The layer and pooling are the codes' (train.json is the model record).
        train = (
            None
            if data is None
            else {**data, **data["codes"], "cv_score": data["cv"]["best_score"]}
        )
        return {"train": train, "train_png": _png(files.train_plot)}
    return {
        "finetune": _json(files.history_json),
        "finetune_title": model.title,
        "curves_png": _png(files.curves),
    }


def _data(cfg: Config, images: ImageSet) -> dict[str, Any]:
    counts = images.counts()
    rows = [(name, [counts[s][name] for s in SPLITS]) for name in images.label_names]
    summary = _json(cfg.layout.extract_summary) or {}
    skipped = summary.get("skipped") or [
        {"path": s.path, "reason": s.reason} for s in images.skipped
    ]
    grid = plots.sample_grid(_samples(images), cfg.layout.samples)
    return {
        "splits": SPLITS,
        "counts": rows,
        "totals": [sum(c.values()) for c in (counts[s] for s in SPLITS)],
        "skipped": skipped,
        "samples": _png(grid),
    }


def _samples(images: ImageSet) -> dict[str, list[Path]]:
    by_class: dict[str, list[Path]] = {name: [] for name in images.label_names}
    for record in images.records:
        name = images.label_names[record.label]
        if record.split == "train" and len(by_class[name]) < SAMPLES_PER_CLASS:
            by_class[name].append(images.absolute(record))
    return by_class


def _mistakes(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = []
        for row in csv.DictReader(handle):
            rows.append(row)
            if len(rows) == MISTAKES_SHOWN:
                break
    return rows
