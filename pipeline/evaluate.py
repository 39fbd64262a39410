"""The evaluate stage: score the trained model on the test split.

Writes `metrics.json` (accuracy, balanced accuracy, macro-F1, per-class
precision / recall / F1 / support, the confusion matrix), `confusion_matrix.png`
and `misclassified.csv` (path, true, predicted, score) under run.out.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from features.cache import atomic_write_text, read_provenance
from features.codes import load_codes
from features.errors import CacheMismatchError, DataError
from features.heads import Head, load_head
from features.transforms import Preprocessing, eval_transform
from pipeline import extract, plots
from pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    """Test-split predictions of any model kind, ready to score."""

    y_true: npt.NDArray[np.int64]
    y_pred: npt.NDArray[np.int64]
    score: npt.NDArray[np.float64]  # the predicted class's probability or margin
    paths: npt.NDArray[np.str_]
    label_names: tuple[str, ...]
    score_kind: str  # "probability" or "decision"


@dataclass(frozen=True)
class EvalResult:
    """Headline test metrics and where the details are."""

    accuracy: float
    balanced_accuracy: float
    f1_macro: float
    n_test: int
    n_misclassified: int
    metrics_path: Path
    confusion_path: Path
    misclassified_path: Path


def run(cfg: Config) -> EvalResult:
    """Score `<run.out>/model` on the test split of the configured data.

    Raises:
        StageInputError: no trained model under run.out.
        CacheMismatchError: the model was trained on other codes or classes.
        DataError: the test split is empty.
    """
    folder = cfg.run.out / "model"
    if _kind(folder) == "finetune":
        predictions, title = predict_finetuned(cfg, folder)
        return score(cfg, predictions, title=title)
    head = load_head(folder)
    predictions = predict_codes(cfg, head)
    return score(
        cfg,
        predictions,
        title=f"{head.metadata['classifier']} on "
        f"{head.metadata['layer']}/{head.metadata['pooling']}",
    )


def _kind(folder: Path) -> str | None:
    meta = folder / "model.json"
    return json.loads(meta.read_text()).get("kind") if meta.is_file() else None


def predict_finetuned(cfg: Config, folder: Path) -> tuple[Predictions, str]:
    """Predict the test split's images with the fine-tuned network."""
    from features.extractor import resolve_device, resolve_precision
    from pipeline import finetune, finetune_data
    from pipeline.extract import load_images

    device = resolve_device(cfg.finetune.device)
    model, meta = finetune.load_model(folder, device)
    images = load_images(cfg)
    if tuple(meta["label_names"]) != images.label_names:
        raise CacheMismatchError(
            f"the model was trained on classes {meta['label_names']}, the data has "
            f"{list(images.label_names)}; run `quadrant finetune` again"
        )
    prep = model_preprocessing(meta)
    dataset = finetune_data.split_dataset(
        images,
        "test",
        eval_transform(prep),
        prep=prep,
        seed=cfg.run.seed,
        max_pixels=cfg.data.max_pixels,
        background=cfg.data.background,
    )
    if len(dataset) == 0:
        raise DataError(
            "the test split is empty; set data.test_fraction > 0 or add a test/ folder"
        )
    loader = finetune_data.loader(
        dataset,
        batch_size=cfg.finetune.batch_size,
        train=False,
        workers=0,
        pin_memory=False,
        seed=cfg.run.seed,
    )
    amp = finetune.AMP[resolve_precision(cfg.finetune.precision, device)]
    probs, labels, index = finetune.predict_loader(model, loader, device, amp)
    predicted = probs.argmax(1)
    paths = np.array([r.path for r in images.records if r.split == "test"])
    title = f"fine-tuned {meta['backbone']} ({meta['init']})"
    chosen = probs[torch.arange(len(predicted)), predicted].numpy()
    predictions = Predictions(
        labels.numpy(),
        predicted.numpy(),
        chosen,
        paths[index.numpy()],
        images.label_names,
        "probability",
    )
    return predictions, title


def model_preprocessing(meta: dict[str, Any]) -> Preprocessing:
    """The preprocessing a fine-tuned model was trained with."""
    return Preprocessing().updated(meta["identity"]["preprocessing"])


