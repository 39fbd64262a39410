"""Export benchmarks: parity per head kind, fp16 / int8 accuracy, prediction speed.

On a Fashion-MNIST subset with the real EfficientNet-Lite0 (ImageNet weights):

1. parity: for each head kind (logistic, linear SVM, RBF SVM, SGD on the
   top-layer codes, and a fine-tuned network), `quadrant export` writes the
   ONNX file and checks it against the PyTorch / scikit-learn model; the
   largest score difference, whether every label agreed, and the test
   accuracy of the fp32, fp16 and int8 (static and dynamic) copies;
2. speed (`--repeats`): images/s of the exported file in onnxruntime against
   the source model (PyTorch code model + scikit-learn head, or the PyTorch
   network) on the same uint8 batches, interleaved, median of paired ratios.

Usage:
    python benchmarks/export.py --work /tmp/qexport
    python benchmarks/export.py --work /tmp/qexport --per-class 100 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.datasets import write_fashion_mnist  # noqa: E402
from features.onnx_engine import session  # noqa: E402
from pipeline import export, finetune, inputs, train  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.models import load_model, select_model  # noqa: E402

HEADS = ("logistic", "linear_svm", "svm", "sgd")


def config(data: Path, out: Path, args: argparse.Namespace, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{data}'",
            f"run.out='{out}'",
            "run.progress=false",
            f"backbone.input_size={args.size}",
            f"backbone.resize_size={args.size}",
            "data.val_fraction=0.1",
            "train.cv_folds=3",
            "train.C=[0.1, 1.0]",
            "train.alpha=[1e-4]",
            "export.fp16=true",
            "export.parity_images=64",
            "finetune.epochs=2",
            "finetune.batch_size=32",
            "finetune.num_workers=1",
            *extra,
        ],
    )


def exported(cfg: Config, head: str) -> export.ExportResult:
    """Train (or fine-tune) and export; int8 static here, dynamic beside it."""
    if head == "finetune":
        finetune.run(cfg, restart=True)
    else:
        train.run(cfg)
    result = export.run(cfg)
    # Dynamic int8 is the other choice of export.int8: a second export of the
    # same model (model.onnx is rewritten identically).
    again = replace(cfg, export=replace(cfg.export, int8="dynamic", fp16=False))
    result.variants["int8 dynamic"] = export.run(again).variants["int8"]
    return result


def speed(cfg: Config, repeats: int, batches: int) -> tuple[float, float, float]:
    """(source img/s, onnxruntime img/s, median paired ratio) on one model."""
    model = load_model(select_model(cfg.layout, cfg.run.model))
    reference = model.image_scores  # the PyTorch (+ scikit-learn) model itself
    images = inputs.load_images(cfg)
    files = [images.absolute(r) for r in images.records][: 32 * batches]
    pixels = inputs.load_pixels(cfg, files, model.preprocessing)
    sess = session(model.files.onnx)

    def onnx_run(batch: np.ndarray) -> Any:
        return sess.run(["scores", "label"], {"images": batch})

    timed: dict[str, list[float]] = {"source": [], "onnx": []}
    for _ in range(repeats):
        timed["source"].append(_rate(reference, pixels))
        timed["onnx"].append(_rate(onnx_run, pixels))
    ratios = [o / s for s, o in zip(timed["source"], timed["onnx"], strict=True)]
    return (
        statistics.median(timed["source"]),
        statistics.median(timed["onnx"]),
        statistics.median(ratios),
    )


def _rate(run: Callable[[np.ndarray], Any], pixels: np.ndarray) -> float:
    run(pixels[:32])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), 32):
        run(pixels[i : i + 32])
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=128, help="input size (px)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8, help="of 32 images")
    args = parser.parse_args()
    data = args.work / "fashion-mnist"
    if not data.exists():
        write_fashion_mnist(data, per_class=args.per_class, split="both")

    print(
        "| head | parity images | largest score difference | labels agree | "
        "test acc. fp32 | fp16 | int8 static | int8 dynamic |"
    )
    print("|---|---|---|---|---|---|---|---|")
    configs = {}
    for head in (*HEADS, "finetune"):
        cfg = config(
            data,
            args.work / head,
            args,
            f"train.classifier={'logistic' if head == 'finetune' else head}",
            "export.int8='static'",
        )
        result = exported(cfg, head)
        v = result.variants
        print(
            f"| {head} | {result.parity_images} | {result.max_abs_diff:.2e} | "
            f"{'yes' if result.labels_equal else 'no'} | "
            f"{v['fp16'].fp32_accuracy:.4f} | {v['fp16'].accuracy:.4f} | "
            f"{v['int8'].accuracy:.4f} | {v['int8 dynamic'].accuracy:.4f} |",
            flush=True,
        )
        configs[head] = cfg

    print("\n| model | source img/s | onnxruntime img/s | median paired ratio |")
    print("|---|---|---|---|")
    for head in ("logistic", "svm", "finetune"):
        source, onnx, ratio = speed(configs[head], args.repeats, args.batches)
        print(
            f"| {head} | {source:.1f} | {onnx:.1f} | {ratio:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
