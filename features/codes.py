"""Reading cached CNN codes as numpy arrays, whole or in chunks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from features.cache import open_cache
from features.errors import CacheMismatchError, DataError
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

    def take(self, rows: npt.NDArray[np.integer[Any]]) -> Codes:
        """The codes of `rows` (indices into these codes) only."""
        return replace(
            self,
            X=self.X[rows],
            y=self.y[rows],
            split=self.split[rows],
            paths=self.paths[rows],
            groups=self.groups[rows],
            views=self.views[rows],
        )


def available_codes(path: Path) -> list[str]:
    """The "layer/pooling" names a cache file holds."""
    with open_cache(path) as h5:
        return _dataset_names(h5)


def _dataset_names(h5: h5py.File) -> list[str]:
    """Code arrays in network order, from the input to the output."""
    return list(json.loads(h5.attrs["code_order"]))


def resolve_codes(
    path: Path, layer: str, pooling: str | None = None
) -> tuple[str, str]:
    """(layer, pooling) of a code array in the file; pooling found if omitted.

    Raises:
        CacheMismatchError: the layer or pooling is not in the file.
    """
    with open_cache(Path(path)) as h5:
        dataset = _dataset(h5, Path(path), layer, pooling)
        return str(dataset.attrs["layer"]), str(dataset.attrs["pooling"])


def read_labels(
    path: Path, *, split: str | Sequence[str] | None = None, views: str = "first"
) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    """Labels of the selected rows and the label names, without any codes."""
    with open_cache(Path(path)) as h5:
        index = _Index.read(h5)
        rows = index.select(split, views)
        return index.labels[index.row_image[rows]], index.label_names


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
        step = chunk_rows or _chunk_rows(dataset)
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
    # h5py fancy indexing is slow for many rows, and reading the whole span
    # would hold every row of the file (a split's rows are spread over it):
    # read the HDF5 chunks that hold selected rows, one at a time.
    out = np.empty((len(rows), dataset.shape[1]), dtype=dataset.dtype)
    first = 0
    for part, block in _chunk_reads(dataset, _by_chunk(dataset, rows)):
        out[first : first + len(part)] = block
        first += len(part)
    return out


def _chunk_rows(dataset: h5py.Dataset) -> int:
    """Rows per read: the HDF5 chunk, or about 1 MiB for a linked (virtual) array."""
    if dataset.chunks:
        return int(dataset.chunks[0])
    return int(dataset.attrs.get("rows_per_chunk", 4096))


def _by_chunk(
    dataset: h5py.Dataset, rows: npt.NDArray[np.int64]
) -> list[npt.NDArray[np.int64]]:
    """Sorted `rows` grouped by the HDF5 chunk that holds them."""
    step = _chunk_rows(dataset)
    starts = np.flatnonzero(np.diff(rows // step)) + 1
    return np.split(rows, starts) if len(rows) else []


def _chunk_reads(
    dataset: h5py.Dataset, groups: Iterable[npt.NDArray[np.int64]]
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[Any]]]:
    """(rows, their codes) for each group of rows of one chunk, one read each."""
    step = _chunk_rows(dataset)
    for part in groups:
        start = int(part[0]) // step * step
        yield part, dataset[start : start + step][part - start]


_Block = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]


def stream_codes(
    path: Path,
    layer: str = TOP,
    pooling: str | None = None,
    *,
    split: str | Sequence[str] | None = None,
    views: str = "first",
    buffer_rows: int = 65536,
    block_rows: int = 1024,
    rng: np.random.Generator | None = None,
) -> Iterator[_Block]:
    """(codes, labels, image indices) blocks for streaming training.

    Rows sit in the file sorted by path, so whole classes are contiguous;
    feeding them in file order would train SGD on one class at a time. With
    `rng`, HDF5 chunks are visited in random order and gathered into a buffer
    of `buffer_rows` rows that is shuffled before it is cut into blocks:
    memory stays at one buffer, whatever the size of the file. Without
    `rng`, blocks come in file order.
    """
    with open_cache(Path(path)) as h5:
        dataset = _dataset(h5, Path(path), layer, pooling)
        index = _Index.read(h5)
        rows = index.select(split, views)  # sorted
        per_chunk = _by_chunk(dataset, rows)
        if rng is not None:
            per_chunk = [per_chunk[i] for i in rng.permutation(len(per_chunk))]
        step = _chunk_rows(dataset)
        # One preallocated buffer (plus at most one chunk of overflow): memory
        # is buffer_rows rows whatever the size of the file.
        capacity = min(len(rows), buffer_rows + step)
        X = np.empty((capacity, dataset.shape[1]), dtype=np.float32)
        y = np.empty(capacity, dtype=np.int64)
        groups = np.empty(capacity, dtype=np.int64)
        held = 0
        for selected, block in _chunk_reads(dataset, per_chunk):
            end = held + len(selected)
            X[held:end] = block
            groups[held:end] = index.row_image[selected]
            y[held:end] = index.labels[groups[held:end]]
            held = end
            if held >= buffer_rows:
                yield from _drain(X, y, groups, held, block_rows, rng)
                held = 0
        yield from _drain(X, y, groups, held, block_rows, rng)


def _drain(
    X: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    groups: npt.NDArray[np.int64],
    held: int,
    block_rows: int,
    rng: np.random.Generator | None,
) -> Iterator[_Block]:
    """Cut the first `held` buffer rows into blocks, shuffled with `rng`.

    Blocks are copies (fancy indexing), so the caller may keep them while the
    buffer is refilled.
    """
    order = rng.permutation(held) if rng is not None else np.arange(held)
    for start in range(0, held, block_rows):
        take = order[start : start + block_rows]
        yield X[take], y[take], groups[take]


def check_finite(X: npt.NDArray[np.floating[Any]], name: str) -> None:
    """Refuse NaN or infinite codes with the count and the likely causes.

    Raises:
        DataError: some codes are not finite.
    """
    bad = ~np.isfinite(X)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise DataError(
            f"{name}: {rows} of {len(X)} code rows hold NaN or infinite values. "
            "Likely causes: float16 storage overflowing (set extract.dtype = "
            "'float32'), fp16 autocast (set extract.precision = 'bf16' or 'fp32'), "
            "or broken weights; re-extract after fixing."
        )
