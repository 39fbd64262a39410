"""The HDF5 code cache: crash-safe shards linked into one small file.

A finished cache (format version 2) is two entries side by side:

    codes-<key16>.h5       the cache file: tables, provenance, and one virtual
                           dataset per code array that links the shards
    codes-<key16>.shards/  shard-NNNNNN.h5: the codes themselves, written once
                           each, by whichever process (torchrun rank) ran them

Layout of the cache file:

    /                      attrs: format, format_version, key, provenance (JSON),
                           environment (JSON), label_names (JSON), code_order,
                           data_root, n_images, n_rows, shards, n_shards,
                           shard_rows, created, complete
    /listed/...            every listed image and row, before failed decodes
                           were dropped (the sources of /images and /rows)
    /images/path  (I,)     str, relative to data_root        } rows of images
    /images/label (I,)     int64 index into label_names      } that decoded,
    /images/split (I,)     str: train | val | test           } linked into
    /rows/image   (R,)     int64 index into /images           } /listed
    /rows/view    (R,)     int16: 0 is the deterministic view }
    /codes/<layer>/<pooling> (R, D) float32 | float16: a virtual dataset over
                           the shards' arrays, decodable rows only
                           attrs: layer, node, pooling, source_shape,
                           rows_per_chunk
    /skipped/path, /skipped/reason (S,) str

Writing never touches the final name until the cache is whole. The process
that owns the cache (rank 0) writes the image tables into
`codes-<key16>.shards/index.h5` before any compute. Codes go into fixed-size
shards: each shard is written to a temporary file, fsynced and renamed into
place, so a shard file that exists is complete, and it carries the sha256 of
each of its arrays. A killed run resumes by skipping the shards it finds.
Finishing adds the virtual datasets to the index file and renames it to the
final name; it reads no codes and copies none, so it costs about the same at
any size. A file with the final name is therefore always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np
import numpy.typing as npt

from features.atomic import (
    atomic_path,
    make_folder,
    output_error,
    read_optional_json,
    require_file,
    write_text,
)
from features.errors import (
    CacheCorruptError,
    CacheLockedError,
    CacheMismatchError,
    RecordError,
    StageInputError,
)

log = logging.getLogger(__name__)

FORMAT = "quadrant-codes"
FORMAT_VERSION = 2
SHARD_FORMAT = "quadrant-codes-shard"
_CHUNK_BYTES = 1 << 20
_STR = h5py.string_dtype()


def cache_key(provenance: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the codes."""
    text = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def shards_folder(final: Path) -> Path:
    """The folder of shard files that belongs to the cache file `final`."""
    return Path(final).with_suffix(".shards")


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


# Rows whose image failed to decode, per shard: {row: reason}.
Failures = dict[int, str]


# ---------------------------------------------------------------------------
# Shards


