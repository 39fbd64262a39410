"""`quadrant predict` against `quadrant extract` on the same images (issue 20).

Both commands run as a user runs them (a child process each, start-up
included) on the same folder: extract into a fresh cache each time, predict
into a fresh Parquet file with the model exported from those codes
(EfficientNet-Lite0 with its real weights, a logistic head). Interleaved,
`--repeats` pairs; the figure is the median of the paired ratios of
images/s, predict / extract.

Sets: Fashion-MNIST PNGs (28x28, `--small`, 10 classes) and camera photos
(4000x3000 JPEGs of benchmarks/photos.py, `--photos`).

Manifests (`--manifest-rows 10000 1000000`): peak resident memory of
`quadrant predict` over CSV manifests of each length (one row in 100 an
image of the small set, the others files that do not exist, which get
their error row at the cost of a stat: the rows flow through the same
listing, parts and output as images do, in minutes instead of hours).

Usage:
    python benchmarks/predict.py --work /tmp/qpredict
    python benchmarks/predict.py --work /tmp/qpredict --small 2000 --photos 200
    python benchmarks/predict.py --work /tmp/qpredict --small 2000 --photos 0 \
        --repeats 0 --manifest-rows 10000 1000000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.photos import write_photos  # noqa: E402
from features.datasets import write_fashion_mnist  # noqa: E402


def quadrant(*args: str) -> float:
    """Seconds of one `python -m pipeline ...` command (start-up included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True)
    return time.perf_counter() - start


def sets(data: Path) -> list[str]:
    return [f"data.root='{data}'", "run.progress=false", "data.test_fraction=0.2"]


def prepare(work: Path, data: Path) -> Path:
    """Extract, train and export once: the model predict runs."""
    run = work / "model-run"
    if not (run / "models" / "codes" / "model.onnx").exists():
        overrides = [*sets(data), f"run.out='{run}'", "train.cv_folds=2"]
        args = [a for o in overrides for a in ("--set", o)]
        for command in ("extract", "train", "export"):
            quadrant(command, "-q", *args)
    return run / "models" / "codes" / "model.onnx"


def pair(work: Path, data: Path, model: Path, count: int, i: int) -> float:
    """predict images/s over extract images/s, the first of the two alternating."""
    cache = work / f"cache-{i}"
    shutil.rmtree(cache, ignore_errors=True)
    overrides = [*sets(data), f"run.out='{work / 'x'}'", f"extract.cache_dir='{cache}'"]
    extract = ["extract", "-q", *[a for o in overrides for a in ("--set", o)]]
    out = work / f"p-{i}.parquet"
    predict = ["predict", "-q", str(model), str(data), "--out", str(out)]
    first, second = (extract, predict) if i % 2 == 0 else (predict, extract)
    times = {first[0]: quadrant(*first), second[0]: quadrant(*second)}
    shutil.rmtree(cache, ignore_errors=True)
    rates = {k: count / v for k, v in times.items()}
    ratio = rates["predict"] / rates["extract"]
    print(
        f"  pair {i}: extract {rates['extract']:.1f} img/s, predict "
        f"{rates['predict']:.1f} img/s, ratio {ratio:.3f}",
        flush=True,
    )
    return ratio


def measure(work: Path, data: Path, count: int, repeats: int, what: str) -> None:
    model = prepare(work, data)
    print(f"{what}: {count} images", flush=True)
    ratios = [pair(work, data, model, count, i) for i in range(repeats)]
    print(
        f"{what}: predict / extract images/s, median of {repeats} pairs "
        f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})",
        flush=True,
    )


# Runs the command in a child and prints the child's peak RSS (KiB): the
# parent's own ru_maxrss would mix in this script's.
_PEAK = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)


def manifest_memory(work: Path, data: Path, rows: list[int]) -> None:
    """Peak RSS of predict over manifests of `rows` rows each."""
    model = prepare(work, data)
    images = sorted(str(p) for p in data.rglob("*.png"))
    for count in rows:
        manifest = work / f"manifest-{count}.csv"
        with open(manifest, "w") as handle:
            handle.write("path,id\n")
            for i in range(count):
                real = i % 100 == 0
                path = images[i % len(images)] if real else f"/nonexistent/{i}.png"
                handle.write(f"{path},row-{i}\n")
        out = work / f"manifest-{count}.parquet"
        command = [sys.executable, "-m", "pipeline", "predict", "-q", str(model)]
        command += [str(manifest), "--out", str(out)]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, *command],
            capture_output=True,
            text=True,
            check=True,
        )
        peak, code = done.stdout.split()[-2:]
        print(
            f"manifest of {count} rows: peak RSS {int(peak) / 1024:.0f} MiB, "
            f"{time.perf_counter() - start:.0f} s, exit {code}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--small", type=int, default=2000, help="Fashion-MNIST images")
    parser.add_argument("--photos", type=int, default=200, help="camera photos")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--manifest-rows", type=int, nargs="*", default=[], help="manifest lengths"
    )
    args = parser.parse_args()
    if args.small:
        small = args.work / "fashion"
        data = small / "data"
        if not data.exists():
            write_fashion_mnist(data, per_class=args.small // 10, split="train")
        if args.repeats:
            measure(small, data, args.small // 10 * 10, args.repeats, "Fashion-MNIST")
        if args.manifest_rows:
            manifest_memory(small, data, args.manifest_rows)
    if args.photos:
        photos = args.work / "photos"
        data = write_photos(photos / "data", args.photos)
        measure(photos, data, args.photos, args.repeats, "camera photos")


if __name__ == "__main__":
    main()
