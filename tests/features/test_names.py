"""Tests for features/names.py: every registry acts on exactly the names declared."""

from __future__ import annotations

from features import names
from features.classifiers import CLASSIFIERS, GRID_KEYS
from features.devices import PRECISION_DTYPES
from features.pooling import parse_pooling
from features.transforms import INTERPOLATION_MODES


def test_names_import_nothing() -> None:
    source = names.__file__
    with open(source, encoding="utf-8") as handle:
        assert "import" not in handle.read().replace("Import-free", "")


def test_registries_are_keyed_by_the_declared_names() -> None:
    assert tuple(CLASSIFIERS) == names.CLASSIFIERS
    assert tuple(GRID_KEYS) == names.CLASSIFIERS
    assert {"auto", *PRECISION_DTYPES} == set(names.PRECISIONS)
    assert tuple(INTERPOLATION_MODES) == names.INTERPOLATIONS
    for spec in (*names.SPATIAL_POOLINGS, *names.TOKEN_POOLINGS):
        assert parse_pooling(spec).spec == spec


def test_every_strategy_names_auto_or_a_case() -> None:
    assert set(names.STRATEGIES.values()) == {"auto", "1", "2", "3", "4"}
