"""Tests for features/housekeeping.py through `quadrant cache prune`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import filelock
import pytest

from features import housekeeping
from pipeline import extract, train
from pipeline.cli import main
from pipeline.config import Config

MakeConfig = Callable[..., Config]
DAY = 86400


def _age(cache: Path, days: float) -> None:
    """Make a cache (file and shards) look `days` old."""
    when = time.time() - days * DAY
    for path in [cache, *cache.with_suffix(".shards").rglob("*")]:
        os.utime(path, (when, when))


@pytest.fixture
def caches(image_folder: Path, make_config: MakeConfig) -> tuple[Config, list[Path]]:
    """Three caches in one folder, 40, 20 and 0 days old."""
    made = []
    for i, days in enumerate((40, 20, 0)):
        cfg = make_config(image_folder, f"run.seed={i}")
        made.append(extract.run(cfg).path)
        _age(made[-1], days)
    return cfg, made


def _prune(folder: Path, *args: str) -> int:
    return main(["cache", "prune", str(folder), *args])


def test_prune_by_age_removes_whole_caches(
    caches: tuple[Config, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, (old, middle, new) = caches
    assert _prune(cfg.cache_dir, "--older-than", "30d", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"would remove {old.name}" in out and "would remove 1 of 3 caches" in out
    assert old.exists()
    assert _prune(cfg.cache_dir, "--older-than", "30d") == 0
    assert not old.exists() and not old.with_suffix(".shards").exists()
    assert middle.exists() and new.exists()


def test_prune_to_a_size_removes_the_oldest_first(
    caches: tuple[Config, list[Path]],
) -> None:
    cfg, (old, middle, new) = caches
    sizes = [housekeeping.list_caches(cfg.cache_dir)[i].size_bytes for i in range(3)]
    limit = sizes[2] + sizes[1] // 2  # room for the newest and half another
    assert _prune(cfg.cache_dir, "--max-size", str(limit)) == 0
    assert not old.exists() and not middle.exists() and new.exists()


def test_prune_keeps_what_a_run_was_trained_on_and_what_is_being_written(
    caches: tuple[Config, list[Path]], image_folder: Path, make_config: MakeConfig
) -> None:
    cfg, (old, middle, new) = caches
    trained = make_config(image_folder, "run.seed=0", "train.cv_folds=2")
    train.run(trained)
    _age(old, 40)
    lock = filelock.FileLock(f"{middle.with_suffix('.shards')}.lock")
    with lock:  # an extraction writing this key right now
        args = ("--older-than", "1d", "--keep-used-by", str(trained.layout.root))
        assert _prune(cfg.cache_dir, *args) == 0
    assert old.exists() and middle.exists() and new.exists()


def test_an_unfinished_cache_is_pruned_too(
    caches: tuple[Config, list[Path]],
) -> None:
    cfg, _ = caches
    orphan = cfg.cache_dir / "codes-0123456789abcdef.shards"
    orphan.mkdir()
    (orphan / "shard-000000.h5").write_bytes(b"x" * 100)
    when = time.time() - 40 * DAY
    os.utime(orphan / "shard-000000.h5", (when, when))
    [entry] = [e for e in housekeeping.list_caches(cfg.cache_dir) if not e.finished]
    assert "(unfinished)" in housekeeping.describe(entry)
    assert _prune(cfg.cache_dir, "--older-than", "30d") == 0
    assert not orphan.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "needs --older-than (30d) and/or --max-size (50G)"),
        (["--older-than", "soon"], "--older-than 'soon': give an age such as"),
        (["--max-size", "big"], "--max-size 'big': give a size such as"),
    ],
)
def test_prune_arguments_are_checked(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    assert _prune(tmp_path, *args) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500M", 500 * 2**20),
        ("50G", 50 * 2**30),
        ("1.5T", int(1.5 * 2**40)),
        ("200GiB", 200 * 2**30),
        ("4096", 4096),
    ],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert housekeeping.parse_size(text) == expected
