"""The evaluate stage: score the selected trained model on the test split.

Writes, into the model's own folder (`<run.out>/models/<kind>/`):
`metrics.json` (accuracy, balanced accuracy, macro-F1, per-class precision /
recall / F1 / support, the confusion matrix), `confusion_matrix.png` and
`misclassified.csv` (path, true, predicted, score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from features.atomic import write_csv, write_json
from features.codes import load_codes
from features.data import ImageSet
from features.devices import PRECISION_DTYPES, resolve_device, resolve_precision
from features.errors import DataError
from features.heads import Scores
from features.transforms import eval_transform
from pipeline import extract, finetune, plots
from pipeline.config import Config, config_to_dict
from pipeline.inputs import load_images
from pipeline.layout import ModelFiles
from pipeline.models import (
    CodesModel,
    FinetunedModel,
    TrainedModel,
    load_model,
    predict_batches,
    select_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    """Test-split predictions of any model kind, ready to score."""

    y_true: npt.NDArray[np.int64]
    scores: Scores
    paths: npt.NDArray[np.str_]
    label_names: tuple[str, ...]

    @property
    def y_pred(self) -> npt.NDArray[np.int64]:
        return self.scores.labels


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
    """Score the selected model (`run.model`) on the test split of the data.

    The model's own record says which backbone, layer and codes it needs, so
    a model that `quadrant run` trained on its own layer set is evaluated on
    those codes, whatever `[extract]` says now.

    Raises:
        StageInputError: no trained model under run.out.
        CacheMismatchError: the data's classes are not the model's, or its
            files changed since they were written.
        DataError: the test split is empty.
    """
    model = load_model(select_model(cfg.layout, cfg.run.model))
    images = load_images(cfg)
    model.check_labels(images.label_names)
    if not any(r.split == "test" for r in images.records):
        raise DataError(
            "the test split is empty; set data.test_fraction > 0 or add a test/ folder"
        )
    if isinstance(model, CodesModel):
        predictions = _predict_codes(cfg, model, images)
    else:
        assert isinstance(model, FinetunedModel)
        predictions = _predict_finetuned(cfg, model, images)
    return score(cfg, model, predictions)


def _predict_codes(cfg: Config, model: CodesModel, images: ImageSet) -> Predictions:
    """The head's predictions on the test split's codes of the model's layer."""
    cache = extract.codes_for_model(cfg, model, images)
    test = load_codes(cache, model.layer, model.pooling, split="test")
    return Predictions(test.y, model.scores(test.X), test.paths, test.label_names)


def _predict_finetuned(
    cfg: Config, model: FinetunedModel, images: ImageSet
) -> Predictions:
    """The network's predictions on the test split's images."""
    device = resolve_device(cfg.finetune.device)
    prep = model.preprocessing
    dataset = finetune.split_dataset(
        images,
        "test",
        eval_transform(prep),
        prep=prep,
        seed=cfg.run.seed,
        decoding=cfg.data.decoding.for_input(prep),
    )
    loader = finetune.loader(
        dataset,
        batch_size=cfg.finetune.batch_size,
        train=False,
        workers=0,
        pin_memory=False,
        seed=cfg.run.seed,
    )
    amp = PRECISION_DTYPES[resolve_precision(cfg.finetune.precision, device)]
    probs, labels, index = predict_batches(model.network(device), loader, device, amp)
    values = probs.double().numpy()
    paths = np.array([r.path for r in images.records if r.split == "test"])
    return Predictions(
        labels.numpy(),
        Scores(values, values.argmax(1), "probability"),
        paths[index.numpy()],
        images.label_names,
    )


def score(cfg: Config, model: TrainedModel, p: Predictions) -> EvalResult:
    """Compute the metrics of predictions and write them into the model's folder."""
    files = model.files
    _warn_unseen(p)
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
        "model": {"kind": model.kind, "title": model.title, **_identity(model)},
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
        "score_kind": p.scores.kind,
        "config": config_to_dict(cfg),
    }
    write_json(files.metrics, metrics)
    wrong = _write_misclassified(files, p)
    plots.confusion_plot(
        matrix,
        p.label_names,
        files.confusion,
        title=f"{model.title}: accuracy {metrics['accuracy']:.3f}",
    )
    return EvalResult(
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["f1_macro"],
        len(p.y_true),
        wrong,
        files.metrics,
        files.confusion,
        files.misclassified,
    )


def _identity(model: TrainedModel) -> dict[str, str]:
    return {"created": str(model.record["created"]), "stamp": model.record["stamp"]}


def _warn_unseen(p: Predictions) -> None:
    trained = set(np.unique(p.y_pred))
    for label in sorted(set(np.unique(p.y_true)) - trained):
        count = int((p.y_true == label).sum())
        log.warning(
            "class %r has %d test image(s) but was never predicted; if it had no "
            "training images, its test images can only count as errors",
            p.label_names[label],
            count,
        )


def _write_misclassified(files: ModelFiles, p: Predictions) -> int:
    wrong = np.flatnonzero(p.y_true != p.y_pred)
    chosen = p.scores.chosen()
    # Most confident mistakes first: those are the ones worth looking at.
    wrong = wrong[np.argsort(-chosen[wrong], kind="stable")]
    write_csv(
        files.misclassified,
        ["path", "true", "predicted", "score"],
        (
            [
                p.paths[i],
                p.label_names[p.y_true[i]],
                p.label_names[p.y_pred[i]],
                f"{chosen[i]:.6f}",
            ]
            for i in wrong
        ),
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
