"""Declared limits of settings, and the one function that checks them.

As scikit-learn declares `_parameter_constraints` (`Interval`, `StrOptions`
in `sklearn/utils/_param_validation.py`), each config section (and each
estimator) declares a table `{key: limit}` once; `check_limits` checks a
value against its table and words every error the same way: where, the
key, the value and what is allowed. Rules that tie two keys together
(`Rule`) are declared beside the table.

Each limit can also give a value it refuses (`invalid`), as scikit-learn's
`generate_invalid_param_val` does, so the tests can try every limited key.
None means "unset" (the backbone's own value, the default path) and is
never checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from features.errors import ConfigError


class Limit(Protocol):
    """What a value must be; `problem` words the failure, or returns None."""

    def problem(self, value: Any) -> str | None: ...

    def invalid(self) -> Any: ...


@dataclass(frozen=True)
class Interval:
    """A number between `low` and `high` (None: unbounded on that side).

    `closed` says which ends are allowed: "both", "left", "right" or
    "neither". `what` names whole numbers in the message ("an integer in
    0..9" for an interval closed at both ends).
    """

    low: float | None = None
    high: float | None = None
    closed: str = "both"
    what: str = ""

    def allows(self, value: Any) -> bool:
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.low is not None and (
            value < self.low or (value == self.low and not left)
        ):
            return False
        if self.high is not None and (
            value > self.high or (value == self.high and not right)
        ):
            return False
        return True

    def problem(self, value: Any) -> str | None:
        return None if self.allows(value) else f" must be {self.text()}, got {value!r}"

    def text(self) -> str:
        """ "> 0", ">= 1", "in [0, 1)", "an integer in 0..9" (`what`, both ends)."""
        low, high = self.low, self.high
        if high is None:
            return f"{'>=' if self.closed in ('both', 'left') else '>'} {low}"
        if low is None:
            return f"{'<=' if self.closed in ('both', 'right') else '<'} {high}"
        if self.what and self.closed == "both":
            return f"{self.what} in {low}..{high}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"in {left}{low}, {high}{right}"

    def invalid(self) -> Any:
        if self.low is not None:
            return self.low - 1
        assert self.high is not None  # an interval bounded on no side refuses nothing
        return self.high + 1


@dataclass(frozen=True)
class OneOf:
    """One of the given names."""

    choices: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        if value in self.choices:
            return None
        return f" = {value!r} is not one of {list(self.choices)}"

    def invalid(self) -> Any:
        return "no-such-" + self.choices[0]


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex`, described to users as `wording`."""

    regex: str
    wording: str

    def problem(self, value: Any) -> str | None:
        if re.fullmatch(self.regex, value):
            return None
        return f" = {value!r} is not one of {self.wording}"

    def invalid(self) -> Any:
        return "no-such-value"


@dataclass(frozen=True)
class Parses:
    """A value the function `parse` accepts; its ValueError is the message."""

    parse: Callable[[Any], Any]
    example: Any

    def problem(self, value: Any) -> str | None:
        try:
            self.parse(value)
        except ValueError as err:
            return f": {err}"
        return None

    def invalid(self) -> Any:
        return self.example


@dataclass(frozen=True)
class Check:
    """Any other condition: `test(value)` must hold; `wording` says what must."""

    test: Callable[[Any], bool]
    wording: str
    example: Any

    def problem(self, value: Any) -> str | None:
        return None if self.test(value) else f" {self.wording}, got {_shown(value)}"

    def invalid(self) -> Any:
        return self.example


@dataclass(frozen=True)
class Each:
    """A sequence whose every item keeps `limit`; `empty`: may it be empty?"""

    limit: Limit
    empty: bool = True
    hint: str = ""

    def problem(self, value: Any) -> str | None:
        if not value and not self.empty:
            return f" must name at least one{self.hint}"
        for item in value:
            problem = self.limit.problem(item)
            if problem is not None:
                return problem
        return None

    def invalid(self) -> Any:
        return (self.limit.invalid(),)


@dataclass(frozen=True)
class Unique:
    """A sequence without repeats, each item keeping `limit`."""

    limit: Limit

    def problem(self, value: Any) -> str | None:
        if len(set(value)) != len(value):
            return f" has duplicates: {_shown(value)}"
        return self.limit.problem(value)

    def invalid(self) -> Any:
        return self.limit.invalid()


@dataclass(frozen=True)
class Rule:
    """A condition on several keys of one section, checked after each key's own."""

    keys: tuple[str, ...]
    test: Callable[..., bool]
    wording: str

    def problem(self, values: Sequence[Any]) -> str | None:
        if self.test(*values):
            return None
        pairs = zip(self.keys, values, strict=True)
        got = ", ".join(f"{k} = {_shown(v)}" for k, v in pairs)
        return f" {self.wording}; got {got}"


Limits = Mapping[str, Limit]


def check_limits(
    where: str, obj: Any, limits: Limits, rules: Iterable[Rule] = ()
) -> None:
    """Check `obj`'s attributes against their declared limits and rules.

    Args:
        where: how messages name the owner, e.g. "[extract]" or "CNNCodes:".
        obj: an object with one attribute per key (a config dataclass, an
            estimator).
        limits: `{key: limit}`; keys whose value is None are skipped.
        rules: conditions tying several keys together.

    Raises:
        ConfigError: "[extract] batch_size must be > 0, got 0", naming the
            first key that breaks its limit.
    """
    for key, limit in limits.items():
        value = getattr(obj, key)
        if value is None:
            continue
        problem = limit.problem(value)
        if problem is not None:
            raise ConfigError(f"{where} {key}{problem}")
    for rule in rules:
        problem = rule.problem([getattr(obj, key) for key in rule.keys])
        if problem is not None:
            raise ConfigError(f"{where} {' and '.join(rule.keys)}:{problem}")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return repr(list(value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)
