"""The HDF5 code cache: crash-safe shards, atomic assembly, verification.

Layout of a finished cache file (format version 1):

    /                      attrs: format, format_version, key, provenance (JSON),
                           environment (JSON), label_names (JSON), data_root,
                           n_images, n_rows, created, complete
    /images/path  (I,)     str, relative to data_root
    /images/label (I,)     int64 index into label_names
    /images/split (I,)     str: train | val | test
    /rows/image   (R,)     int64 index into /images (one row per image and view)
    /rows/view    (R,)     int16: 0 is the deterministic view
    /codes/<layer>/<pooling> (R, D) float32 | float16, chunked ~1 MiB
                           attrs: layer, node, pooling, source_shape, sha256
    /skipped/path, /skipped/reason (S,) str

Writing never touches the final name until the file is whole. Codes go into
fixed-size shards in `<name>.parts/`: each shard is written to a temporary
file, fsynced and renamed into place, so a shard file that exists is complete.
A killed run resumes by skipping the shards it finds. The final file is built
under a temporary name, fsynced and renamed over the final name; then the
parts are removed. A file with the final name is therefore always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np
import numpy.typing as npt

from features.atomic import (
    atomic_open,
    atomic_path,
    check_free_space,
    make_folder,
    output_error,
    write_text,
)
from features.errors import (
    CacheCorruptError,
    CacheLockedError,
    CacheMismatchError,
    StageInputError,
)

log = logging.getLogger(__name__)

FORMAT = "quadrant-codes"
FORMAT_VERSION = 1
_CHUNK_BYTES = 1 << 20
_STR = h5py.string_dtype()


def cache_key(provenance: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the codes."""
    text = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CodeSpec:
    """One cached array: a layer pooled one way."""

    layer: str
    node: str
    pooling: str
    dims: int
    source_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.pooling}"


@dataclass(frozen=True)
class ImageTable:
    """The images and rows a cache describes, before failed decodes are dropped."""

    paths: Sequence[str]
    labels: npt.NDArray[np.int64]
    splits: Sequence[str]
    row_image: npt.NDArray[np.int64]
    row_view: npt.NDArray[np.int16]


# ---------------------------------------------------------------------------
# Shards


class ShardStore:
    """The `<cache>.parts/` folder of committed shards, held under a lock.

    Use as a context manager; the lock stops a second process from extracting
    the same codes at the same time.
    """

    def __init__(
        self,
        parts: Path,
        *,
        key: str,
        n_rows: int,
        shard_rows: int,
        specs: Sequence[CodeSpec],
        dtype: str,
    ) -> None:
        self.parts = parts
        self.key = key
        self.n_rows = n_rows
        self.shard_rows = shard_rows
        self.specs = tuple(specs)
        self.dtype = np.dtype(dtype)
        self.finished = False
        self._lock = filelock.FileLock(str(parts) + ".lock")

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def code_bytes(self, rows: int) -> int:
        """Bytes the codes of `rows` rows take, every array together."""
        return rows * sum(s.dims for s in self.specs) * self.dtype.itemsize

    def rows(self, shard: int) -> range:
        return range(
            shard * self.shard_rows, min(self.n_rows, (shard + 1) * self.shard_rows)
        )

    def __enter__(self) -> ShardStore:
        make_folder(self.parts.parent, setting="extract.cache_dir")
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise CacheLockedError(
                f"another quadrant process is extracting into {self.parts}; wait "
                f"for it to finish (or, if none runs, delete {self._lock.lock_file})"
            ) from None
        except OSError as err:  # a read-only or full cache folder
            raise output_error(
                Path(self._lock.lock_file), err, setting="extract.cache_dir"
            ) from err
        self._open_manifest()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self.finished:
            # NOTE: a lock file outliving its cache only confuses; a process
            # arriving now finds the finished file before it looks for a lock.
            Path(self._lock.lock_file).unlink(missing_ok=True)

    def _manifest(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "n_rows": self.n_rows,
            "shard_rows": self.shard_rows,
            "dtype": self.dtype.name,
            "specs": [asdict(s) for s in self.specs],
        }

    def _open_manifest(self) -> None:
        path = self.parts / "manifest.json"
        wanted = json.loads(json.dumps(self._manifest()))  # tuples as lists
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):
                found = None
            if found == wanted:
                return
            log.warning(
                "discarding shards in %s written with other settings", self.parts
            )
            shutil.rmtree(self.parts)
        make_folder(self.parts)
        write_text(path, json.dumps(wanted, indent=1))

    def _shard_path(self, shard: int) -> Path:
        return self.parts / f"shard-{shard:06d}.npz"

    def committed(self) -> list[int]:
        """Shards already on disk and readable; unreadable ones are removed."""
        done = []
        for shard in range(self.n_shards):
            path = self._shard_path(shard)
            if path.is_file():
                if self._readable(shard):
                    done.append(shard)
                else:
                    log.warning("shard %s is unreadable; computing it again", path)
                    path.unlink()
        return done

    def _readable(self, shard: int) -> bool:
        try:
            self.read(shard)
        except Exception:  # noqa: BLE001 - any failure means "compute it again"
            return False
        return True

    def write(
        self,
        shard: int,
        codes: Mapping[str, npt.NDArray[Any]],
        ok: npt.NDArray[np.bool_],
        reasons: Sequence[str],
    ) -> None:
        """Commit one shard atomically (temporary file, fsync, rename)."""
        n = len(self.rows(shard))
        arrays = {
            f"codes/{name}": codes[name].astype(self.dtype, copy=False)
            for name in (s.name for s in self.specs)
        }
        for name, array in arrays.items():
            if array.shape[0] != n:
                raise AssertionError(
                    f"shard {shard}: {name} has {array.shape[0]} rows, not {n}"
                )
        arrays["ok"] = ok
        arrays["reasons"] = np.asarray(list(reasons), dtype=str)
        with atomic_open(self._shard_path(shard), "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]

    def read(
        self, shard: int
    ) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.bool_], list[str]]:
        """The codes, decode flags and failure reasons of one committed shard."""
        n = len(self.rows(shard))
        with np.load(self._shard_path(shard), allow_pickle=False) as data:
            codes = {s.name: data[f"codes/{s.name}"] for s in self.specs}
            ok, reasons = data["ok"], [str(r) for r in data["reasons"]]
        for spec in self.specs:
            if codes[spec.name].shape != (n, spec.dims):
                raise CacheCorruptError(
                    f"shard {shard}: {spec.name} has the wrong shape"
                )
        if ok.shape != (n,) or len(reasons) != n:
            raise CacheCorruptError(f"shard {shard}: row flags have the wrong length")
        return codes, ok, reasons


