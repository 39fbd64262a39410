"""Reading cached CNN codes as numpy arrays, whole or in chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from features.cache import open_cache
from features.errors import CacheMismatchError
from features.layers import TOP


@dataclass(frozen=True)
class Codes:
    """Codes of one layer with the labels and splits of their rows.

    Attributes:
        X: codes, one row per image (and augmented view).
        y: label index per row.
        split: "train", "val" or "test" per row.
        paths: image path per row, relative to the data root.
        groups: image index per row: rows of one image share it (use it as
            `groups` in grouped cross-validation when views > 1).
        views: view per row; 0 is the deterministic view.
        label_names: class name of each label index.
        layer: the layer name; pooling: how it was pooled.
        metadata: the cache's key, provenance, environment and data root.
    """

    X: npt.NDArray[np.floating[Any]]
    y: npt.NDArray[np.int64]
    split: npt.NDArray[np.str_]
    paths: npt.NDArray[np.str_]
    groups: npt.NDArray[np.int64]
    views: npt.NDArray[np.int16]
    label_names: tuple[str, ...]
    layer: str
    pooling: str
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.y)


def available_codes(path: Path) -> list[str]:
    """The "layer/pooling" names a cache file holds."""
    with open_cache(path) as h5:
        return _dataset_names(h5)


def _dataset_names(h5: h5py.File) -> list[str]:
    return [
        f"{layer}/{pooling}" for layer in h5["codes"] for pooling in h5["codes"][layer]
    ]


def _dataset(
    h5: h5py.File, path: Path, layer: str, pooling: str | None
) -> h5py.Dataset:
    names = _dataset_names(h5)
    if layer not in h5["codes"]:
        raise CacheMismatchError(
            f"layer {layer!r} is not in {path}; it holds {names}. Add it to "
            "extract.layers and run `quadrant extract`."
        )
    poolings = list(h5["codes"][layer])
    if pooling is None:
        if len(poolings) > 1:
            raise CacheMismatchError(
                f"layer {layer!r} in {path} is pooled {poolings} ways; pass pooling="
            )
        pooling = poolings[0]
    if pooling not in poolings:
        raise CacheMismatchError(
            f"{layer!r} pooled {pooling!r} is not in {path}; it holds {names}"
        )
    return h5["codes"][layer][pooling]


def load_codes(
    path: Path,
    layer: str = TOP,
    pooling: str | None = None,
    *,
    split: str | Sequence[str] | None = None,
    views: str = "first",
    dtype: npt.DTypeLike = np.float32,
) -> Codes:
    """Load one layer's codes with their labels, splits and provenance.

    Args:
        path: a cache file written by `quadrant extract`.
        layer: a layer name as given in extract.layers ("top" by default).
        pooling: which pooling of the layer; may be omitted when there is one.
        split: keep only rows of this split (or these splits).
        views: "first" keeps the deterministic view of each image; "all" adds
            the augmented views.
        dtype: dtype of the returned codes.

    Raises:
        StageInputError: the file does not exist.
        CacheCorruptError: the file is not a complete cache.
        CacheMismatchError: the layer or pooling is not in the file.
    """
    if views not in ("first", "all"):
        raise ValueError(f"views must be 'first' or 'all', got {views!r}")
    with open_cache(Path(path)) as h5:
        dataset = _dataset(h5, Path(path), layer, pooling)
        index = _Index.read(h5)
        rows = index.select(split, views)
        X = _read_rows(dataset, rows).astype(dtype, copy=False)
        return index.codes(dataset, rows, X)


def iter_codes(
    path: Path,
    layer: str = TOP,
    pooling: str | None = None,
    *,
    split: str | Sequence[str] | None = None,
    views: str = "first",
    chunk_rows: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Iterator[Codes]:
    """Stream codes in chunks, for code sets larger than memory.

    Chunks follow the file's HDF5 chunking (about 1 MiB each) unless
    `chunk_rows` is given; every chunk is a `Codes` of consecutive rows.
    Arguments as for `load_codes`.
    """
    with open_cache(Path(path)) as h5:
        dataset = _dataset(h5, Path(path), layer, pooling)
        index = _Index.read(h5)
        rows = index.select(split, views)
        step = chunk_rows or (dataset.chunks[0] if dataset.chunks else 4096)
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            X = _read_rows(dataset, block).astype(dtype, copy=False)
            yield index.codes(dataset, block, X)


@dataclass(frozen=True)
class _Index:
    """The small per-image and per-row tables, read once per call."""

    row_image: npt.NDArray[np.int64]
    row_view: npt.NDArray[np.int16]
    labels: npt.NDArray[np.int64]
    splits: npt.NDArray[np.str_]
    paths: npt.NDArray[np.str_]
    label_names: tuple[str, ...]
    metadata: dict[str, Any]

    @classmethod
    def read(cls, h5: h5py.File) -> _Index:
        return cls(
            row_image=h5["rows/image"][:],
            row_view=h5["rows/view"][:],
            labels=h5["images/label"][:],
            splits=h5["images/split"].asstr()[:].astype(str),
            paths=h5["images/path"].asstr()[:].astype(str),
            label_names=tuple(json.loads(h5.attrs["label_names"])),
            metadata={
                "path": str(h5.filename),
                "key": str(h5.attrs["key"]),
                "provenance": json.loads(h5.attrs["provenance"]),
                "environment": json.loads(h5.attrs["environment"]),
                "data_root": str(h5.attrs["data_root"]),
            },
        )

    def select(
        self, split: str | Sequence[str] | None, views: str
    ) -> npt.NDArray[np.int64]:
        keep = np.ones(len(self.row_image), dtype=bool)
        if views == "first":
            keep &= self.row_view == 0
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            keep &= np.isin(self.splits[self.row_image], wanted)
        return np.flatnonzero(keep)

    def codes(
        self,
        dataset: h5py.Dataset,
        rows: npt.NDArray[np.int64],
        X: npt.NDArray[np.floating[Any]],
    ) -> Codes:
        images = self.row_image[rows]
        return Codes(
            X=X,
            y=self.labels[images],
            split=self.splits[images],
            paths=self.paths[images],
            groups=images,
            views=self.row_view[rows],
            label_names=self.label_names,
            layer=str(dataset.attrs["layer"]),
            pooling=dataset.name.rsplit("/", 1)[-1],
            metadata=self.metadata,
        )


def _read_rows(
    dataset: h5py.Dataset, rows: npt.NDArray[np.int64]
) -> npt.NDArray[np.floating[Any]]:
    if len(rows) == 0:
        return np.zeros((0, dataset.shape[1]), dtype=dataset.dtype)
    if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice read
        return dataset[int(rows[0]) : int(rows[-1]) + 1]
    # h5py fancy indexing is slow for many rows; read the span and select.
    return dataset[int(rows[0]) : int(rows[-1]) + 1][rows - rows[0]]
