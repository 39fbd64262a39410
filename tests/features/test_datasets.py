"""Tests for features/datasets.py: the digits and Fashion-MNIST PNG writers."""

from __future__ import annotations

import gzip
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import features.datasets as datasets
from features.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    load_digits_images,
    load_fashion_mnist,
    write_dataset,
    write_digits,
    write_fashion_mnist,
)
from features.errors import ConfigError, DataError, StageInputError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FILES = [
    DEBIAN_DIR / f"{prefix}-{kind}-ubyte.gz"
    for prefix in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
]
needs_debian_files = pytest.mark.skipif(
    not all(path.is_file() for path in DEBIAN_FILES),
    reason=f"Fashion-MNIST IDX files not in {DEBIAN_DIR}; "
    "install them with `apt-get install dataset-fashion-mnist`",
)

# NOTE: a synthetic source in the same IDX format keeps most writer tests
# independent of the Debian package: 6 train and 2 test images per class.
TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 2


def _idx_bytes(array: npt.NDArray[np.uint8], magic: int) -> bytes:
    """An IDX file's contents: big-endian magic and sizes, then the bytes."""
    header = struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
    return header + array.tobytes()


def _write_split(
    folder: Path, prefix: str, per_class: int, *, gz: bool = True, seed: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Write a random split in IDX format; return its images and labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    opener: Callable[[bytes], bytes] = gzip.compress if gz else bytes
    folder.mkdir(parents=True, exist_ok=True)
    images_path = folder / f"{prefix}-images-idx3-ubyte{suffix}"
    images_path.write_bytes(opener(_idx_bytes(images, 2051)))
    labels_path = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
    labels_path.write_bytes(opener(_idx_bytes(labels, 2049)))
    return images, labels


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A folder of synthetic Fashion-MNIST IDX files, gzipped like Debian's."""
    folder = tmp_path / "source"
    _write_split(folder, "train", TRAIN_PER_CLASS, seed=1)
    _write_split(folder, "t10k", TEST_PER_CLASS, seed=2)
    return folder


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[float | None]:
    """No Debian files, an empty download cache, and no name resolution.

    Returns the socket default timeouts seen by each attempted connection.
    """
    timeouts: list[float | None] = []

    def no_network(*args: object, **kwargs: object) -> None:
        timeouts.append(socket.getdefaulttimeout())
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # NOTE: CI may be online; failing every lookup keeps this test off the network.
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return timeouts


def _pngs(folder: Path) -> dict[str, list[str]]:
    """Class folder name -> sorted PNG names under `folder`."""
    return {
        sub.name: sorted(png.name for png in sub.glob("*.png"))
        for sub in sorted(folder.iterdir())
    }


def _read_png(path: Path) -> npt.NDArray[np.uint8]:
    """The pixels of a PNG, checking it is 8-bit grayscale."""
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


# ------------------------------------------------------------------------------- digits


def test_load_digits_images_scales_0_16_to_0_255() -> None:
    images, labels, classes = load_digits_images()
    raw = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.array_equal(labels, raw.target)
    assert classes == tuple("0123456789")
    assert images.max() == 255 and images.min() == 0
    assert np.array_equal(images, np.rint(raw.images * 255 / 16).astype(np.uint8))
    assert set(np.unique(images[raw.images == 8])) == {128}


def test_write_digits_writes_every_image_in_its_class_folder(tmp_path: Path) -> None:
    images, labels, _ = load_digits_images()
    out = write_digits(tmp_path / "digits")
    found = _pngs(out)
    assert sorted(found) == [str(d) for d in range(10)]
    assert sum(len(names) for names in found.values()) == 1797
    for digit, names in found.items():
        assert all(labels[int(name[:5])] == int(digit) for name in names)
    index = int(found["7"][3][:5])
    assert np.array_equal(_read_png(out / "7" / f"{index:05d}.png"), images[index])
    assert list(tmp_path.iterdir()) == [out]  # no staging folder left


# ------------------------------------------------------------------------ Fashion-MNIST


@needs_debian_files
def test_load_fashion_mnist_reads_the_debian_files() -> None:
    images, labels, classes = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))
    assert classes == FASHION_MNIST_CLASSES


@needs_debian_files
def test_write_fashion_mnist_subset_matches_the_idx_labels(tmp_path: Path) -> None:
    out = write_fashion_mnist(
        tmp_path / "fm", classes=["sandal", "bag"], per_class=5, split="both"
    )
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    for split, count in [("train", 5), ("test", 1)]:
        images, labels, _ = load_fashion_mnist(split)
        found = _pngs(out / split)
        assert {name: len(pngs) for name, pngs in found.items()} == {
            "bag": count,
            "sandal": count,
        }
        for name, pngs in found.items():
            wanted = FASHION_MNIST_CLASSES.index(name)
            assert all(labels[int(png[:5])] == wanted for png in pngs)
        index = int(found["bag"][0][:5])
        pixels = _read_png(out / split / "bag" / f"{index:05d}.png")
        assert pixels.shape == (28, 28)
        assert np.array_equal(pixels, images[index])


