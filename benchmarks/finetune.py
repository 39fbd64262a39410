"""Fine-tuning benchmarks.

1. throughput (`--throughput`): images/s of one training epoch with
   quadrant's loop vs the plain loop of torchvision's transfer-learning
   tutorial (ImageFolder, ToTensor + Normalize, zero_grad / forward /
   backward / step), same model, batch size, images, workers and device,
   interleaved in one run;
2. accuracy (`--accuracy`): Fashion-MNIST, all 60k training images,
   EfficientNet-Lite0 pretrained vs from scratch for a few epochs, test
   accuracy on the official 10k, with the wall time;
3. recipes (`--recipes`): scikit-learn's digits, EfficientNet-Lite0, 10
   epochs, by input size, head (probe or random), BatchNorm (frozen or
   updated), augmentation and learning rate: test accuracy and time (the
   table of docs/finetune.md).

Usage:
    python benchmarks/finetune.py --work /tmp/qft --throughput
    python benchmarks/finetune.py --work /tmp/qft --accuracy --epochs 3 --size 32
    python benchmarks/finetune.py --work /tmp/qft --recipes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets as tv_datasets
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.datasets import write_fashion_mnist  # noqa: E402
from features.devices import resolve_device  # noqa: E402
from pipeline import evaluate, finetune  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402


def config(data: Path, out: Path, args: argparse.Namespace, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{data}'",
            f"run.out='{out}'",
            f"backbone.name='{args.backbone}'",
            f"backbone.input_size={args.size}",
            f"finetune.batch_size={args.batch}",
            f"finetune.num_workers={args.workers}",
            f"finetune.device='{args.device}'",
            "run.progress=false",
            *extra,
        ],
    )


def quadrant_epoch(data: Path, out: Path, args: argparse.Namespace) -> float:
    """Training images/s of quadrant's loop (one epoch, validation excluded)."""
    cfg = config(
        data,
        out,
        args,
        "finetune.epochs=1",
        "data.val_fraction=0.05",
        "data.test_fraction=0",
        "finetune.precision=fp32",
    )
    finetune.run(cfg, restart=True)
    record = cfg.layout.model("finetune").history_json
    history = json.loads(record.read_text())["epochs"]
    return float(history[0]["train_images_per_second"])


def tutorial_epoch(data: Path, args: argparse.Namespace) -> float:
    """Images/s of the torchvision tutorial's loop on the same images."""
    cfg = config(data, data.parent / "unused", args)
    model, prep, _ = finetune.build_model(cfg, 10, resolve_device(args.device))
    net = model.net.train()
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(prep.input_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    dataset = tv_datasets.ImageFolder(str(data), transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
    )
    device = resolve_device(args.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> None:
    data = args.work / f"fashion-{args.images}"
    if not data.exists():
        write_fashion_mnist(data, per_class=args.images // 10, split="train")
    print(
        f"# {args.backbone} at {args.size}px, batch {args.batch}, "
        f"{args.workers} workers, {resolve_device(args.device)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.images} images"
    )
    ours, theirs = [], []
    for i in range(args.repeats):
        theirs.append(tutorial_epoch(data, args))
        ours.append(quadrant_epoch(data, args.work / f"tp{i}", args))
        print(
            f"  repeat {i}: tutorial {theirs[-1]:.1f} img/s, quadrant "
            f"{ours[-1]:.1f} img/s",
            flush=True,
        )
    q, t = statistics.median(ours), statistics.median(theirs)
    # Each repeat runs both loops back to back: the median of the paired
    # ratios is less sensitive to the machine's drifts than a ratio of medians.
    paired = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    print(
        f"tutorial loop {t:.1f} img/s, quadrant loop {q:.1f} img/s (medians); "
        f"median paired ratio {paired:.2f}x"
    )


def accuracy(args: argparse.Namespace) -> None:
    data = args.work / "fashion-full"
    if not data.exists():
        write_fashion_mnist(data, split="both")
    print(
        f"# {args.backbone} at {args.size}px, {args.epochs} epochs, batch "
        f"{args.batch}, {resolve_device(args.device)}, Fashion-MNIST 60k/10k"
    )
    for init in ("pretrained", "scratch"):
        out = args.work / f"acc-{init}"
        cfg = config(
            data,
            out,
            args,
            f"finetune.init={init}",
            f"finetune.epochs={args.epochs}",
            "data.val_fraction=0.05",
            f"finetune.lr={args.lr}",
        )
        start = time.perf_counter()
        resume = (out / "finetune" / "last.pt").exists()
        result = finetune.run(cfg, resume=resume)
        test = evaluate.run(cfg)
        print(
            f"| {init} | {result.epochs_run} | {test.accuracy:.4f} | "
            f"{result.best_value:.4f} | {time.perf_counter() - start:.0f} s |",
            flush=True,
        )


# The recipe table of docs/finetune.md: (input size, head, BatchNorm,
# augmentation, lr) on the digits.
RECIPES = [
    (32, "probe", "train", "standard", 1e-3),
    (32, "probe", "train", "none", 1e-3),
    (32, "probe", "frozen", "none", 1e-3),
    (32, "random", "frozen", "none", 1e-3),
    (32, "probe", "frozen", "standard", 1e-3),
    (32, "probe", "frozen", "none", 3e-4),
    (64, "probe", "frozen", "none", 1e-3),
]


def recipes(args: argparse.Namespace) -> None:
    """Fine-tuning recipes on scikit-learn's digits: test accuracy and time."""
    from features.datasets import write_digits

    data = args.work / "digits"
    if not data.exists():
        write_digits(data)
    print(
        "| input | head | BatchNorm | augmentation | lr | test accuracy | "
        "fine-tune time |\n|---|---|---|---|---|---|---|"
    )
    for size, head, bn, augment, lr in RECIPES:
        out = args.work / f"recipe-{size}-{head}-{bn}-{augment}-{lr:g}"
        cfg = load_config(
            None,
            [
                f"data.root='{data}'",
                f"run.out='{out}'",
                f"backbone.name='{args.backbone}'",
                f"finetune.input_size={size}",
                f"finetune.head_init={head}",
                f"finetune.batchnorm={bn}",
                f"finetune.augment={augment}",
                f"finetune.lr={lr}",
                "finetune.epochs=10",
                "run.progress=false",
            ],
        )
        start = time.perf_counter()
        finetune.run(cfg, restart=True)
        seconds = time.perf_counter() - start
        test = evaluate.run(cfg)
        print(
            f"| {size} px | {head} | {bn} | {augment} | {lr:g} | "
            f"{test.accuracy:.3f} | {seconds:.0f} s |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument(
        "--recipes", action="store_true", help="the recipe table on the digits"
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        throughput(args)
    if args.accuracy:
        accuracy(args)
    if args.recipes:
        recipes(args)


if __name__ == "__main__":
    main()
