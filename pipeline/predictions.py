"""Predictions as they are made: committed in parts, published whole.

`quadrant predict` writes its rows in parts (`--part-rows`, 1,024 images by
default), each a Parquet file written atomically under a hidden folder
beside the output (`.predictions.csv.parts/`), with an index of the job
they belong to (`index.json`) and a record per committed part. A killed
run, started again with the same model, inputs and options, skips
the committed parts; when every part is there the output is written in one
atomic step (a CSV file, a Parquet file, or a folder of Parquet files, a
partitioned dataset) with a JSON summary beside it, and the parts folder is
removed.

Parts cover fixed ranges of the input list, so the output's rows are in
input order however often the run was interrupted; only `predicted_at`
(when the row's part was committed) differs from an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from features.atomic import (
    atomic_open,
    atomic_path,
    check_writable,
    read_optional_json,
    staged_folder,
    write_json,
)
from features.errors import OutputError, RecordError, StageInputError

# Images per committed part: a killed run loses at most this much work.
PART_ROWS = 1024
INDEX_VERSION = 1
FORMATS = ("csv", "parquet", "dataset")
_PART = re.compile(r"^part-\d{6}\.parquet$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What makes two runs the same job: their parts are interchangeable."""

    model_sha256: str
    inputs_sha256: str
    rows: int
    top_k: int
    all_scores: bool
    label_names: tuple[str, ...]
    part_rows: int = PART_ROWS
    extra_columns: tuple[str, ...] = ()  # the manifests' own, passed through

    def key(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "model_sha256": self.model_sha256,
            "inputs_sha256": self.inputs_sha256,
            "rows": self.rows,
            "top_k": self.top_k,
            "all_scores": self.all_scores,
            "part_rows": self.part_rows,
            "extra_columns": list(self.extra_columns),
        }

    def parts(self) -> int:
        return -(-self.rows // self.part_rows)


class Entry(NamedTuple):
    """One input: its path, and a manifest row's other columns."""

    path: str
    columns: Mapping[str, str] = MappingProxyType({})


# Columns of ours: a manifest column of the same name is written as input_<name>.
OWN_COLUMNS = frozenset(
    ["path", "label", "label_index", "score", "top_labels", "top_scores"]
    + ["error", "model_sha256", "predicted_at"]
)


def output_name(column: str) -> str:
    """A manifest column's name in the output."""
    clashes = column in OWN_COLUMNS or column.startswith("score_")
    return f"input_{column}" if clashes else column


def describe(entries: Iterable[Entry]) -> tuple[int, str, tuple[str, ...]]:
    """One pass over the inputs: (count, sha256 of the ordered list and its
    manifest columns, the manifests' columns besides `path` in first-seen
    order). Another list is another job."""
    digest = hashlib.sha256()
    columns: dict[str, None] = {}
    count = 0
    for entry in entries:
        count += 1
        digest.update(entry.path.encode("utf-8", "surrogateescape") + b"\0")
        if entry.columns:
            digest.update(json.dumps(sorted(entry.columns.items())).encode() + b"\0")
            for name in entry.columns:
                columns.setdefault(name, None)
    return count, digest.hexdigest(), tuple(columns)


def output_format(out: Path) -> str:
    """csv, parquet, or dataset (a folder of Parquet files), by the name.

    A name ending in .csv or .parquet is that file; an existing folder, or a
    name without a suffix, is a dataset folder.
    """
    suffix = out.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if out.is_dir() or not suffix:
        return "dataset"
    raise StageInputError(
        f"--out {out}: cannot tell the format from {suffix!r}; name a .csv or "
        ".parquet file, or a folder (a Parquet dataset)"
    )


def check_dataset_folder(out: Path) -> None:
    """A dataset folder is new, empty, or an earlier dataset of predict's: it
    is replaced whole, so a folder holding anything else is refused.

    Raises:
        OutputError: naming the folder and what to give instead.
    """
    check_writable(out.parent, setting="--out")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: name a new folder")
    others = [p.name for p in out.iterdir() if not _PART.match(p.name)]
    if others:
        raise OutputError(
            f"--out {out} is a folder holding other files ({sorted(others)[:3]}), "
            "which a Parquet dataset would replace: name a new or empty folder, "
            "or a .csv or .parquet file"
        )


def schema(job: Job) -> pa.Schema:
    """The columns of every part and of the Parquet outputs."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        *[pa.field(output_name(c), pa.string()) for c in job.extra_columns],
        pa.field("label", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_scores", pa.list_(pa.float32())),
    ]
    if job.all_scores:
        fields += [pa.field(f"score_{name}", pa.float32()) for name in job.label_names]
    fields += [
        pa.field("error", pa.string()),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("predicted_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ]
    return pa.schema(fields)


class PartStore:
    """The committed parts of one job, in a hidden folder beside the output.

    `index.json` names the job; each committed part is its Parquet file and
    a record of its counts (`part-NNNNNN.json`, written after the part), so
    that several processes commit parts side by side without sharing a file.
    """

    def __init__(self, out: Path, job: Job) -> None:
        self.folder = out.with_name(f".{out.name}.parts")
        self.index_file = self.folder / "index.json"
        self.job = job
        self.schema = schema(job)
        self.committed: dict[int, dict[str, int]] = {}

    def open(self) -> int:
        """Keep the parts of the same job, discard another job's; the count kept.

        Under torchrun, rank 0 alone opens the store; the others `refresh`.
        """
        index = self._read_index()
        if index is None or index.get("job") != self.job.key():
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            write_json(self.index_file, {"job": self.job.key()})
        return self.refresh()

    def refresh(self) -> int:
        """Read which parts are committed (by any process); their count."""
        self.committed = {}
        for part in range(self.job.parts()):
            record = self._record_file(part)
            if record.is_file() and self._part_file(part).is_file():
                counts = read_optional_json(record)
                if isinstance(counts, dict):
                    self.committed[part] = counts
        return len(self.committed)

    def _read_index(self) -> dict[str, Any] | None:
        if not self.folder.is_dir():
            return None
        try:
            index = read_optional_json(self.index_file)
        except RecordError as err:
            # NOTE: the index is written atomically; an unreadable one was
            # changed by hand: its parts cannot be trusted, so they go.
            log.warning("%s; predicting every part again", err)
            return None
        return index if isinstance(index, dict) else None

    def missing(self) -> list[int]:
        return [i for i in range(self.job.parts()) if i not in self.committed]

    def rows_of(self, part: int) -> range:
        start = part * self.job.part_rows
        return range(start, min(start + self.job.part_rows, self.job.rows))

    def commit(self, part: int, columns: dict[str, list[Any]]) -> None:
        """Write one part atomically, then its record."""
        now = datetime.now(UTC)
        rows = len(columns["path"])
        columns = columns | {
            "model_sha256": [self.job.model_sha256] * rows,
            "predicted_at": [now] * rows,
        }
        table = pa.Table.from_pydict(columns, schema=self.schema)
        with atomic_path(self._part_file(part), setting="--out") as tmp:
            pq.write_table(table, tmp)
        failed = sum(error is not None for error in columns["error"])
        self.committed[part] = {"rows": rows, "failed": failed}
        write_json(self._record_file(part), self.committed[part])

    def totals(self) -> tuple[int, int]:
        """(rows, failed) over the committed parts."""
        rows = sum(c["rows"] for c in self.committed.values())
        return rows, sum(c["failed"] for c in self.committed.values())

    def tables(self) -> Iterator[pa.Table]:
        for part in range(self.job.parts()):
            yield pq.read_table(self._part_file(part), schema=self.schema)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _part_file(self, part: int) -> Path:
        return self.folder / f"part-{part:06d}.parquet"

    def _record_file(self, part: int) -> Path:
        return self.folder / f"part-{part:06d}.json"


def publish(store: PartStore, out: Path, fmt: str) -> None:
    """Write the output from the committed parts, in one atomic step."""
    if fmt == "csv":
        _write_csv(store, out)
    elif fmt == "parquet":
        with atomic_path(out, setting="--out") as tmp:
            with pq.ParquetWriter(tmp, store.schema) as writer:
                for table in store.tables():
                    writer.write_table(table)
    else:
        with staged_folder(out) as staging:
            for part, table in enumerate(store.tables()):
                pq.write_table(table, staging / f"part-{part:06d}.parquet")


def _write_csv(store: PartStore, out: Path) -> None:
    names = store.job.label_names
    probs = [f"score_{n}" for n in names] if store.job.all_scores else []
    extras = [output_name(c) for c in store.job.extra_columns]
    header = ["path", *extras, "label", "score", "top_k", "error", *probs]
    header += ["model_sha256", "predicted_at"]
    with atomic_open(out, "w", newline="", setting="--out") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for table in store.tables():
            for row in table.to_pylist():
                writer.writerow(_csv_row(row, extras, probs))


def _csv_row(row: dict[str, Any], extras: list[str], probs: list[str]) -> list[Any]:
    predicted = row["error"] is None
    top = ";".join(
        f"{label}:{score:.4f}"
        for label, score in zip(
            row["top_labels"] or [], row["top_scores"] or [], strict=True
        )
    )
    return [
        row["path"],
        *[row[name] or "" for name in extras],
        row["label"] or "",
        f"{row['score']:.6f}" if predicted else "",
        top,
        row["error"] or "",
        *[f"{row[p]:.6f}" if predicted else "" for p in probs],
        row["model_sha256"],
        row["predicted_at"].isoformat(timespec="milliseconds"),
    ]


def summary_path(out: Path) -> Path:
    """The JSON summary beside the output: predictions.csv ->
    predictions.summary.json, a dataset folder preds/ -> preds.summary.json."""
    name = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{name}.summary.json")


def write_summary(out: Path, fmt: str, summary: dict[str, Any]) -> Path:
    path = summary_path(out)
    write_json(path, {"output": str(out), "format": fmt, **summary})
    return path
