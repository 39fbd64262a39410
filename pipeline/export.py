"""The export stage: one ONNX file, images in, class scores out.

- Codes path: normalisation -> backbone cut at the trained layer -> pooling
  (exported from PyTorch) -> the scikit-learn head (converted by skl2onnx),
  joined into one graph with `onnx.compose`.
- Fine-tune path: normalisation -> the fine-tuned network -> softmax.

The graph takes `images`, a batch (N, 3, S, S) of uint8 (or float 0..255)
pixels already resized and centre-cropped as the model's metadata says, and
returns `scores` (N, K) (probabilities where the model has them, else
decision values) and `label` (N,) int64, an index into the label names.

Following timm's exporter, every export is checked before it is reported
done: onnx.checker, then onnxruntime against the PyTorch / scikit-learn model
on held-out images. A model that fails is kept only as `model.failed.onnx`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.pipeline import Pipeline
from torch import nn

from features.cache import atomic_write_text, read_provenance
from features.data import ImageSet
from features.errors import DataError, ExportParityError, StageInputError
from features.extractor import CodeModel
from features.heads import load_head
from features.onnx_engine import check_parity, export_module, session
from features.transforms import Preprocessing
from pipeline import extract, finetune
from pipeline.config import Config
from pipeline.evaluate import model_preprocessing

log = logging.getLogger(__name__)

# NOTE: SGD's one-vs-rest probabilities saturate (ties at 1.0 pick labels
# arbitrarily), so its scores are the decision values, like the SVMs'.
PROBABILITY_HEADS = ("logistic", "finetune")


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
    """Export `<run.out>/model` to `<run.out>/model.onnx` and check it.

    Raises:
        StageInputError: no trained model.
        ExportParityError: onnxruntime disagrees with the source model; the
            file is renamed `model.failed.onnx`.
    """
    folder = cfg.run.out / "model"
    meta = _model_meta(folder)
    images = extract.load_images(cfg)
    if meta.get("kind") == "finetune":
        onnx_model, reference, prep = _finetuned(cfg, folder)
    else:
        onnx_model, reference, prep = _codes(cfg, folder)
    _describe(onnx_model, cfg, meta, prep, images)
    out = cfg.run.out / "model.onnx"
    pixels = extract.load_pixels(
        cfg, _parity_records(images, cfg.export.parity_images), prep
    )
    worst = _save_checked(onnx_model, out, pixels, reference, cfg)
    result = ExportResult(
        out,
        str(meta.get("kind", "codes")),
        len(pixels),
        worst,
        True,
        out.stat().st_size,
        _variants(cfg, out, images, prep),
    )
    _write_summary(cfg, result)
    return result


def _model_meta(folder: Path) -> dict[str, Any]:
    file = folder / "model.json"
    if not file.is_file():
        raise StageInputError(
            f"no trained model in {folder}; run `quadrant train` or `quadrant "
            "finetune` first"
        )
    return dict(json.loads(file.read_text()))


# ---------------------------------------------------------------------------
# Building the graph


Reference = Any  # callable: uint8 pixels (N, 3, S, S) -> (scores, labels)


class _Scored(nn.Module):
    """Logits to (softmax scores, argmax label) for the fine-tuned network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.model(images).float(), dim=1)
        return probs, probs.argmax(dim=1)


def _input_dtype(cfg: Config) -> torch.dtype:
    return torch.uint8 if cfg.export.input_dtype == "uint8" else torch.float32


