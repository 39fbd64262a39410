"""ONNX for the frozen backbone: export a code model, run it with onnxruntime.

The same exported graph serves two purposes: extraction with
`extract.engine = "onnxruntime"` (often faster than PyTorch eager on a CPU)
and the backbone half of the codes path's exported model. `onnx` and
`onnxruntime` are imported inside the functions, as timm's exporter does, so
importing quadrant does not load them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from features.atomic import atomic_path
from features.errors import ExportParityError

DEFAULT_OPSET = 17
INPUT = "images"


class _TupleOutputs(nn.Module):
    """A code model returning its arrays as a tuple in spec order (ONNX outputs)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes = self.model(images)
        return tuple(codes[name] for name in self.names)


def export_module(
    module: nn.Module,
    input_size: int,
    output_names: Sequence[str],
    *,
    opset: int = DEFAULT_OPSET,
    input_dtype: torch.dtype = torch.uint8,
) -> Any:
    """Trace `module` (images -> outputs) to an in-memory, checked ONNX model.

    The batch axis is dynamic; the graph's input is `images`, (N, 3, S, S) of
    `input_dtype` with values 0..255.
    """
    import onnx

    module = module.eval()  # NOTE: the exporter restores the module's prior mode
    example = torch.zeros(2, 3, input_size, input_size, dtype=input_dtype)
    axes = {INPUT: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo
        # one, which needs onnxscript; its output is what we check below.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(output_names),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    return model


def export_code_model(
    model: nn.Module,
    specs: Sequence[Any],
    input_size: int,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the code model as ONNX with one output per code array.

    Outputs are named `codes_0`, `codes_1` ... in the order of `specs`; the
    file is written under a temporary name and renamed into place.
    """
    import onnx

    names = [spec.name for spec in specs]
    outputs = [f"codes_{i}" for i in range(len(names))]
    onnx_model = export_module(
        _TupleOutputs(model, names), input_size, outputs, opset=opset
    )
    with atomic_path(path) as tmp:
        onnx.save(onnx_model, tmp)
    return path


def session(
    path_or_bytes: Path | bytes, *, device: str = "cpu", threads: int = 0
) -> Any:
    """An onnxruntime session: CUDA when asked for and available, else the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are not the user's
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    providers: list[Any] = ["CPUExecutionProvider"]
    # NOTE: onnxruntime-gpu lists the CUDA provider even where no driver is
    # installed, then prints an error while falling back; torch knows better.
    if (
        device.startswith("cuda")
        and "CUDAExecutionProvider" in available
        and torch.cuda.is_available()
    ):
        providers.insert(0, ("CUDAExecutionProvider", cuda_options(device)))
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def cuda_options(device: str) -> dict[str, int]:
    """onnxruntime's CUDA provider options for "cuda" or "cuda:N" (GPU N)."""
    _, _, index = device.partition(":")
    return {"device_id": int(index) if index else 0}


class OnnxRunner:
    """Runs an exported code model on uint8 batches with onnxruntime.

    Same call contract as `features.extractor.CodeRunner`: a uint8 tensor
    (N, 3, S, S) in, {spec name: float32 codes} out, run `chunk` images at a
    time (on the CPU, small chunks keep activations in cache, as for torch).
    The session is made at the first call, with the threads asked for then.
    """

    def __init__(
        self,
        path: Path,
        names: Sequence[str],
        device: torch.device,
        *,
        chunk: int | None = None,
    ) -> None:
        self.path = path
        self.device = device
        self.chunk = chunk
        self.names = list(names)
        self.outputs = [f"codes_{i}" for i in range(len(names))]
        self.threads = torch.get_num_threads()
        self._session: Any = None

    @property
    def session(self) -> Any:
        """The onnxruntime session (made on first use)."""
        if self._session is None:
            self._session = session(
                self.path, device=self.device.type, threads=self.threads
            )
        return self._session

    def set_threads(self, threads: int) -> None:
        """Run later calls on `threads` intra-op threads (0: torch's count)."""
        threads = threads or torch.get_num_threads()
        if threads != self.threads:
            self.threads, self._session = threads, None

    def __call__(self, pixels: torch.Tensor) -> dict[str, npt.NDArray[np.float32]]:
        # NOTE: GPU-decoded batches arrive on the device; onnxruntime takes
        # numpy arrays.
        array = pixels.cpu().numpy()
        step = self.chunk or len(array) or 1
        parts = [
            self.session.run(self.outputs, {INPUT: array[i : i + step]})
            for i in range(0, len(array), step)
        ]
        return {
            name: np.concatenate([np.asarray(p[k], dtype=np.float32) for p in parts])
            for k, name in enumerate(self.names)
        }


def check_parity(
    expected: npt.NDArray[Any],
    actual: npt.NDArray[Any],
    *,
    what: str,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> float:
    """Largest absolute difference; raise when outside the tolerances.

    A row may differ by `atol + rtol * (its largest |expected| value)`. The
    relative part is per row, not per element: SVM and SGD margins reach
    thousands, where float32 rounding alone moves a near-zero score of the
    same row by more than `rtol` of itself, while the row's ranking (the
    label) is untouched.

    Raises:
        ExportParityError: naming what differed, by how much, and where.
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        raise ExportParityError(
            f"{what}: ONNX gives shape {actual.shape}, the reference {expected.shape}"
        )
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    if diff.size == 0:
        return 0.0
    worst = float(diff.max())
    scale = np.abs(expected.astype(np.float64)).reshape(len(expected), -1).max(1)
    allowed = atol + rtol * scale.reshape((-1,) + (1,) * (diff.ndim - 1))
    if not (diff <= allowed).all():
        where = np.unravel_index(int((diff - allowed).argmax()), diff.shape)
        raise ExportParityError(
            f"{what}: onnxruntime and the reference differ by up to {worst:.3g} at "
            f"{tuple(int(i) for i in where)} (tolerance atol={atol}, rtol={rtol} of "
            "the row's largest value)"
        )
    return worst


# ---------------------------------------------------------------------------
# scikit-learn heads and joined graphs


def head_graph(pipeline: Any, dims: int, opset: int) -> Any:
    """The scikit-learn head as an ONNX graph from codes (N, dims) to label, scores."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.pipeline import Pipeline
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


def join_graphs(body: Any, head: Any, *, swap_columns: bool = False) -> Any:
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
