"""ONNX for the frozen backbone: export a code model, run it with onnxruntime.

The same exported graph serves two purposes: extraction with
`extract.engine = "onnxruntime"` (often faster than PyTorch eager on a CPU)
and the backbone half of the codes path's exported model. `onnx` and
`onnxruntime` are imported inside the functions, as timm's exporter does, so
importing quadrant does not load them.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

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
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    onnx.save(onnx_model, tmp)
    os.replace(tmp, path)
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
    providers = ["CPUExecutionProvider"]
    # NOTE: onnxruntime-gpu lists the CUDA provider even where no driver is
    # installed, then prints an error while falling back; torch knows better.
    if (
        device.startswith("cuda")
        and "CUDAExecutionProvider" in available
        and torch.cuda.is_available()
    ):
        providers.insert(0, "CUDAExecutionProvider")
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, sess_options=options, providers=providers)


class OnnxRunner:
    """Runs an exported code model on uint8 batches with onnxruntime.

    Same call contract as `features.extractor.CodeRunner`: a uint8 tensor
    (N, 3, S, S) in, {spec name: float32 codes} out.
    """

    def __init__(self, path: Path, names: Sequence[str], device: torch.device) -> None:
        self.session = session(
            path, device=device.type, threads=torch.get_num_threads()
        )
        self.names = list(names)
        self.outputs = [f"codes_{i}" for i in range(len(names))]

    def __call__(self, pixels: torch.Tensor) -> dict[str, npt.NDArray[np.float32]]:
        values = self.session.run(self.outputs, {INPUT: pixels.numpy()})
        return {
            name: np.asarray(v, dtype=np.float32)
            for name, v in zip(self.names, values, strict=True)
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