# ---------------------------------------------------------------------------
# Assembly


def assemble(
    store: ShardStore,
    final: Path,
    *,
    table: ImageTable,
    label_names: Sequence[str],
    skipped: Sequence[tuple[str, str]],
    provenance: Mapping[str, Any],
    environment: Mapping[str, Any],
    data_root: str,
    compression: str = "none",
) -> Path:
    """Build the final HDF5 file from the shards and rename it into place.

    Images whose decode failed are dropped here (every view of them), and
    listed under /skipped with the reason.
    """
    image_ok, failures = _decode_outcome(store, table)
    keep = np.flatnonzero(image_ok)
    new_index = np.full(len(table.paths), -1, dtype=np.int64)
    new_index[keep] = np.arange(len(keep))
    row_keep = image_ok[table.row_image]
    check_free_space(
        final.parent,
        store.code_bytes(int(row_keep.sum())),
        what="the code cache",
        setting="extract.cache_dir",
    )
    with atomic_path(final) as tmp, h5py.File(tmp, "w") as h5:
        _write_images(h5, table, keep, new_index, row_keep)
        skipped_all = sorted([*skipped, *failures])
        _write_strings(h5, "skipped/path", [p for p, _ in skipped_all])
        _write_strings(h5, "skipped/reason", [r for _, r in skipped_all])
        n_rows = int(row_keep.sum())
        _write_codes(h5, store, row_keep, n_rows, compression)
        h5.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "key": store.key,
                "provenance": json.dumps(provenance, sort_keys=True),
                "environment": json.dumps(environment, sort_keys=True),
                "label_names": json.dumps(list(label_names)),
                "code_order": json.dumps([s.name for s in store.specs]),
                "data_root": data_root,
                "n_images": len(keep),
                "n_rows": n_rows,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        # Set last: a file without it was not finished (belt and braces, since
        # the rename that atomic_path does is what publishes the file).
        h5.attrs["complete"] = True
    store.finished = True
    shutil.rmtree(store.parts, ignore_errors=True)
    return final