def _finetuned(cfg: Config, folder: Path) -> tuple[Any, Reference, Preprocessing]:
    model, meta = finetune.load_model(folder, torch.device("cpu"))
    prep = model_preprocessing(meta)
    scored = _Scored(model).eval()
    onnx_model = export_module(
        scored,
        prep.input_size,
        ["scores", "label"],
        opset=cfg.export.opset,
        input_dtype=_input_dtype(cfg),
    )

    @torch.inference_mode()
    def reference(
        pixels: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        probs, label = scored(torch.from_numpy(pixels))
        return probs.numpy(), label.numpy()

    return onnx_model, reference, prep


def _codes(cfg: Config, folder: Path) -> tuple[Any, Reference, Preprocessing]:
    head = load_head(folder)
    meta = head.metadata
    cache = extract.locate_codes(cfg, cfg.train.codes)
    head.check_codes(read_provenance(cache), head.label_names)
    backbone = extract.load_backbone(cfg)
    code_model = CodeModel(backbone, [meta["layer"]], [_pooling_spec(meta["pooling"])])
    spec = code_model.specs[0]
    body = export_module(
        _SingleCode(code_model, spec.name),
        backbone.preprocessing.input_size,
        ["codes"],
        opset=cfg.export.opset,
        input_dtype=_input_dtype(cfg),
    )
    binary_svm = meta["classifier"] == "svm" and len(head.pipeline.classes_) == 2
    onnx_model = _join(
        body,
        _sklearn_graph(head.pipeline, spec.dims, cfg.export.opset),
        swap_columns=binary_svm,
    )

    @torch.inference_mode()
    def reference(
        pixels: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        codes = code_model.eval()(torch.from_numpy(pixels))[spec.name].numpy()
        return _head_scores(head.pipeline, meta["classifier"], codes)

    return onnx_model, reference, backbone.preprocessing


def _pooling_spec(pooling: str) -> str:
    # Flat layers are cached under "none"; any pooling leaves them unchanged.
    return "avg" if pooling == "none" else pooling


class _SingleCode(nn.Module):
    def __init__(self, model: CodeModel, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[self.name]


def _head_scores(
    pipeline: Any, classifier: str, codes: npt.NDArray[Any]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The head's scores as the exported graph reports them, and its labels."""
    if classifier in PROBABILITY_HEADS:
        scores = pipeline.predict_proba(codes)
    else:
        scores = pipeline.decision_function(codes)
        if scores.ndim == 1:  # binary: skl2onnx reports (-margin, margin)
            scores = np.stack([-scores, scores], axis=1)
    return scores, pipeline.predict(codes)


def _sklearn_graph(pipeline: Any, dims: int, opset: int) -> Any:
    """The scikit-learn head as an ONNX graph from codes (N, dims) to label, scores."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.svm import LinearSVC

    clf = pipeline.steps[-1][1]
    if isinstance(clf, LinearSVC):
        pipeline = Pipeline([*pipeline.steps[:-1], ("clf", _as_hinge_sgd(clf))])
        clf = pipeline.steps[-1][1]
    # Scores as a plain (N, K) tensor rather than a list of dicts.
    chosen: dict[str, Any] = {"zipmap": False}
    if type(clf).__name__ == "SGDClassifier" and getattr(clf, "loss", "") == "log_loss":
        chosen["raw_scores"] = True
    options = {id(clf): chosen}
    return to_onnx(
        pipeline,
        initial_types=[("codes", FloatTensorType([None, dims]))],
        target_opset={"": opset, "ai.onnx.ml": 3},
        options=options,
    )


def _as_hinge_sgd(svc: Any) -> Any:
    """The same linear decision function as an SGDClassifier(loss="hinge").

    NOTE: skl2onnx 1.20's LinearSVC converter asks for a `zipmap` option that
    LinearSVC does not accept (a NameError); its SGD converter computes the
    identical coef . x + intercept.
    """
    from sklearn.linear_model import SGDClassifier

    surrogate = SGDClassifier(loss="hinge")
    surrogate.coef_, surrogate.intercept_ = svc.coef_, svc.intercept_
    surrogate.classes_, surrogate.n_features_in_ = svc.classes_, svc.n_features_in_
    return surrogate


def _join(body: Any, head: Any, *, swap_columns: bool = False) -> Any:
    """One graph: images -> body -> codes -> head -> (scores, label).

    `swap_columns`: skl2onnx reports a binary SVC's scores as (margin,
    -margin); swapping gives (-margin, margin), so that column k is always
    the evidence for class k, as for every other head.
    """
    import onnx
    from onnx import compose, helper

    head = compose.add_prefix(head, "head/")
    outputs = {o.name for o in head.graph.output}
    label = next(n for n in outputs if n.endswith("label"))
    scores = next(n for n in outputs if n.endswith("probabilities"))
    head.ir_version = body.ir_version = min(body.ir_version, head.ir_version)
    merged = compose.merge_models(
        body, head, io_map=[("codes", "head/codes")], outputs=[scores, label]
    )
    # Stable public names for the two outputs.
    merged.graph.node.extend(
        [
            *_scores_nodes(scores, swap_columns),
            helper.make_node("Identity", [label], ["label"], name="head/label"),
        ]
    )
    for out in list(merged.graph.output):
        merged.graph.output.remove(out)
    merged.graph.output.extend(
        [
            helper.make_tensor_value_info(
                "scores", onnx.TensorProto.FLOAT, ["batch", None]
            ),
            helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["batch"]),
        ]
    )
    # merge_models repeats the default domain once per input model.
    versions: dict[str, int] = {}
    for entry in merged.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())
    onnx.checker.check_model(merged)
    return merged


def _scores_nodes(scores: str, swap: bool) -> list[Any]:
    from onnx import helper, numpy_helper

    if not swap:
        return [helper.make_node("Identity", [scores], ["scores"], name="head/scores")]
    order = numpy_helper.from_array(np.array([1, 0], dtype=np.int64))
    indices = helper.make_node(
        "Constant", [], ["head/swap"], value=order, name="head/swap_indices"
    )
    return [
        indices,
        helper.make_node(
            "Gather", [scores, "head/swap"], ["scores"], axis=1, name="head/scores"
        ),
    ]


def _describe(
    model: Any, cfg: Config, meta: dict[str, Any], prep: Preprocessing, images: ImageSet
) -> None:
    """Metadata a deployment needs: labels, input, preprocessing, provenance."""
    from onnx import helper

    props = {
        "label_names": json.dumps(list(images.label_names)),
        "input": json.dumps(
            {
                "name": "images",
                "dtype": cfg.export.input_dtype,
                "shape": ["batch", 3, prep.input_size, prep.input_size],
                "range": "0..255, RGB, resized and centre-cropped",
            }
        ),
        "preprocessing": json.dumps(prep.as_dict()),
        "score_kind": "probability"
        if meta.get("classifier") in PROBABILITY_HEADS
        else "decision",
        "model_kind": str(meta.get("kind", "codes")),
        "classifier": str(meta.get("classifier")),
        "layer": str(meta.get("layer", "")),
        "cache_key": str(meta.get("cache_key", "")),
        "training": json.dumps(
            meta.get("identity", meta.get("params", {})), default=str
        ),
        "quadrant_version": version("quadrant"),
    }
    helper.set_model_props(model, props)
    model.producer_name = "quadrant"
    model.doc_string = "images (uint8 N x 3 x S x S) -> scores (N x K), label (N)"


# ---------------------------------------------------------------------------
# Checking and saving


def _parity_records(images: ImageSet, count: int) -> list[Path]:
    """Held-out images first (test, then val), training images if need be."""
    order = {"test": 0, "val": 1, "train": 2}
    records = sorted(images.records, key=lambda r: (order[r.split], r.path))
    return [images.absolute(r) for r in records[:count]]


def _save_checked(
    model: Any,
    out: Path,
    pixels: npt.NDArray[np.uint8],
    reference: Reference,
    cfg: Config,
) -> float:
    import onnx

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    onnx.save(model, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    try:
        worst = _compare(tmp, pixels, reference, cfg)
    except ExportParityError:
        os.replace(tmp, out.with_name("model.failed.onnx"))
        out.unlink(missing_ok=True)  # never leave an older file looking current
        raise
    os.replace(tmp, out)
    return worst


def _feed(pixels: npt.NDArray[np.uint8], cfg: Config) -> npt.NDArray[Any]:
    """The pixels as the graph's input type (export.input_dtype)."""
    return pixels if cfg.export.input_dtype == "uint8" else pixels.astype(np.float32)


def _compare(
    path: Path, pixels: npt.NDArray[np.uint8], reference: Reference, cfg: Config
) -> float:
    feed = _feed(pixels, cfg)
    scores, labels = session(path).run(["scores", "label"], {"images": feed})
    expected_scores, expected_labels = reference(pixels)
    worst = check_parity(
        expected_scores,
        scores,
        what="scores",
        atol=cfg.export.atol,
        rtol=cfg.export.rtol,
    )
    if not np.array_equal(np.asarray(expected_labels), labels):
        raise ExportParityError(
            f"predicted labels differ on {int((expected_labels != labels).sum())} of "
            f"{len(labels)} images (largest score difference {worst:.3g})"
        )
    return worst


def _variants(
    cfg: Config, fp32: Path, images: ImageSet, prep: Preprocessing
) -> dict[str, Variant]:
    if not cfg.export.fp16 and cfg.export.int8 == "none":
        return {}
    test = [images.absolute(r) for r in images.records if r.split == "test"]
    if not test:
        raise DataError("fp16/int8 accuracy needs a test split; set data.test_fraction")
    pixels = extract.load_pixels(cfg, test, prep)
    labels = np.array([r.label for r in images.records if r.split == "test"])
    base = _accuracy(fp32, pixels, labels, cfg)
    made: dict[str, Path] = {}
    if cfg.export.fp16:
        made["fp16"] = _to_fp16(fp32)
    if cfg.export.int8 == "dynamic":
        made["int8"] = _to_int8_dynamic(fp32)
    elif cfg.export.int8 == "static":
        made["int8"] = _to_int8_static(fp32, _calibration(images, prep, cfg))
    out = {}
    for name, path in made.items():
        accuracy = _accuracy(path, pixels, labels, cfg)
        out[name] = Variant(path, accuracy, base, path.stat().st_size)
        log.info("%s: test accuracy %.4f (fp32 %.4f)", name, accuracy, base)
    return out


def _calibration(
    images: ImageSet, prep: Preprocessing, cfg: Config
) -> npt.NDArray[np.uint8]:
    """A seeded sample of training images for int8 activation ranges."""
    train = [r for r in images.records if r.split == "train"]
    rng = np.random.default_rng(cfg.run.seed)
    count = min(cfg.export.calibration_images, len(train))
    chosen = sorted(rng.choice(len(train), size=count, replace=False))
    return extract.load_pixels(cfg, [images.absolute(train[i]) for i in chosen], prep)


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
    return float((predicted == labels[: len(predicted)]).mean())


def _to_fp16(path: Path) -> Path:
    """Weights and activations in float16, inputs and outputs unchanged."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(path)
    # The scikit-learn head (ai.onnx.ml operators) has no float16 kernels: it
    # stays float32, and the backbone, where the time goes, is converted.
    head = [n.name for n in model.graph.node if n.name.startswith("head/")]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=head)
    _drop_repeated_casts(model.graph)
    out = path.with_name("model.fp16.onnx")
    onnx.save(model, out)
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


def _to_int8_dynamic(path: Path) -> Path:
    """Dynamic int8 quantisation of the weights (onnxruntime.quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("model.int8.onnx")
    quantize_dynamic(
        path,
        out,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=_head_nodes(path),
        extra_options=_QUANT_OPTIONS,
    )
    return out


def _to_int8_static(path: Path, calibration: npt.NDArray[np.uint8]) -> Path:
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

    out = path.with_name("model.int8.onnx")
    quantize_static(
        path,
        out,
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
    data = json.loads(summary.read_text())
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


def _write_summary(cfg: Config, result: ExportResult) -> None:
    summary = {
        "model": str(result.path),
        "kind": result.kind,
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
    }
    atomic_write_text(cfg.run.out / "export.json", json.dumps(summary, indent=2) + "\n")
