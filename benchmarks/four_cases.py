"""The four-case benchmark: does the advisor pick the strategy that wins?

A controlled experiment in the manner of Yosinski et al. (2014):

- source network: a ResNet-18 trained from scratch (quadrant finetune) on
  Fashion-MNIST classes 0-4 (t-shirt/top, trouser, pullover, dress, coat);
- targets, each at a small size (`--small` images per class), a medium size
  (`--medium`, source backbone only), a large size (`--large`) and a huge one
  (`--huge`: all 6,000 Fashion-MNIST training images per class, and as many
  glyphs), where fine-tuning should win:
  (a) similar: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle
      boot): the same kind of images, other classes;
  (b) different: "glyphs": the letters A-E rendered from 21 fonts that ship
      with matplotlib (DejaVu, STIX, Computer Modern) with random size,
      rotation and position, 28 x 28, white on black: a notMNIST-like
      domain (Bulatov, 2011) far from clothing photographs;
- in every cell and seed, every strategy: (1) logistic regression on the
  top-layer codes, (2) logistic regression or RBF SVM (chosen by CV) on the
  best earlier layer (chosen by CV), (3) fine-tuning from the pretrained
  weights with quadrant's recipe (LP-FT: the head from a linear probe,
  BatchNorm statistics kept), (3r) the same with a random head and
  BatchNorm statistics updated (the recipe before LP-FT), (3p) partial
  fine-tuning from the best earlier layer (everything before it frozen),
  (4) training from scratch; test accuracy on a fixed test set per target,
  the final validation accuracy of each fine-tune, and the cost of each
  (the huge cells skip 3r: it costs a full fine-tune more);
- `quadrant run` with `run.strategy = "auto"` and a `run.budget` in every
  cell and seed: the advisor's candidates, its intervals and pilots, what it
  picked, its test accuracy and its whole wall time (advice included), in a
  fresh run folder;
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
import math
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
    "1": "linear on top codes",
    "2": "linear/SVM on best earlier layer",
    "3": "fine-tune (LP-FT, BN kept)",
    "3r": "fine-tune (random head, BN updated)",
    "3p": "partial fine-tune from the best earlier layer",
    "4": "train from scratch",
}
# run.budget of `quadrant run` per cell size: enough for its fine-tunes on
# two CPU cores, so that the pick is what the budget-free best would be.
BUDGETS = {"small": "10m", "medium": "15m", "large": "20m", "huge": "90m"}


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
    if per_class <= 100:
        return 30
    return 10 if per_class <= 300 else 4 if per_class <= 1000 else 3


def finetune_settings(per_class: int) -> list[str]:
    """The fine-tune recipe of strategies 3 and 4, and of `quadrant run`'s."""
    return [
        f"finetune.epochs={epochs_for(per_class)}",
        f"finetune.batch_size={32 if per_class <= 100 else 64}",
        "finetune.warmup_epochs=1.0",
        "finetune.num_workers=1",
    ]


def run_codes(cfg: Config, strategy: str) -> tuple[float, str]:
    """Test accuracy of strategy 1 or 2, and the best earlier layer."""
    from features.backbones import build_backbone
    from features.layers import spread_layers

    b = cfg.backbone
    backbone = build_backbone(b.name, b.weights, preprocessing=b.preprocessing())
    layers = spread_layers(backbone.model, backbone.preprocessing.input_size)
    cfg = replace(cfg, extract=replace(cfg.extract, layers=tuple(layers)))
    result = sweep.run(cfg)
    earlier = max((r for r in result.rows if r.layer != TOP), key=lambda r: r.accuracy)
    if strategy == "1":
        cfg = replace(cfg, train=replace(cfg.train, layer=TOP))
        train.run(cfg)
        return evaluate.run(cfg).accuracy, earlier.layer
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
    return evaluate.run(best).accuracy, earlier.layer


def run_finetune(cfg: Config, strategy: str, earlier: str | None) -> dict[str, float]:
    """Test accuracy and the last epoch's validation accuracy of one fine-tune.

    NOTE: every variant uses the configured recipe (finetune_settings), the
    one `quadrant run` and its pilots use, so each pilot is the beginning of
    the strategy it forecasts.
    """
    ft = cfg.finetune
    variants = {
        "3": replace(ft, init="pretrained"),
        "3r": replace(ft, init="pretrained", head_init="random", batchnorm="train"),
        "3p": replace(ft, init="pretrained", train_from=earlier),
        "4": replace(ft, init="scratch"),
    }
    cfg = replace(cfg, finetune=variants[strategy])
    finetune.run(cfg, resume=cfg.layout.checkpoint.exists())
    history = json.loads(cfg.layout.model("finetune").history_json.read_text())
    return {
        "test": evaluate.run(cfg).accuracy,
        "val": float(history["epochs"][-1]["val_accuracy"]),
    }


