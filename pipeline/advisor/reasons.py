"""The advice in words: each reason with its figure, its interval, its threshold.

`explain` gives the sentences advice.json keeps; `summary_lines` is what
`quadrant advise` prints; `announce` logs the case as soon as it is decided.
"""

from __future__ import annotations

import logging
import math

from features.probes import DomainStatistics
from pipeline.advisor.record import CASES, Advice, Pilot, Similarity, Size

log = logging.getLogger(__name__)


def explain(advice: Advice) -> list[str]:
    """The evidence in sentences, each with its figure and threshold."""
    return [
        size_reason(advice.size, advice.similarity.margin),
        similarity_reason(advice.similarity),
        f"LogME ranks {advice.logme_best_layer} first",
        _bn_shift_reason(advice.domain),
        _confidence_reason(advice.domain),
    ]


def similarity_reason(s: Similarity) -> str:
    """The similarity verdict in one sentence with its figures."""
    g = s.gain
    low, high, margin = 100 * g.low, 100 * g.high, 100 * s.margin
    what, cmp = {
        "different": ("its lower end clears", f"{low:+.1f} > {margin:.1f}"),
        "similar": ("its upper end stays within", f"{high:+.1f} <= {margin:.1f}"),
        "undecided": (
            "both within noise: it straddles",
            f"{low:+.1f} <= {margin:.1f} < {high:+.1f}",
        ),
    }[s.verdict]
    return (
        f"similarity: {s.verdict}: the best earlier layer {s.best_layer} scores "
        f"{100 * g.mean:+.1f} points over top [{low:+.1f}, {high:+.1f}] "
        f"({100 * g.confidence:.1f}% interval, {s.folds} "
        f"folds x {s.repeats} repeats on {s.images} images, {g.method}); "
        f"{what} advise.top_margin = {margin:.1f} points ({cmp})"
    )


def size_reason(z: Size, margin: float) -> str:
    """The size verdict in one sentence with its figures."""
    head = (
        f"median {z.per_class_median:.0f} training images per class (min "
        f"{z.per_class_min}, {z.images} in all)"
    )
    if not z.measured:
        return (
            f"size: small: {head} < advise.small_per_class = {z.floor}: too few "
            "to fine-tune, no pilot"
        )
    p = z.pilot
    assert p is not None  # measured implies a pilot
    frozen = z.frozen_curve[-1].accuracy
    figures = (
        f"pilot fine-tune ({p.images} of {p.full} images, {100 * p.share:.0f}%): "
        f"val {p.accuracy:.3f}, {100 * p.versus.mean:+.1f} points "
        f"[{100 * p.versus.low:+.1f}, {100 * p.versus.high:+.1f}] against the "
        f"frozen {z.layer} probe ({frozen:.3f}); {_forecast_text(p)}"
    )
    text = f"size: {_size_verdict(z.rule, p, frozen, margin)}: {head}; {figures}"
    if z.scratch is not None:
        text += f"; {_scratch_text(z.scratch)}: {z.init}"
    return text


def _size_verdict(rule: str, p: Pilot, frozen: float, margin: float) -> str:
    """The measured size verdict, by the rule that decided it."""
    return {
        "ahead": "large: fine-tune: the pilot is ahead",
        "forecast": f"large: fine-tune: the forecast's lower end passes the frozen "
        f"codes by {100 * (p.forecast_low - frozen):.1f} > {100 * margin:.1f} points",
        "codes": f"codes path: the pilot is not ahead and its forecast's lower end "
        f"does not pass the frozen codes by more than {100 * margin:.1f} points",
    }[rule]


def _scratch_text(s: Pilot) -> str:
    return (
        f"scratch pilot val {s.accuracy:.3f}, {100 * s.versus.mean:+.1f} "
        f"points [{100 * s.versus.low:+.1f}, {100 * s.versus.high:+.1f}] "
        f"against pretrained, {_forecast_text(s)}"
    )


