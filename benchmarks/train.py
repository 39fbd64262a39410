"""Classifier benchmarks on Fashion-MNIST codes (EfficientNet-Lite0, top layer).

For each training size (1k, 10k, 60k images) and each classifier, in a fresh
process: the fit time with cross-validation included (the train stage's own
fitting code), the test accuracy on the official 10k test images, and the
process's peak memory. The sgd classifier streams codes from HDF5, so its
memory should stay flat as the codes grow; the others load them.

Codes are extracted once (all 70k images, by `quadrant extract`); smaller
training sets are stratified, seeded subsets of the 60k written as their own
cache files, so every run reads codes from disk like the stage does.

Usage:
    python benchmarks/train.py --work /tmp/qbench          # all sizes
    python benchmarks/train.py --work /tmp/qbench --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.extract import peak_rss_mib  # noqa: E402
from features.codes import load_codes  # noqa: E402
from features.datasets import write_fashion_mnist  # noqa: E402
from pipeline import extract, train  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402

CLASSIFIERS = ("logistic", "linear_svm", "svm", "sgd")


def config(work: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{work / 'fashion-mnist'}'",
            f"run.out='{work / 'run'}'",
            "data.val_fraction=0",
            "extract.batch_size=64",
            "run.progress=true",
            # sgd holds one shuffle buffer of codes: 64 MiB (13k rows of 1280
            # floats) is smaller than the 60k set, so flat memory shows.
            "train.buffer_mib=64",
            *extra,
        ],
    )


def prepare(work: Path) -> Path:
    """Fashion-MNIST as PNG folders, and its codes (cached across runs)."""
    data = work / "fashion-mnist"
    if not data.exists():
        write_fashion_mnist(data, split="both")
    start = time.perf_counter()
    # locate_codes also accepts codes that differ only in compute settings.
    path = extract.locate_codes(config(work))
    seconds = time.perf_counter() - start
    print(f"# codes: {path} ({seconds:.0f} s to find or extract)", flush=True)
    return path


def subset_cache(full: Path, size: int, seed: int = 0) -> Path:
    """A cache file holding `size` training rows (stratified) and all test rows."""
    out = full.with_name(f"subset-{size}.h5")
    if out.exists():
        return out
    codes = load_codes(full, "top", split="train")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in np.unique(codes.y):
        rows = np.flatnonzero(codes.y == label)
        chosen = rng.choice(rows, size * len(rows) // len(codes), replace=False)
        keep += codes.groups[chosen].tolist()  # image indices in the file
    with h5py.File(full, "r") as src:
        split = src["images/split"].asstr()[:]
        images = np.sort(
            np.concatenate([np.asarray(keep), np.flatnonzero(split == "test")])
        )
        _copy_rows(src, out, images)
    return out


def _copy_rows(src: h5py.File, out: Path, images: np.ndarray) -> None:
    """Copy a cache keeping `images` (views = 1, so rows are images)."""
    tmp = out.with_suffix(".tmp")
    with h5py.File(tmp, "w") as dst:
        for name in ("images/path", "images/label", "images/split", "codes/top/none"):
            data = src[name][:][images]
            dst.create_dataset(
                name,
                data=data,
                dtype=src[name].dtype,
                chunks=src[name].chunks if name.startswith("codes") else None,
            )
            dst[name].attrs.update(dict(src[name].attrs))
        dst.create_dataset("rows/image", data=np.arange(len(images)))
        dst.create_dataset("rows/view", data=np.zeros(len(images), dtype=np.int16))
        for name in ("skipped/path", "skipped/reason"):
            dst.create_dataset(name, data=src[name][:], dtype=src[name].dtype)
        dst.attrs.update(dict(src.attrs))
        dst.attrs["code_order"] = json.dumps(["top/none"])
        dst.attrs["n_images"] = dst.attrs["n_rows"] = len(images)
    tmp.rename(out)


def one(work: Path, cache: Path, classifier: str, folds: int) -> None:
    """Child process: fit with CV like the stage, score on test, report."""
    cfg = config(
        work,
        f"train.classifier={classifier}",
        f"train.cv_folds={folds}",
        "run.progress=false",
    )
    start = time.perf_counter()
    pipeline, summary, _, n = train.fit(cfg, cache, "top", "none")
    seconds = time.perf_counter() - start
    test = load_codes(cache, "top", "none", split="test")
    accuracy = float((pipeline.predict(test.X) == test.y).mean())
    print(
        json.dumps(
            {
                "n": n,
                "seconds": seconds,
                "accuracy": accuracy,
                "cv": summary["best_score"],
                "params": summary["best_params"],
                "peak_mib": peak_rss_mib(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 60000])
    parser.add_argument("--classifiers", nargs="+", default=list(CLASSIFIERS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="classifier:size pairs not to run, e.g. svm:60000",
    )
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.work, Path(args.one[0]), args.one[1], args.folds)
        return
    full = prepare(args.work)
    print(
        "| classifier | train images | fit + CV (s) | CV accuracy | test accuracy | "
        "chosen | peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cache = full if size >= 60000 else subset_cache(full, size)
        for classifier in args.classifiers:
            if f"{classifier}:{size}" in args.skip:
                print(f"| {classifier} | {size} | not run | | | | |", flush=True)
                continue
            command = [
                sys.executable,
                __file__,
                "--work",
                str(args.work),
                "--folds",
                str(args.folds),
                "--one",
                str(cache),
                classifier,
            ]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {classifier} | {r['n']} | {r['seconds']:.1f} | {r['cv']:.4f} | "
                f"{r['accuracy']:.4f} | {r['params']} | {r['peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
