"""Tests for features/limits.py: declared limits and how their errors read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from features.errors import ConfigError
from features.limits import (
    Check,
    Each,
    Interval,
    OneOf,
    Parses,
    Pattern,
    Rule,
    Unique,
    check_limits,
)


@dataclass
class Settings:
    size: Any = 1
    share: Any = 0.5
    mode: Any = "a"
    names: Any = ("x",)
    low: Any = 0
    high: Any = 1


LIMITS = {
    "size": Interval(0, None, closed="neither"),
    "share": Interval(0, 1, closed="left"),
    "mode": OneOf(("a", "b")),
    "names": Unique(Each(OneOf(("x", "y")), empty=False, hint=", e.g. ['x']")),
}
ORDER = (Rule(("low", "high"), lambda lo, hi: lo < hi, "low must be < high"),)

WORDED = [
    ({"size": 0}, r"^\[s\] size must be > 0, got 0$"),
    ({"share": 1.0}, r"^\[s\] share must be in \[0, 1\), got 1.0$"),
    ({"mode": "c"}, r"^\[s\] mode = 'c' is not one of \['a', 'b'\]$"),
    ({"names": ()}, r"^\[s\] names must name at least one, e\.g\. \['x'\]$"),
    ({"names": ("x", "x")}, r"^\[s\] names has duplicates: \['x', 'x'\]$"),
    ({"names": ("z",)}, r"^\[s\] names = 'z' is not one of \['x', 'y'\]$"),
    ({"low": 2}, r"^\[s\] low and high: low must be < high; got low = 2, high = 1$"),
]


@pytest.mark.parametrize("values, message", WORDED)
def test_each_limit_words_the_key_the_value_and_what_is_allowed(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_limits("[s]", Settings(**values), LIMITS, ORDER)


def test_unset_values_are_not_checked() -> None:
    check_limits("[s]", Settings(size=None, mode=None), LIMITS, ORDER)


@pytest.mark.parametrize(
    "limit, text",
    [
        (Interval(1, None), ">= 1"),
        (Interval(None, 5, closed="neither"), "< 5"),
        (Interval(0, 1, closed="right"), "in (0, 1]"),
        (Interval(0.0, 1.0), "in [0.0, 1.0]"),
        (Interval(13, 21, what="an integer"), "an integer in 13..21"),
    ],
)
def test_interval_wording(limit: Interval, text: str) -> None:
    assert limit.text() == text


@pytest.mark.parametrize(
    "limit",
    [
        Interval(0, None, closed="neither"),
        Interval(None, 3),
        OneOf(("a",)),
        Pattern(r"cpu|cuda", "cpu, cuda"),
        Parses(int, "x"),
        Check(lambda v: v != 0, "must not be 0", 0),
        Each(Interval(1, None)),
        Unique(Each(OneOf(("a",)))),
    ],
)
def test_every_limit_refuses_its_own_invalid_example(limit: Any) -> None:
    assert limit.problem(limit.invalid()) is not None
