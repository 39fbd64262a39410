"""Batch prediction with an exported model: onnxruntime only, no training stack.

`quadrant predict model.onnx PATH...` reads image files, folders (recursively)
or CSV files with a `path` column, decodes them as extraction does (fast or
full decoding, as the model's training pixels were), resizes and crops them
as the model's metadata says, and writes one CSV row per image:
`path, label, score, top_k, error`. An unreadable image gets its error in the
row instead of stopping the run.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from features.atomic import atomic_open, check_output_file
from features.errors import ConfigError, ImageDecodeError, StageInputError
from features.names import DECODE_MODES
from features.onnx_engine import session
from features.progress import progress_bar
from features.settings import Decoding
from features.transforms import Preprocessing, eval_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    """Where the predictions went and how many images were read."""

    out: Path
    predicted: int
    failed: int
    provider: str


@dataclass(frozen=True)
class _Model:
    session: Any
    label_names: tuple[str, ...]
    prep: Preprocessing
    decoding: Decoding
    input_dtype: str


def run(
    model: Path,
    paths: Sequence[Path],
    *,
    out: Path,
    top_k: int = 3,
    batch_size: int = 32,
    device: str = "auto",
) -> PredictResult:
    """Predict every image under `paths` and write the CSV `out`.

    Raises:
        StageInputError: the model or a path is missing, or the file is not a
            model written by `quadrant export`.
    """
    check_output_file(out, setting="--out")
    loaded = _load(model, device)
    files = list(_gather(paths))
    transform = eval_transform(loaded.prep)
    failed = 0
    with (
        atomic_open(out, "w", newline="") as handle,
        ThreadPoolExecutor(4) as pool,
        progress_bar(len(files), desc="predict", enabled=True) as bar,
    ):
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "score", "top_k", "error"])
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            decoded = list(
                pool.map(lambda f: _prepare(f, transform, loaded.decoding), batch)
            )
            failed += _write_batch(writer, loaded, batch, decoded, top_k)
            bar.update(len(batch))
    provider = loaded.session.get_providers()[0]
    return PredictResult(out, len(files) - failed, failed, provider)


def _load(model: Path, device: str) -> _Model:
    if not model.is_file():
        raise StageInputError(
            f"model {model} not found; write one with `quadrant export`"
        )
    try:
        sess = session(model, device="cuda" if device in ("auto", "cuda") else device)
    except Exception as err:  # onnxruntime raises its own exception types
        raise StageInputError(f"{model} is not a loadable ONNX model ({err})") from err
    props = sess.get_modelmeta().custom_metadata_map
    if "label_names" not in props or "preprocessing" not in props:
        raise StageInputError(
            f"{model} has no quadrant metadata (label_names, preprocessing); export "
            "it with `quadrant export`"
        )
    prep = Preprocessing().updated(json.loads(props["preprocessing"]))
    # NOTE: the model's metadata says how its training pixels were decoded
    # (models exported before fast decoding existed say nothing: "full").
    try:
        decoding = Decoding().for_input(prep)
    except ConfigError:
        raise StageInputError(
            f"{model} asks for decoding {prep.decode!r}, which this quadrant does "
            f"not know ({list(DECODE_MODES)}); upgrade quadrant"
        ) from None
    dtype = json.loads(props.get("input", "{}")).get("dtype", "uint8")
    labels = tuple(json.loads(props["label_names"]))
    return _Model(sess, labels, prep, decoding, dtype)


def _gather(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if not path.exists():
            raise StageInputError(f"{path} not found")
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
        elif path.suffix.lower() == ".csv":
            yield from _csv_paths(path)
        else:
            yield path


def _csv_paths(path: Path) -> Iterator[Path]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise StageInputError(f"{path} needs a 'path' column")
        for row in reader:
            yield path.parent / row["path"]


def _prepare(
    file: Path, transform: Any, decoding: Decoding
) -> npt.NDArray[np.uint8] | str:
    try:
        return np.asarray(transform(decoding.open(file)).numpy())
    except ImageDecodeError as err:
        return str(err).removeprefix(f"{file}: ")


def _write_batch(
    writer: Any,
    model: _Model,
    files: list[Path],
    decoded: list[npt.NDArray[np.uint8] | str],
    top_k: int,
) -> int:
    good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    results: dict[int, tuple[npt.NDArray[np.float32], int]] = {}
    if good:
        pixels = np.stack([decoded[i] for i in good])
        if model.input_dtype != "uint8":
            pixels = pixels.astype(np.float32)
        scores, labels = model.session.run(["scores", "label"], {"images": pixels})
        results = {i: (scores[j], int(labels[j])) for j, i in enumerate(good)}
    for i, file in enumerate(files):
        if i not in results:
            writer.writerow([file, "", "", "", decoded[i]])
            continue
        scores, label = results[i]
        best = np.argsort(-scores)[:top_k]
        top = ";".join(f"{model.label_names[k]}:{scores[k]:.4f}" for k in best)
        writer.writerow(
            [file, model.label_names[label], f"{scores[label]:.6f}", top, ""]
        )
    return len(files) - len(good)
