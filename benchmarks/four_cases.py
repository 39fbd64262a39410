"""The four-case benchmark: does the advisor pick the strategy that wins?

A controlled experiment in the manner of Yosinski et al. (2014):

- source network: a ResNet-18 trained from scratch (quadrant finetune) on
  Fashion-MNIST classes 0-4 (t-shirt/top, trouser, pullover, dress, coat);
- targets, each at a small size (`--small` images per class), a medium size
  (`--medium`, source backbone only) and a large size (`--large`):
  (a) similar: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle
      boot): the same kind of images, other classes;
  (b) different: "glyphs": the letters A-E rendered from 21 fonts that ship
      with matplotlib (DejaVu, STIX, Computer Modern) with random size,
      rotation and position, 28 x 28, white on black: a notMNIST-like
      domain (Bulatov, 2011) far from clothing photographs;
- in every cell and seed, every strategy: (1) logistic regression on the
  top-layer codes, (2) logistic regression or RBF SVM (chosen by CV) on the
  best earlier layer (chosen by CV), (3) fine-tuning from the pretrained
  weights, (4) training from scratch; test accuracy on a fixed test set per
  target, and the cost of each;
- `quadrant run` with `run.strategy = "auto"` in every cell and seed: the
  advisor's case, its intervals and pilot, the strategy it runs, its test
  accuracy and its whole cost (advice included), in a fresh run folder;
- the same with the real ImageNet EfficientNet-Lite0 as the backbone.

Seeds change which training images are drawn, the validation split and the
training seed; the test set of a target stays the same.

Usage:
    python benchmarks/four_cases.py --work /tmp/four --small 20 --large 500
    python benchmarks/four_cases.py --work /tmp/four --backbones source  # one part
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
from pipeline import advisor, evaluate, finetune, sweep, train  # noqa: E402
from pipeline import run as run_stage  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402

SOURCE_CLASSES = (0, 1, 2, 3, 4)
SIMILAR_CLASSES = (5, 6, 7, 8, 9)
LETTERS = "ABCDE"
TEST_SEED = 1000
STRATEGIES = {
    1: "linear on top codes",
    2: "linear/SVM on best earlier layer",
    3: "fine-tune from pretrained",
    4: "train from scratch",
}


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
    for split, count in (("train", per_class), ("test", test_per_class)):
        rng = np.random.default_rng(seed if split == "train" else TEST_SEED)
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
    for split, count in (("train", per_class), ("test", test_per_class)):
        rng = np.random.default_rng(seed * 10 if split == "train" else TEST_SEED)
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
    weights = out / "models" / "finetune" / "model.pt"
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
    return 30 if per_class <= 100 else 10 if per_class <= 300 else 4


def finetune_settings(per_class: int) -> list[str]:
    """The fine-tune recipe of strategies 3 and 4, and of `quadrant run`'s."""
    return [
        f"finetune.epochs={epochs_for(per_class)}",
        f"finetune.batch_size={32 if per_class <= 100 else 64}",
        "finetune.warmup_epochs=1.0",
        "finetune.num_workers=1",
    ]


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


def run_finetune(cfg: Config, strategy: int) -> float:
    # NOTE: both inits use the configured recipe (finetune_settings), the one
    # `quadrant run` and its pilots use, so each pilot is the beginning of
    # the strategy it forecasts.
    init = "pretrained" if strategy == 3 else "scratch"
    cfg = replace(cfg, finetune=replace(cfg.finetune, init=init))
    finetune.run(cfg, resume=cfg.layout.checkpoint.exists())
    return evaluate.run(cfg).accuracy


