"""Shared by the fine-tune tests: a tiny CPU config, small image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from features import datasets
from pipeline.config import Config, load_config
from tests.conftest import write_png

FASHION = datasets.DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(),
    reason="apt-get install dataset-fashion-mnist (CI installs it)",
)

# resnet18 from scratch at 32 px: seconds per epoch on a CPU.
TINY = [
    "backbone.name=resnet18",
    "backbone.input_size=32",
    "backbone.resize_size=32",
    "finetune.init=scratch",
    "finetune.batch_size=8",
    "finetune.num_workers=0",
    "finetune.warmup_epochs=0",
    "run.progress=false",
]


def config(root: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [f"data.root='{root}'", f"run.out='{out}'", *TINY, *extra])


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FASHION.exists():
        pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)")
    root = tmp_path_factory.mktemp("fashion") / "fm"
    return datasets.write_fashion_mnist(
        root, classes=["trouser", "bag", "sneaker"], per_class=30, split="both"
    )


def write_classes(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """Random 32x32 PNGs in class folders c0, c1, ..."""
    for c in range(classes):
        for i in range(per_class):
            write_png(root / f"c{c}" / f"{i:02d}.png", seed=100 * c + i)
    return root


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "finetune" / "last.pt", weights_only=True)
    return state["model"]
