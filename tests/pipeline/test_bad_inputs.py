"""Bad inputs from the fault audit (issue 22): each is one clean error.

Every case runs the real command line in a fresh project folder and checks
what a user relies on: exit status 1, one `quadrant <command>: error:` line
naming the problem and the fix, no traceback, and no work done or record
changed before the error where the problem could be known first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import TINY, write_png

FINETUNE = ["finetune.init=scratch", "finetune.num_workers=0", "finetune.epochs=1"]


def _one_class(root: Path) -> None:
    for i in range(10):
        write_png(root / "data" / "only" / f"{i}.png", seed=i)


def _two_classes(root: Path) -> None:
    for c in ("cat", "dog"):
        for i in range(6):
            write_png(root / "data" / c / f"{i}.png", seed=i + 10 * len(c))


def _junk(root: Path) -> None:
    for c in ("cat", "dog"):
        (root / "data" / c).mkdir(parents=True)
        (root / "data" / c / "1.jpg").write_bytes(b"not a jpeg")


def _wide_manifest(root: Path) -> None:
    _two_classes(root)
    (root / "data.csv").write_text("path,label\ndata/cat/0.png,cat\ndata/x,y.png,dog\n")


def _misplaced_manifest(root: Path) -> None:
    _two_classes(root)
    (root / "lists").mkdir()
    (root / "lists" / "m.csv").write_text("path,label\ndata/cat/0.png,cat\n")


def _folder(name: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        _two_classes(root)
        (root / name).mkdir()

    return make


def _taken(root: Path) -> None:
    write_png(root / "taken" / "x.png", seed=0)


@dataclass(frozen=True)
class Case:
    """A bad input: the files it needs, the command, what the error says."""

    setup: Callable[[Path], None]
    argv: list[str]
    message: str
    untouched: list[str] = field(default_factory=list)  # absent after the error


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


CASES = {
    "finetune on one class": Case(
        _one_class,
        ["finetune", *_sets(*TINY, *FINETUNE)],
        "only one class ('only') under",
        ["run/finetune", "run/models"],
    ),
    "advise on one class": Case(
        _one_class,
        ["advise", *_sets(*TINY)],
        "advice (it trains classifiers to measure) needs at least two classes",
        ["run/cache", "run/advise"],
    ),
    "forced case 1 on one class": Case(
        _one_class,
        ["run", *_sets(*TINY, "run.strategy=1")],
        "case 1's classifier needs at least two classes: add a folder of images",
        ["run/cache"],
    ),
    "train.n_jobs = 0": Case(
        _two_classes,
        ["train", *_sets(*TINY, "train.n_jobs=0")],
        "[train] n_jobs must be a number of parallel jobs",
        ["run/cache"],
    ),
    "a fixed-size ViT at 32 px": Case(
        _two_classes,
        ["extract", *_sets(*TINY, "backbone.name=vit_b_16")],
        "vit_b_16 takes only 224x224 inputs",
        ["run/cache"],
    ),
    "every image unreadable": Case(
        _junk,
        ["extract", *_sets(*TINY)],
        "all 2 listed files were skipped; fix or remove these files:\n  cat/1.jpg: ",
        ["run/cache"],
    ),
    "a manifest beside its images' folder": Case(
        _misplaced_manifest,
        ["extract", *_sets(*TINY, "data.root='lists/m.csv'")],
        "a manifest's paths are relative to the CSV's own folder",
        ["run/cache"],
    ),
    "a manifest row with a comma in its path": Case(
        _wide_manifest,
        ["extract", *_sets(*TINY, "data.root='data.csv'")],
        "data.csv line 3 has 3 cells, the header 2 (path,label); quote a path",
        ["run/cache"],
    ),
    "-c naming a folder": Case(
        _folder("settings"),
        ["extract", "-c", "settings"],
        "config file settings is a folder, not a file; pass -c PATH",
    ),
    "backbone.weights naming a folder": Case(
        _folder("weights"),
        ["extract", *_sets(*TINY, "backbone.weights='weights/'")],
        "weights is a folder, not a file; set backbone.weights",
        ["run/cache"],
    ),
    "cache verify given conf.toml": Case(
        _two_classes,
        ["cache", "verify", "conf.toml"],
        "conf.toml is not a code cache (not an HDF5 file); pass a cache file",
    ),
    "demo-data into a taken folder": Case(
        _taken,
        ["demo-data", "digits", "taken"],
        "replace it: `quadrant demo-data ... --overwrite`",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_a_bad_input_is_one_clean_error(
    case: Case,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path)
    (tmp_path / "conf.toml").write_text(
        '[data]\nroot = "data"\n[run]\nout = "run"\nprogress = false\n'
    )
    before = (tmp_path / "conf.toml").read_bytes()
    assert main(case.argv) == 1
    err = capsys.readouterr().err
    assert f"quadrant {case.argv[0]}: error: " in err
    assert case.message in err, err
    assert "Traceback" not in err
    for path in case.untouched:
        assert not (tmp_path / path).exists(), path
    assert (tmp_path / "conf.toml").read_bytes() == before


def test_each_skipped_file_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A whole run lists the data in several stages; the user reads it once.
    monkeypatch.chdir(tmp_path)
    _two_classes(tmp_path)
    (tmp_path / "data" / "cat" / "bad.png").write_bytes(b"broken")
    (tmp_path / "conf.toml").write_text('[data]\nroot = "data"\n[run]\nout = "run"\n')
    with caplog.at_level(logging.WARNING):
        assert main(["run", *_sets(*TINY, "run.strategy=1", "train.cv_folds=2")]) == 0
    warned = [m for m in caplog.messages if "cat/bad.png" in m]
    assert len(warned) == 1, warned
