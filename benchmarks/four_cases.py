"""The four-case benchmark: does the advisor pick the strategy that wins?

A controlled experiment in the manner of Yosinski et al. (2014):

- source network: a ResNet-18 trained from scratch (quadrant finetune) on
  Fashion-MNIST classes 0-4 (t-shirt/top, trouser, pullover, dress, coat);
- targets, each at a small size (`--small` images per class) and a large size
  (`--large` per class):
  (a) similar: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle
      boot): the same kind of images, other classes;
  (b) different: "glyphs": the letters A-E rendered from 21 fonts that ship
      with matplotlib (DejaVu, STIX, Computer Modern) with random size,
      rotation and position, 28 x 28, white on black: a notMNIST-like
      domain (Bulatov, 2011) far from clothing photographs;
- in every cell, every strategy: (1) logistic regression on the top-layer
  codes, (2) logistic regression or RBF SVM (chosen by CV) on the best
  earlier layer (chosen by CV), (3) fine-tuning from the pretrained weights,
  (4) training from scratch; test accuracy on a fixed test set per target;
- the advisor's pick (quadrant advise) in every cell, and whether it was the
  best or within 1 point of it;
- the same with the real ImageNet EfficientNet-Lite0 as the backbone.

Usage:
    python benchmarks/four_cases.py --work /tmp/four --small 20 --large 2000
    python benchmarks/four_cases.py --work /tmp/four --backbones source  # one part
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402
from features.layers import TOP  # noqa: E402
from pipeline import advise, evaluate, finetune, sweep, train  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402

SOURCE_CLASSES = (0, 1, 2, 3, 4)
SIMILAR_CLASSES = (5, 6, 7, 8, 9)
LETTERS = "ABCDE"
STRATEGIES = {
    1: "linear on top codes",
    2: "linear/SVM on best earlier layer",
    3: "fine-tune from pretrained",
    4: "train from scratch",
}
# The advisor's case -> the strategy it runs (case 4 fine-tunes from pretrained
# by default, as timm and fastai do).
CASE_STRATEGY = {1: 1, 2: 2, 3: 3, 4: 3}


# ---------------------------------------------------------------------------
# Data


def _save(
    folder: Path, images: np.ndarray, names: list[str], labels: np.ndarray
) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / names[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:05d}.png")


def fashion_target(
    root: Path, classes: tuple[int, ...], per_class: int, test_per_class: int, seed: int
) -> Path:
    """train/ and test/ folders of some Fashion-MNIST classes."""
    if root.exists():
        return root
    names = list(FASHION_MNIST_CLASSES)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        images, labels, _ = load_fashion_mnist(split)
        keep = np.concatenate(
            [
                rng.choice(np.flatnonzero(labels == c), count, replace=False)
                for c in classes
            ]
        )
        _save(root / split, images[keep], names, labels[keep])
    return root


def glyph_fonts() -> list[Path]:
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    wanted = (
        "DejaVuSans",
        "DejaVuSerif",
        "DejaVuSansMono",
        "STIXGeneral",
        "cmr10",
        "cmss10",
        "cmtt10",
        "cmti10",
        "cmb10",
    )
    return sorted(
        p
        for p in folder.glob("*.ttf")
        if p.stem.startswith(wanted) and "Display" not in p.stem
    )


def render_glyph(letter: str, font: Path, rng: np.random.Generator) -> np.ndarray:
    """One 28 x 28 letter: random size, rotation, offset; white on black."""
    size = int(rng.integers(16, 25))
    canvas = Image.new("L", (56, 56), 0)
    draw = ImageDraw.Draw(canvas)
    face = ImageFont.truetype(str(font), size * 2)
    box = draw.textbbox((0, 0), letter, font=face)
    x = (56 - (box[2] - box[0])) / 2 - box[0] + rng.normal(0, 3)
    y = (56 - (box[3] - box[1])) / 2 - box[1] + rng.normal(0, 3)
    draw.text((x, y), letter, fill=int(rng.integers(180, 256)), font=face)
    canvas = canvas.rotate(float(rng.normal(0, 10)), resample=Image.BILINEAR)
    return np.asarray(canvas.resize((28, 28), Image.LANCZOS))


def glyph_target(root: Path, per_class: int, test_per_class: int, seed: int) -> Path:
    """train/ and test/ folders of rendered letters A-E."""
    if root.exists():
        return root
    fonts = glyph_fonts()
    for split, count, offset in (("train", per_class, 0), ("test", test_per_class, 1)):
        rng = np.random.default_rng(seed * 10 + offset)
        images, labels = [], []
        for label, letter in enumerate(LETTERS):
            for _ in range(count):
                images.append(
                    render_glyph(letter, fonts[int(rng.integers(len(fonts)))], rng)
                )
                labels.append(label)
        _save(root / split, np.stack(images), list(LETTERS), np.array(labels))
    return root


def source_data(root: Path) -> Path:
    """All Fashion-MNIST training images of classes 0-4 (and their test images)."""
    if root.exists():
        return root
    names = list(FASHION_MNIST_CLASSES[:5])
    for split in ("train", "test"):
        images, labels, _ = load_fashion_mnist(split)
        keep = np.isin(labels, SOURCE_CLASSES)
        _save(root / split, images[keep], names, labels[keep])
    return root


# ---------------------------------------------------------------------------
# Runs


def base_config(data: Path, out: Path, backbone: dict[str, Any], *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{data}'",
            f"run.out='{out}'",
            "run.progress=false",
            "data.val_fraction=0.1",
            "data.test_fraction=0",
            f"backbone.name='{backbone['name']}'",
            f"backbone.weights='{backbone['weights']}'",
            f"backbone.input_size={backbone['size']}",
            f"backbone.resize_size={backbone['size']}",
            "train.cv_folds=3",
            "sweep.cv_folds=3",
            *extra,
        ],
    )


def train_source(work: Path, args: argparse.Namespace) -> Path:
    """ResNet-18 from scratch on Fashion-MNIST 0-4; returns its weights file."""
    out = work / "source-run"
    weights = out / "model" / "model.pt"
    if weights.exists():
        return weights
    data = source_data(work / "source-data")
    cfg = base_config(
        data,
        out,
        {"name": "resnet18", "weights": "random", "size": 32},
        "finetune.init=scratch",
        f"finetune.epochs={args.source_epochs}",
        "finetune.batch_size=128",
        "finetune.lr=0.003",
        "finetune.num_workers=1",
        "data.val_fraction=0.05",
    )
    start = time.perf_counter()
    finetune.run(cfg, restart=True)
    accuracy = evaluate.run(cfg).accuracy
    print(
        f"# source network: test accuracy {accuracy:.4f} on Fashion-MNIST 0-4 "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return weights


def epochs_for(per_class: int) -> int:
    # Few images need more passes; thousands need a few.
    return 30 if per_class <= 100 else 4


def run_codes(cfg: Config, strategy: int) -> float:
    from features.backbones import build_backbone
    from features.layers import spread_layers

    b = cfg.backbone
    backbone = build_backbone(b.name, b.weights, preprocessing=b.preprocessing())
    layers = spread_layers(backbone.model, backbone.preprocessing.input_size)
    cfg = replace(cfg, extract=replace(cfg.extract, layers=tuple(layers)))
    if strategy == 1:
        cfg = replace(cfg, train=replace(cfg.train, layer=TOP))
        train.run(cfg)
        return evaluate.run(cfg).accuracy
    result = sweep.run(cfg)
    earlier = max((r for r in result.rows if r.layer != TOP), key=lambda r: r.accuracy)
    scores = {}
    for classifier in ("logistic", "svm"):
        trial = replace(
            cfg,
            train=replace(
                cfg.train,
                layer=earlier.layer,
                pooling=earlier.pooling,
                classifier=classifier,
            ),
        )
        scores[classifier] = (train.run(trial).cv_score, trial)
    best = max(scores.values(), key=lambda item: item[0])[1]
    train.run(best)
    return evaluate.run(best).accuracy


def run_finetune(cfg: Config, strategy: int, per_class: int) -> float:
    init = "pretrained" if strategy == 3 else "scratch"
    cfg = replace(
        cfg,
        finetune=replace(
            cfg.finetune,
            init=init,
            epochs=epochs_for(per_class),
            batch_size=32 if per_class <= 100 else 128,
            lr=3e-3 if init == "scratch" else 1e-3,
            warmup_epochs=1.0,
            num_workers=1,
        ),
    )
    checkpoint = cfg.run.out / "finetune" / "last.pt"
    finetune.run(cfg, resume=checkpoint.exists())
    return evaluate.run(cfg).accuracy


def cell(
    work: Path,
    target: str,
    size: str,
    data: Path,
    backbone: dict[str, Any],
    per_class: int,
) -> dict[str, Any]:
    """Every strategy and the advisor's pick in one cell; cached in cell.json."""
    folder = work / "runs" / backbone["key"] / f"{target}-{size}"
    saved = folder / "cell.json"
    if saved.exists():
        return dict(json.loads(saved.read_text()))
    results: dict[str, Any] = {
        "target": target,
        "size": size,
        "per_class": per_class,
        "backbone": backbone["key"],
        "accuracy": {},
        "seconds": {},
    }
    for strategy in STRATEGIES:
        cfg = base_config(data, folder / f"s{strategy}", backbone)
        start = time.perf_counter()
        accuracy = (
            run_codes(cfg, strategy)
            if strategy <= 2
            else run_finetune(cfg, strategy, per_class)
        )
        results["accuracy"][strategy] = accuracy
        results["seconds"][strategy] = time.perf_counter() - start
        print(
            f"  {backbone['key']} {target}-{size} strategy {strategy}: {accuracy:.4f} "
            f"({results['seconds'][strategy]:.0f} s)",
            flush=True,
        )
    advice = advise.run(base_config(data, folder / "advise", backbone))
    results["advice"] = {
        "case": advice.case,
        "reasons": advice.reasons(),
        "top_gap": advice.top_gap,
        "bn_shift": advice.domain.bn_shift,
        "confidence": advice.domain.confidence,
        "best_layer": advice.best_layer,
    }
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=2))
    return results


