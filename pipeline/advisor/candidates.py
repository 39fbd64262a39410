"""Every way to run the job, with its expected accuracy and its expected time.

The advisor's answer is a table, not a case number alone: the codes path on
the advised layer (and on top), and fine-tuning by init, input size and how
much of the network trains (`finetune_options`), each with an expected
accuracy interval (cross-validation for the codes path, the pilot and its
forecast for a fine-tune) and an expected wall time on this machine, from
unit costs measured while advising (`unit_costs`: seconds per image of the
extraction, images per second of a training step at each candidate's input
size). `choose` takes the best expected accuracy that fits what is left of
`run.budget`, a fine-tune only where its pilot beats the codes path; the
table also says what a larger budget would buy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from features.backbones import Backbone, fixed_input_size
from features.data import ImageSet
from features.errors import TrainingError
from features.layers import TOP
from pipeline.advisor.record import Candidate, Depth, Pilot, Similarity, Size
from pipeline.advisor.size import FinetuneOption, finetune_keys
from pipeline.config import Config
from pipeline.finetune import StepRate, native_side, step_rate

log = logging.getLogger(__name__)

# A training step on random pixels leaves the data loading out; on two CPU
# cores the fine-tune's real rate (decoding and augmentation in a worker
# beside it) was about 0.85 of it on the digits at 32 px. A pilot measures
# the real rate, which replaces this guess for every candidate.
LOADER_SHARE = 0.85
# Export (ONNX, checker, parity) and the report, measured at 10-25 s for
# EfficientNet-Lite0 on two CPU cores.
EXPORT_SECONDS = 20.0


@dataclass(frozen=True)
class Costs:
    """Unit costs measured while advising.

    Attributes:
        counts: images per split (train, val, test).
        extract_per_image: seconds per image of the codes' extraction.
        extracted: whether every image's codes are cached already.
        rates: each fine-tune option's step rate, by key.
    """

    counts: dict[str, int]
    extract_per_image: float
    extracted: bool
    rates: dict[str, StepRate]


def input_sizes(native: float, backbone_size: int) -> list[int]:
    """Input sizes worth fine-tuning at: the backbone's, and for small images
    the smallest multiple of 32 at least twice their side.

    NOTE: small native images (8x8 digits, 28x28 scans) need not be blown up
    to 224 px: on the digits, EfficientNet-Lite0 fine-tuned at 32 px reached
    0.992 test accuracy in 126 s on two CPU cores (docs/benchmarks.md).
    """
    small = 32 * math.ceil(2 * native / 32) if math.isfinite(native) else backbone_size
    return sorted({min(small, backbone_size), backbone_size})


def finetune_options(
    cfg: Config, backbone: Backbone, images: ImageSet, similarity: Similarity
) -> list[dict[str, Any]]:
    """The fine-tune candidates' settings: init, input size, frozen prefix.

    From the pretrained weights at each of `input_sizes`; at the smallest,
    also partly frozen (trained from the best earlier layer, between the
    codes path of case 2 and a whole fine-tune), and, when the data is
    different, from scratch.
    """
    sizes = input_sizes(native_side(images), backbone.preprocessing.input_size)
    if fixed_input_size(backbone.name, backbone.weights) is not None:
        sizes = [backbone.preprocessing.input_size]
    options = [{"finetune.init": "pretrained", "finetune.input_size": s} for s in sizes]
    small = sizes[0]
    # NOTE: a depth's name is its layer, with the pooling when not plain.
    layer = similarity.best_layer.split("/")[0]
    if layer != TOP:
        options.append(
            {
                "finetune.init": "pretrained",
                "finetune.input_size": small,
                "finetune.train_from": layer,
            }
        )
    if similarity.verdict == "different":
        options.append({"finetune.init": "scratch", "finetune.input_size": small})
    return options


def option_name(settings: dict[str, Any]) -> str:
    """ "fine-tune pretrained 32 px", "... from _blocks.9", "train from scratch ..."."""
    size = settings["finetune.input_size"]
    if settings["finetune.init"] == "scratch":
        return f"train from scratch {size} px"
    name = f"fine-tune pretrained {size} px"
    if settings.get("finetune.train_from"):
        name += f" from {settings['finetune.train_from']}"
    return name


def option_key(settings: dict[str, Any]) -> str:
    """The option's folder name under <run.out>/advise/."""
    key = f"{settings['finetune.init']}-{settings['finetune.input_size']}"
    if settings.get("finetune.train_from"):
        key += "-from-" + settings["finetune.train_from"].replace(".", "_")
    return key