def run_auto(cfg: Config) -> dict[str, Any]:
    """`quadrant run` with the advisor, in a fresh folder: pick, accuracy, cost."""
    start = time.perf_counter()
    result = run_stage.run(cfg)
    seconds = time.perf_counter() - start
    advice = result.advice
    assert advice is not None
    sim, size = advice.similarity, advice.size
    chosen = next(c for c in advice.candidates if c.name == advice.chosen)
    return {
        "case": result.case,
        "chosen": chosen.name,
        "strategy": pick(chosen.path, chosen.settings),
        "accuracy": result.evaluation.accuracy,
        "seconds": seconds,
        "budget": cfg.run.budget_seconds,
        "timings": result.timings,
        "advice_seconds": advice.seconds,
        "candidates": [
            {
                "name": c.name,
                "accuracy": c.accuracy,
                "interval": [c.low, c.high],
                "seconds": c.seconds,
                "fits": c.fits,
            }
            for c in advice.candidates
        ],
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
            "reference": None
            if size.reference is None
            else {"cv": size.reference.cv.mean, "val": size.reference.val_accuracy},
            "frozen_curve": [[p.images, p.accuracy] for p in size.frozen_curve],
            "pilots": [_pilot(p) for p in size.pilots],
        },
        "bn_shift": advice.domain.bn_shift,
        "confidence": advice.domain.confidence,
        "reasons": advisor.explain(advice),
    }


def _pilot(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "strategy": pick("finetune", p.settings),
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
        "wins": p.wins(0.01),
    }


def pick(path: str, settings: dict[str, Any]) -> str:
    """The strategy a candidate runs: 1, 2, 3, 3p (partial) or 4 (scratch)."""
    if path == "codes":
        return "1" if settings["train.layer"] == TOP else "2"
    if settings.get("finetune.init") == "scratch":
        return "4"
    return "3p" if settings.get("finetune.train_from") else "3"


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
            "val": {},
            "seconds": {},
        }
    )
    results.setdefault("val", {})
    extra = [
        f"run.seed={seed}",
        f"data.seed={seed}",
        *finetune_settings(per_class),
    ]
    # Strategies 1 and 2 share one code cache (one extraction, as a user
    # running both would); `quadrant run` has its own folder and cache.
    shared = f"extract.cache_dir='{folder / 'codes-cache'}'"
    for strategy in STRATEGIES:
        if strategy in results["accuracy"] or (strategy == "3r" and size == "huge"):
            continue
        cfg = base_config(data, folder / f"s{strategy}", backbone, *extra, shared)
        start = time.perf_counter()
        if strategy in ("1", "2"):
            accuracy, results["earlier"] = run_codes(cfg, strategy)
        else:
            measured = run_finetune(cfg, strategy, results.get("earlier"))
            accuracy = measured["test"]
            results["val"][strategy] = measured["val"]
        results["accuracy"][strategy] = accuracy
        results["seconds"][strategy] = time.perf_counter() - start
        _save_cell(saved, results)
        _say(backbone, target, size, seed, f"strategy {strategy}", accuracy)
    if "auto" not in results:
        # A fresh folder: the cost is that of a first run, advice included.
        shutil.rmtree(folder / "auto", ignore_errors=True)
        auto = base_config(
            data, folder / "auto", backbone, *extra, f"run.budget='{BUDGETS[size]}'"
        )
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


def _accuracy(c: dict[str, Any]) -> dict[str, float]:
    return {str(k): v for k, v in c["accuracy"].items()}


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
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def accuracy_table(cells: list[dict[str, Any]]) -> str:
    """Mean ± SD over seeds per strategy; the advisor's picks and gaps."""
    lines = [
        "| backbone | target | images/class | seeds | "
        + " | ".join(f"{k}. {v}" for k, v in STRATEGIES.items())
        + " | fine-tune gain over best frozen (points) | `quadrant run` picked "
        "(per seed) | pick's gap to best (points) | `quadrant run` test accuracy "
        "| within 1 point |",
        "|---|---|---|---|" + "---|" * len(STRATEGIES) + "---|---|---|---|---|",
    ]
    for (bb, target, _), group_cells in group(cells).items():
        accs = [_accuracy(c) for c in group_cells]
        means = {
            s: statistics.mean(a[s] for a in accs) for s in STRATEGIES if s in accs[0]
        }
        top = max(means.values())
        marks = [
            "–" if s not in means else
            f"**{_mean_sd([a[s] for a in accs])}**" if means[s] == top else
            _mean_sd([a[s] for a in accs])
            for s in STRATEGIES
        ]  # fmt: skip
        frozen = max(means["1"], means["2"])
        tuned = max(v for k, v in means.items() if k not in ("1", "2"))
        picks = ", ".join(c["auto"]["chosen"] for c in group_cells)
        gaps = [gap(c) for c in group_cells]
        ok = sum(g <= 1.0 for g in gaps)
        lines.append(
            f"| {bb} | {target} | {group_cells[0]['per_class']} | {len(group_cells)} | "
            + " | ".join(marks)
            + f" | {100 * (tuned - frozen):+.1f} | {picks} | "
            f"{', '.join(f'{g:.1f}' for g in gaps)} | "
            f"{_mean_sd([c['auto']['accuracy'] for c in group_cells])} | "
            f"{ok}/{len(gaps)} |"
        )
    return "\n".join(lines)