def table(cells: list[dict[str, Any]]) -> str:
    lines = [
        "| backbone | target | images/class | "
        + " | ".join(f"{k}. {v}" for k, v in STRATEGIES.items())
        + " | advisor | pick's gap to best |",
        "|---|---|---|" + "---|" * len(STRATEGIES) + "---|---|",
    ]
    for c in cells:
        acc = {int(k): v for k, v in c["accuracy"].items()}
        best = max(acc.values())
        case = c["advice"]["case"]
        pick = CASE_STRATEGY[case]
        gap = 100 * (best - acc[pick])
        marks = [
            f"**{acc[s]:.3f}**" if acc[s] == best else f"{acc[s]:.3f}"
            for s in STRATEGIES
        ]
        verdict = (
            "best" if gap == 0 else f"{gap:.1f} points" + (" ✓" if gap <= 1 else " ✗")
        )
        lines.append(
            f"| {c['backbone']} | {c['target']} | {c['per_class']} | "
            + " | ".join(marks)
            + f" | case {case} → {pick} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500, help="test images per class")
    parser.add_argument("--source-epochs", type=int, default=5)
    parser.add_argument("--backbones", nargs="+", default=["source", "imagenet"])
    parser.add_argument("--lite-size", type=int, default=64)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    backbones = []
    if "source" in args.backbones:
        weights = train_source(args.work, args)
        backbones.append(
            {
                "key": "fashion-0-4 resnet18",
                "name": "resnet18",
                "weights": str(weights),
                "size": 32,
            }
        )
    if "imagenet" in args.backbones:
        backbones.append(
            {
                "key": "imagenet lite0",
                "name": "efficientnet_lite0",
                "weights": "default",
                "size": args.lite_size,
            }
        )
    cells = []
    for backbone in backbones:
        for size, per_class in (("small", args.small), ("large", args.large)):
            targets = {
                "fashion-5-9": fashion_target(
                    args.work / f"fashion-5-9-{per_class}",
                    SIMILAR_CLASSES,
                    per_class,
                    args.test,
                    seed=1,
                ),
                "glyphs": glyph_target(
                    args.work / f"glyphs-{per_class}", per_class, args.test, seed=2
                ),
            }
            for target, data in targets.items():
                cells.append(cell(args.work, target, size, data, backbone, per_class))
    print(table(cells))
    within = sum(1 for c in cells if _gap(c) <= 1.0)
    print(f"\nadvisor's pick best or within 1 point in {within} of {len(cells)} cells")


def _gap(c: dict[str, Any]) -> float:
    acc = {int(k): v for k, v in c["accuracy"].items()}
    return 100 * (max(acc.values()) - acc[CASE_STRATEGY[c["advice"]["case"]]])


if __name__ == "__main__":
    main()
