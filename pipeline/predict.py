"""Batch prediction with an exported model: onnxruntime only, no training stack.

`quadrant predict model.onnx PATH...` reads image files, folders (recursively),
CSV files with a `path` column, or a list of paths on stdin (`-`), decodes
them as extraction does (fast or full decoding, as the model's training
pixels were), resizes and crops them as the model's metadata says, and
writes one row per image (`pipeline.predictions`: CSV, Parquet or a Parquet
dataset, committed in parts so that a killed run resumes). An unreadable
image gets its error in the row instead of stopping the run, up to
`--max-failures`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from features.atomic import check_output_file
from features.backbones import sha256_of
from features.data import list_files
from features.devices import resolve_device
from features.distributed import (
    World,
    gather_text,
    join_world,
    leave_world,
    run_on_main,
    share_text,
)
from features.errors import ConfigError, DataError, ImageDecodeError, StageInputError
from features.names import DECODE_MODES
from features.onnx_engine import session
from features.progress import progress_bar
from features.settings import Decoding
from features.transforms import Preprocessing, eval_transform
from pipeline import predictions
from pipeline.predictions import Entry, Job, PartStore, output_name

log = logging.getLogger(__name__)

# Exit code of a run that wrote every row but some images failed: a batch
# scheduler tells it from success (0), a user error (1) and an interrupt (130).
EXIT_SOME_FAILED = 3
# Larger inputs than this are no image model's: metadata saying so was edited.
MAX_INPUT_SIDE = 4096
DEFAULT_TOP_K = 3
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_FAILURES = re.compile(r"^(\d+(?:\.\d+)?)(%?)$")


@dataclass(frozen=True)
class PredictOptions:
    """How `quadrant predict` runs; every field checked by `check`."""

    top_k: int | None = None  # None: the best 3, or every class if fewer
    batch_size: int = 32
    device: str = "auto"
    all_scores: bool = False
    max_failures: str | None = None  # a count ("10") or a share ("5%")
    progress: bool = True
    part_rows: int = predictions.PART_ROWS  # images per committed part

    def check(self) -> None:
        """Raises: ConfigError naming the option, the value and what is allowed."""
        if self.batch_size < 1:
            raise ConfigError(
                f"--batch-size {self.batch_size}: give a positive number of images"
            )
        if self.part_rows < 1:
            raise ConfigError(
                f"--part-rows {self.part_rows}: give a positive number of images"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(
                f"--top-k {self.top_k}: give how many of the best classes to list "
                "(1 or more)"
            )
        if self.max_failures is not None and not _FAILURES.match(self.max_failures):
            raise ConfigError(
                f"--max-failures {self.max_failures!r}: give a count of images "
                "(10) or a share of them (5%)"
            )

    def failure_limit(self, total: int) -> int | None:
        """The most failed images allowed among `total`; None: no limit."""
        if self.max_failures is None:
            return None
        match = _FAILURES.match(self.max_failures)
        assert match is not None  # checked by `check`
        value = float(match[1])
        return int(value / 100 * total) if match[2] else int(value)


@dataclass(frozen=True)
class PredictResult:
    """Where the predictions went and how many images were read."""

    out: Path
    summary: Path
    predicted: int
    failed: int
    provider: str
    resumed_parts: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictResult:
        """The result rank 0 sent to the other ranks as JSON."""
        return cls(
            Path(data["out"]),
            Path(data["summary"]),
            int(data["predicted"]),
            int(data["failed"]),
            str(data["provider"]),
            int(data["resumed_parts"]),
        )


@dataclass(frozen=True)
class _Model:
    session: Any
    label_names: tuple[str, ...]
    prep: Preprocessing
    decoding: Decoding
    input_dtype: str


def run(
    model: Path,
    paths: Sequence[str | Path],
    *,
    out: Path,
    options: PredictOptions | None = None,
) -> PredictResult:
    """Predict every image under `paths` into `out`, resuming committed parts.

    Raises:
        ConfigError: an option is out of range, or --device names a device
            this machine does not have.
        StageInputError: the model or a path is missing, a path is a URL,
            no image file was given, or the file is not a model written by
            `quadrant export` (or its metadata disagrees with its graph).
        DataError: every image failed, or more than --max-failures did (the
            parts predicted so far are kept for the rerun).
    """
    options = options or PredictOptions()
    options.check()
    fmt = predictions.output_format(out)
    if fmt == "dataset":
        predictions.check_dataset_folder(out)
    else:
        check_output_file(out, setting="--out")
    world = join_world()
    try:
        if world.size > 1 and "-" in map(str, paths):
            raise ConfigError(
                "a path list on stdin (-) is read by one process; under torchrun "
                "give a CSV with a 'path' column instead"
            )
        loaded = _load(model, _rank_device(options.device, world))
        options = _with_top_k(options, len(loaded.label_names))
        inputs = Inputs(paths)
        store = PartStore(out, _job(model, loaded, inputs, options))
        resumed = run_on_main(world, store.open) or 0
        store.refresh()
        if resumed:
            log.info(
                "resuming: %d of %d parts were committed by an earlier run",
                resumed,
                store.job.parts(),
            )
        mine = store.missing()[world.rank :: world.size]
        _predict_parts(store, loaded, inputs, options, mine, world)
        gather_text(world, "done")  # every rank's parts are committed
        result = run_on_main(
            world, lambda: _publish(store, loaded, out, fmt, model, options, resumed)
        )
        text = json.dumps(asdict(result), default=str) if result else None
        shared = share_text(world, text)
    finally:
        leave_world(world)
    return result or PredictResult.from_dict(json.loads(shared))


def _rank_device(device: str, world: World) -> str:
    """Under torchrun each rank of a machine takes its own GPU (LOCAL_RANK)."""
    if world.size > 1 and device in ("auto", "cuda"):
        return f"cuda:{world.local_rank}" if torch.cuda.is_available() else device
    return device


def _publish(
    store: PartStore,
    loaded: _Model,
    out: Path,
    fmt: str,
    model: Path,
    options: PredictOptions,
    resumed: int,
) -> PredictResult:
    """Write the output and its summary from every committed part."""
    store.refresh()
    rows, failed = _require_some_predicted(store)
    predictions.publish(store, out, fmt)
    provider = loaded.session.get_providers()[0]
    summary = predictions.write_summary(
        out,
        fmt,
        {
            "rows": rows,
            "predicted": rows - failed,
            "failed": failed,
            "model": str(model),
            "model_sha256": store.job.model_sha256,
            "provider": provider,
            "top_k": options.top_k,
            "all_scores": options.all_scores,
            "resumed_parts": resumed,
        },
    )
    store.remove()
    log.info("predict: %d rows written, %d failed -> %s", rows, failed, out)
    return PredictResult(out, summary, rows - failed, failed, provider, resumed)


def _require_some_predicted(store: PartStore) -> tuple[int, int]:
    """(rows, failed) of the committed parts.

    Raises:
        DataError: not one image could be read (the parts are removed: a
            rerun would read the same files).
    """
    rows, failed = store.totals()
    if failed == rows:
        examples = _examples(store)
        store.remove()
        raise DataError(
            f"none of the {rows} images could be read, e.g. {examples}; check "
            "that the paths point at image files"
        )
    return rows, failed


def _with_top_k(options: PredictOptions, classes: int) -> PredictOptions:
    """The options with --top-k set (3, or every class if fewer) and checked.

    Raises:
        ConfigError: --top-k asks for more classes than the model has.
    """
    if options.top_k is None:
        return replace(options, top_k=min(DEFAULT_TOP_K, classes))
    if options.top_k > classes:
        raise ConfigError(
            f"--top-k {options.top_k}: the model has {classes} classes; give at "
            f"most {classes}"
        )
    return options


def _job(model: Path, loaded: _Model, inputs: Inputs, options: PredictOptions) -> Job:
    assert options.top_k is not None  # set by _with_top_k
    count, digest, columns = predictions.describe(inputs)
    return Job(
        sha256_of(model),
        digest,
        count,
        options.top_k,
        options.all_scores,
        loaded.label_names,
        options.part_rows,
        columns,
    )


def _predict_parts(
    store: PartStore,
    model: _Model,
    inputs: Inputs,
    options: PredictOptions,
    parts: list[int],
    world: World,
) -> None:
    """Predict and commit `parts`, streaming the inputs once; stop past
    --max-failures (counted per process under torchrun)."""
    limit = options.failure_limit(store.job.rows)
    wanted = set(parts)
    transform = eval_transform(model.prep)
    done, failed = store.totals()
    total = sum(len(store.rows_of(p)) for p in parts)
    show = options.progress and world.main
    with (
        ThreadPoolExecutor(4) as pool,
        progress_bar(total, desc="predict", enabled=show) as bar,
    ):
        for part, entries in inputs.parts(store.job.part_rows):
            if part not in wanted:
                continue
            columns = _empty_columns(model, options, store.job.extra_columns)
            for start in range(0, len(entries), options.batch_size):
                batch = entries[start : start + options.batch_size]
                decoded = list(
                    pool.map(
                        lambda e: _prepare(e.path, transform, model.decoding), batch
                    )
                )
                _add_rows(
                    columns, model, batch, decoded, options, store.job.extra_columns
                )
                bar.update(len(batch))
            store.commit(part, columns)
            failed += sum(e is not None for e in columns["error"])
            if limit is not None and failed > limit:
                raise DataError(
                    f"{failed} images failed, more than --max-failures "
                    f"{options.max_failures} allows, e.g. "
                    f"{_errors(columns)}; the {len(store.committed)} parts done "
                    f"are kept in {store.folder}: fix the inputs or raise "
                    "--max-failures, then run the same command again"
                )


def _examples(store: PartStore) -> str:
    """The first three failures, "path: error", from the first part."""
    table = next(store.tables()).select(["path", "error"])
    return _errors(table.to_pydict())


def _errors(columns: dict[str, list[Any]]) -> str:
    pairs = [
        f"{p}: {e}"
        for p, e in zip(columns["path"], columns["error"], strict=True)
        if e is not None
    ]
    return "; ".join(pairs[:3])


# ---------------------------------------------------------------------------
# The model


def _load(model: Path, device: str) -> _Model:
    if not model.is_file():
        raise StageInputError(
            f"model {model} not found; write one with `quadrant export`"
        )
    if device != "auto":
        resolve_device(device)  # refuses a device this machine does not have
    try:
        sess = session(model, device="cuda" if device in ("auto", "cuda") else device)
    except Exception as err:  # onnxruntime raises its own exception types
        raise StageInputError(f"{model} is not a loadable ONNX model ({err})") from err
    labels, prep, decoding, dtype = model_metadata(
        model, sess.get_modelmeta().custom_metadata_map
    )
    _check_graph(model, sess, prep)
    return _Model(sess, labels, prep, decoding, dtype)


def model_metadata(
    model: Path, props: dict[str, str]
) -> tuple[tuple[str, ...], Preprocessing, Decoding, str]:
    """(label names, preprocessing, decoding, input dtype) from the metadata
    `quadrant export` writes into the ONNX file.

    Raises:
        StageInputError: the metadata is missing, unreadable, or asks for a
            decoding this quadrant does not know.
    """
    if "label_names" not in props or "preprocessing" not in props:
        raise StageInputError(
            f"{model} has no quadrant metadata (label_names, preprocessing); export "
            "it with `quadrant export`"
        )
    try:
        prep = Preprocessing().updated(json.loads(props["preprocessing"]))
        labels = tuple(json.loads(props["label_names"]))
        dtype = json.loads(props.get("input", "{}")).get("dtype", "uint8")
    except (ValueError, TypeError, AttributeError, ConfigError) as err:
        raise StageInputError(
            f"{model}: its quadrant metadata cannot be read ({err}); export it again"
        ) from None
    # NOTE: the model's metadata says how its training pixels were decoded
    # (models exported before fast decoding existed say nothing: "full").
    try:
        decoding = Decoding().for_input(prep)
    except ConfigError:
        raise StageInputError(
            f"{model} asks for decoding {prep.decode!r}, which this quadrant does "
            f"not know ({list(DECODE_MODES)}); upgrade quadrant"
        ) from None
    return labels, prep, decoding, dtype


def _check_graph(model: Path, sess: Any, prep: Preprocessing) -> None:
    """The graph has quadrant's input and outputs, at the metadata's size.

    Checked before any image is decoded: metadata that claims a size the
    graph does not take would allocate batches of that size.

    Raises:
        StageInputError: naming what is missing or disagrees.
    """
    outputs = {o.name for o in sess.get_outputs()}
    inputs = {i.name: i for i in sess.get_inputs()}
    missing = sorted({"scores", "label"} - outputs) + (
        [] if "images" in inputs else ["input 'images'"]
    )
    if missing:
        raise StageInputError(
            f"{model} lacks {missing} (it has inputs {sorted(inputs)}, outputs "
            f"{sorted(outputs)}): it is not a model written by `quadrant export`; "
            "export it again"
        )
    shape = inputs["images"].shape
    sides = [d for d in shape[2:] if isinstance(d, int)]
    wrong = any(side != prep.input_size for side in sides)
    if wrong or max(prep.input_size, prep.resize_size) > MAX_INPUT_SIDE:
        taken = "x".join(str(d) for d in shape[2:])
        raise StageInputError(
            f"{model}: its metadata says input_size {prep.input_size} (resize "
            f"{prep.resize_size}) but its graph takes {taken} images; the "
            "metadata was changed after export: export the model again"
        )


# ---------------------------------------------------------------------------
# The inputs


class Inputs:
    """The input entries, streamed as often as needed: a manifest of ten
    million rows is read row by row, never held whole (a list on stdin,
    which can be read once, is kept)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]
        self.stdin = (
            [line.rstrip("\n") for line in sys.stdin if line.strip()]
            if "-" in self.paths
            else []
        )

    def __iter__(self) -> Iterator[Entry]:
        return gather(self.paths, stdin=self.stdin)

    def parts(self, part_rows: int) -> Iterator[tuple[int, list[Entry]]]:
        """(part number, its entries), in order."""
        part, chunk = 0, []
        for entry in self:
            chunk.append(entry)
            if len(chunk) == part_rows:
                yield part, chunk
                part, chunk = part + 1, []
        if chunk:
            yield part, chunk