class ShardStore:
    """The `<cache>.shards/` folder of committed shards.

    Use as a context manager. The owner (the only process of a run, or rank 0
    of a torchrun job) holds a lock that stops a second job from extracting
    the same codes at the same time, and creates or checks the folder's
    manifest; the other ranks of its job open the folder without the lock.
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
        compression: str = "none",
        owner: bool = True,
        rank: int = 0,
    ) -> None:
        self.parts = parts
        self.key = key
        self.n_rows = n_rows
        self.shard_rows = shard_rows
        self.specs = tuple(specs)
        self.dtype = np.dtype(dtype)
        self.compression = None if compression == "none" else compression
        self.owner = owner
        self.rank = rank
        self.finished = False
        self._lock = filelock.FileLock(str(parts) + ".lock")

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def code_bytes(self, rows: int) -> int:
        """Bytes the codes of `rows` rows take, every array together."""
        return rows * sum(s.dims for s in self.specs) * self.dtype.itemsize

    @property
    def index(self) -> Path:
        """The image tables, written before compute; finishing publishes it."""
        return self.parts / "index.h5"

    def rows(self, shard: int) -> range:
        return range(
            shard * self.shard_rows, min(self.n_rows, (shard + 1) * self.shard_rows)
        )

    def __enter__(self) -> ShardStore:
        if not self.owner:
            self._check_manifest()
            return self
        make_folder(self.parts.parent, setting="extract.cache_dir")
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise CacheLockedError(
                f"another quadrant job is extracting into {self.parts}; wait "
                f"for it to finish (or, if none runs, delete {self._lock.lock_file})"
            ) from None
        except OSError as err:  # a read-only or full cache folder
            raise output_error(
                Path(self._lock.lock_file), err, setting="extract.cache_dir"
            ) from err
        self._open_manifest()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.owner:
            return
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

    def _read_manifest(self) -> Any:
        try:
            return read_optional_json(self.parts / "manifest.json")
        except RecordError:
            return None  # a damaged manifest describes no shard: they are redone

    def _open_manifest(self) -> None:
        wanted = json.loads(json.dumps(self._manifest()))  # tuples as lists
        found = self._read_manifest()
        if found == wanted:
            # NOTE: under the lock, before any rank of this job writes, every
            # temporary file here is a killed process's (of any machine).
            for leftover in self.parts.glob(".*.tmp-*"):
                leftover.unlink(missing_ok=True)
            return
        if found is not None or self.parts.exists():
            log.warning(
                "discarding shards in %s written with other settings", self.parts
            )
            shutil.rmtree(self.parts)
        make_folder(self.parts)
        write_text(self.parts / "manifest.json", json.dumps(wanted, indent=1))

    def _check_manifest(self) -> None:
        if self._read_manifest() != json.loads(json.dumps(self._manifest())):
            raise CacheMismatchError(
                f"{self.parts}/manifest.json does not describe the shards this "
                "process would write: the ranks of this job disagree on the "
                "settings. Run every rank with the same conf.toml and quadrant "
                "version."
            )

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard:06d}.h5"

    def shard_path(self, shard: int) -> Path:
        return self.parts / self.shard_name(shard)

    def committed(self, shards: Iterable[int] | None = None) -> dict[int, Failures]:
        """Committed shards among `shards` (all by default) and their failures.

        A shard is checked by its header (key, index, array shapes) and the
        sha256 of each code array (what a resume costs: reading the codes
        once, far less than computing them); a shard that fails is removed,
        to be computed again.
        """
        done: dict[int, Failures] = {}
        for shard in range(self.n_shards) if shards is None else shards:
            path = self.shard_path(shard)
            if not path.is_file():
                continue
            try:
                done[shard] = self._failures(shard)
            except Exception as err:  # noqa: BLE001 - any failure: compute it again
                log.warning("shard %s is damaged (%s); computing it again", path, err)
                path.unlink(missing_ok=True)
        return done

    def _failures(self, shard: int) -> Failures:
        with h5py.File(self.shard_path(shard), "r") as h5:
            self._check_shard(h5, shard)
            for spec in self.specs:
                dataset = h5[f"codes/{spec.name}"]
                if _digest_dataset(dataset) != dataset.attrs.get("sha256"):
                    raise CacheCorruptError(f"{spec.name}: checksum mismatch")
            ok = h5["ok"][:]
            failed = np.flatnonzero(~ok)
            reasons = h5["reasons"].asstr()[:] if len(failed) else []
        start = self.rows(shard).start
        return {start + int(i): str(reasons[i]) for i in failed}

    def _check_shard(self, h5: h5py.File, shard: int) -> None:
        n = len(self.rows(shard))
        if h5.attrs.get("format") != SHARD_FORMAT or h5.attrs.get("key") != self.key:
            raise CacheCorruptError(f"{h5.filename} is not a shard of key {self.key}")
        if int(h5.attrs.get("shard", -1)) != shard:
            raise CacheCorruptError(f"{h5.filename} is not shard {shard}")
        for spec in self.specs:
            if h5[f"codes/{spec.name}"].shape != (n, spec.dims):
                raise CacheCorruptError(
                    f"{h5.filename}: {spec.name} has the wrong shape"
                )
        if h5["ok"].shape != (n,) or h5["reasons"].shape != (n,):
            raise CacheCorruptError(f"{h5.filename}: row flags have the wrong length")

    def write(
        self,
        shard: int,
        codes: Mapping[str, npt.NDArray[Any]],
        ok: npt.NDArray[np.bool_],
        reasons: Sequence[str],
    ) -> None:
        """Commit one shard atomically (temporary file, fsync, rename).

        Each array's sha256 is recorded beside it, for `verify`.
        """
        n = len(self.rows(shard))
        arrays = {
            s.name: np.ascontiguousarray(codes[s.name], dtype=self.dtype)
            for s in self.specs
        }
        for spec in self.specs:
            if arrays[spec.name].shape != (n, spec.dims):
                raise AssertionError(f"shard {shard}: {spec.name} has the wrong shape")
        with atomic_path(self.shard_path(shard)) as tmp, h5py.File(tmp, "w") as h5:
            for name, array in arrays.items():
                self._write_array(h5, f"codes/{name}", array)
            h5.create_dataset("ok", data=np.asarray(ok, dtype=bool))
            _write_strings(h5, "reasons", list(reasons))
            h5.attrs.update(
                {
                    "format": SHARD_FORMAT,
                    "key": self.key,
                    "shard": shard,
                    "rank": self.rank,  # which process wrote it (for the record)
                }
            )

    def _write_array(self, h5: h5py.File, name: str, array: npt.NDArray[Any]) -> None:
        rows, dims = array.shape
        chunks = _chunks(rows, dims, self.dtype) if self.compression else None
        dataset = h5.create_dataset(
            name, data=array, chunks=chunks, compression=self.compression
        )
        dataset.attrs["sha256"] = hashlib.sha256(array.tobytes()).hexdigest()

    def read(
        self, shard: int
    ) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.bool_], list[str]]:
        """The codes, decode flags and failure reasons of one committed shard."""
        with h5py.File(self.shard_path(shard), "r") as h5:
            self._check_shard(h5, shard)
            codes = {s.name: h5[f"codes/{s.name}"][:] for s in self.specs}
            ok = h5["ok"][:]
            reasons = [str(r) for r in h5["reasons"].asstr()[:]]
        return codes, ok, reasons


def _chunks(rows: int, dims: int, dtype: np.dtype[Any]) -> tuple[int, int] | None:
    """HDF5 chunks of about 1 MiB of whole rows (None for an empty array)."""
    if rows == 0:
        return None
    return max(1, min(rows, _CHUNK_BYTES // max(1, dims * dtype.itemsize))), dims


# ---------------------------------------------------------------------------
# The index file (written before compute) and finishing (linking)


def write_index(
    store: ShardStore,
    table: ImageTable,
    *,
    skipped: Sequence[tuple[str, str]],
    attrs: Mapping[str, str],
) -> Path:
    """Write the listed images and rows to `store.index`, atomically.

    Written by the owner before any compute (and again on every run, so a
    run killed while finishing leaves nothing half-modified behind); the
    other ranks read the image list from it instead of listing the files.
    """
    with atomic_path(store.index) as tmp, h5py.File(tmp, "w") as h5:
        _write_strings(h5, "listed/path", table.paths)
        h5.create_dataset("listed/label", data=np.asarray(table.labels, np.int64))
        _write_strings(h5, "listed/split", table.splits)
        h5.create_dataset(
            "listed/row_image", data=np.asarray(table.row_image, np.int64)
        )
        h5.create_dataset("listed/row_view", data=np.asarray(table.row_view, np.int16))
        _write_strings(h5, "listed/skipped_path", [p for p, _ in skipped])
        _write_strings(h5, "listed/skipped_reason", [r for _, r in skipped])
        h5.attrs.update(dict(attrs))
    return store.index


def read_index(
    index: Path,
) -> tuple[ImageTable, list[tuple[str, str]], dict[str, str]]:
    """The table, listing-time skips and attributes `write_index` wrote."""
    with h5py.File(index, "r") as h5:
        g = h5["listed"]
        table = ImageTable(
            paths=[str(p) for p in g["path"].asstr()[:]],
            labels=g["label"][:],
            splits=[str(s) for s in g["split"].asstr()[:]],
            row_image=g["row_image"][:],
            row_view=g["row_view"][:],
        )
        skipped = _listed_skips(h5)
        attrs = {k: str(v) for k, v in h5.attrs.items()}
    return table, skipped, attrs


def decode_outcome(
    table: ImageTable, failures: Mapping[int, str]
) -> tuple[npt.NDArray[np.bool_], dict[int, str]]:
    """Which images decoded, and why each one that did not failed.

    Args:
        failures: rows whose decode failed, with the reason (every view of a
            failed image fails, since they decode the same file).
    """
    image_ok = np.ones(len(table.paths), dtype=bool)
    reasons: dict[int, str] = {}
    for row, why in sorted(failures.items()):
        image = int(table.row_image[row])
        image_ok[image] = False
        reasons.setdefault(image, why)
    return image_ok, reasons


def finish(
    store: ShardStore,
    final: Path,
    *,
    table: ImageTable,
    failures: Mapping[int, str],
    provenance: Mapping[str, Any],
    environment: Mapping[str, Any],
    label_names: Sequence[str],
    data_root: str,
) -> Path:
    """Link the committed shards into the cache file and publish it atomically.

    The index file gets one virtual dataset per code array, mapping the
    decodable rows of every shard, and virtual image tables without the
    images whose decode failed (listed under /skipped with the reason). No
    code is read or copied: the cost grows with the number of shards and
    failures, not with the number of codes.

    Args:
        failures: the rows whose decode failed, with the reason, over all shards.
    """
    image_ok, reasons = decode_outcome(table, failures)
    with atomic_path(final) as tmp:
        os.replace(store.index, tmp)
        with h5py.File(tmp, "r+") as h5:
            skipped = sorted(
                [*_listed_skips(h5), *((table.paths[i], r) for i, r in reasons.items())]
            )
            row_keep = _link_tables(h5, table, image_ok)
            _link_codes(h5, store, row_keep)
            _write_strings(h5, "skipped/path", [p for p, _ in skipped])
            _write_strings(h5, "skipped/reason", [r for _, r in skipped])
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
                    "n_images": int(image_ok.sum()),
                    "n_rows": len(h5["rows/view"]),
                    "shards": store.parts.name,
                    "n_shards": store.n_shards,
                    "shard_rows": store.shard_rows,
                    "shard_stats": json.dumps(
                        _shard_stats(store.parts, store.n_shards)
                    ),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
            # Set last: a file without it was not finished (belt and braces,
            # since the rename that atomic_path does is what publishes it).
            h5.attrs["complete"] = True
    store.finished = True
    return final


def _listed_skips(h5: h5py.File) -> list[tuple[str, str]]:
    g = h5["listed"]
    return list(
        zip(
            (str(p) for p in g["skipped_path"].asstr()[:]),
            (str(r) for r in g["skipped_reason"].asstr()[:]),
            strict=True,
        )
    )


def _link_tables(
    h5: h5py.File, table: ImageTable, image_ok: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_] | None:
    """/images and /rows as views of /listed without failed images.

    Returns:
        Which rows are kept, or None when every image decoded.
    """
    all_ok = bool(image_ok.all())
    row_keep = None if all_ok else image_ok[table.row_image]
    kept_images = _runs(image_ok)
    for name in ("path", "label", "split"):
        _link_same_file(h5, f"images/{name}", f"listed/{name}", kept_images)
    kept_rows = [(0, len(table.row_image))] if row_keep is None else _runs(row_keep)
    _link_same_file(h5, "rows/view", "listed/row_view", kept_rows)
    if all_ok:
        _link_same_file(h5, "rows/image", "listed/row_image", kept_rows)
    else:
        # NOTE: the one table finishing writes row by row, and only when an
        # image failed: image indices after a dropped image shift down.
        new_index = np.cumsum(image_ok, dtype=np.int64) - 1
        h5.create_dataset(
            "rows/image", data=new_index[table.row_image[row_keep]].astype(np.int64)
        )
    return row_keep


def _runs(keep: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.view(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _link_same_file(
    h5: h5py.File, name: str, source: str, runs: Sequence[tuple[int, int]]
) -> None:
    src = h5[source]
    n = sum(b - a for a, b in runs)
    layout = h5py.VirtualLayout(shape=(n, *src.shape[1:]), dtype=src.dtype)
    # "." is HDF5's name for the file that holds the virtual dataset itself.
    vsource = h5py.VirtualSource(".", source, shape=src.shape, dtype=src.dtype)
    at = 0
    for a, b in runs:
        layout[at : at + b - a] = vsource[a:b]
        at += b - a
    h5.create_virtual_dataset(name, layout)


def _link_codes(
    h5: h5py.File, store: ShardStore, row_keep: npt.NDArray[np.bool_] | None
) -> None:
    runs = list(_shard_runs(store, row_keep))
    n_rows = sum(b - a for _, a, b in runs)
    files = [f"{store.parts.name}/{store.shard_name(s)}".encode() for s, _, _ in runs]
    for spec in store.specs:
        # NOTE: the mappings go straight into the property list through
        # h5py's low-level API: h5py's VirtualLayout deep-copies its source
        # per mapping, which made finishing grow by ~80 us a shard.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.VIRTUAL)
        # NaN, not 0, where a shard is unreadable: a missing file cannot pass
        # for codes.
        dcpl.set_fill_value(np.array([np.nan], dtype=store.dtype))
        # '%' is a format character in HDF5's virtual source names.
        source = f"codes/{spec.name}".replace("%", "%%").encode()
        virtual = h5py.h5s.create_simple((max(n_rows, 1), spec.dims))
        spaces: dict[int, h5py.h5s.SpaceID] = {}
        at = 0
        for (shard, a, b), file in zip(runs, files, strict=True):
            rows = store.rows(shard)
            space = spaces.get(len(rows))
            if space is None:
                space = h5py.h5s.create_simple((len(rows), spec.dims))
                spaces[len(rows)] = space
            if (a, b) == (rows.start, rows.stop):
                space.select_all()
            else:
                space.select_hyperslab((a - rows.start, 0), (b - a, spec.dims))
            # HDF5 copies both selections into the property list.
            virtual.select_hyperslab((at, 0), (b - a, spec.dims))
            dcpl.set_virtual(virtual, file, source, space)
            at += b - a
        group = h5.require_group(f"codes/{spec.layer}")
        dataset = h5py.Dataset(
            h5py.h5d.create(
                group.id,
                spec.pooling.encode(),
                h5py.h5t.py_create(np.dtype(store.dtype), logical=True),
                h5py.h5s.create_simple((n_rows, spec.dims)),
                dcpl=dcpl,
            )
        )
        chunk = _chunks(store.shard_rows, spec.dims, np.dtype(store.dtype))
        dataset.attrs.update(
            {
                "layer": spec.layer,
                "node": spec.node,
                "pooling": spec.pooling,
                "source_shape": list(spec.source_shape),
                "rows_per_chunk": chunk[0] if chunk else 1,
            }
        )


def _shard_runs(
    store: ShardStore, row_keep: npt.NDArray[np.bool_] | None
) -> Iterator[tuple[int, int, int]]:
    """(shard, first row, stop row) of every run of kept rows within a shard."""
    touched = (
        set()
        if row_keep is None
        else {int(r) // store.shard_rows for r in np.flatnonzero(~row_keep)}
    )
    for shard in range(store.n_shards):
        rows = store.rows(shard)
        if shard not in touched:
            yield shard, rows.start, rows.stop
            continue
        assert row_keep is not None
        for a, b in _runs(row_keep[rows.start : rows.stop]):
            yield shard, rows.start + a, rows.start + b


def _write_strings(h5: h5py.File, name: str, values: Sequence[str]) -> None:
    h5.create_dataset(name, data=np.asarray(values, dtype=object), dtype=_STR)


# ---------------------------------------------------------------------------
# Reading and checking


@contextlib.contextmanager
def open_cache(path: Path, *, check_shards: bool = True) -> Iterator[h5py.File]:
    """Open a finished cache file for reading.

    With `check_shards`, a shard whose size or modification time differs
    from when the cache was written has its checksums checked before any
    code is read (`verify` checks every shard; `cache info` none).

    Raises:
        StageInputError: the file does not exist.
        CacheCorruptError: the file is not a complete quadrant cache, shard
            files it links are missing, or a changed shard is damaged.
        CacheMismatchError: the file has another format version.
    """
    path = require_file(
        path,
        what="code cache",
        fix="pass a cache file (the .h5 files under <run.out>/cache), or run "
        "`quadrant extract` to create one",
    )
    _check_is_hdf5(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise CacheCorruptError(
            f"{path} cannot be opened as HDF5 ({err}); it is truncated or not a "
            "code cache. Delete it and run `quadrant extract` again."
        ) from err
    try:
        _check_header(path, h5)
        _check_shards_present(path, h5)
        if check_shards:
            _check_changed_shards(path, h5)
        yield h5
    finally:
        h5.close()


def _check_is_hdf5(path: Path) -> None:
    """Tell a file that is no cache at all (a conf.toml passed by mistake)
    from a damaged cache, which is the only one worth deleting.

    Raises:
        StageInputError: `path` is not an .h5 file and not HDF5.
        CacheCorruptError: an .h5 file without the HDF5 signature.
    """
    if h5py.is_hdf5(path):
        return
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise StageInputError(
            f"{path} is not a code cache (not an HDF5 file); pass a cache file: "
            "the .h5 files under <run.out>/cache (or extract.cache_dir)"
        )
    raise CacheCorruptError(
        f"{path} is not an HDF5 file (no HDF5 signature): it is truncated or was "
        "overwritten. Delete it and run `quadrant extract` again."
    )


def _check_header(path: Path, h5: h5py.File) -> None:
    if h5.attrs.get("format") != FORMAT:
        raise CacheCorruptError(f"{path} is an HDF5 file but not a quadrant code cache")
    version = int(h5.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path} has cache format version {version}; this quadrant reads "
            f"version {FORMAT_VERSION} (codes in shard files linked by one small "
            "file). Fix: re-extract: run `quadrant extract` with the same "
            "conf.toml, which writes a new cache beside it; then delete this file."
        )
    if not h5.attrs.get("complete", False):
        raise CacheCorruptError(
            f"{path} was not finished; delete it and run `quadrant extract` again"
        )


def _virtual_codes(h5: h5py.File) -> bool:
    order = json.loads(h5.attrs.get("code_order", "[]"))
    return bool(order) and h5[f"codes/{order[0]}"].is_virtual


def _check_shards_present(path: Path, h5: h5py.File) -> None:
    """Refuse a cache whose shard files are not beside it.

    NOTE: HDF5 reads a missing virtual source as fill values, and looks for
    relative source paths in the working folder too: a moved or copied cache
    file without its shards would otherwise read as NaN or as another cache's
    codes.
    """
    if not _virtual_codes(h5):
        return
    folder = path.parent / str(h5.attrs["shards"])
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    missing = [
        name
        for name in (f"shard-{i:06d}.h5" for i in range(int(h5.attrs["n_shards"])))
        if name not in names
    ]
    if missing:
        raise CacheCorruptError(
            f"{path} links its codes to {int(h5.attrs['n_shards'])} shard files in "
            f"{folder}, and {len(missing)} are missing (e.g. {missing[0]}): the "
            "cache file was moved or copied without its shards folder. Fix: keep "
            f"{folder.name}/ beside {path.name} (move or copy both), or delete "
            "both and run `quadrant extract` again."
        )


def _shard_stats(folder: Path, n_shards: int) -> list[list[int]]:
    """(size, mtime_ns) of every shard file: what the cheap check compares."""
    stats = [os.stat(folder / f"shard-{i:06d}.h5") for i in range(n_shards)]
    return [[st.st_size, st.st_mtime_ns] for st in stats]


# Said wherever a damaged shard is found: extract repairs it.
REPAIR = (
    "Fix: run `quadrant extract` again with the same settings: it checks every "
    "shard's checksum and computes the damaged ones again (the others are kept)"
)


def _check_changed_shards(path: Path, h5: h5py.File) -> None:
    """Checksum the shards changed since the cache was written (none, usually).

    NOTE: a copy without its times (cp without -p) changes every shard's
    time: each is checked then, at the cost of reading it.

    Raises:
        CacheCorruptError: naming the damaged shard and the fix.
    """
    if not _virtual_codes(h5) or "shard_stats" not in h5.attrs:
        return
    recorded = json.loads(h5.attrs["shard_stats"])
    now = _shard_stats(path.parent / str(h5.attrs["shards"]), len(recorded))
    changed = [i for i, (a, b) in enumerate(zip(recorded, now, strict=True)) if a != b]
    if not changed:
        return
    log.info("%d shard file(s) changed since written: checking them", len(changed))
    store, order = _shard_store_of(path, h5)
    for shard in changed:
        problem = _verify_shard(store, shard, order)
        if problem:
            raise CacheCorruptError(
                f"{path}: {store.parts.name}/{store.shard_name(shard)}: {problem}. "
                + REPAIR
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
    """Summarise a cache file (header, datasets, counts); no code is read."""
    with open_cache(path, check_shards=False) as h5:
        order = json.loads(h5.attrs["code_order"])
        datasets = {name: tuple(h5[f"codes/{name}"].shape) for name in order}
        splits = h5["images/split"].asstr()[:]
        values, counts = np.unique(splits, return_counts=True)
        first = next(iter(datasets), None)
        shards = Path(path).parent / str(h5.attrs.get("shards", ""))
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
            size_bytes=Path(path).stat().st_size + _folder_bytes(shards),
        )


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir() or folder == folder.parent:
        return 0
    return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())


def verify(path: Path) -> list[str]:
    """Check a cache end to end; return the problems found (empty: sound).

    Checks that every table agrees on the number of rows, then re-reads every
    shard: its header (key, index, shapes) and the sha256 of each of its code
    arrays against the one recorded when the shard was written.
    """
    problems: list[str] = []
    try:
        with open_cache(path, check_shards=False) as h5:
            problems += _verify_tables(h5)
            if _virtual_codes(h5):
                problems += _verify_shards(Path(path), h5)
            else:
                problems += _verify_plain(h5)
    except (CacheCorruptError, CacheMismatchError) as err:
        problems.append(str(err))
    except StageInputError:
        raise  # no cache at all: nothing to verify, nothing to delete
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
    for name in json.loads(h5.attrs["code_order"]):
        if h5[f"codes/{name}"].shape[0] != n_rows:
            problems.append(f"codes/{name}: expected {n_rows} rows")
    return problems


def _verify_shards(path: Path, h5: h5py.File) -> list[str]:
    """Every shard's header and checksums; one line per bad shard."""
    store, order = _shard_store_of(path, h5)
    problems = []
    for shard in range(store.n_shards):
        problem = _verify_shard(store, shard, order)
        if problem:
            problems.append(f"{store.parts.name}/{store.shard_name(shard)}: {problem}")
    return problems


