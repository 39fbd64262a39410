"""Extraction benchmarks: overhead, memory, cache hits, data-loader workers.

Measured side by side in one run on one machine (the machines are shared and
noisy, so only ratios within a run are reported):

1. throughput: quadrant's end-to-end extraction (image files -> HDF5, including
   listing and probing the files and building the model) vs a bare forward
   pass of the same code model on in-memory tensors, same batch and device;
   plus the naive baseline (the plain network, fp32, whole batches, no BN
   folding) to show what the CPU optimisations buy;
2. a cache-hit re-run vs the extraction it reuses;
3. peak memory (RSS) of extraction at N and 10N images, in fresh processes,
   with enough code dimensions that holding the codes would show;
4. data-loader workers 0, 1, 2.

Usage:
    python benchmarks/extract.py                      # CPU figures
    python benchmarks/extract.py --backbone resnet50 --weights random \\
        --images 5000 --batch 256                     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.datasets import load_fashion_mnist  # noqa: E402
from features.devices import resolve_device, resolve_precision  # noqa: E402
from features.extractor import CodeModel, CodeRunner  # noqa: E402
from pipeline import (
    extract,  # noqa: E402
    inputs,
)
from pipeline.config import Config, load_config  # noqa: E402

# Many code dimensions (about 6,300 per image): holding all codes of 10k
# images in memory would add about 250 MB, which the memory figure would show.
MEMORY_LAYERS = '["top", "_blocks.14", "_blocks.10"]'
MEMORY_POOLING = '["avg", "grid:4"]'


def write_images(root: Path, count: int, size: int, fmt: str) -> Path:
    """Fashion-MNIST images, upscaled to `size` and saved as JPEG or PNG files."""
    images, labels, names = load_fashion_mnist("train")
    per_class = count // len(names)
    suffix = "jpg" if fmt == "jpeg" else "png"
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            image = Image.fromarray(images[i]).convert("RGB").resize((size, size))
            image.save(folder / f"{i:05d}.{suffix}", quality=90)
    return root


def config(args: argparse.Namespace, data: Path, out: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{data}'",
            f"run.out='{out}'",
            f"backbone.name='{args.backbone}'",
            f"backbone.weights='{args.weights}'",
            f"extract.batch_size={args.batch}",
            f"extract.device='{args.device}'",
            "run.progress=false",
            *extra,
        ],
    )


def bare_forward(cfg: Config, count: int) -> float:
    """Images/s of the same code model on one in-memory uint8 batch, repeated."""
    backbone = inputs.load_backbone(cfg)
    model = CodeModel(backbone, cfg.extract.layers, cfg.extract.pooling)
    options = cfg.extract
    device = resolve_device(options.device)
    compute = CodeRunner(model, options, device, resolve_precision("auto", device))
    size = backbone.preprocessing.input_size
    batch = torch.randint(
        0, 256, (options.batch_size, 3, size, size), dtype=torch.uint8
    )
    compute(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(count // options.batch_size):
        compute(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (
        (count // options.batch_size)
        * options.batch_size
        / (time.perf_counter() - start)
    )


def naive_forward(cfg: Config, count: int) -> float:
    """Images/s of the plain network: fp32, NCHW, whole batches, BN not folded."""
    backbone = inputs.load_backbone(cfg)
    device = resolve_device(cfg.extract.device)
    model = backbone.model.to(device).eval()
    size = backbone.preprocessing.input_size
    batch = torch.randn(cfg.extract.batch_size, 3, size, size, device=device)
    with torch.inference_mode():
        model(batch)
        start = time.perf_counter()
        for _ in range(count // len(batch)):
            model(batch).cpu()
    return (count // len(batch)) * len(batch) / (time.perf_counter() - start)


def end_to_end(cfg: Config) -> tuple[float, float]:
    """(images/s, seconds) of `quadrant extract` from files to a fresh cache."""
    start = time.perf_counter()
    result = extract.run(cfg)
    seconds = time.perf_counter() - start
    assert not result.reused
    return result.n_rows / seconds, seconds


def memory_probe(data: Path, out: Path, args: argparse.Namespace) -> None:
    """Child process: extract, then print peak RSS in MiB and the codes' size."""
    cfg = config(
        args,
        data,
        out,
        f"extract.layers={MEMORY_LAYERS}",
        f"extract.pooling={MEMORY_POOLING}",
    )
    result = extract.run(cfg)
    dims = sum(s.dims for s in result.specs)
    print(
        json.dumps(
            {"peak_mib": peak_rss_mib(), "codes_mib": result.n_rows * dims * 4 / 2**20}
        )
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory.

    NOTE: Linux keeps ru_maxrss across exec, so a child started by a large
    parent reports the parent's peak; VmHWM belongs to the new address space.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(data: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--memory-probe",
        str(data),
        str(out),
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--batch",
        str(args.batch),
        "--device",
        args.device,
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image file side")
    parser.add_argument("--format", default="jpeg", choices=["jpeg", "png"])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--only-throughput",
        action="store_true",
        help="bare forward and end-to-end only (quick; e.g. for versions.py)",
    )
    parser.add_argument("--memory-probe", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe, args)
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    data = write_images(tmp / "small", args.images, args.size, args.format)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"# {args.backbone} ({args.weights}), batch {args.batch}, {device} ({name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.images} {args.format} files of {args.size}px"
    )
    bare, e2e, secs, naive, onnx = [], [], [], [], []
    by_workers: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for i in range(args.repeats):  # interleaved: drifts in machine load hit all
        cfg = config(args, data, tmp / f"run{i}")
        bare.append(bare_forward(cfg, args.images))
        rate, seconds = end_to_end(cfg)
        e2e.append(rate)
        secs.append(seconds)
        if args.only_throughput:
            continue
        naive.append(naive_forward(cfg, min(args.images, 4 * args.batch)))
        ort_cfg = config(args, data, tmp / f"ort{i}", "extract.engine='onnxruntime'")
        # The engine's one-off export is not part of the rate: export it once
        # and give every run a copy beside its cache.
        if i == 0:
            extract.run(
                config(args, data, tmp / "ort-warm", "extract.engine='onnxruntime'")
            )
        (tmp / f"ort{i}" / "cache").mkdir(parents=True, exist_ok=True)
        for engine in (tmp / "ort-warm" / "cache").glob("engine-*.onnx"):
            shutil.copy(engine, tmp / f"ort{i}" / "cache" / engine.name)
        onnx.append(end_to_end(ort_cfg)[0])
        for workers, rates in by_workers.items():
            cfg = config(
                args, data, tmp / f"w{workers}-{i}", f"extract.num_workers={workers}"
            )
            rates.append(end_to_end(cfg)[0])
    b, e = statistics.median(bare), statistics.median(e2e)
    print(f"bare forward (same code model)   {b:8.1f} img/s")
    print(f"end-to-end files -> HDF5          {e:8.1f} img/s   ratio {e / b:.2f}x")
    if args.only_throughput:
        return
    n = statistics.median(naive)
    print(
        f"naive forward (plain fp32 model)  {n:8.1f} img/s   quadrant e2e / naive "
        f"{e / n:.2f}x"
    )
    o = statistics.median(onnx)
    print(
        f"end-to-end, onnxruntime engine    {o:8.1f} img/s   {o / e:.2f}x torch engine"
    )
    for workers, rates in by_workers.items():
        rate = statistics.median(rates)
        print(
            f"end-to-end, {workers} loader workers        {rate:8.1f} img/s   "
            f"{rate / b:.2f}x bare"
        )

    cfg = config(args, data, tmp / "run0")
    start = time.perf_counter()
    assert extract.run(cfg).reused
    hit = time.perf_counter() - start
    print(
        f"cache-hit re-run                  {hit:8.2f} s      "
        f"{100 * hit / statistics.median(secs):.1f}% of an extraction"
    )

    if not args.skip_memory:
        big = write_images(tmp / "big", 10 * args.images, args.size, args.format)
        small_mem = peak_memory(data, tmp / "mem-small", args)
        big_mem = peak_memory(big, tmp / "mem-big", args)
        print(
            f"peak RSS {args.images} images       {small_mem['peak_mib']:8.0f} MiB "
            f"(codes {small_mem['codes_mib']:.0f} MiB)"
        )
        print(
            f"peak RSS {10 * args.images} images      {big_mem['peak_mib']:8.0f} MiB "
            f"(codes {big_mem['codes_mib']:.0f} MiB)   ratio "
            f"{big_mem['peak_mib'] / small_mem['peak_mib']:.3f}"
        )


if __name__ == "__main__":
    main()
