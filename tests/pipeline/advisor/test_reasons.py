"""The reasons in words: each figure with its interval and its threshold."""

from __future__ import annotations

from dataclasses import replace

from features.probes import DomainStatistics
from pipeline.advisor import decide
from pipeline.advisor.reasons import explain, similarity_reason, summary_lines
from tests.pipeline.advisor.test_record import (
    DEPTHS,
    DOMAIN,
    interval,
    similarity,
    size,
)


def test_reasons_give_the_gain_with_its_interval_folds_and_repeats() -> None:
    advice = decide(
        similarity("different", interval(0.052, 0.021, 0.083)),
        replace(size(False), per_class_median=12, per_class_min=10, images=52),
        DEPTHS,
        DOMAIN,
    )
    first, second = explain(advice)[:2]
    assert "median 12 training images per class (min 10, 52 in all) < " in first
    assert "advise.small_per_class = 100" in first
    assert (
        "similarity: different: the best earlier layer layer2 scores +5.2 points "
        "over top [+2.1, +8.3] (97.5% interval, 5 folds x 3 repeats on 120 images"
    ) in second
    assert "its lower end clears advise.top_margin = 1.0 points (+2.1 > 1.0)" in second
    undecided = similarity_reason(similarity("undecided", interval(0.02, -0.01, 0.05)))
    assert "within noise: it straddles advise.top_margin = 1.0 points" in undecided
    assert undecided.endswith("(-1.0 <= 1.0 < +5.0)")
    lines = "\n".join(summary_lines(advice))
    assert "+5.0 [ +2.0,  +8.0]" in lines  # each depth's gain and interval


def test_reasons_of_a_backbone_without_batchnorm_or_classifier() -> None:
    nan = float("nan")
    domain = DomainStatistics(nan, (), nan, nan, nan, 10)
    reasons = explain(
        decide(
            similarity("similar", interval(0.0, -0.01, 0.01)),
            size(False),
            DEPTHS,
            domain,
        )
    )
    assert "none (the backbone has no BatchNorm layers)" in reasons[3]
    assert "the backbone has no classifier of its own" in reasons[4]