def run_auto(cfg: Config) -> dict[str, Any]:
    """`quadrant run` with the advisor, in a fresh folder: pick, accuracy, cost."""
    start = time.perf_counter()
    result = run_stage.run(cfg)
    seconds = time.perf_counter() - start
    advice = result.advice
    assert advice is not None
    sim, size = advice.similarity, advice.size
    pilot = size.pilot
    return {
        "case": result.case,
        "strategy": pick(result.case, size.init),
        "accuracy": result.evaluation.accuracy,
        "seconds": seconds,
        "timings": result.timings,
        "advice_seconds": advice.seconds,
        "similarity": {
            "verdict": sim.verdict,
            "best_layer": sim.best_layer,
            "layer": sim.layer,
            "gain": [sim.gain.mean, sim.gain.low, sim.gain.high],
            "confidence": sim.gain.confidence,
            "folds": sim.folds,
            "repeats": sim.repeats,
            "images": sim.images,
        },
        "size": {
            "measured": size.measured,
            "rule": size.rule,
            "init": size.init,
            "frozen_curve": [[p.images, p.accuracy] for p in size.frozen_curve],
            "frozen_gain": None
            if size.frozen_gain is None
            else [size.frozen_gain.mean, size.frozen_gain.low, size.frozen_gain.high],
            "pilots": [
                {
                    "init": p.init,
                    "images": p.images,
                    "full": p.full,
                    "seconds": p.seconds,
                    "curve": [[c.images, c.accuracy] for c in p.curve],
                    "accuracy": p.accuracy,
                    "versus": [p.versus.mean, p.versus.low, p.versus.high],
                    "forecast": p.forecast,
                    "forecast_interval": [p.forecast_low, p.forecast_high],
                    "forecast_points": p.forecast_points,
                    "reference": p.reference,
                }
                for p in (size.pilot, size.scratch)
                if p is not None
            ],
        },
        "bn_shift": advice.domain.bn_shift,
        "confidence": advice.domain.confidence,
        "resumed_pilot": bool(pilot and result.case >= 3 and pilot.resumable),
        "reasons": advisor.explain(advice),
    }


def pick(case: int, init: str) -> int:
    """The strategy a case runs: 1, 2, 3, or 4 for case 4 from scratch."""
    if case in (1, 2):
        return case
    return 4 if init == "scratch" else 3


def cell(
    work: Path,
    target: str,
    size: str,
    data: Path,
    backbone: dict[str, Any],
    per_class: int,
    seed: int,
) -> dict[str, Any]:
    """Every strategy and `quadrant run` in one cell and seed; cached in cell.json."""
    folder = work / "runs" / backbone["key"] / f"{target}-{size}-s{seed}"
    saved = folder / "cell.json"
    # NOTE: a cell is saved after each part, so an interrupted run (or a
    # change to the advisor only) redoes only what is missing.
    results: dict[str, Any] = (
        dict(json.loads(saved.read_text()))
        if saved.exists()
        else {
            "target": target,
            "size": size,
            "per_class": per_class,
            "backbone": backbone["key"],
            "seed": seed,
            "accuracy": {},
            "seconds": {},
        }
    )
    extra = [
        f"run.seed={seed}",
        f"data.seed={seed}",
        *finetune_settings(per_class),
    ]
    # Strategies 1 and 2 share one code cache (one extraction, as a user
    # running both would); `quadrant run` has its own folder and cache.
    shared = f"extract.cache_dir='{folder / 'codes-cache'}'"
    for strategy in STRATEGIES:
        if str(strategy) in results["accuracy"]:
            continue
        cfg = base_config(data, folder / f"s{strategy}", backbone, *extra, shared)
        start = time.perf_counter()
        accuracy = (
            run_codes(cfg, strategy) if strategy <= 2 else run_finetune(cfg, strategy)
        )
        results["accuracy"][str(strategy)] = accuracy
        results["seconds"][str(strategy)] = time.perf_counter() - start
        _save_cell(saved, results)
        _say(backbone, target, size, seed, f"strategy {strategy}", accuracy)
    if "auto" not in results:
        # A fresh folder: the cost is that of a first run, advice included.
        shutil.rmtree(folder / "auto", ignore_errors=True)
        auto = base_config(data, folder / "auto", backbone, *extra)
        results["auto"] = run_auto(auto)
        _save_cell(saved, results)
        _say(backbone, target, size, seed, "quadrant run", results["auto"]["accuracy"])
    return results


def _save_cell(saved: Path, results: dict[str, Any]) -> None:
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=2))


def _say(
    backbone: dict[str, Any],
    target: str,
    size: str,
    seed: int,
    what: str,
    accuracy: float,
) -> None:
    print(
        f"  {backbone['key']} {target}-{size} seed {seed} {what}: {accuracy:.4f}",
        flush=True,
    )