def gather(paths: Sequence[str | Path], stdin: Sequence[str] = ()) -> Iterator[Entry]:
    """Every input entry, in order: files, folders (sorted, recursively),
    CSV manifests with a `path` column (their other columns go along to the
    output), and `-` (one path per line on stdin).

    Raises:
        StageInputError: a path is missing, is a URL, or nothing was found.
    """
    found = 0
    for given in paths:
        for file in _expand(str(given), stdin):
            found += 1
            yield file
    if not found:
        raise StageInputError(
            f"no image files found in {[str(p) for p in paths]}; give image "
            "files, folders of them or a CSV with a 'path' column"
        )


def _expand(given: str, stdin: Sequence[str]) -> Iterator[Entry]:
    if given == "-":
        yield from (Entry(line) for line in stdin)
        return
    if _URL.match(given):
        raise StageInputError(
            f"{given}: URLs and object storage are not read by this version; "
            "copy the images to a local or mounted folder (e.g. `aws s3 sync`, "
            "`gcloud storage rsync`, rclone mount) and give that folder"
        )
    path = Path(given)
    if not path.exists() and not path.is_symlink():
        raise StageInputError(f"{path} not found")
    if path.is_dir():
        yield from (Entry(file) for file in list_files(path))
    elif path.suffix.lower() == ".csv":
        yield from _manifest_entries(path)
    else:
        yield Entry(str(path))


