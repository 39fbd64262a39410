"""Shared fixtures: small real images, tiny configs, a CPU-only world."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Config, load_config

# NOTE: set before anything imports huggingface_hub (timm does), which reads
# them once: no test reaches the Hugging Face hub or a user's cache of it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="quadrant-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)

# A commit hash of a hub repository, for Hugging Face hub cache entries.
REVISION = "0123456789abcdef0123456789abcdef01234567"

# A small random network keeps extraction tests to seconds: resnet18 at 32 px.
TINY = [
    "backbone.name=resnet18",
    "backbone.weights=random",
    "backbone.input_size=32",
    "backbone.resize_size=32",
    "extract.batch_size=4",
    "extract.num_workers=0",
    "extract.engine=torch",
    "run.progress=false",
]


@pytest.fixture(autouse=True)
def _cpu_and_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test sees a fresh torch hub cache, so none finds or downloads weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.set_num_threads(1)


class Planted:
    """Pickles to a call that leaves a file behind: proof that code ran on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.marker).write_text, ("code ran",))


def write_png(path: Path, seed: int, size: int = 32, mode: str = "RGB") -> Path:
    """A random image file (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def write_digits_subset(base: Path, per_class: int) -> Path:
    """scikit-learn's digits written under `base`, the first `per_class` of each."""
    from features import datasets

    full = datasets.write_digits(base / "all")
    subset = base / "digits"
    for folder in sorted(full.iterdir()):
        (subset / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:per_class]:
            shutil.copy(file, subset / folder.name / file.name)
    return subset


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of ten random 32x32 PNGs each, as class folders."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(10):
            write_png(root / name / f"{i:02d}.png", seed=100 * c + i)
    return root


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a tiny CPU config for `root`, with extra `--set` style overrides."""

    def make(root: Path, *overrides: str) -> Config:
        base = [f"data.root={str(root)!r}", f"run.out={str(tmp_path / 'run')!r}"]
        return load_config(None, [*base, *TINY, *overrides], cwd=tmp_path)

    return make


def write_hub_cache(
    cache: Path,
    repo: str,
    state: dict[str, torch.Tensor],
    revision: str = REVISION,
) -> Path:
    """A Hugging Face hub cache entry as `hf_hub_download` leaves it: the file
    under snapshots/<revision>/, and refs/main naming that revision."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    file = folder / "snapshots" / revision / "model.safetensors"
    file.parent.mkdir(parents=True)
    save_file(state, file)
    return file


def write_photo(
    path: Path,
    size: tuple[int, int] = (4000, 3000),
    *,
    orientation: int = 1,
    mode: str = "RGB",
    progressive: bool = False,
) -> Path:
    """scikit-image's chelsea upscaled to `size` (as displayed), saved as JPEG q90.

    With `orientation` 6 the pixels are stored turned counter-clockwise with
    that EXIF tag, as a phone stores a portrait photo; `mode` "CMYK" or "L"
    converts before saving.
    """
    data = pytest.importorskip("skimage.data")
    image = Image.fromarray(data.chelsea()).resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if orientation == 6:
        image = image.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(
        path, "JPEG", quality=90, exif=exif.tobytes(), progressive=progressive
    )
    return path