def cost_table(cells: list[dict[str, Any]]) -> str:
    """`quadrant run` (advice included) against its budget and every strategy."""
    lines = [
        "| backbone | target | images/class | run.budget (s) | advice (s) "
        "| `quadrant run` total (s), max over seeds | within budget + 10% "
        "| every strategy (s) | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (bb, target, _), group_cells in group(cells).items():
        advice = [c["auto"]["timings"].get("advise", 0.0) for c in group_cells]
        total = [c["auto"]["seconds"] for c in group_cells]
        budget = group_cells[0]["auto"].get("budget") or math.inf
        every = [sum(c["seconds"].values()) for c in group_cells]
        within = sum(t <= 1.1 * budget for t in total)
        lines.append(
            f"| {bb} | {target} | {group_cells[0]['per_class']} | {budget:.0f} | "
            f"{statistics.mean(advice):.0f} | {max(total):.0f} | "
            f"{within}/{len(total)} | {statistics.mean(every):.0f} | "
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
        truth = 100 * (acc["2"] - acc["1"])
        ranked = sorted(acc.values(), reverse=True)
        close = 100 * (ranked[0] - ranked[1]) <= 2
        lines.append(
            f"| {c['backbone']} | {c['target']} | {c['per_class']} | {c['seed']} | "
            f"{sim['verdict']} | {mean:+.1f} [{low:+.1f}, {high:+.1f}] | "
            f"{truth:+.1f} | {'yes' if low <= truth <= high else 'no'} | "
            f"{'yes' if close else 'no'} |"
        )
    return "\n".join(lines)


def forecasts(cells: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """(pilot, the realised full run's last validation accuracy) with a forecast."""
    out = []
    for c in cells:
        for p in c["auto"]["size"]["pilots"]:
            truth = c.get("val", {}).get(p["strategy"])
            if p["forecast"] is not None and truth is not None:
                out.append((p, truth))
    return out


def coverage(pairs: list[tuple[dict[str, Any], float]], widen: float) -> float:
    """Share of forecasts whose interval, half-widths times `widen`, covers."""
    if not pairs:
        return math.nan
    hits = 0
    for p, truth in pairs:
        low, high = p["forecast_interval"]
        mean = p["forecast"]
        if mean - widen * (mean - low) <= truth <= mean + widen * (high - mean):
            hits += 1
    return hits / len(pairs)


def calibrated_widen(pairs: list[tuple[dict[str, Any], float]]) -> float:
    """The smallest widening (in steps of 0.25) that covers 80% of the runs."""
    widen = 1.0
    while coverage(pairs, widen) < 0.8 and widen < 20:
        widen += 0.25
    return widen


def pilot_table(cells: list[dict[str, Any]]) -> str:
    """Every pilot: its figures, the rule, and the realised full run."""
    lines = [
        "| backbone | target | images/class | seed | codes path val | pilot "
        "| pilot val | vs codes [interval] (points) | forecast [interval] "
        "| realised full run: val (test) | covered | wins |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        size = c["auto"]["size"]
        if not size["measured"]:
            continue
        acc = _accuracy(c)
        for p in size["pilots"]:
            mean, low, high = (100 * v for v in p["versus"])
            val = c.get("val", {}).get(p["strategy"])
            test = acc.get(p["strategy"])
            forecast, covered = "none", "–"
            if p["forecast"] is not None:
                lo, hi = p["forecast_interval"]
                forecast = f"{p['forecast']:.3f} [{lo:.3f}, {hi:.3f}]"
                if val is not None:
                    covered = "yes" if lo <= val <= hi else "no"
            realised = "–" if val is None else f"{val:.3f} ({test:.3f})"
            lines.append(
                f"| {c['backbone']} | {c['target']} | {c['per_class']} | "
                f"{c['seed']} | {size['reference']['val']:.3f} | {p['name']} "
                f"{p['images']}/{p['full']} ({p['seconds']:.0f} s) | "
                f"{p['accuracy']:.3f} | {mean:+.1f} [{low:+.1f}, {high:+.1f}] | "
                f"{forecast} | {realised} | {covered} | {p['wins'] or 'no'} |"
            )
    pairs = forecasts(cells)
    widen = calibrated_widen(pairs)
    lines.append(
        f"\nForecast intervals as made (advisor's FORECAST_WIDEN) covered the "
        f"realised full run in {100 * coverage(pairs, 1.0):.0f}% of {len(pairs)} "
        f"runs with a forecast; widened {widen:.2f}x they cover "
        f"{100 * coverage(pairs, widen):.0f}%."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--medium", type=int, default=150)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument(
        "--huge",
        type=int,
        default=0,
        help="images per class of the huge cells (0: none)",
    )
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
                [
                    ("small", args.small),
                    ("medium", args.medium),
                    ("large", args.large),
                    *([("huge", args.huge)] if args.huge else []),
                ],
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
                [
                    ("small", args.small),
                    ("large", args.large),
                    *([("huge", args.huge)] if args.huge else []),
                ],
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
