from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_digits

from features.classifiers import ClassifierSpec, build_pipeline, fit_streaming
from features.errors import CacheMismatchError, StageInputError
from features.heads import head_scores, load_head, save_head
from tests.conftest import Planted


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
def test_every_head_round_trips_without_pickle(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray], spec: ClassifierSpec
) -> None:
    X, y = digits
    pipeline = build_pipeline(spec).fit(X, y)
    pinned = save_head(tmp_path / "head.skops", pipeline, X[:16])
    assert pinned["format"] == "skops" and len(pinned["probe_scores"]) == 16
    head = load_head(tmp_path / "head.skops", pinned)
    np.testing.assert_array_equal(head.predict(X), pipeline.predict(X))
    assert [p.name for p in tmp_path.iterdir()] == ["head.skops"]  # no temporary


def test_scores_name_their_kind_and_give_binary_margins_two_columns(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    X, y = digits
    logistic = build_pipeline(ClassifierSpec("logistic")).fit(X, y)
    scores = head_scores(logistic, X[:5])
    assert scores.kind == "probability" and scores.values.shape == (5, 10)
    np.testing.assert_allclose(scores.values.sum(axis=1), 1.0, rtol=1e-6)
    binary = (y > 4).astype(np.int64)
    svm = build_pipeline(ClassifierSpec("svm")).fit(X, binary)
    scores = head_scores(svm, X[:5])
    margin = svm.decision_function(X[:5])
    assert scores.kind == "margin"
    np.testing.assert_allclose(scores.values, np.stack([-margin, margin], axis=1))
    np.testing.assert_array_equal(scores.labels, svm.predict(X[:5]))
    np.testing.assert_array_equal(scores.chosen(), np.abs(margin))


class _UntrustedType:
    """A type outside the trusted list whose loading would leave a mark."""

    marker: Path | None = None

    def __setstate__(self, state: dict[str, object]) -> None:
        Path(str(state["marker"])).write_text("code ran")


def test_a_planted_type_is_refused_before_anything_is_loaded(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits
    pipeline = build_pipeline(ClassifierSpec("svm")).fit(X, y)
    pinned = save_head(tmp_path / "head.skops", pipeline, X[:4])
    planted = _UntrustedType()
    planted.__dict__["marker"] = str(tmp_path / "ran")
    sio.dump(
        {"pipeline": pipeline, "probe": X[:4], "extra": planted},
        tmp_path / "head.skops",
    )
    with pytest.raises(CacheMismatchError, match="holds types quadrant does not load"):
        load_head(tmp_path / "head.skops", pinned)
    assert not (tmp_path / "ran").exists()


def test_a_pickle_in_place_of_the_head_is_refused_unread(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits
    pinned = save_head(
        tmp_path / "head.skops", build_pipeline(ClassifierSpec()).fit(X, y), X[:4]
    )
    marker = tmp_path / "ran"
    payload = pickle.dumps(Planted(marker))
    (tmp_path / "head.skops").write_bytes(payload)
    with pytest.raises(CacheMismatchError, match="not a readable skops file"):
        load_head(tmp_path / "head.skops", pinned)
    assert not marker.exists()


def test_changed_scores_are_detected(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    X, y = digits
    pinned = save_head(
        tmp_path / "head.skops", build_pipeline(ClassifierSpec()).fit(X, y), X[:8]
    )
    pinned["probe_scores"][0][0] += 0.5
    with pytest.raises(
        CacheMismatchError, match="no longer predicts what it predicted"
    ):
        load_head(tmp_path / "head.skops", pinned)


def test_missing_head_says_to_train(tmp_path: Path) -> None:
    with pytest.raises(StageInputError, match="run `quadrant train`"):
        load_head(tmp_path / "head.skops", {"probe_scores": []})


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
