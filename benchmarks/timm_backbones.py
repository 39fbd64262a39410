"""timm backbones through quadrant: extraction speed, export parity and speed.

Measured side by side in one run (random weights: no download needed):

1. extraction (`--part extract`): images/s of quadrant's code model for
   `timm/resnet50` and torchvision's `resnet50` on the same uint8 batches
   (same engine: BatchNorm folding, channels_last, CPU chunks), and of
   `quadrant extract` from the same image files with the same preprocessing
   (timm's is overridden with torchvision's): its extraction loop (list and
   fingerprint the files, decode, forward, write HDF5; building the model is
   not counted), interleaved;
2. export (`--part export`): for one timm CNN and one timm ViT, the codes path
   (top-layer codes, a logistic head) exported by `quadrant export`: the
   largest score difference to PyTorch + scikit-learn on held-out images,
   and images/s of the source model and of the ONNX file in onnxruntime on
   the same uint8 batches, interleaved, median of paired ratios.

Usage:
    python benchmarks/timm_backbones.py --work /tmp/qtimm
    python benchmarks/timm_backbones.py --work /tmp/qtimm --part extract --repeats 5
    python benchmarks/timm_backbones.py --work /tmp/qtimm --device cuda  # GPU machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.datasets import load_fashion_mnist  # noqa: E402
from features.devices import resolve_device, resolve_precision  # noqa: E402
from features.extractor import CodeModel, CodeRunner  # noqa: E402
from features.onnx_engine import session  # noqa: E402
from pipeline import export, extract, inputs, train  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.models import load_model  # noqa: E402

PAIR = ("timm/resnet50", "resnet50")
EXPORTED = ("timm/convnext_tiny", "timm/vit_small_patch16_224")
# torchvision's ResNet-50 preprocessing, given to both in the end-to-end runs.
SAME_INPUT = [
    "backbone.input_size=224",
    "backbone.resize_size=256",
    "backbone.interpolation='bilinear'",
    "backbone.mean=[0.485, 0.456, 0.406]",
    "backbone.std=[0.229, 0.224, 0.225]",
]


def write_images(root: Path, per_class: int, size: int = 256) -> Path:
    """Fashion-MNIST images upscaled to `size` px, as JPEG class folders."""
    if root.exists():
        return root
    images, labels, names = load_fashion_mnist("train")
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            image = Image.fromarray(images[i]).convert("RGB").resize((size, size))
            image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def config(
    args: argparse.Namespace, data: Path, out: Path, backbone: str, *extra: str
) -> Config:
    return load_config(
        None,
        [
            f"data.root='{data}'",
            f"run.out='{out}'",
            f"backbone.name='{backbone}'",
            "backbone.weights=random",
            "extract.batch_size=32",
            f"extract.device='{args.device}'",
            "run.progress=false",
            *extra,
        ],
    )


# ---------------------------------------------------------------------------
# 1. extraction


def code_model_rate(runner: CodeRunner, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    runner(pixels)
    return len(pixels) / (time.perf_counter() - start)


def extraction(args: argparse.Namespace) -> None:
    data = write_images(args.work / "images", args.per_class)
    runners, folded = {}, {}
    for name in PAIR:
        cfg = config(args, data, args.work / "unused", name, *SAME_INPUT)
        model = CodeModel(inputs.load_backbone(cfg), ["top"], ["avg"])
        options = cfg.extract
        device = resolve_device(options.device)
        runners[name] = CodeRunner(
            model, options, device, resolve_precision("auto", device)
        )
        folded[name] = model.folded
    pixels = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8)
    bare: dict[str, list[float]] = {n: [] for n in PAIR}
    e2e: dict[str, list[float]] = {n: [] for n in PAIR}
    for runner in runners.values():
        runner(pixels[:8])  # warm-up
    for i in range(args.repeats):  # interleaved: load drifts hit both
        for name in PAIR:
            bare[name].append(code_model_rate(runners[name], pixels))
        for name in PAIR:
            out = args.work / f"e2e-{name.replace('/', '-')}-{i}"
            result = extract.run(config(args, data, out, name, *SAME_INPUT))
            assert not result.reused
            e2e[name].append(result.images_per_second)
    print(
        f"# extraction, random weights, 224 px, {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; medians of "
        f"{args.repeats}"
    )
    print("| img/s | timm/resnet50 | torchvision resnet50 | timm / torchvision |")
    print("|---|---|---|---|")
    for label, rates in (
        (f"code model, {args.batch} in-memory images", bare),
        (f"quadrant extract, {len(list(data.rglob('*.jpg')))} JPEG files", e2e),
    ):
        t, v = statistics.median(rates[PAIR[0]]), statistics.median(rates[PAIR[1]])
        print(f"| {label} | {t:.1f} | {v:.1f} | {t / v:.3f} |")
    print(f"| BatchNorm layers folded | {folded[PAIR[0]]} | {folded[PAIR[1]]} | |")


# ---------------------------------------------------------------------------
# 2. export


def exports(args: argparse.Namespace) -> None:
    data = write_images(args.work / "images", args.per_class)
    print(
        "\n| backbone | parity images | largest score difference | labels agree | "
        "PyTorch + scikit-learn img/s | onnxruntime img/s | median paired ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in EXPORTED:
        cfg = config(
            args,
            data,
            args.work / f"export-{name.replace('/', '-')}",
            name,
            "train.cv_folds=2",
            "train.C=[1.0]",
            f"export.parity_images={args.parity}",
        )
        train.run(cfg)
        result = export.run(cfg)
        source, onnx, ratio = speed(cfg, args)
        print(
            f"| {name} | {result.parity_images} | {result.max_abs_diff:.2e} | "
            f"{'yes' if result.labels_equal else 'no'} | {source:.1f} | {onnx:.1f} "
            f"| {ratio:.2f}x |",
            flush=True,
        )


def speed(cfg: Config, args: argparse.Namespace) -> tuple[float, float, float]:
    """(source img/s, onnxruntime img/s, median paired ratio) on the same batches."""
    model = load_model(cfg.layout.model("codes"))
    images = inputs.load_images(cfg)
    files = [images.absolute(r) for r in images.records][: args.batch * 2]
    pixels = inputs.load_pixels(cfg, files, model.preprocessing)
    sess = session(model.files.onnx)

    def onnx_run(batch: np.ndarray) -> Any:
        return sess.run(["scores", "label"], {"images": batch})

    timed: dict[str, list[float]] = {"source": [], "onnx": []}
    for run in (model.image_scores, onnx_run):
        run(pixels[:8])  # warm-up
    for _ in range(args.repeats):
        timed["source"].append(_rate(model.image_scores, pixels, args.batch))
        timed["onnx"].append(_rate(onnx_run, pixels, args.batch))
    ratios = [o / s for s, o in zip(timed["source"], timed["onnx"], strict=True)]
    return (
        statistics.median(timed["source"]),
        statistics.median(timed["onnx"]),
        statistics.median(ratios),
    )


def _rate(run: Callable[[np.ndarray], Any], pixels: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        run(pixels[i : i + batch])
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--part", choices=["extract", "export", "both"], default="both")
    parser.add_argument("--per-class", type=int, default=8, help="images per class")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--parity", type=int, default=32, help="parity images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part in ("extract", "both"):
        extraction(args)
    if args.part in ("export", "both"):
        exports(args)


if __name__ == "__main__":
    main()
