"""Saving and loading trained classifiers ("heads") on codes.

A head is saved in a folder:

- `model.json`: what it is and what it expects (classifier, layer, pooling,
  the code cache key, label names, chosen hyper-parameters, library versions,
  the sha256 of the joblib file);
- `model.joblib`: the fitted scikit-learn pipeline (every head);
- `model.npz`: for linear heads (standardize / l2 / PCA, then logistic,
  linear SVM or SGD), the same pipeline as plain arrays, which loads without
  running any code.

joblib (pickle) runs code on load, so `load_head` reads `model.npz` when it
exists and otherwise only a `model.joblib` whose sha256 matches the one
recorded when quadrant wrote it. Loading checks that the rebuilt pipeline
reproduces the predictions recorded at save time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import sklearn
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from features.cache import atomic_write_text, diff_provenance, same_codes
from features.errors import CacheMismatchError, StageInputError

FORMAT = "quadrant-head"
FORMAT_VERSION = 1
_LINEAR = {
    "LogisticRegression": LogisticRegression,
    "LinearSVC": LinearSVC,
    "SGDClassifier": SGDClassifier,
}


@dataclass(frozen=True)
class Head:
    """A trained classifier with what it was trained on."""

    pipeline: Pipeline
    metadata: dict[str, Any]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["label_names"])

    def check_codes(
        self, provenance: Mapping[str, Any], label_names: Sequence[str]
    ) -> None:
        """Refuse codes other than those the head was trained on.

        Codes that differ only in float rounding (another device, precision
        or batch size) are accepted.

        Raises:
            CacheMismatchError: other classes, or codes of another backbone,
                layer set, preprocessing or image set, listing the differences.
        """
        if tuple(label_names) != self.label_names:
            raise CacheMismatchError(
                f"the model was trained on classes {list(self.label_names)}, the "
                f"codes have {list(label_names)}; run `quadrant train` again"
            )
        trained = self.metadata["provenance"]
        if not same_codes(trained, provenance):
            raise CacheMismatchError(
                "the model was trained on other codes than these:\n  "
                + "\n  ".join(diff_provenance(trained, provenance))
                + "\nRun `quadrant train` again (or restore the config it used)."
            )


def save_head(
    folder: Path,
    pipeline: Pipeline,
    metadata: Mapping[str, Any],
    probe: npt.NDArray[np.floating[Any]],
) -> Path:
    """Write the head's files; `probe` (a few code rows) pins its predictions."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"model.joblib.tmp-{id(pipeline)}"
    joblib.dump(pipeline, tmp)
    tmp.replace(folder / "model.joblib")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **metadata,
        "sklearn": sklearn.__version__,
        "joblib_sha256": _sha256(folder / "model.joblib"),
        "probe_scores": _scores(pipeline, probe).tolist(),
    }
    arrays = _linear_arrays(pipeline)
    npz = folder / "model.npz"
    if arrays is not None:
        arrays["probe"] = probe
        with open(folder / "model.npz.tmp", "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        (folder / "model.npz.tmp").replace(npz)
        meta["npz_steps"] = [_step_kind(step) for _, step in pipeline.steps]
    else:
        npz.unlink(missing_ok=True)
        np.save(folder / "probe.npy", probe)
    atomic_write_text(folder / "model.json", json.dumps(meta, indent=2) + "\n")
    return folder


def load_head(folder: Path, *, allow_joblib: bool = True) -> Head:
    """Load a head written by `save_head`, preferring the code-free arrays.

    Raises:
        StageInputError: no model in `folder`.
        CacheMismatchError: the files were changed since quadrant wrote them,
            or the rebuilt model predicts differently than when saved.
    """
    meta_file = folder / "model.json"
    if not meta_file.is_file():
        raise StageInputError(
            f"no trained model in {folder}; run `quadrant train` first"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{meta_file} is not a quadrant model of this version")
    if (folder / "model.npz").is_file():
        pipeline, probe = _from_arrays(folder / "model.npz", meta["npz_steps"])
    elif allow_joblib:
        pipeline, probe = _from_joblib(folder, meta), np.load(folder / "probe.npy")
    else:
        raise CacheMismatchError(
            f"{folder} holds a {meta['classifier']} model, which only exists as "
            "joblib (pickle); load it with allow_joblib=True or use its ONNX export"
        )
    if not np.allclose(
        _scores(pipeline, probe), meta["probe_scores"], rtol=1e-5, atol=1e-6
    ):
        raise CacheMismatchError(
            f"the model in {folder} no longer predicts what it predicted when saved "
            f"(scikit-learn {meta['sklearn']} then, {sklearn.__version__} now?); "
            "run `quadrant train` again"
        )
    return Head(pipeline, meta)


def _from_joblib(folder: Path, meta: Mapping[str, Any]) -> Pipeline:
    file = folder / "model.joblib"
    if _sha256(file) != meta["joblib_sha256"]:
        raise CacheMismatchError(
            f"{file} changed since quadrant wrote it (sha256 mismatch); joblib runs "
            "code on load, so it is refused. Run `quadrant train` again."
        )
    return joblib.load(file)


def _scores(pipeline: Pipeline, X: npt.NDArray[np.floating[Any]]) -> npt.NDArray[Any]:
    if hasattr(pipeline, "predict_proba") and _has_proba(pipeline):
        return np.asarray(pipeline.predict_proba(X))
    return np.asarray(pipeline.decision_function(X))


def _has_proba(pipeline: Pipeline) -> bool:
    clf = pipeline.steps[-1][1]
    return isinstance(clf, LogisticRegression) or getattr(clf, "loss", "") == "log_loss"


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Linear heads as arrays


def _step_kind(step: BaseEstimator) -> str:
    return type(step).__name__


def _linear_arrays(pipeline: Pipeline) -> dict[str, npt.NDArray[Any]] | None:
    arrays: dict[str, npt.NDArray[Any]] = {}
    for i, (_, step) in enumerate(pipeline.steps):
        if isinstance(step, StandardScaler):
            arrays[f"{i}/mean"] = _or_zero(step.mean_, step.n_features_in_)
            arrays[f"{i}/scale"] = _or_one(step.scale_, step.n_features_in_)
        elif isinstance(step, Normalizer):
            arrays[f"{i}/norm"] = np.array(step.norm)
            arrays[f"{i}/n_features"] = np.array(step.n_features_in_)
        elif isinstance(step, PCA) and not step.whiten:
            arrays[f"{i}/components"] = step.components_
            arrays[f"{i}/mean"] = step.mean_
        elif type(step).__name__ in _LINEAR:
            arrays[f"{i}/coef"] = step.coef_
            arrays[f"{i}/intercept"] = np.atleast_1d(step.intercept_)
            arrays[f"{i}/classes"] = step.classes_
        else:
            return None
    return arrays


def _or_zero(value: Any, n: int) -> npt.NDArray[Any]:
    return np.zeros(n) if value is None else np.asarray(value)


def _or_one(value: Any, n: int) -> npt.NDArray[Any]:
    return np.ones(n) if value is None else np.asarray(value)


def _from_arrays(file: Path, kinds: Sequence[str]) -> tuple[Pipeline, npt.NDArray[Any]]:
    with np.load(file, allow_pickle=False) as data:
        steps = [
            (kind.lower(), _rebuild(kind, i, data)) for i, kind in enumerate(kinds)
        ]
        probe = data["probe"]
    steps[-1] = ("clf", steps[-1][1])
    return Pipeline(steps), probe


def _rebuild(kind: str, i: int, data: Any) -> BaseEstimator:
    """Set exactly the fitted attributes scikit-learn reads at predict time."""
    if kind == "StandardScaler":
        step: Any = StandardScaler()
        step.mean_, step.scale_ = data[f"{i}/mean"], data[f"{i}/scale"]
        step.var_ = step.scale_**2
        step.n_features_in_ = len(step.mean_)
        step.n_samples_seen_ = 0
    elif kind == "Normalizer":
        step = Normalizer(norm=str(data[f"{i}/norm"]))
        step.n_features_in_ = int(data[f"{i}/n_features"])
    elif kind == "PCA":
        step = PCA()
        step.components_, step.mean_ = data[f"{i}/components"], data[f"{i}/mean"]
        step.n_components_, step.n_features_in_ = step.components_.shape
        step.explained_variance_ = np.ones(step.n_components_)
    else:
        step = _LINEAR[kind]()
        if kind == "SGDClassifier":
            step.set_params(loss="log_loss")
        step.coef_, step.intercept_ = data[f"{i}/coef"], data[f"{i}/intercept"]
        step.classes_ = data[f"{i}/classes"]
        step.n_features_in_ = step.coef_.shape[1]
    return step
