"""Saving and loading trained scikit-learn classifiers ("heads") without pickle.

A head is a fitted scikit-learn `Pipeline` (preprocessing steps, then `clf`)
stored with skops (`skops.io`), scikit-learn's own safe format: loading
rebuilds the objects from a schema and refuses any type outside an explicit
trusted list, so a planted file cannot run code. pickle and joblib run
whatever a file tells them to on load, so quadrant neither writes nor reads
them for models.

Every head is saved with a few code rows and their scores: loading predicts
them again and refuses a head that no longer gives the same scores (a
scikit-learn upgrade that changed a format, a file edited by hand).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from features.atomic import atomic_path
from features.errors import CacheMismatchError, StageInputError

# NOTE: skops trusts scikit-learn's estimators and numpy/scipy containers by
# default and nothing else; quadrant adds no type of its own to that list, so
# a head file holding anything but those is refused before it is loaded.
TRUSTED_TYPES: tuple[str, ...] = ()
PROBE_ROWS = 16  # code rows whose scores are pinned with the saved head


@dataclass(frozen=True)
class Scores:
    """A model's class scores for a batch, and what kind of numbers they are.

    Attributes:
        values: (N, K) scores; column k is the evidence for class k.
        labels: (N,) the predicted class index.
        kind: "probability" (rows sum to 1) or "margin" (decision values).
    """

    values: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    kind: str

    def chosen(self) -> npt.NDArray[np.float64]:
        """The score of the predicted class of each row."""
        return self.values[np.arange(len(self.labels)), self.labels]


def score_kind(pipeline: Pipeline) -> str:
    """ "probability" for logistic regression, "margin" for every other head.

    NOTE: SGD's one-vs-rest probabilities saturate (ties at 1.0 pick labels
    arbitrarily), so SGD heads report decision values, like the SVMs.
    """
    clf = pipeline.steps[-1][1]
    return "probability" if isinstance(clf, LogisticRegression) else "margin"


def head_scores(pipeline: Pipeline, codes: npt.NDArray[Any]) -> Scores:
    """The head's scores on code rows, one column per class.

    Labels come from `predict`, not from the scores' argmax: saturated
    probabilities can tie, and argmax over ties picks the wrong class. Column
    k is class k: the train stage fits every head on all classes 0..K-1.
    """
    kind = score_kind(pipeline)
    if kind == "probability":
        values = pipeline.predict_proba(codes)
    else:
        values = pipeline.decision_function(codes)
        if values.ndim == 1:  # binary: the margin of class 1, as two columns
            values = np.stack([-values, values], axis=1)
    labels = np.asarray(pipeline.predict(codes), dtype=np.int64)
    return Scores(np.asarray(values, dtype=np.float64), labels, kind)


def save_head(
    path: Path, pipeline: Pipeline, probe: npt.NDArray[np.floating[Any]]
) -> dict[str, Any]:
    """Write the head to `path` (skops); return what pins it, for the model record.

    Args:
        path: the file to write (atomically).
        pipeline: the fitted scikit-learn pipeline.
        probe: a few code rows; their scores are recorded and checked on load.
    """
    import sklearn
    import skops.io as sio

    probe = np.ascontiguousarray(probe[:PROBE_ROWS])
    with atomic_path(path) as tmp:
        sio.dump({"pipeline": pipeline, "probe": probe}, tmp)
    return {
        "file": Path(path).name,
        "format": "skops",
        "sklearn": sklearn.__version__,
        "probe_scores": head_scores(pipeline, probe).values.tolist(),
    }


def load_head(path: Path, pinned: dict[str, Any]) -> Pipeline:
    """Load a head written by `save_head` and check it still scores as saved.

    Args:
        path: the skops file.
        pinned: what `save_head` returned (kept in the model record).

    Raises:
        StageInputError: the file is missing.
        CacheMismatchError: the file holds types outside the trusted list, is
            not a head, or no longer predicts what it predicted when saved.
    """
    import sklearn
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise StageInputError(
            f"{path} not found; run `quadrant train` to train the model again"
        )
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as err:  # zip, JSON and schema errors all mean "not a head"
        raise CacheMismatchError(
            f"{path} is not a readable skops file ({type(err).__name__}: {err}); "
            "run `quadrant train` again"
        ) from err
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise CacheMismatchError(
            f"{path} holds types quadrant does not load ({', '.join(refused)}): it "
            "was not written by quadrant. Delete it and run `quadrant train` again."
        )
    stored = sio.load(path, trusted=list(TRUSTED_TYPES))
    pipeline, probe = _unpack(stored, path)
    saved = np.asarray(pinned["probe_scores"])
    now = head_scores(pipeline, probe).values
    if now.shape != saved.shape or not np.allclose(now, saved, rtol=1e-5, atol=1e-6):
        raise CacheMismatchError(
            f"the head in {path} no longer predicts what it predicted when saved "
            f"(scikit-learn {pinned.get('sklearn')} then, {sklearn.__version__} "
            "now, or an edited file); run `quadrant train` again"
        )
    return pipeline


def _unpack(stored: Any, path: Path) -> tuple[Pipeline, npt.NDArray[Any]]:
    if (
        not isinstance(stored, dict)
        or not isinstance(stored.get("pipeline"), Pipeline)
        or not isinstance(stored.get("probe"), np.ndarray)
    ):
        raise CacheMismatchError(
            f"{path} is not a quadrant head; run `quadrant train` again"
        )
    return stored["pipeline"], stored["probe"]


def check_label_names(trained: Sequence[str], found: Sequence[str], fix: str) -> None:
    """Refuse data whose classes are not the ones a model was trained on.

    Raises:
        CacheMismatchError: naming both class lists and the fix.
    """
    if tuple(trained) != tuple(found):
        raise CacheMismatchError(
            f"the model was trained on classes {list(trained)}, the data has "
            f"{list(found)}; {fix}"
        )