def _shard_store_of(path: Path, h5: h5py.File) -> tuple[ShardStore, list[str]]:
    """The shards of a finished cache, to read, and its code arrays' names."""
    order = json.loads(h5.attrs["code_order"])
    store = ShardStore(
        path.parent / str(h5.attrs["shards"]),
        key=str(h5.attrs["key"]),
        n_rows=len(h5["listed/row_image"]),
        shard_rows=int(h5.attrs["shard_rows"]),
        specs=[
            CodeSpec("", "", "", int(h5[f"codes/{name}"].shape[1]), ())
            for name in order
        ],
        dtype=str(h5[f"codes/{order[0]}"].dtype),
    )
    return store, order


def _verify_shard(store: ShardStore, shard: int, order: Sequence[str]) -> str:
    n = len(store.rows(shard))
    try:
        with h5py.File(store.shard_path(shard), "r") as h5:
            if h5.attrs.get("key") != store.key or h5.attrs.get("shard") != shard:
                return f"not shard {shard} of key {store.key[:16]}"
            for name, spec in zip(order, store.specs, strict=True):
                dataset = h5[f"codes/{name}"]
                if dataset.shape != (n, spec.dims):
                    return f"codes/{name} has shape {dataset.shape}"
                if _digest_dataset(dataset) != dataset.attrs.get("sha256"):
                    return f"codes/{name}: checksum mismatch (data corrupted)"
    except (OSError, KeyError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return ""


def _verify_plain(h5: h5py.File) -> list[str]:
    """Code arrays stored whole (no shards): the array-wide sha256, if any."""
    problems = []
    for name in json.loads(h5.attrs["code_order"]):
        dataset = h5[f"codes/{name}"]
        expected = dataset.attrs.get("sha256")
        if expected is not None and _digest_dataset(dataset) != expected:
            problems.append(f"codes/{name}: checksum mismatch (data corrupted)")
    return problems


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