def unit_costs(
    cfg: Config,
    images: ImageSet,
    options: list[dict[str, Any]],
    *,
    extract_per_image: float,
    extracted: bool,
) -> Costs:
    """Time a few training steps of each option; gather the unit costs.

    An option whose training step would not fit in memory gets no rate: it
    is left out of the advice, and the log says why.
    """
    counts = {s: sum(c.values()) for s, c in images.counts().items()}
    rates = {}
    for settings in options:
        ocfg = replace(cfg, finetune=replace(cfg.finetune, **finetune_keys(settings)))
        try:
            rates[option_key(settings)] = step_rate(ocfg, len(images.label_names))
        except TrainingError as err:
            log.warning("advise: %s left out: %s", option_name(settings), err)
            continue
        log.info(
            "advise: %s: %.1f training images/s, %.1f inference images/s "
            "(compute only)",
            option_name(settings),
            rates[option_key(settings)].train,
            rates[option_key(settings)].infer,
        )
    return Costs(counts, extract_per_image, extracted, rates)


def finetune_seconds(
    cfg: Config, costs: Costs, key: str, *, measured_rate: float | None = None
) -> float:
    """Expected wall time of a whole fine-tune: probe head, epochs, evaluation,
    export. `measured_rate` (a pilot's, data loading included) replaces the
    compute-only training rate."""
    rate, n = costs.rates[key], costs.counts
    epochs = cfg.finetune.epochs
    if measured_rate:
        train = epochs * n["train"] / measured_rate
    else:
        train = epochs * (
            n["train"] / (LOADER_SHARE * rate.train) + n["val"] / rate.infer
        )
    probe = 2 * (n["train"] + n["val"]) / rate.infer if cfg.finetune.probe_head else 0
    return probe + train + n["test"] / rate.infer + EXPORT_SECONDS


def options_with_costs(
    cfg: Config, options: list[dict[str, Any]], costs: Costs
) -> list[FinetuneOption]:
    """The options with their expected full and pilot wall times, cheapest first."""
    made = []
    for settings in options:
        key = option_key(settings)
        if key not in costs.rates:
            continue  # left out: its step does not fit in memory
        full = finetune_seconds(cfg, costs, key)
        pilot = cfg.advise.pilot_share * (full - EXPORT_SECONDS)
        made.append(FinetuneOption(option_name(settings), key, settings, full, pilot))
    return sorted(made, key=lambda o: o.seconds)


def codes_seconds(costs: Costs, size: Size) -> float:
    """Expected wall time of the codes path: what is left to extract, the
    classifier's tuning and refit, evaluation and export."""
    n = costs.counts
    extract = 0.0 if costs.extracted else costs.extract_per_image * sum(n.values())
    fit = size.reference.seconds if size.reference is not None else 5.0
    return extract + fit + EXPORT_SECONDS


# ---------------------------------------------------------------------------
# The table and the choice


def weigh(
    cfg: Config,
    depths: tuple[Depth, ...],
    similarity: Similarity,
    size: Size,
    options: list[FinetuneOption],
    costs: Costs,
    *,
    left: float,
) -> tuple[Candidate, ...]:
    """Every candidate with its expected accuracy and time, best first.

    `left` is what run.budget leaves after the advice (inf: no budget).
    """
    candidates = [
        *_codes_candidates(depths, similarity, size, costs, left),
        *(_finetune_candidate(cfg, option, size, costs, left) for option in options),
    ]
    return tuple(
        sorted(
            candidates,
            key=lambda c: (c.accuracy is None, -(c.accuracy or 0.0), c.seconds),
        )
    )


def _codes_candidates(
    depths: tuple[Depth, ...],
    similarity: Similarity,
    size: Size,
    costs: Costs,
    left: float,
) -> list[Candidate]:
    """The codes path on the advised layer, and on top when that is another."""
    seconds = codes_seconds(costs, size)
    advised = similarity.layer
    made = []
    for depth in depths:
        if depth.layer not in (advised, TOP):
            continue
        code = similarity.code if depth.layer == advised else _top_code(similarity)
        mean, low, high, basis = _depth_accuracy(depth, similarity)
        if depth.layer == advised and size.reference is not None:
            r = size.reference
            mean, low, high = r.cv.mean, r.cv.low, r.cv.high
            basis = f"the tuned {r.classifier}'s {r.cv.n}-fold CV (C = {r.C:g})"
        made.append(
            Candidate(
                name=f"codes on {depth.layer}",
                path="codes",
                settings={"train.layer": code[0], "train.pooling": code[1]},
                accuracy=mean,
                low=low,
                high=high,
                basis=basis,
                seconds=seconds,
                fits=seconds <= left,
            )
        )
    return made