def test_write_fashion_mnist_from_source_writes_flat_split(
    source: Path, tmp_path: Path
) -> None:
    out = write_fashion_mnist(tmp_path / "fm", split="test", source=source)
    images, labels, _ = load_fashion_mnist("test", source=source)
    found = _pngs(out)
    assert sorted(found) == sorted(FASHION_MNIST_CLASSES)
    assert all(len(pngs) == TEST_PER_CLASS for pngs in found.values())
    for name, pngs in found.items():
        for png in pngs:
            index = int(png[:5])
            assert labels[index] == FASHION_MNIST_CLASSES.index(name)
            assert np.array_equal(_read_png(out / name / png), images[index])


def test_class_indices_typed_on_the_command_line_are_indices(
    source: Path, tmp_path: Path
) -> None:
    # `quadrant demo-data fashion-mnist DIR --classes 1 8` passes strings.
    out = write_fashion_mnist(
        tmp_path / "fm", classes=["1", "8"], per_class=2, split="train", source=source
    )
    assert sorted(p.name for p in out.iterdir()) == ["bag", "trouser"]


def test_write_fashion_mnist_subset_is_seeded_per_class(
    source: Path, tmp_path: Path
) -> None:
    def subset(name: str, classes: list[str | int], seed: int) -> list[str]:
        out = write_fashion_mnist(
            tmp_path / name,
            classes=classes,
            per_class=3,
            split="train",
            seed=seed,
            source=source,
        )
        return _pngs(out)["bag"]

    first = subset("a", ["bag"], seed=0)
    assert len(first) == 3
    assert subset("b", ["sandal", 8], seed=0) == first
    seeds = [subset(f"seed{seed}", ["bag"], seed=seed) for seed in range(1, 6)]
    assert any(other != first for other in seeds)


BAD_OPTIONS = [
    ({"classes": ["bags"]}, r"Unknown Fashion-MNIST class 'bags'; valid names: "),
    ({"classes": [10]}, r"class index 10 is out of range 0..9"),
    ({"classes": []}, r"classes is empty"),
    ({"split": "val"}, r"split must be one of \['train', 'test', 'both'\]"),
    ({"per_class": 0}, r"per_class must be an int >= 1 or None, got 0"),
    ({"per_class": 7, "split": "train"}, r"per_class=7, but class .* has only 6"),
    ({"seed": -1}, r"seed must be >= 0, got -1"),
]


@pytest.mark.parametrize("options, pattern", BAD_OPTIONS)
def test_write_fashion_mnist_rejects_bad_options(
    source: Path, tmp_path: Path, options: dict[str, Any], pattern: str
) -> None:
    out = tmp_path / "fm"
    with pytest.raises(ConfigError, match=pattern):
        write_fashion_mnist(out, source=source, **options)
    assert not out.exists()


CORRUPT = [
    # (file, new contents as a function of the old raw bytes, message pattern)
    ("t10k-images-idx3-ubyte.gz", lambda raw: b"\0\0\x08\x01" + raw[4:], "magic"),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: raw[:-3], "header promises"),
    (
        "t10k-labels-idx1-ubyte.gz",
        lambda raw: struct.pack(">ii", 2049, 19) + raw[8:27],
        "20 images but .* 19 labels; the files belong to different data sets",
    ),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: raw[:-1] + b"\x0a", "label 10"),
    ("t10k-images-idx3-ubyte.gz", lambda raw: raw[:4], "shorter than"),
]


@pytest.mark.parametrize("name, damage, pattern", CORRUPT)
def test_load_fashion_mnist_rejects_corrupt_files(
    source: Path,
    name: str,
    damage: Callable[[bytes], bytes],
    pattern: str,
) -> None:
    path = source / name
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(damage(raw)))
    with pytest.raises(DataError, match=pattern) as caught:
        load_fashion_mnist("test", source=source)
    assert str(path) in str(caught.value)


def test_load_fashion_mnist_wrong_magic_names_the_file(source: Path) -> None:
    path = source / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(struct.pack(">i", 2051) + raw[4:]))
    message = f"{path}: magic number 2051, expected 2049"
    with pytest.raises(DataError, match=re.escape(message)):
        load_fashion_mnist("test", source=source)


def test_load_fashion_mnist_rejects_a_file_that_is_not_gzip(source: Path) -> None:
    path = source / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot be read")):
        load_fashion_mnist("test", source=source)


