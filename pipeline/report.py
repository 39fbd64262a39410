"""`report.html`: one self-contained page per run, plots embedded.

Everything is read back from the files the stages wrote under run.out
(extract.json, advice.json, sweep.json, train.json, finetune.json,
metrics.json, export.json and the PNGs), so the report shows exactly what was
measured. The page is rendered with Jinja2 (autoescaped) from
`pipeline/templates/report.html`.
"""

from __future__ import annotations

import base64
import csv
import json
import time
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from features.cache import atomic_write_text
from features.data import SPLITS, ImageSet
from pipeline import plots
from pipeline.advise import CASES
from pipeline.config import Config, config_to_dict, dump_toml
from pipeline.extract import load_images

SAMPLES_PER_CLASS = 6
MISTAKES_SHOWN = 10


def write(cfg: Config, case: int, timings: dict[str, float], reused: list[str]) -> Path:
    """Render `<run.out>/report.html` from the run's files."""
    out = cfg.run.out
    images = load_images(cfg)
    context = {
        "title": f"{cfg.backbone.name} on {cfg.data.root.name}",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "out": str(out),
        "version": version("quadrant"),
        "case": case,
        "case_text": CASES[case],
        **_data(cfg, images),
        "advice": _json(out / "advice.json"),
        "sweep": _json(out / "sweep.json"),
        "sweep_png": _png(out / "sweep.png"),
        "train": _train(out),
        "train_png": _png(out / "train_cv.png"),
        "finetune": _json(out / "finetune.json"),
        "finetune_title": f"{cfg.backbone.name} ({cfg.finetune.init})",
        "curves_png": _png(out / "training_curves.png"),
        "metrics": _json(out / "metrics.json"),
        "confusion_png": _png(out / "confusion_matrix.png"),
        "misclassified": _mistakes(out / "misclassified.csv"),
        "export": _json(out / "export.json"),
        "timings": timings,
        "reused": reused,
        "config": dump_toml(config_to_dict(cfg)),
    }
    template = _environment().get_template("report.html")
    path = out / "report.html"
    atomic_write_text(path, template.render(**context))
    return path


def _environment() -> jinja2.Environment:
    source = files("pipeline").joinpath("templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(source)),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.ChainableUndefined,
    )


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _train(out: Path) -> dict[str, Any] | None:
    data = _json(out / "train.json")
    if data is None or not (out / "model" / "model.json").is_file():
        return None
    if _json(out / "model" / "model.json").get("kind") == "finetune":
        return None  # a later fine-tune replaced the codes-path model
    return {**data, "cv_score": data["cv"]["best_score"]}


def _data(cfg: Config, images: ImageSet) -> dict[str, Any]:
    counts = images.counts()
    rows = [(name, [counts[s][name] for s in SPLITS]) for name in images.label_names]
    summary = _json(cfg.run.out / "extract.json") or {}
    skipped = summary.get("skipped") or [
        {"path": s.path, "reason": s.reason} for s in images.skipped
    ]
    grid = plots.sample_grid(_samples(images), cfg.run.out / "samples.png")
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
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for row in reader:
            score = row.get("probability", row.get("decision", ""))
            rows.append({**row, "score": score})
            if len(rows) == MISTAKES_SHOWN:
                break
    return rows