def _manifest_entries(path: Path) -> Iterator[Entry]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise StageInputError(f"{path} needs a 'path' column")
        for row in reader:
            file = row.pop("path")
            extras = {k: v for k, v in row.items() if isinstance(k, str)}
            yield Entry(str(path.parent / file), extras)


def _not_a_file(file: str) -> str | None:
    """Why `file` cannot be an image, before opening it (a FIFO would block)."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        return "a link to a missing file" if os.path.islink(file) else "not found"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def _prepare(file: str, transform: Any, decoding: Decoding) -> npt.NDArray[Any] | str:
    why = _not_a_file(file)
    if why is not None:
        return why
    try:
        return np.asarray(transform(decoding.open(Path(file))).numpy())
    except ImageDecodeError as err:
        return str(err).removeprefix(f"{file}: ")


# ---------------------------------------------------------------------------
# The rows


def _empty_columns(
    model: _Model, options: PredictOptions, extras: tuple[str, ...]
) -> dict[str, list[Any]]:
    names = ["path", *map(output_name, extras), "label", "label_index", "score"]
    names += ["top_labels", "top_scores"]
    if options.all_scores:
        names += [f"score_{n}" for n in model.label_names]
    return {name: [] for name in [*names, "error"]}


def _add_rows(
    columns: dict[str, list[Any]],
    model: _Model,
    entries: list[Entry],
    decoded: list[npt.NDArray[Any] | str],
    options: PredictOptions,
    extras: tuple[str, ...] = (),
) -> None:
    good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    results: dict[int, tuple[npt.NDArray[np.float32], int]] = {}
    if good:
        pixels = np.stack([decoded[i] for i in good])
        if model.input_dtype != "uint8":
            pixels = pixels.astype(np.float32)
        scores, labels = model.session.run(["scores", "label"], {"images": pixels})
        results = {i: (scores[j], int(labels[j])) for j, i in enumerate(good)}
    for i, entry in enumerate(entries):
        columns["path"].append(entry.path)
        for source in extras:
            columns[output_name(source)].append(entry.columns.get(source))
        if i not in results:
            _add_failed(columns, model, options, str(decoded[i]))
            continue
        scores, label = results[i]
        best = np.argsort(-scores, kind="stable")[: options.top_k]
        columns["label"].append(model.label_names[label])
        columns["label_index"].append(label)
        columns["score"].append(float(scores[label]))
        columns["top_labels"].append([model.label_names[k] for k in best])
        columns["top_scores"].append([float(scores[k]) for k in best])
        if options.all_scores:
            for k, name in enumerate(model.label_names):
                columns[f"score_{name}"].append(float(scores[k]))
        columns["error"].append(None)


def _add_failed(
    columns: dict[str, list[Any]], model: _Model, options: PredictOptions, error: str
) -> None:
    for name in ("label", "label_index", "score", "top_labels", "top_scores"):
        columns[name].append(None)
    if options.all_scores:
        for name in model.label_names:
            columns[f"score_{name}"].append(None)
    columns["error"].append(error)
