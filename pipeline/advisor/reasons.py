"""The advice in words: each reason with its figure, its interval, its threshold.

`explain` gives the sentences advice.json keeps; `summary_lines` is what
`quadrant advise` prints; `announce` logs the case as soon as it is decided.
"""

from __future__ import annotations

import logging
import math

from features.probes import DomainStatistics
from pipeline.advisor.candidates import larger_budget
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
    if not z.measured or z.reference is None:
        return (
            f"size: small: {head} < advise.small_per_class = {z.floor}: too few "
            "to fine-tune, no pilot"
        )
    r = z.reference
    codes = (
        f"the codes path's tuned {r.classifier} (C = {r.C:g}) on {r.layer}: CV "
        f"{r.cv.mean:.3f} [{r.cv.low:.3f}, {r.cv.high:.3f}], val {r.val_accuracy:.3f}"
    )
    if not z.pilots:
        return (
            f"size: codes path: {head}; {codes}; no pilot fine-tune fit the "
            "advice's share of run.budget"
        )
    best = max(z.pilots, key=lambda p: p.expected)
    verdict = _size_verdict(z.rule, best, r.val_accuracy, margin)
    return f"size: {verdict}: {head}; {codes}; {_pilot_text(best)}"


def _pilot_text(p: Pilot) -> str:
    return (
        f"pilot of {p.name} ({p.images} of {p.full} images, {100 * p.share:.0f}%): "
        f"val {p.accuracy:.3f}, {100 * p.versus.mean:+.1f} points "
        f"[{100 * p.versus.low:+.1f}, {100 * p.versus.high:+.1f}] against the codes "
        f"path; {_forecast_text(p)}"
    )


def _size_verdict(rule: str, p: Pilot, codes: float, margin: float) -> str:
    """The measured size verdict, by the rule that decided it."""
    if rule == "forecast" and p.forecast is not None and p.forecast_low is not None:
        return (
            f"large: fine-tune: the forecast passes the codes path by "
            f"{100 * (p.forecast - codes):.1f} > {100 * margin:.1f} points, its "
            f"lower end {100 * (p.forecast_low - codes):+.1f} stays within "
            f"{100 * margin:.1f} below it"
        )
    if rule == "ahead":
        return "large: fine-tune: the pilot is ahead"
    return (
        "codes path: no pilot is ahead, and no forecast passes the codes path by "
        f"more than {100 * margin:.1f} points with its lower end within "
        f"{100 * margin:.1f} below it"
    )


def _forecast_text(p: Pilot) -> str:
    if p.forecast is None or p.forecast_low is None or p.forecast_high is None:
        return (
            f"no forecast ({p.forecast_points} validation point(s) after the "
            "warm-up): the measured pilot alone decides"
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
    """Log the case, its evidence and the candidates weighed, with their
    expected times, at INFO as soon as it is decided (before the long work)."""
    log.info("case %d: %s", advice.case, CASES[advice.case])
    for reason in explain(advice)[:2]:
        log.info("  %s", reason)
    for line in candidate_lines(advice):
        log.info("%s", line)


# ---------------------------------------------------------------------------
# What `quadrant advise` prints


def summary_lines(advice: Advice) -> list[str]:
    """What `quadrant advise` prints."""
    lines = [f"case {advice.case}: {CASES[advice.case]}"]
    lines += [f"  - {reason}" for reason in explain(advice)]
    lines += _depth_lines(advice)
    lines += _curve_lines(advice.size)
    lines += candidate_lines(advice)
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
    """The codes path's learning curve and each pilot's, when measured."""
    if not z.measured:
        return []
    curve = ", ".join(f"{p.images}: {p.accuracy:.3f}" for p in z.frozen_curve)
    lines = [f"  codes path {z.layer} learning curve (val accuracy): {curve}"]
    for p in z.pilots:
        points = ", ".join(f"{c.images}: {c.accuracy:.3f}" for c in p.curve)
        lines.append(f"  pilot of {p.name}, {p.seconds:.0f} s, val accuracy: {points}")
    return lines


def candidate_lines(advice: Advice) -> list[str]:
    """The candidates weighed, best first: expected accuracy and time."""
    if not advice.candidates:
        return []
    budget = (
        "no run.budget"
        if advice.budget is None
        else f"run.budget {duration(advice.budget)}"
    )
    lines = [f"candidates (expected accuracy [interval], expected time; {budget}):"]
    width = max(len(c.name) for c in advice.candidates)
    for c in advice.candidates:
        mark = "*" if c.name == advice.chosen else " "
        accuracy = (
            f"{c.accuracy:.3f} [{c.low:.3f}, {c.high:.3f}]"
            if c.accuracy is not None and c.low is not None and c.high is not None
            else "not measured".ljust(20)
        )
        fits = "" if c.fits else ", over the budget"
        lines.append(
            f"  {mark} {c.name:<{width}}  {accuracy}  {duration(c.seconds):>8}{fits}"
            f"  ({c.basis})"
        )
    lines += _larger_budget_lines(advice)
    return lines


def _larger_budget_lines(advice: Advice) -> list[str]:
    chosen = next((c for c in advice.candidates if c.name == advice.chosen), None)
    if chosen is None or advice.budget is None:
        return []
    better = larger_budget(advice.candidates, chosen)
    if better is None or better.accuracy is None or chosen.accuracy is None:
        return []
    spent = sum(advice.seconds.values())
    need = 60 * math.ceil((spent + better.seconds) * 1.1 / 60)
    return [
        f"  a larger budget: run.budget = '{duration(need, compact=True)}' would "
        f"allow {better.name}: expected {better.accuracy:.3f} "
        f"({100 * (better.accuracy - chosen.accuracy):+.1f} points)"
    ]


def duration(seconds: float, *, compact: bool = False) -> str:
    """Seconds as "45s", "3m 20s", "1h 05m" ("3m", "1h05m" with compact)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60) if compact else int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m" if compact else f"{minutes}m {seconds % 60:02.0f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if compact else f"{hours}h {minutes:02d}m"


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