def _forecast_text(p: Pilot) -> str:
    if p.forecast_points < 2:
        return (
            f"no forecast ({p.forecast_points} validation point(s) after the "
            "warm-up; the pilot's last accuracy stands)"
        )
    return (
        f"forecast at the full budget {p.forecast:.3f} [{p.forecast_low:.3f}, "
        f"{p.forecast_high:.3f}]"
    )


def _bn_shift_reason(domain: DomainStatistics) -> str:
    return "BatchNorm input shift (mean KL to the backbone's running statistics): " + (
        f"{domain.bn_shift:.3f}"
        if math.isfinite(domain.bn_shift)
        else "none (the backbone has no BatchNorm layers)"
    )


def _confidence_reason(domain: DomainStatistics) -> str:
    if not math.isfinite(domain.confidence):
        return (
            "the backbone has no classifier of its own (its confidence is not measured)"
        )
    return (
        f"the backbone's own classifier: mean top-1 probability "
        f"{domain.confidence:.3f}, normalised entropy {domain.entropy:.3f}, "
        f"{domain.classes_used:.1f} of its classes in use"
    )


def announce(advice: Advice) -> None:
    """Log the case and its evidence at INFO, as soon as it is decided."""
    log.info("case %d: %s", advice.case, CASES[advice.case])
    for reason in explain(advice)[:2]:
        log.info("  %s", reason)


# ---------------------------------------------------------------------------
# What `quadrant advise` prints


def summary_lines(advice: Advice) -> list[str]:
    """What `quadrant advise` prints."""
    lines = [f"case {advice.case}: {CASES[advice.case]}"]
    lines += [f"  - {reason}" for reason in explain(advice)]
    lines += _depth_lines(advice)
    lines += _curve_lines(advice.size)
    lines += _settings_lines(advice)
    return lines


def _depth_lines(advice: Advice) -> list[str]:
    """A table of the probed depths: dims, accuracy, gain over top, LogME."""
    lines = [
        "  depth   layer             dims   probe accuracy   gain over top "
        "[interval]      LogME"
    ]
    best = advice.similarity.best_layer
    for i, d in enumerate(advice.depths):
        gain = (
            f"{100 * d.gain.mean:+5.1f} [{100 * d.gain.low:+5.1f}, "
            f"{100 * d.gain.high:+5.1f}]"
            if d.gain
            else " " * 22
        )
        mark = "  <- best earlier" if d.layer == best else ""
        lines.append(
            f"  {i:>5}   {d.layer:<16} {d.dims:>5}   {d.accuracy:.3f} ± "
            f"{d.std:.3f}   {gain}   {d.logme:7.3f}{mark}"
        )
    return lines


def _curve_lines(z: Size) -> list[str]:
    """The frozen learning curve and each pilot's, when measured."""
    if not z.measured:
        return []
    curve = ", ".join(f"{p.images}: {p.accuracy:.3f}" for p in z.frozen_curve)
    lines = [f"  frozen {z.layer} learning curve (val accuracy): {curve}"]
    for p in (z.pilot, z.scratch):
        if p is not None:
            points = ", ".join(f"{c.images}: {c.accuracy:.3f}" for c in p.curve)
            lines.append(
                f"  pilot ({p.init}) {p.seconds:.0f} s, val accuracy: {points}"
            )
    return lines


def _settings_lines(advice: Advice) -> list[str]:
    """The recommended settings, their note, and what the advice cost."""
    settings = ", ".join(
        f"{k} = {v!r}"
        for k, v in advice.settings.items()
        if k not in ("path", "note") and v != ""
    )
    lines = [f"recommended: {settings}"]
    if advice.settings.get("note"):
        lines.append(f"  note: {advice.settings['note']}")
    if advice.seconds:
        cost = ", ".join(f"{k} {v:.1f} s" for k, v in advice.seconds.items())
        lines.append(f"  advice cost: {cost}")
    return lines