# ---------------------------------------------------------------------------
# Tables


def _accuracy(c: dict[str, Any]) -> dict[int, float]:
    return {int(k): v for k, v in c["accuracy"].items()}


def gap(c: dict[str, Any]) -> float:
    """Points the advisor's pick falls behind the best strategy in one seed."""
    acc = _accuracy(c)
    return 100 * (max(acc.values()) - acc[c["auto"]["strategy"]])


def group(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[Any]]:
    out: dict[tuple[str, str, str], list[Any]] = {}
    for c in cells:
        out.setdefault((c["backbone"], c["target"], c["size"]), []).append(c)
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def accuracy_table(cells: list[dict[str, Any]]) -> str:
    """Mean ± SD over seeds per strategy; the advisor's picks and gaps."""
    lines = [
        "| backbone | target | images/class | seeds | "
        + " | ".join(f"{k}. {v}" for k, v in STRATEGIES.items())
        + " | advisor's case → strategy per seed | pick's gap to best (points) "
        "| `quadrant run` test accuracy | within 1 point |",
        "|---|---|---|---|" + "---|" * len(STRATEGIES) + "---|---|---|---|",
    ]
    for (bb, target, _), group_cells in group(cells).items():
        accs = [_accuracy(c) for c in group_cells]
        means = {s: statistics.mean(a[s] for a in accs) for s in STRATEGIES}
        top = max(means.values())
        marks = [
            (f"**{_mean_sd([a[s] for a in accs])}**" if means[s] == top else
             _mean_sd([a[s] for a in accs]))
            for s in STRATEGIES
        ]  # fmt: skip
        picks = ", ".join(
            f"{c['auto']['case']}→{c['auto']['strategy']}" for c in group_cells
        )
        gaps = [gap(c) for c in group_cells]
        ok = sum(g <= 1.0 for g in gaps)
        lines.append(
            f"| {bb} | {target} | {group_cells[0]['per_class']} | {len(group_cells)} | "
            + " | ".join(marks)
            + f" | {picks} | {', '.join(f'{g:.1f}' for g in gaps)} | "
            f"{_mean_sd([c['auto']['accuracy'] for c in group_cells])} | "
            f"{ok}/{len(gaps)} |"
        )
    return "\n".join(lines)


