"""The advice record: the case names, what the advisor found, advice.json.

Data only: the measurements live in `similarity` and `size`, their wording in
`reasons`, the stage in `stage`. advice.json has its one writer
(`write_advice`) and its one reader (`read_advice`) here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from features.atomic import read_json, write_json
from features.probes import DomainStatistics, Interval

CASES = {
    1: "small, similar: a linear classifier on the top-layer codes",
    2: "small, different: a linear classifier on codes of an earlier layer",
    3: "large, similar: fine-tune the whole network from the pretrained weights",
    4: "large, different: fine-tune the whole network (pretrained init, or scratch)",
}
VERDICTS = ("similar", "different", "undecided")


@dataclass(frozen=True)
class Depth:
    """One probed depth: its layer and how well its codes serve the task.

    `accuracy` and `std` are the mean and spread over every fold of every
    repeat; `gain` is its paired gain over top with its interval (None for
    top itself).
    """

    layer: str
    dims: int
    accuracy: float
    std: float
    logme: float
    gain: Interval | None = None


@dataclass(frozen=True)
class Similarity:
    """The similarity verdict and the paired evidence behind it.

    Attributes:
        verdict: "similar", "different" or "undecided".
        best_layer: the earlier layer with the highest mean probe accuracy.
        gain: its accuracy minus top's on the same folds, with the interval
            the verdict reads (at the Bonferroni level for `layers` earlier
            layers, so that picking the best of them keeps the overall level
            at `confidence`).
        margin: advise.top_margin.
        confidence: advise.confidence (family-wise over the earlier layers).
        folds, repeats: the cross-validation the gain rests on.
        images: training images in the probe's sample.
        layer: the depth the codes path trains on: top when similar, else the
            best earlier layer (undecided: the cheaper one, which stops the
            network earlier).
        code: (layer, pooling) of that depth in the code cache.
    """

    verdict: str
    best_layer: str
    gain: Interval
    margin: float
    confidence: float
    folds: int
    repeats: int
    images: int
    layers: int
    layer: str
    code: tuple[str, str]


@dataclass(frozen=True)
class CurvePoint:
    """Validation accuracy after training on (or processing) `images` images."""

    images: int
    accuracy: float


@dataclass(frozen=True)
class Reference:
    """What the codes path will deliver: its tuned classifier on the advised layer.

    Attributes:
        layer: the layer/pooling it trains on.
        classifier: the scikit-learn classifier (train.classifier).
        C: the inverse regularisation its cross-validation chose from train.C.
        cv: its cross-validated accuracy on the training images, mean and
            interval over the folds.
        val_accuracy: refitted on every training image, its validation
            accuracy (the fine-tune pilots are set against it image by image).
        seconds: the tuning and the refit.
    """

    layer: str
    classifier: str
    C: float
    cv: Interval
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class Pilot:
    """One budgeted pilot fine-tune and how it compares.

    Attributes:
        name: the candidate it pilots, e.g. "pretrained 32 px".
        settings: the fine-tune's settings it runs with (config keys).
        init: "pretrained" or "scratch".
        budget, images, full: training images allowed, processed, and
            processed by the full fine-tune.
        share: images / full.
        epochs: whole epochs it completed.
        seconds: its wall time.
        curve: validation accuracy along the pilot (the last point is its end).
        accuracy: its validation accuracy at the end, on `versus`'s images.
        forecast: the accuracy forecast at the full budget, with its interval
            (forecast_low, forecast_high); None when too few validation points
            follow the warm-up, and the measured pilot alone decides.
        forecast_points: the pilot's points the forecast rests on.
        versus: its accuracy minus the reference's (the codes path's tuned
            classifier) on the same validation images.
        reference: what its forecast must pass by the margin: the codes
            path's validation accuracy.
        resumable: the full fine-tune can continue its checkpoint.
        folder: its run folder.
        images_per_second: its training images per second (data loading
            included), the unit cost of the full fine-tune.
    """

    name: str
    settings: dict[str, Any]
    init: str
    budget: int
    images: int
    full: int
    share: float
    epochs: int
    seconds: float
    curve: tuple[CurvePoint, ...]
    accuracy: float
    forecast: float | None
    forecast_low: float | None
    forecast_high: float | None
    forecast_points: int
    versus: Interval
    reference: float
    resumable: bool
    folder: str
    images_per_second: float

    def wins(self, margin: float) -> str | None:
        """Why it beats the codes path ("ahead", "forecast"), or None.

        Ahead: the paired interval against the reference is above 0.
        Forecast: the forecast passes the reference by more than the margin,
        and its interval's lower end stays within the margin below it (a
        forecast that could as well end behind the codes path does not win).
        Without a forecast the measured pilot alone decides.
        """
        if self.versus.low > 0:
            return "ahead"
        if (
            self.forecast is not None
            and self.forecast_low is not None
            and self.forecast - self.reference > margin
            and self.forecast_low >= self.reference - margin
        ):
            return "forecast"
        return None

    @property
    def expected(self) -> float:
        """The full fine-tune's expected accuracy: the forecast, else the pilot's."""
        return self.forecast if self.forecast is not None else self.accuracy


@dataclass(frozen=True)
class Size:
    """The size evidence and the verdict: fine-tune, or the codes path.

    Attributes:
        images, per_class_median, per_class_min: training images.
        floor: advise.small_per_class.
        measured: above the floor, so the curve, the reference and the
            pilots ran.
        layer: the codes path's layer.
        frozen_curve: the tuned classifier's validation accuracy trained on
            1/4, 1/2 and all training images.
        frozen_gain: all minus 1/2, paired on the validation images.
        reference: the codes path's tuned classifier (None below the floor).
        pilots: the fine-tune candidates piloted, in the order they ran.
        finetune: the verdict: a piloted fine-tune beats the codes path.
        rule: which rule decided ("floor", "ahead", "forecast", "codes").
    """

    images: int
    per_class_median: float
    per_class_min: int
    floor: int
    measured: bool
    layer: str
    frozen_curve: tuple[CurvePoint, ...]
    frozen_gain: Interval | None
    reference: Reference | None
    pilots: tuple[Pilot, ...]
    finetune: bool
    rule: str

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.pilots)

    def pilot(self, name: str) -> Pilot | None:
        """The pilot of the candidate `name`, if it ran."""
        return next((p for p in self.pilots if p.name == name), None)


@dataclass(frozen=True)
class Candidate:
    """One way to run the job, with what it is expected to give and to cost.

    Attributes:
        name: "codes on _blocks.9/avg", "fine-tune pretrained 32 px" ...
        path: "codes" or "finetune".
        settings: the config keys that run it (train.layer, finetune.input_size
            ...).
        accuracy, low, high: its expected accuracy and interval; None when
            it was not measured (a pilot would have cost more than the advice
            may spend).
        basis: how the expectation was measured, in words.
        seconds: its expected wall time after the advice: training, then
            evaluation and export.
        fits: whether it fits what is left of run.budget.
    """

    name: str
    path: str
    settings: dict[str, Any]
    accuracy: float | None
    low: float | None
    high: float | None
    basis: str
    seconds: float
    fits: bool


@dataclass(frozen=True)
class Advice:
    """The case, the evidence behind it, and the settings to run it with.

    `candidates` are every way the advisor weighed, best first; `chosen` is
    the name of the one it picked (the best expected accuracy that fits
    `budget` seconds, a fine-tune only where it beats the codes path).
    """

    case: int
    similarity: Similarity
    size: Size
    depths: tuple[Depth, ...]
    logme_best_layer: str
    domain: DomainStatistics
    settings: dict[str, Any]
    seconds: dict[str, float]
    candidates: tuple[Candidate, ...] = ()
    chosen: str = ""
    budget: float | None = None

    @property
    def large(self) -> bool:
        return self.size.finetune

    @property
    def similar(self) -> bool:
        return self.similarity.verdict != "different"

    def reasons(self) -> list[str]:
        """The evidence in sentences: `pipeline.advisor.reasons.explain`."""
        # NOTE: the wording lives in reasons.py, which imports these records:
        # hence the import here, not at the top.
        from pipeline.advisor.reasons import explain

        return explain(self)


# ---------------------------------------------------------------------------
# advice.json


def write_advice(
    path: Path,
    advice: Advice,
    *,
    reasons: list[str],
    config: dict[str, Any],
    stamp: str,
) -> Path:
    """Write `advice` with its case's description, reasons, config and stamp.

    Args:
        path: the record (`<run.out>/advice.json`).
        advice: what the advisor decided.
        reasons: the evidence in sentences.
        config: the whole configuration, as a dict.
        stamp: what the advice was made from (`stage.advice_stamp`).
    """
    data = asdict(advice)
    data["description"] = CASES[advice.case]
    data["reasons"] = reasons
    data["config"] = config
    data["stamp"] = stamp
    return write_json(path, data)


def read_advice(path: Path) -> Advice:
    """The Advice an advice.json holds."""
    data = read_json(path, fix="run `quadrant advise` again")
    sim = data["similarity"]
    return Advice(
        int(data["case"]),
        Similarity(
            **{**sim, "gain": _interval(sim["gain"]), "code": tuple(sim["code"])}
        ),
        _size(data["size"]),
        tuple(
            Depth(**{**d, "gain": _interval(d["gain"]) if d["gain"] else None})
            for d in data["depths"]
        ),
        data["logme_best_layer"],
        DomainStatistics(
            **{
                **data["domain"],
                "bn_shift_layers": tuple(data["domain"]["bn_shift_layers"]),
            }
        ),
        dict(data["settings"]),
        dict(data["seconds"]),
        tuple(Candidate(**c) for c in data["candidates"]),
        data["chosen"],
        data["budget"],
    )


def _interval(data: dict[str, Any]) -> Interval:
    return Interval(**data)


def _curve(data: list[dict[str, Any]]) -> tuple[CurvePoint, ...]:
    return tuple(CurvePoint(**c) for c in data)


def _pilot(data: dict[str, Any]) -> Pilot:
    return Pilot(
        **{**data, "curve": _curve(data["curve"]), "versus": _interval(data["versus"])}
    )


def _reference(data: dict[str, Any] | None) -> Reference | None:
    return None if data is None else Reference(**{**data, "cv": _interval(data["cv"])})


def _size(data: dict[str, Any]) -> Size:
    gain = data["frozen_gain"]
    return Size(
        **{
            **data,
            "frozen_curve": _curve(data["frozen_curve"]),
            "frozen_gain": _interval(gain) if gain else None,
            "reference": _reference(data["reference"]),
            "pilots": tuple(_pilot(p) for p in data["pilots"]),
        }
    )