def _decode_outcome(
    store: ShardStore, table: ImageTable
) -> tuple[npt.NDArray[np.bool_], list[tuple[str, str]]]:
    image_ok = np.ones(len(table.paths), dtype=bool)
    failures: dict[int, str] = {}
    for shard in range(store.n_shards):
        _, ok, reasons = store.read(shard)
        rows = np.asarray(store.rows(shard))
        for row in rows[~ok]:
            image = int(table.row_image[row])
            image_ok[image] = False
            failures.setdefault(image, reasons[row - rows[0]])
    return image_ok, [(table.paths[i], r) for i, r in sorted(failures.items())]


def _write_images(
    h5: h5py.File,
    table: ImageTable,
    keep: npt.NDArray[np.int64],
    new_index: npt.NDArray[np.int64],
    row_keep: npt.NDArray[np.bool_],
) -> None:
    _write_strings(h5, "images/path", [table.paths[i] for i in keep])
    h5.create_dataset("images/label", data=table.labels[keep].astype(np.int64))
    _write_strings(h5, "images/split", [table.splits[i] for i in keep])
    h5.create_dataset("rows/image", data=new_index[table.row_image[row_keep]])
    h5.create_dataset("rows/view", data=table.row_view[row_keep].astype(np.int16))


def _write_strings(h5: h5py.File, name: str, values: Sequence[str]) -> None:
    h5.create_dataset(name, data=np.asarray(values, dtype=object), dtype=_STR)


def _write_codes(
    h5: h5py.File,
    store: ShardStore,
    row_keep: npt.NDArray[np.bool_],
    n_rows: int,
    compression: str,
) -> None:
    datasets, digests = {}, {}
    for spec in store.specs:
        rows_per_chunk = max(
            1, min(n_rows, _CHUNK_BYTES // (spec.dims * store.dtype.itemsize))
        )
        datasets[spec.name] = h5.create_dataset(
            f"codes/{spec.name}",
            shape=(n_rows, spec.dims),
            dtype=store.dtype,
            chunks=(rows_per_chunk, spec.dims) if n_rows else None,
            compression=None if compression == "none" else compression,
        )
        datasets[spec.name].attrs.update(
            {
                "layer": spec.layer,
                "node": spec.node,
                "pooling": spec.pooling,
                "source_shape": list(spec.source_shape),
            }
        )
        digests[spec.name] = hashlib.sha256()
    offset = 0
    # One shard in memory at a time keeps assembly memory flat in dataset size.
    for shard in range(store.n_shards):
        codes, _, _ = store.read(shard)
        rows = store.rows(shard)
        mask = row_keep[rows.start : rows.stop]
        count = int(mask.sum())
        for name, array in codes.items():
            block = np.ascontiguousarray(array[mask])
            datasets[name][offset : offset + count] = block
            digests[name].update(block.tobytes())
        offset += count
    for name, digest in digests.items():
        datasets[name].attrs["sha256"] = digest.hexdigest()


# ---------------------------------------------------------------------------
# Reading and checking


@contextlib.contextmanager
def open_cache(path: Path) -> Iterator[h5py.File]:
    """Open a finished cache file for reading.

    Raises:
        CacheCorruptError: the file is not a complete quadrant cache.
    """
    path = Path(path)
    if not path.is_file():
        raise StageInputError(
            f"code cache {path} not found; run `quadrant extract` to create it"
        )
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise CacheCorruptError(
            f"{path} cannot be opened as HDF5 ({err}); it is truncated or not a "
            "code cache. Delete it and run `quadrant extract` again."
        ) from err
    try:
        _check_header(path, h5)
        yield h5
    finally:
        h5.close()


def _check_header(path: Path, h5: h5py.File) -> None:
    if h5.attrs.get("format") != FORMAT:
        raise CacheCorruptError(f"{path} is an HDF5 file but not a quadrant code cache")
    version = int(h5.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path} has cache format version {version}; this quadrant reads "
            f"version {FORMAT_VERSION}. Run `quadrant extract` to rebuild it."
        )
    if not h5.attrs.get("complete", False):
        raise CacheCorruptError(
            f"{path} was not finished; delete it and run `quadrant extract` again"
        )


@dataclass(frozen=True)
class CacheInfo:
    """What a cache file holds, without its codes."""

    path: Path
    key: str
    n_images: int
    n_rows: int
    label_names: tuple[str, ...]
    datasets: dict[str, tuple[int, ...]]
    dtype: str
    split_counts: dict[str, int]
    n_skipped: int
    provenance: dict[str, Any]
    environment: dict[str, Any]
    data_root: str
    created: str
    size_bytes: int


