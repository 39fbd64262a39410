from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from features.classifiers import ClassifierSpec, build_pipeline, fit_streaming
from features.errors import CacheMismatchError, StageInputError
from features.heads import load_head, save_head


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X[:400].astype(np.float32), y[:400]


SPECS = [
    ClassifierSpec("logistic", ("standardize",)),
    ClassifierSpec("logistic", ("l2", "standardize", "pca"), pca_components=20),
    ClassifierSpec("linear_svm", ("standardize",)),
    ClassifierSpec("svm", ("standardize",)),
    ClassifierSpec("sgd", ("standardize",)),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.classifier}-{len(s.preprocess)}"
)
def test_heads_round_trip_with_identical_predictions(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray], spec: ClassifierSpec
) -> None:
    X, y = digits
    pipeline = build_pipeline(spec).fit(X, y)
    save_head(tmp_path, pipeline, {"classifier": spec.classifier}, X[:16])
    linear = spec.classifier != "svm"
    assert (tmp_path / "model.npz").is_file() == linear
    head = load_head(tmp_path, allow_joblib=not linear)
    np.testing.assert_array_equal(head.pipeline.predict(X), pipeline.predict(X))
    assert head.metadata["classifier"] == spec.classifier


def test_svm_head_needs_joblib_consent(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits
    save_head(
        tmp_path,
        build_pipeline(ClassifierSpec("svm")).fit(X, y),
        {"classifier": "svm"},
        X[:4],
    )
    with pytest.raises(CacheMismatchError, match="only exists as joblib"):
        load_head(tmp_path, allow_joblib=False)


def test_tampered_joblib_is_refused(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits
    save_head(
        tmp_path,
        build_pipeline(ClassifierSpec("svm")).fit(X, y),
        {"classifier": "svm"},
        X[:4],
    )
    with open(tmp_path / "model.joblib", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CacheMismatchError, match="sha256 mismatch.*refused"):
        load_head(tmp_path)


def test_changed_arrays_are_detected(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits
    save_head(
        tmp_path,
        build_pipeline(ClassifierSpec()).fit(X, y),
        {"classifier": "logistic"},
        X[:8],
    )
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["probe_scores"][0][0] += 0.5
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(
        CacheMismatchError, match="no longer predicts what it predicted"
    ):
        load_head(tmp_path)


def test_missing_model_says_to_train(tmp_path: Path) -> None:
    with pytest.raises(StageInputError, match="run `quadrant train` first"):
        load_head(tmp_path)


def test_streaming_sgd_learns_from_shuffled_blocks(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    X, y = digits
    order = np.argsort(y, kind="stable")  # class-sorted, as rows sit in a cache
    X, y = X[order], y[order]

    def chunks(rng: np.random.Generator | None):  # type: ignore[no-untyped-def]
        rows = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
        for start in range(0, len(y), 50):
            block = rows[start : start + 50]
            yield X[block], y[block]

    pipeline = build_pipeline(ClassifierSpec("sgd"))
    fit_streaming(pipeline, chunks, np.arange(10), epochs=5, seed=0)
    assert (pipeline.predict(X) == y).mean() > 0.9
    scaler = pipeline.named_steps["standardize"]
    np.testing.assert_allclose(scaler.mean_, X.mean(axis=0), rtol=1e-4, atol=1e-4)
