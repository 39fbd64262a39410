"""The export stage: one ONNX file, images in, class scores out.

- Codes path: normalisation -> backbone cut at the trained layer -> pooling
  (exported from PyTorch) -> the scikit-learn head (converted by skl2onnx),
  joined into one graph with `onnx.compose`.
- Fine-tune path: normalisation -> the fine-tuned network -> softmax.

The graph takes `images`, a batch (N, 3, S, S) of uint8 (or float 0..255)
pixels already resized and centre-cropped as the model's metadata says, and
returns `scores` (N, K) (probabilities where the model has them, else
margins) and `label` (N,) int64, an index into the label names.

Following timm's exporter, every export is checked before it is reported
done: onnx.checker, then onnxruntime against the PyTorch / scikit-learn model
on held-out images. A model that fails is kept only as `model.failed.onnx`.
Every file lands in the model's own folder, written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from features.atomic import atomic_path, read_json, write_json
from features.data import ImageSet
from features.errors import DataError, ExportParityError
from features.onnx_engine import check_parity, session
from pipeline import __version__
from pipeline.config import Config, config_to_dict
from pipeline.inputs import decode_pixels, load_images, load_pixels
from pipeline.layout import ModelFiles
from pipeline.models import TrainedModel, load_model, select_model
from pipeline.stamps import stamp

log = logging.getLogger(__name__)

VARIANTS = ("fp16", "int8")


@dataclass(frozen=True)
class Variant:
    """A converted copy (fp16, int8) and its accuracy next to fp32's."""

    path: Path
    accuracy: float
    fp32_accuracy: float
    size_bytes: int


@dataclass(frozen=True)
class ExportResult:
    """The exported file and how closely it matches the source model."""

    path: Path
    kind: str
    parity_images: int
    max_abs_diff: float
    labels_equal: bool
    size_bytes: int
    variants: dict[str, Variant] = field(default_factory=dict)


def run(cfg: Config) -> ExportResult:
    """Export the selected model to `model.onnx` in its folder and check it.

    Raises:
        StageInputError: no trained model.
        CacheMismatchError: the data's classes are not the model's, or its
            files changed since they were written (before any compute).
        ExportParityError: onnxruntime disagrees with the source model; the
            file is renamed `model.failed.onnx`.
    """
    model = load_model(select_model(cfg.layout, cfg.run.model))
    images = load_images(cfg)
    model.check_labels(images.label_names)
    _check_variants_possible(cfg, images)
    files = model.files
    prep = model.preprocessing
    pixels = load_pixels(cfg, _parity_records(images, cfg.export.parity_images), prep)
    graph = model.onnx_graph(opset=cfg.export.opset, input_dtype=_input_dtype(cfg))
    _describe(graph, cfg, model)
    worst = _save_checked(graph, files, pixels, model, cfg)
    try:
        variants = _variants(cfg, files, images, model)
    except BaseException:
        # model.onnx is new: an export.json of the old one must not stay beside it.
        files.export_summary.unlink(missing_ok=True)
        raise
    result = ExportResult(
        files.onnx,
        model.kind,
        len(pixels),
        worst,
        True,
        files.onnx.stat().st_size,
        variants,
    )
    _write_summary(cfg, model, result)
    return result


def _check_variants_possible(cfg: Config, images: ImageSet) -> None:
    """fp16 and int8 copies are scored on the test split: refuse before any
    file is written when there is none.

    Raises:
        DataError: naming the settings and the fix.
    """
    wanted = {"export.fp16 = false": cfg.export.fp16}
    wanted["export.int8 = 'none'"] = cfg.export.int8 != "none"
    offs = [off for off, on in wanted.items() if on]
    if offs and not any(r.split == "test" for r in images.records):
        raise DataError(
            "the fp16/int8 copies are checked for accuracy on the test split, and "
            "the data has no test images: set data.test_fraction > 0 (or add a "
            f"test/ folder), or set {' and '.join(offs)}"
        )


def export_stamp(cfg: Config, model: TrainedModel) -> str:
    """The stamp of an export: the export settings and the model it came from."""
    return stamp(asdict(cfg.export), model.record["stamp"], model.record["created"])


def _input_dtype(cfg: Config) -> torch.dtype:
    return torch.uint8 if cfg.export.input_dtype == "uint8" else torch.float32


def _describe(graph: Any, cfg: Config, model: TrainedModel) -> None:
    """Metadata a deployment needs: labels, input, preprocessing, provenance."""
    from onnx import helper

    prep = model.preprocessing
    record = model.record
    props = {
        "label_names": json.dumps(list(model.label_names)),
        "input": json.dumps(
            {
                "name": "images",
                "dtype": cfg.export.input_dtype,
                "shape": ["batch", 3, prep.input_size, prep.input_size],
                "range": "0..255, RGB, resized and centre-cropped",
            }
        ),
        "preprocessing": json.dumps(prep.as_dict()),
        "score_kind": model.score_kind,
        "model_kind": model.kind,
        "model_title": model.title,
        "backbone": json.dumps(record["backbone"], default=str),
        "codes": json.dumps(
            {k: v for k, v in record.get("codes", {}).items() if k != "provenance"},
            default=str,
        ),
        "model_stamp": str(record["stamp"]),
        "quadrant_version": __version__,
    }
    helper.set_model_props(graph, props)
    graph.producer_name = "quadrant"
    graph.doc_string = "images (uint8 N x 3 x S x S) -> scores (N x K), label (N)"