def read_info(path: Path) -> CacheInfo:
    """Summarise a cache file (header, datasets, counts)."""
    with open_cache(path) as h5:
        order = json.loads(h5.attrs["code_order"])
        datasets = {name: tuple(h5[f"codes/{name}"].shape) for name in order}
        splits = h5["images/split"].asstr()[:]
        values, counts = np.unique(splits, return_counts=True)
        first = next(iter(datasets), None)
        return CacheInfo(
            path=Path(path),
            key=str(h5.attrs["key"]),
            n_images=int(h5.attrs["n_images"]),
            n_rows=int(h5.attrs["n_rows"]),
            label_names=tuple(json.loads(h5.attrs["label_names"])),
            datasets=datasets,
            dtype=str(h5[f"codes/{first}"].dtype) if first else "",
            split_counts={str(v): int(c) for v, c in zip(values, counts, strict=True)},
            n_skipped=len(h5["skipped/path"]),
            provenance=json.loads(h5.attrs["provenance"]),
            environment=json.loads(h5.attrs["environment"]),
            data_root=str(h5.attrs["data_root"]),
            created=str(h5.attrs["created"]),
            size_bytes=Path(path).stat().st_size,
        )


def verify(path: Path) -> list[str]:
    """Check a cache file end to end; return the problems found (empty: sound).

    Re-reads every code array and compares its sha256 with the one recorded at
    write time, and checks that every array agrees on the number of rows.
    """
    problems: list[str] = []
    try:
        with open_cache(path) as h5:
            problems += _verify_tables(h5)
            for name, expected in _code_digests(h5).items():
                actual = _digest_dataset(h5[f"codes/{name}"])
                if actual != expected:
                    problems.append(f"codes/{name}: checksum mismatch (data corrupted)")
    except (CacheCorruptError, CacheMismatchError) as err:
        problems.append(str(err))
    except (OSError, KeyError, ValueError) as err:
        problems.append(f"{path}: unreadable ({type(err).__name__}: {err})")
    return problems


def _verify_tables(h5: h5py.File) -> list[str]:
    problems = []
    n_images, n_rows = int(h5.attrs["n_images"]), int(h5.attrs["n_rows"])
    for name, expected in (
        ("images/path", n_images),
        ("images/label", n_images),
        ("images/split", n_images),
        ("rows/image", n_rows),
        ("rows/view", n_rows),
    ):
        if name not in h5 or len(h5[name]) != expected:
            problems.append(f"{name}: expected {expected} entries")
    for name in _code_digests(h5):
        if h5[f"codes/{name}"].shape[0] != n_rows:
            problems.append(f"codes/{name}: expected {n_rows} rows")
    return problems


def _code_digests(h5: h5py.File) -> dict[str, str]:
    found: dict[str, str] = {}
    h5["codes"].visititems(
        lambda name, obj: (
            found.__setitem__(name, str(obj.attrs.get("sha256", "")))
            if isinstance(obj, h5py.Dataset)
            else None
        )
    )
    return found


def _digest_dataset(dataset: h5py.Dataset) -> str:
    digest = hashlib.sha256()
    step = dataset.chunks[0] if dataset.chunks else max(1, len(dataset))
    for start in range(0, dataset.shape[0], step):
        digest.update(np.ascontiguousarray(dataset[start : start + step]).tobytes())
    return digest.hexdigest()


# Provenance entries that only change float rounding, not what the codes are:
# codes computed on a GPU in bf16 serve training on a laptop.
ROUNDING_ONLY = ("compute", "batch_size")


def read_provenance(path: Path) -> dict[str, Any]:
    """The provenance record of a finished cache file (attributes only)."""
    with open_cache(path) as h5:
        return dict(json.loads(h5.attrs["provenance"]))


def same_codes(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two provenance records differ at most in float rounding."""
    return {k: v for k, v in a.items() if k not in ROUNDING_ONLY} == {
        k: v for k, v in b.items() if k not in ROUNDING_ONLY
    }


def find_compatible(cache_dir: Path, provenance: Mapping[str, Any]) -> Path | None:
    """A finished cache in `cache_dir` holding the same codes up to rounding."""
    for file in sorted(Path(cache_dir).glob("codes-*.h5")):
        try:
            if same_codes(read_provenance(file), provenance):
                return file
        except (CacheCorruptError, CacheMismatchError, OSError, KeyError):
            continue
    return None


def diff_provenance(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two provenance records ("a.b: x != y")."""
    out: list[str] = []
    _diff("", expected, found, out)
    return out


def _diff(prefix: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            _diff(f"{prefix}{key}.", a.get(key), b.get(key), out)
    elif a != b:
        out.append(f"{prefix.rstrip('.')}: expected {a!r}, found {b!r}")
