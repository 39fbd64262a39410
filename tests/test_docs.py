"""Every Python example in README.md and docs/ runs, as written, after a demo.

The examples assume what `make demo` leaves in the working folder (the
digits in data/digits, the run in runs/demo); a smaller demo run (twelve
digits per class, 96 px) gives them the same layout here, so an example
that goes stale fails the suite.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipeline.demo import demo_config
from pipeline.demo import run as run_demo
from tests.conftest import write_digits_subset

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
EXAMPLES = [
    pytest.param(code, id=f"{page.name}:{n}")
    for page in PAGES
    for n, code in enumerate(BLOCK.findall(page.read_text()), 1)
]


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder as `make demo` leaves it, smaller."""
    work = tmp_path_factory.mktemp("work")
    write_digits_subset(work / "data", 12)  # data/digits
    shutil.rmtree(work / "data" / "all")
    cfg = demo_config(
        [
            "run.progress=false",
            "backbone.input_size=96",
            "sweep.cv_folds=3",
            "train.cv_folds=3",
            "train.C=[0.1, 1.0]",
            "run.strategy=2",
        ],
        cwd=work,
    )
    run_demo(cfg)
    return work


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("code", EXAMPLES)
def test_python_example_runs(
    code: str, after_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(after_demo)
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