# ---------------------------------------------------------------------------
# Checking and saving


def _parity_records(images: ImageSet, count: int) -> list[Path]:
    """Held-out images first (test, then val), training images if need be."""
    order = {"test": 0, "val": 1, "train": 2}
    records = sorted(images.records, key=lambda r: (order[r.split], r.path))
    return [images.absolute(r) for r in records[:count]]


def _save_checked(
    graph: Any,
    files: ModelFiles,
    pixels: npt.NDArray[np.uint8],
    model: TrainedModel,
    cfg: Config,
) -> float:
    """Write model.onnx only once onnx.checker and the parity check pass."""
    import onnx

    try:
        with atomic_path(files.onnx) as tmp:
            onnx.save(graph, tmp)
            onnx.checker.check_model(str(tmp), full_check=True)
            worst = _compare(tmp, pixels, model, cfg)
    except ExportParityError:
        with atomic_path(files.onnx_failed) as tmp:
            onnx.save(graph, tmp)
        # Never leave an older export looking current beside a failed one.
        for stale in (files.onnx, files.export_summary, *map(files.variant, VARIANTS)):
            stale.unlink(missing_ok=True)
        raise
    files.onnx_failed.unlink(missing_ok=True)
    return worst


def _feed(pixels: npt.NDArray[np.uint8], cfg: Config) -> npt.NDArray[Any]:
    """The pixels as the graph's input type (export.input_dtype)."""
    return pixels if cfg.export.input_dtype == "uint8" else pixels.astype(np.float32)


def _compare(
    path: Path, pixels: npt.NDArray[np.uint8], model: TrainedModel, cfg: Config
) -> float:
    scores, labels = session(path).run(
        ["scores", "label"], {"images": _feed(pixels, cfg)}
    )
    expected = model.image_scores(pixels)
    worst = check_parity(
        expected.values,
        scores,
        what="scores",
        atol=cfg.export.atol,
        rtol=cfg.export.rtol,
    )
    if not np.array_equal(expected.labels, labels):
        raise ExportParityError(
            f"predicted labels differ on {int((expected.labels != labels).sum())} of "
            f"{len(labels)} images (largest score difference {worst:.3g})"
        )
    return worst


def _variants(
    cfg: Config, files: ModelFiles, images: ImageSet, model: TrainedModel
) -> dict[str, Variant]:
    """fp16 / int8 copies as configured, each with its test accuracy."""
    wanted = {"fp16": cfg.export.fp16, "int8": cfg.export.int8 != "none"}
    for name, on in wanted.items():
        if not on:
            files.variant(name).unlink(missing_ok=True)  # no stale copy stays
    if not any(wanted.values()):
        return {}
    test = [r for r in images.records if r.split == "test"]
    pixels, kept = decode_pixels(
        cfg, [images.absolute(r) for r in test], model.preprocessing
    )
    labels = np.array([test[i].label for i in kept])
    base = _accuracy(files.onnx, pixels, labels, cfg)
    made: dict[str, Path] = {}
    with _quiet_onnxruntime(cfg.run.log_level == "debug"):
        if cfg.export.fp16:
            made["fp16"] = _to_fp16(files.onnx, files.variant("fp16"))
        if cfg.export.int8 == "dynamic":
            made["int8"] = _to_int8_dynamic(files.onnx, files.variant("int8"))
        elif cfg.export.int8 == "static":
            calibration = _calibration(images, model, cfg)
            made["int8"] = _to_int8_static(
                files.onnx, files.variant("int8"), calibration
            )
    out = {}
    for name, path in made.items():
        accuracy = _accuracy(path, pixels, labels, cfg)
        out[name] = Variant(path, accuracy, base, path.stat().st_size)
        log.info("%s: test accuracy %.4f (fp32 %.4f)", name, accuracy, base)
    return out


@contextlib.contextmanager
def _quiet_onnxruntime(debug: bool) -> Iterator[None]:
    """Keep onnxruntime's converters' advice off the console and the log.

    NOTE: the quantiser and the float16 converter log on the root logger
    ("Please consider pre-processing before quantization", shape-inference
    notes), so no logger level can hold them back; a filter on the root
    logger drops their records below ERROR unless run.log_level is debug.
    The pre-processing they advise changed nothing here (docs/benchmarks.md).
    """
    marker = f"{os.sep}onnxruntime{os.sep}"

    def keep(record: logging.LogRecord) -> bool:
        return debug or record.levelno >= logging.ERROR or marker not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _calibration(
    images: ImageSet, model: TrainedModel, cfg: Config
) -> npt.NDArray[np.uint8]:
    """A seeded sample of training images for int8 activation ranges."""
    train = [r for r in images.records if r.split == "train"]
    rng = np.random.default_rng(cfg.run.seed)
    count = min(cfg.export.calibration_images, len(train))
    chosen = sorted(rng.choice(len(train), size=count, replace=False))
    files = [images.absolute(train[i]) for i in chosen]
    return load_pixels(cfg, files, model.preprocessing)


