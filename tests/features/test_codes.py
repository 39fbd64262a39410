from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from features import available_codes, iter_codes, load_codes
from pipeline import extract
from pipeline.config import Config


@pytest.fixture
def cache_file(image_folder: Path, make_config: Callable[..., Config]) -> Path:
    cfg = make_config(
        image_folder,
        "extract.layers=['top', 'layer2']",
        "extract.pooling=['avg', 'max']",
        "extract.views=2",
    )
    return extract.run(cfg).path


def test_load_codes_returns_aligned_arrays(cache_file: Path) -> None:
    codes = load_codes(cache_file, "layer2", "max")
    assert codes.X.shape == (20, 128) and len(codes) == 20
    assert codes.y.dtype == np.int64 and set(codes.y) == {0, 1}
    assert codes.label_names == ("cat", "dog")
    assert all(p.startswith(("cat/", "dog/")) for p in codes.paths)
    assert (codes.views == 0).all()
    assert codes.metadata["provenance"]["backbone"]["name"] == "resnet18"
    assert codes.layer == "layer2" and codes.pooling == "max"


def test_load_codes_filters_splits_and_views(cache_file: Path) -> None:
    train = load_codes(cache_file, "top", split="train")
    both = load_codes(cache_file, "top", split=["val", "test"])
    assert len(train) + len(both) == 20 and set(train.split) == {"train"}
    every = load_codes(cache_file, "top", split="train", views="all")
    assert len(every) == 2 * len(train)
    assert set(every.groups) == set(train.groups)  # views share their image's group
    with pytest.raises(ValueError, match="views must be 'first' or 'all'"):
        load_codes(cache_file, "top", views="some")


def test_load_codes_asks_for_pooling_when_ambiguous(cache_file: Path) -> None:
    from features.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError, match=r"pooled \['avg', 'max'\] ways; pass"):
        load_codes(cache_file, "layer2")
    assert sorted(available_codes(cache_file)) == [
        "layer2/avg",
        "layer2/max",
        "top/none",
    ]


def test_iter_codes_streams_the_same_rows(cache_file: Path) -> None:
    whole = load_codes(cache_file, "layer2", "avg", split="train", views="all")
    chunks = list(
        iter_codes(
            cache_file, "layer2", "avg", split="train", views="all", chunk_rows=3
        )
    )
    assert len(chunks) == -(-len(whole) // 3)
    np.testing.assert_array_equal(np.concatenate([c.X for c in chunks]), whole.X)
    np.testing.assert_array_equal(np.concatenate([c.y for c in chunks]), whole.y)


def test_float16_storage_reads_back_as_float32(
    image_folder: Path, make_config: Callable[..., Config]
) -> None:
    path = extract.run(
        make_config(
            image_folder, "extract.dtype='float16'", "extract.compression='lzf'"
        )
    ).path
    codes = load_codes(path)
    assert codes.X.dtype == np.float32
    assert load_codes(path, dtype=np.float16).X.dtype == np.float16


def test_stream_codes_yields_every_row_once_shuffled(cache_file: Path) -> None:
    from features.codes import stream_codes

    whole = load_codes(cache_file, "layer2", "avg", split="train", views="all")
    by_row = {
        (g, tuple(x)): y for g, x, y in zip(whole.groups, whole.X, whole.y, strict=True)
    }
    blocks = list(
        stream_codes(
            cache_file,
            "layer2",
            "avg",
            split="train",
            views="all",
            buffer_rows=5,  # smaller than the split: several refills
            block_rows=2,
            rng=np.random.default_rng(0),
        )
    )
    seen = [
        (g, tuple(x), y) for X, Y, G in blocks for x, y, g in zip(X, Y, G, strict=True)
    ]
    assert sorted((g, x) for g, x, _ in seen) == sorted(by_row)
    assert all(by_row[(g, x)] == y for g, x, y in seen)
    assert [g for g, _, _ in seen] != sorted(g for g, _, _ in seen)  # shuffled


def test_scattered_rows_are_read_chunk_by_chunk(tmp_path: Path) -> None:
    import h5py

    from features.codes import _read_rows

    data = np.arange(200, dtype=np.float32).reshape(50, 4)
    rows = np.array([1, 2, 9, 10, 11, 30, 49])
    with h5py.File(tmp_path / "c.h5", "w") as h5:
        dataset = h5.create_dataset("x", data=data, chunks=(8, 4))
        np.testing.assert_array_equal(_read_rows(dataset, rows), data[rows])