def _top_code(similarity: Similarity) -> tuple[str, str]:
    # NOTE: top is flat (pooled by the network) in every backbone quadrant
    # knows, cached as "none"; a transformer's top keeps the cache's pooling.
    return (TOP, similarity.code[1] if similarity.layer == TOP else "none")


def _depth_accuracy(
    depth: Depth, similarity: Similarity
) -> tuple[float, float, float, str]:
    """A probed depth's CV accuracy with a normal interval over its folds."""
    n = similarity.folds * similarity.repeats
    half = 1.96 * depth.std / math.sqrt(n)
    basis = f"a linear probe's {similarity.folds} x {similarity.repeats}-fold CV"
    return depth.accuracy, depth.accuracy - half, min(1.0, depth.accuracy + half), basis


def _finetune_candidate(
    cfg: Config, option: FinetuneOption, size: Size, costs: Costs, left: float
) -> Candidate:
    pilot = size.pilot(option.name)
    if pilot is None:
        why = (
            f"too few images per class (< advise.small_per_class = {size.floor})"
            if not size.measured
            else f"its pilot (about {option.pilot_seconds:.0f} s) did not fit the "
            "advice's share of run.budget"
        )
        return Candidate(
            option.name,
            "finetune",
            dict(option.settings),
            None,
            None,
            None,
            f"not measured: {why}",
            option.seconds,
            option.seconds <= left,
        )
    seconds = _continued_seconds(cfg, option, pilot, costs)
    low, high = _pilot_interval(pilot)
    return Candidate(
        option.name,
        "finetune",
        dict(option.settings),
        pilot.expected,
        low,
        high,
        _pilot_basis(pilot),
        seconds,
        seconds <= left,
    )


def _continued_seconds(
    cfg: Config, option: FinetuneOption, pilot: Pilot, costs: Costs
) -> float:
    """The full fine-tune's time from its pilot's measured rate, less the
    epochs the pilot already trained (the full run continues its checkpoint)."""
    full = finetune_seconds(
        cfg, costs, option.key, measured_rate=pilot.images_per_second or None
    )
    done = pilot.share * (full - EXPORT_SECONDS) if pilot.resumable else 0.0
    return full - done


def _pilot_interval(pilot: Pilot) -> tuple[float, float]:
    if pilot.forecast_low is not None and pilot.forecast_high is not None:
        return pilot.forecast_low, pilot.forecast_high
    v = pilot.versus  # the measured pilot alone: its paired interval's width
    return pilot.accuracy + v.low - v.mean, min(1.0, pilot.accuracy + v.high - v.mean)


def _pilot_basis(pilot: Pilot) -> str:
    done = (
        f"a pilot of {100 * pilot.share:.0f}% ({pilot.images} of {pilot.full} images)"
    )
    if pilot.forecast is None:
        return f"{done}, no forecast (it ended in its warm-up): its own accuracy"
    return f"{done} and its forecast to the full run"


def choose(
    candidates: tuple[Candidate, ...], size: Size, similarity: Similarity, margin: float
) -> Candidate:
    """The best expected accuracy that fits: a fine-tune only where its pilot
    beats the codes path; else the codes path on the advised layer; if nothing
    fits, the cheapest candidate (the log says so)."""
    fitting = [c for c in candidates if c.fits and c.accuracy is not None]
    winners = [
        c
        for c in fitting
        if c.path == "finetune" and (p := size.pilot(c.name)) and p.wins(margin)
    ]
    if winners:
        return max(winners, key=lambda c: c.accuracy or 0.0)
    advised = f"codes on {similarity.layer}"
    codes = [c for c in fitting if c.path == "codes"]
    for candidate in codes:
        if candidate.name == advised:
            return candidate
    if codes:
        return codes[0]
    cheapest = min(candidates, key=lambda c: c.seconds)
    log.warning(
        "nothing fits run.budget: the cheapest is %s (about %.0f s); set "
        "run.budget higher, or 'none'",
        cheapest.name,
        cheapest.seconds,
    )
    return cheapest


def larger_budget(
    candidates: tuple[Candidate, ...], chosen: Candidate
) -> Candidate | None:
    """The best candidate run.budget left out that is expected to do better."""
    better = [
        c
        for c in candidates
        if not c.fits
        and c.accuracy is not None
        and chosen.accuracy is not None
        and c.accuracy > chosen.accuracy
    ]
    return max(better, key=lambda c: c.accuracy or 0.0) if better else None