def _accuracy(
    path: Path, pixels: npt.NDArray[np.uint8], labels: npt.NDArray[Any], cfg: Config
) -> float:
    feed = _feed(pixels, cfg)
    sess = session(path)
    predicted = np.concatenate(
        [
            sess.run(["label"], {"images": feed[i : i + 64]})[0]
            for i in range(0, len(feed), 64)
        ]
    )
    return float((predicted == labels).mean())


def _to_fp16(path: Path, out: Path) -> Path:
    """Weights and activations in float16, inputs and outputs unchanged."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(path)
    # The scikit-learn head (ai.onnx.ml operators) has no float16 kernels: it
    # stays float32, and the backbone, where the time goes, is converted.
    head = [n.name for n in model.graph.node if n.name.startswith("head/")]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=head)
    _drop_repeated_casts(model.graph)
    # NOTE: the converter appends the casts it adds in front of blocked nodes
    # at the end of the node list; onnx.checker (and strict runtimes) want the
    # graph in topological order, which onnxruntime's own helper restores.
    OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save(model, tmp)
    return out


def _drop_repeated_casts(graph: Any) -> None:
    """Remove nodes that repeat an earlier node exactly; make names unique.

    NOTE: the float16 converter adds a cast in front of every blocked node
    input and names it after the tensor, so a tensor that feeds two blocked
    nodes (as in skl2onnx's RBF SVM head) gets two identical casts with the
    same output name, which onnxruntime refuses. The repeats compute the
    same value and can go.
    """
    produced: dict[str, Any] = {}
    names: set[str] = set()
    for node in list(graph.node):
        first = produced.get(node.output[0]) if node.output else None
        if first is not None and first.SerializeToString() == node.SerializeToString():
            graph.node.remove(node)
            continue
        name, n = node.name, 1
        while node.name in names:
            node.name, n = f"{name}_{n}", n + 1
        names.add(node.name)
        produced.update({out: node for out in node.output})


def _head_nodes(path: Path) -> list[str]:
    """The scikit-learn head's nodes: kept float (no int8 kernels for them)."""
    import onnx

    return [n.name for n in onnx.load(path).graph.node if n.name.startswith("head/")]


# The head's ai.onnx.ml outputs defeat the quantiser's shape inference; their
# type is float in every head quadrant writes.
_QUANT_OPTIONS = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


def _to_int8_dynamic(path: Path, out: Path) -> Path:
    """Dynamic int8 quantisation of the weights (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out) as tmp:
        quantize_dynamic(
            path,
            tmp,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_head_nodes(path),
            extra_options=_QUANT_OPTIONS,
        )
    return out


def _to_int8_static(path: Path, out: Path, calibration: npt.NDArray[np.uint8]) -> Path:
    """Static int8 (QDQ, per-channel weights) calibrated on training images.

    The scikit-learn head stays float: its operators have no int8 kernels.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    {"images": calibration[i : i + 16]}
                    for i in range(0, len(calibration), 16)
                ]
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    with atomic_path(out) as tmp:
        quantize_static(
            path,
            tmp,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            nodes_to_exclude=_head_nodes(path),
            extra_options=_QUANT_OPTIONS,
        )
    return out


def load_result(summary: Path) -> ExportResult:
    """The ExportResult recorded in an export.json."""
    data = read_json(summary, fix="run `quadrant export` again")
    parity = data["parity"]
    variants = {
        k: Variant(Path(v["path"]), v["accuracy"], v["fp32_accuracy"], v["size_bytes"])
        for k, v in data["variants"].items()
    }
    return ExportResult(
        Path(data["model"]),
        data["kind"],
        parity["images"],
        parity["max_abs_diff"],
        parity["labels_equal"],
        data["size_bytes"],
        variants,
    )


def _write_summary(cfg: Config, model: TrainedModel, result: ExportResult) -> None:
    summary = {
        "model": str(result.path),
        "kind": result.kind,
        "title": model.title,
        "size_bytes": result.size_bytes,
        "parity": {
            "images": result.parity_images,
            "max_abs_diff": result.max_abs_diff,
            "labels_equal": result.labels_equal,
            "atol": cfg.export.atol,
            "rtol": cfg.export.rtol,
        },
        "variants": {
            k: {
                "path": str(v.path),
                "accuracy": v.accuracy,
                "fp32_accuracy": v.fp32_accuracy,
                "size_bytes": v.size_bytes,
            }
            for k, v in result.variants.items()
        },
        "stamp": export_stamp(cfg, model),
        "config": config_to_dict(cfg),
    }
    write_json(model.files.export_summary, summary)