def test_load_fashion_mnist_reads_uncompressed_files(tmp_path: Path) -> None:
    images, labels = _write_split(tmp_path, "train", 1, gz=False)
    got_images, got_labels, _ = load_fashion_mnist("train", source=tmp_path)
    assert np.array_equal(got_images, images)
    assert np.array_equal(got_labels, labels)


def test_load_fashion_mnist_missing_source_is_not_replaced_by_a_download(
    tmp_path: Path,
) -> None:
    pattern = re.escape(f"{tmp_path} holds no Fashion-MNIST train files")
    with pytest.raises(StageInputError, match=pattern):
        load_fashion_mnist("train", source=tmp_path)


def test_load_fashion_mnist_uses_the_download_cache(
    offline: list[float | None], tmp_path: Path
) -> None:
    raw = tmp_path / "cache" / "quadrant" / "fashion-mnist" / "FashionMNIST" / "raw"
    images, labels = _write_split(raw, "t10k", 1, gz=False)
    got_images, got_labels, _ = load_fashion_mnist("test")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert offline == []  # no download attempted


def test_load_fashion_mnist_offline_error_says_how_to_get_the_files(
    offline: list[float | None], tmp_path: Path
) -> None:
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(StageInputError) as caught:
        load_fashion_mnist("train")
    message = str(caught.value)
    assert f"not found in {tmp_path / 'debian'}" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert f"into {tmp_path / 'cache' / 'quadrant' / 'fashion-mnist'}" in message
    assert "Name or service not known" in message
    assert "run once with internet access" in message
    # NOTE: torchvision's urlopen has no timeout of its own; ours must be in force.
    assert offline and all(t == datasets._DOWNLOAD_TIMEOUT_S for t in offline)
    assert socket.getdefaulttimeout() == timeout_before  # restored


# ------------------------------------------------------------------------------- safety


def test_writers_refuse_a_non_empty_target(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    pattern = (
        r"already exists and is not empty; choose another folder, or replace it: "
        r"`quadrant demo-data \.\.\. --overwrite`"
    )
    with pytest.raises(DataError, match=pattern):
        write_digits(out)
    with pytest.raises(DataError, match=pattern):
        write_fashion_mnist(out, source=source)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_writers_fill_an_empty_target_folder(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    write_fashion_mnist(out, source=source, split="train", per_class=1)
    assert len(list(out.rglob("*.png"))) == 10


def test_overwrite_replaces_a_data_set_but_nothing_else(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fm"
    write_fashion_mnist(out, source=source, split="train", per_class=2)
    write_fashion_mnist(out, source=source, split="both", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt, which is not a PNG image"):
        write_fashion_mnist(out, source=source, overwrite=True)
    assert (out / "notes.txt").exists()


def _fail_after(count: int) -> Callable[[Path, npt.NDArray[np.uint8]], None]:
    """A stand-in for _save_png that writes `count` PNGs, then dies."""
    calls = [0]
    save = datasets._save_png

    def save_or_die(path: Path, image: npt.NDArray[np.uint8]) -> None:
        calls[0] += 1
        if calls[0] > count:
            raise KeyboardInterrupt("killed mid-way")
        save(path, image)

    return save_or_die


def test_an_interrupted_write_leaves_no_data_set(
    monkeypatch: pytest.MonkeyPatch, source: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(datasets, "_save_png", _fail_after(30))
    out = tmp_path / "fm"
    with pytest.raises(KeyboardInterrupt, match="killed mid-way"):
        write_fashion_mnist(out, source=source)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # staging removed


def test_an_interrupted_overwrite_keeps_the_old_data_set(
    monkeypatch: pytest.MonkeyPatch, source: Path, tmp_path: Path
) -> None:
    out = write_fashion_mnist(tmp_path / "fm", source=source, split="test")
    before = _pngs(out)
    monkeypatch.setattr(datasets, "_save_png", _fail_after(5))
    with pytest.raises(KeyboardInterrupt):
        write_fashion_mnist(out, source=source, split="train", overwrite=True)
    assert _pngs(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm", "source"]


# ----------------------------------------------------------------------------- dispatch


def test_write_dataset_dispatches_on_name(source: Path, tmp_path: Path) -> None:
    out = write_dataset(
        "fashion-mnist", tmp_path / "fm", source=source, split="train", per_class=1
    )
    assert len(list(out.rglob("*.png"))) == 10
    assert DATASETS == ("digits", "fashion-mnist")


@pytest.mark.parametrize(
    "name, options, pattern",
    [
        ("mnist", {}, r"Unknown data set 'mnist'; valid: digits, fashion-mnist\."),
        ("digits", {"per_class": 3}, r"no option\(s\) \['per_class'\]; valid: "),
    ],
)
def test_write_dataset_rejects_bad_names_and_options(
    tmp_path: Path, name: str, options: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        write_dataset(name, tmp_path / "out", **options)