def cost_table(cells: list[dict[str, Any]]) -> str:
    """`quadrant run` (advice included) against running every strategy."""
    lines = [
        "| backbone | target | images/class | advice (s) | `quadrant run` total (s) "
        "| every strategy (s) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for (bb, target, _), group_cells in group(cells).items():
        advice = [c["auto"]["timings"].get("advise", 0.0) for c in group_cells]
        total = [c["auto"]["seconds"] for c in group_cells]
        every = [sum(c["seconds"].values()) for c in group_cells]
        lines.append(
            f"| {bb} | {target} | {group_cells[0]['per_class']} | "
            f"{statistics.mean(advice):.0f} | {statistics.mean(total):.0f} | "
            f"{statistics.mean(every):.0f} | "
            f"{statistics.mean(t / e for t, e in zip(total, every, strict=True)):.2f} |"
        )
    return "\n".join(lines)


def interval_table(cells: list[dict[str, Any]]) -> str:
    """The advisor's similarity interval against the measured gap (test set)."""
    lines = [
        "| backbone | target | images/class | seed | verdict | advisor: earlier − top "
        "[interval] (CV points) | measured: strategy 2 − 1 (test points) | covered "
        "| best two within 2 points |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        sim = c["auto"]["similarity"]
        mean, low, high = (100 * v for v in sim["gain"])
        acc = _accuracy(c)
        truth = 100 * (acc[2] - acc[1])
        ranked = sorted(acc.values(), reverse=True)
        close = 100 * (ranked[0] - ranked[1]) <= 2
        lines.append(
            f"| {c['backbone']} | {c['target']} | {c['per_class']} | {c['seed']} | "
            f"{sim['verdict']} | {mean:+.1f} [{low:+.1f}, {high:+.1f}] | "
            f"{truth:+.1f} | {'yes' if low <= truth <= high else 'no'} | "
            f"{'yes' if close else 'no'} |"
        )
    return "\n".join(lines)


def pilot_table(cells: list[dict[str, Any]]) -> str:
    """Every pilot: its figures, the rule that decided, and the truth."""
    lines = [
        "| backbone | target | images/class | seed | frozen val (¼, ½, all) "
        "| pilot | pilot val | vs reference [interval] (points) | forecast "
        "| measured test: fine-tune (3/4) | measured: codes run | rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        size = c["auto"]["size"]
        if not size["measured"]:
            continue
        curve = ", ".join(f"{a:.3f}" for _, a in size["frozen_curve"])
        acc = _accuracy(c)
        for p in size["pilots"]:
            mean, low, high = (100 * v for v in p["versus"])
            truth = acc[3] if p["init"] == "pretrained" else acc[4]
            lines.append(
                f"| {c['backbone']} | {c['target']} | {c['per_class']} | "
                f"{c['seed']} | {curve} | {p['init']} {p['images']}/{p['full']} "
                f"({p['seconds']:.0f} s) | {p['accuracy']:.3f} | {mean:+.1f} "
                f"[{low:+.1f}, {high:+.1f}] | {p['forecast']:.3f} | {truth:.3f} | "
                f"{c['auto']['accuracy']:.3f} | {size['rule']} → {size['init']} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--medium", type=int, default=150)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument("--test", type=int, default=300, help="test images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lite-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds for the ImageNet backbone (default: --seeds); it costs most",
    )
    parser.add_argument("--source-epochs", type=int, default=5)
    parser.add_argument("--backbones", nargs="+", default=["source", "imagenet"])
    parser.add_argument("--lite-size", type=int, default=64)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cells = []
    # NOTE: seed by seed, so a run cut short has every cell at its first seeds.
    for seed in args.seeds:
        for backbone, sizes in backbones(args):
            lite = backbone["name"] != "resnet18"
            if lite and args.lite_seeds is not None and seed not in args.lite_seeds:
                continue
            for size, per_class in sizes:
                for target, data in targets(args, per_class, seed).items():
                    cells.append(
                        cell(args.work, target, size, data, backbone, per_class, seed)
                    )
    cells.sort(key=lambda c: (c["backbone"], c["per_class"], c["target"], c["seed"]))
    report = "\n\n".join(
        [
            accuracy_table(cells),
            cost_table(cells),
            interval_table(cells),
            pilot_table(cells),
        ]
    )
    print(report)
    within = sum(1 for c in cells if gap(c) <= 1.0)
    print(f"\nadvisor's pick best or within 1 point in {within} of {len(cells)} runs")
    (args.work / "four_cases.md").write_text(report + "\n")
    (args.work / "cells.json").write_text(json.dumps(cells, indent=2))


def backbones(
    args: argparse.Namespace,
) -> list[tuple[dict[str, Any], list[tuple[str, int]]]]:
    out = []
    if "source" in args.backbones:
        weights = train_source(args.work, args)
        out.append(
            (
                {
                    "key": "fashion-0-4 resnet18",
                    "name": "resnet18",
                    "weights": str(weights),
                    "size": 32,
                },
                [("small", args.small), ("medium", args.medium), ("large", args.large)],
            )
        )
    if "imagenet" in args.backbones:
        out.append(
            (
                {
                    "key": "imagenet lite0",
                    "name": "efficientnet_lite0",
                    "weights": "default",
                    "size": args.lite_size,
                },
                [("small", args.small), ("large", args.large)],
            )
        )
    return out


def targets(args: argparse.Namespace, per_class: int, seed: int) -> dict[str, Path]:
    return {
        "fashion-5-9": fashion_target(
            args.work / f"fashion-5-9-{per_class}-s{seed}",
            SIMILAR_CLASSES,
            per_class,
            args.test,
            seed=1 + seed,
        ),
        "glyphs": glyph_target(
            args.work / f"glyphs-{per_class}-s{seed}",
            per_class,
            args.test,
            seed=2 + seed,
        ),
    }


if __name__ == "__main__":
    main()