def predict_codes(cfg: Config, head: Head) -> Predictions:
    """Predict the test split's codes with a head trained on codes."""
    cache = extract.locate_codes(cfg, cfg.train.codes)
    meta = head.metadata
    test = load_codes(cache, meta["layer"], meta["pooling"], split="test")
    head.check_codes(read_provenance(cache), test.label_names)
    if len(test) == 0:
        raise DataError(
            "the test split is empty; set data.test_fraction > 0 or add a test/ "
            "folder, then run `quadrant extract`"
        )
    pipeline = head.pipeline
    # NOTE: labels come from predict(): saturated probabilities can tie
    # (SGD's sigmoids at 1.0), and argmax over ties picks the wrong class.
    predicted = pipeline.predict(test.X)
    column = np.searchsorted(pipeline.classes_, predicted)
    if meta["classifier"] == "logistic":
        scores, kind = pipeline.predict_proba(test.X), "probability"
    else:
        scores, kind = pipeline.decision_function(test.X), "decision"
    if scores.ndim == 1:  # a binary decision function: the margin of class 1
        scores = np.stack([-scores, scores], axis=1)
    chosen = scores[np.arange(len(predicted)), column]
    return Predictions(test.y, predicted, chosen, test.paths, test.label_names, kind)


def score(cfg: Config, p: Predictions, *, title: str) -> EvalResult:
    """Compute the metrics of predictions and write the files."""
    out = cfg.run.out
    _warn_unseen(cfg, p)
    labels = np.arange(len(p.label_names))
    matrix = confusion_matrix(p.y_true, p.y_pred, labels=labels)
    report = classification_report(
        p.y_true,
        p.y_pred,
        labels=labels,
        target_names=list(p.label_names),
        output_dict=True,
        zero_division=0,
    )
    metrics = {
        "accuracy": float(accuracy_score(p.y_true, p.y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(p.y_true, p.y_pred)),
        "f1_macro": float(
            f1_score(
                p.y_true, p.y_pred, labels=labels, average="macro", zero_division=0
            )
        ),
        "n_test": len(p.y_true),
        "per_class": {name: report[name] for name in p.label_names},
        "confusion_matrix": matrix.tolist(),
        "labels": list(p.label_names),
        "score_kind": p.score_kind,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    wrong = _write_misclassified(out / "misclassified.csv", p)
    plots.confusion_plot(
        matrix,
        p.label_names,
        out / "confusion_matrix.png",
        title=f"{title}: accuracy {metrics['accuracy']:.3f}",
    )
    return EvalResult(
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["f1_macro"],
        len(p.y_true),
        wrong,
        out / "metrics.json",
        out / "confusion_matrix.png",
        out / "misclassified.csv",
    )


def _warn_unseen(cfg: Config, p: Predictions) -> None:
    trained = set(np.unique(p.y_pred))
    for label in sorted(set(np.unique(p.y_true)) - trained):
        count = int((p.y_true == label).sum())
        log.warning(
            "class %r has %d test image(s) but was never predicted; if it had no "
            "training images, its test images can only count as errors",
            p.label_names[label],
            count,
        )


def _write_misclassified(path: Path, p: Predictions) -> int:
    wrong = np.flatnonzero(p.y_true != p.y_pred)
    # Most confident mistakes first: those are the ones worth looking at.
    wrong = wrong[np.argsort(-p.score[wrong], kind="stable")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", p.score_kind])
        for i in wrong:
            writer.writerow(
                [
                    p.paths[i],
                    p.label_names[p.y_true[i]],
                    p.label_names[p.y_pred[i]],
                    f"{p.score[i]:.6f}",
                ]
            )
    return len(wrong)


def summary_lines(result: EvalResult) -> list[str]:
    """What `quadrant evaluate` prints."""
    return [
        f"test images: {result.n_test}",
        f"  accuracy {result.accuracy:.4f}  balanced accuracy "
        f"{result.balanced_accuracy:.4f}  macro-F1 {result.f1_macro:.4f}",
        f"  misclassified: {result.n_misclassified} ({result.misclassified_path})",
        f"  metrics: {result.metrics_path}",
        f"  confusion matrix: {result.confusion_path}",
    ]
