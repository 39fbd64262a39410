"""Camera-photo extraction benchmark: decoding 4000x3000 JPEGs is the cost.

Makes camera-size photos (default 200) from scikit-image's bundled photos
(chelsea, coffee, astronaut, rocket: one class each): a random crop and flip
of the source, upscaled to 4000x3000, Gaussian noise (sigma 8) for camera-like
texture, JPEG quality 90 (about 3.1-3.3 MB each); every fourth photo is
stored sideways with EXIF orientation 6, as phones do. Then measures, side
by side in one run (the machine is shared and noisy: ratios are the point):

1. decode cost per photo on one core: full decoding vs fast decoding (DCT
   scaling) vs torchvision's decode_jpeg, each followed by the resize and
   crop; and the forward's cost per image on one thread (unit costs for
   docs/scale.md);
2. agreement of the codes from fast and full decoding on every photo
   (cosine, goal >= 0.995 for every image), and of the GPU-decoding recipe
   (torchvision's CPU decoder standing in for nvJPEG) with both;
3. interleaved repeats of: quadrant end to end with the new defaults;
   with full decoding and the previous loader defaults (1 worker, the
   forward on torch's default threads, the torch engine); the plain user
   pipeline (torchvision ImageFolder + transforms + DataLoader(num_workers=2)
   + forward + np.save); the bare onnxruntime forward on in-memory tensors;
4. the same new-vs-previous comparison on the 256 px Fashion-MNIST JPEGs of
   benchmarks/extract.py (no regression expected), with its bare forward.

Usage:
    flock /tmp/quadrant-heavy.lock python benchmarks/photos.py
    python benchmarks/photos.py --photos 40 --repeats 1 --small 0   # quick look
    python benchmarks/photos.py --device cuda --decoder nvjpeg      # GPU machine
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.devices import resolve_device, resolve_precision  # noqa: E402
from features.extractor import CodeModel, CodeRunner  # noqa: E402
from features.gpu_decode import GpuJpegDecoder, jpeg_source  # noqa: E402
from features.images import decode_image, read_plain_jpeg  # noqa: E402
from features.onnx_engine import OnnxRunner, export_code_model  # noqa: E402
from features.settings import decode_side  # noqa: E402
from features.transforms import Preprocessing, eval_transform  # noqa: E402
from pipeline import extract, inputs  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402

SOURCES = ("chelsea", "coffee", "astronaut", "rocket")
PHOTO_SIZE = (4000, 3000)
NOISE_SIGMA = 8.0
QUALITY = 90
ORIENTATION_TAG = 0x0112


def previous_defaults() -> tuple[str, ...]:
    """The previous defaults on a CPU machine: every pixel decoded, one loader
    worker, the forward on torch's default threads (every core), the torch engine.
    """
    return (
        "data.decode='full'",
        "extract.num_workers=1",
        f"extract.threads={torch.get_num_threads()}",
        "extract.engine='torch'",
    )


# ------------------------------------------------------------------ the photos


def write_photos(root: Path, count: int, *, seed: int = 0) -> Path:
    """`count` camera-size JPEGs under root/<source>/ (kept between runs)."""
    from skimage import data

    marker = root / f".complete-{count}-{seed}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    # NOTE: a few noise fields, shifted per photo, cost far less than fresh
    # Gaussian noise for 36 million values each time.
    fields = [
        np.clip(rng.normal(0, NOISE_SIGMA, (*PHOTO_SIZE[::-1], 3)), -127, 127).astype(
            np.int16
        )
        for _ in range(2)
    ]
    for i in range(count):
        name = SOURCES[i % len(SOURCES)]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = _photo_pixels(getattr(data, name)(), rng, fields)
        _save_jpeg(folder / f"{i:04d}.jpg", pixels, sideways=i % 4 == 3)
    marker.touch()
    return root


def _photo_pixels(
    source: np.ndarray, rng: np.random.Generator, fields: list[np.ndarray]
) -> np.ndarray:
    """A random crop (80-100% a side) and flip of `source`, upscaled, with noise."""
    h, w = source.shape[:2]
    ch, cw = int(h * rng.uniform(0.8, 1.0)), int(w * rng.uniform(0.8, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = source[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop)).resize(
        PHOTO_SIZE, Image.Resampling.BICUBIC
    )
    noise = np.roll(
        fields[int(rng.integers(len(fields)))],
        (int(rng.integers(PHOTO_SIZE[1])), int(rng.integers(PHOTO_SIZE[0]))),
        axis=(0, 1),
    )
    return np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def _save_jpeg(path: Path, pixels: np.ndarray, *, sideways: bool) -> None:
    """Save as JPEG quality 90; `sideways` stores it rotated with EXIF orientation 6."""
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if sideways:
        # NOTE: orientation 6 means "rotate 90 degrees clockwise to display",
        # so the stored pixels are the displayed ones turned counter-clockwise.
        image = image.transpose(Image.Transpose.ROTATE_90)
        exif[ORIENTATION_TAG] = 6
    image.save(path, "JPEG", quality=QUALITY, exif=exif.tobytes())


def photo_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


# ----------------------------------------------------------- unit costs (1 core)


def decode_costs(files: list[Path], prep: Preprocessing) -> dict[str, list[float]]:
    """Seconds per photo to decode + resize + crop, three ways, interleaved."""
    fast = decode_side(Preprocessing(**{**prep.as_dict(), "decode": "fast"}))
    transform = eval_transform(prep)
    target = max(prep.resize_size, prep.input_size)
    ways: dict[str, Callable[[Path], Any]] = {
        "full": lambda f: transform(decode_image(f)),
        "fast": lambda f: transform(decode_image(f, min_side=fast)),
        # NOTE: keeping only the target (no gap): the cheapest DCT scale.
        "fast, gap 1": lambda f: transform(decode_image(f, min_side=target)),
        "torchvision": lambda f: _torchvision_decode(f, prep),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for file in files:
        for name, way in ways.items():
            start = time.perf_counter()
            way(file)
            times[name].append(time.perf_counter() - start)
    return times


def _torchvision_decode(file: Path, prep: Preprocessing) -> torch.Tensor:
    """torchvision.io.decode_jpeg on the CPU (full size, EXIF applied), resize, crop."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2 as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = decode_jpeg(
            read_file(str(file)), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    return T.CenterCrop(prep.input_size)(
        T.Resize(prep.resize_size, antialias=True)(image)
    )


def forward_costs(model: CodeModel, engine: Path, count: int = 64) -> dict[str, float]:
    """Seconds per image of the forward on one CPU thread, chunks of 8."""
    size = model.preprocessing.input_size
    batch = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    cpu = torch.device("cpu")
    torch_runner = CodeRunner(model, _options(), cpu, "fp32")
    torch_runner.set_threads(1)
    ort = OnnxRunner(engine, [s.name for s in model.specs], cpu, chunk=8)
    ort.set_threads(1)
    out = {}
    for name, runner in (("torch", torch_runner), ("onnxruntime", ort)):
        runner(batch[:8])
        start = time.perf_counter()
        runner(batch)
        out[name] = (time.perf_counter() - start) / count
    return out


def _options() -> Any:
    from features.settings import ExtractOptions

    return ExtractOptions(device="cpu", precision="fp32")


# ---------------------------------------------------------------- agreement


def agreement(
    files: list[Path], model: CodeModel, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """Cosine between codes of the same photos decoded in different ways."""
    cpu = torch.device("cpu")
    runner = CodeRunner(model, _options(), cpu, "fp32")
    transform = eval_transform(prep)
    fast_side = decode_side(Preprocessing(**{**prep.as_dict(), "decode": "fast"}))
    gpu_recipe = GpuJpegDecoder(
        Preprocessing(**{**prep.as_dict(), "decode": "fast"}),
        cpu,
        cpu_decode=lambda f: transform(decode_image(f, min_side=fast_side)),
        decode=_cpu_stand_in,
    )
    target = max(prep.resize_size, prep.input_size)
    ways: dict[str, Callable[[Path], torch.Tensor]] = {
        "full": lambda f: transform(decode_image(f)),
        "fast": lambda f: transform(decode_image(f, min_side=fast_side)),
        "fast, gap 1": lambda f: transform(decode_image(f, min_side=target)),
        "gpu recipe": lambda f: _recipe(gpu_recipe, f),
    }
    codes: dict[str, list[np.ndarray]] = {name: [] for name in ways}
    for start in range(0, len(files), 8):
        chunk = files[start : start + 8]
        for name, way in ways.items():
            pixels = torch.stack([way(f) for f in chunk])
            codes[name].append(next(iter(runner(pixels).values())))
    merged = {name: np.concatenate(parts) for name, parts in codes.items()}
    return {
        "fast vs full": _cosine(merged["fast"], merged["full"]),
        "fast, gap 1 vs full": _cosine(merged["fast, gap 1"], merged["full"]),
        "gpu recipe vs fast": _cosine(merged["gpu recipe"], merged["fast"]),
        "gpu recipe vs full": _cosine(merged["gpu recipe"], merged["full"]),
    }


def _cpu_stand_in(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """torchvision's CPU JPEG decoder in nvJPEG's place (same call, same output)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in datas]


def _recipe(decoder: GpuJpegDecoder, file: Path) -> torch.Tensor:
    jpeg = read_plain_jpeg(file)
    assert jpeg is not None, f"{file} is not a plain JPEG"
    source = jpeg_source(file, *jpeg)
    return decoder.finish(_cpu_stand_in([source.data])[0], source)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (
        np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    )


# ------------------------------------------------------------------ end to end


def config(args: argparse.Namespace, data: Path, out: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root='{data}'",
            f"run.out='{out}'",
            f"backbone.name='{args.backbone}'",
            f"backbone.weights='{args.weights}'",
            f"extract.device='{args.device}'",
            f"extract.decoder='{args.decoder}'",
            "run.progress=false",
            *extra,
        ],
    )


def end_to_end(cfg: Config, engines: Path | None) -> float:
    """Images/s of `quadrant extract` from files to a fresh cache."""
    if engines is not None:
        # NOTE: the onnxruntime engine is exported once per network and
        # kept beside the caches; its one-off cost is reported on its own.
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        for engine in engines.glob("engine-*.onnx"):
            shutil.copy(engine, cfg.cache_dir / engine.name)
    start = time.perf_counter()
    result = extract.run(cfg)
    seconds = time.perf_counter() - start
    assert not result.reused and not result.skipped, result.skipped
    return result.n_rows / seconds


def plain_pipeline(data: Path, cfg: Config, out: Path) -> float:
    """Images/s of the ten lines a user writes: ImageFolder, DataLoader(2), np.save."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from features.backbones import head_name

    backbone = inputs.load_backbone(cfg)
    prep = backbone.preprocessing
    start = time.perf_counter()
    model = backbone.model.eval()
    parent, _, leaf = head_name(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    transform = T.Compose(
        [
            T.Resize(prep.resize_size),
            T.CenterCrop(prep.input_size),
            T.ToTensor(),
            T.Normalize(prep.mean, prep.std),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(data), transform), batch_size=64, num_workers=2
    )
    codes = []
    with torch.no_grad():
        for pixels, _ in loader:
            codes.append(model(pixels).numpy())
    np.save(out, np.concatenate(codes))
    return len(loader.dataset) / (time.perf_counter() - start)


def bare_onnxruntime(engine: Path, model: CodeModel, count: int, threads: int) -> float:
    """Images/s of the engine's onnxruntime session on in-memory uint8 tensors."""
    size = model.preprocessing.input_size
    pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    runner = OnnxRunner(
        engine, [s.name for s in model.specs], torch.device("cpu"), chunk=8
    )
    runner.set_threads(threads)
    runner(pixels[:8])
    start = time.perf_counter()
    for batch in pixels.split(64):
        runner(batch)
    return count / (time.perf_counter() - start)


def bare_torch(model: CodeModel, count: int, device: torch.device) -> float:
    """Images/s of quadrant's torch CodeRunner on in-memory uint8 tensors."""
    size = model.preprocessing.input_size
    pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    runner = CodeRunner(model, _options(), device, resolve_precision("auto", device))
    runner(pixels[:8])
    start = time.perf_counter()
    for batch in pixels.split(64):
        runner(batch)
    return count / (time.perf_counter() - start)


# ---------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report_costs(times: dict[str, list[float]], forward: dict[str, float]) -> None:
    full, fast = times["full"], times["fast"]
    ratios = [b / a for a, b in zip(full, fast, strict=True)]
    print(f"\n## decode + resize + crop per photo, one core ({len(full)} photos)")
    for name, values in times.items():
        print(f"{name:12s} median {1000 * _median(values):7.1f} ms")
    for name in ("fast", "fast, gap 1", "torchvision"):
        paired = [b / a for a, b in zip(full, times[name], strict=True)]
        print(f"{name} / full: median ratio {_median(paired):.3f}")
    print(f"fast / full range {min(ratios):.3f}-{max(ratios):.3f}")
    print("## forward per image, one thread, chunks of 8")
    for name, seconds in forward.items():
        print(f"{name:12s} {1000 * seconds:7.2f} ms")


def report_agreement(cosines: dict[str, np.ndarray]) -> None:
    print("\n## codes agreement (cosine per photo, top layer, avg pooling)")
    for name, values in cosines.items():
        print(
            f"{name:20s} min {values.min():.5f}  median {np.median(values):.5f}  "
            f"photos below 0.995: {(values < 0.995).sum()} of {len(values)}"
        )


def report_rates(rates: dict[str, list[float]], what: str) -> None:
    print(f"\n## end to end on {what} (images/s, median of the repeats)")
    new = _median(rates["quadrant, new defaults"])
    for name, values in rates.items():
        m = _median(values)
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:44s} {m:7.2f}  new/this {new / m:5.2f}x   runs: {shown}")


# ------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "quadrant-photos"
    )
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-sample", type=int, default=40)
    parser.add_argument(
        "--small", type=int, default=1000, help="256 px images; 0 skips"
    )
    parser.add_argument("--small-repeats", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decoder", default="auto")
    args = parser.parse_args()
    # NOTE: the loader plan each extraction chooses is part of the figures.
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    logging.getLogger("features.extractor").setLevel(logging.INFO)
    torch.manual_seed(0)
    run(args)


def run(args: argparse.Namespace) -> None:
    data = write_photos(args.work / "photos", args.photos)
    files = photo_files(data)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = config(args, data, tmp / "probe")
        backbone = inputs.load_backbone(cfg)
        model = CodeModel(backbone, cfg.extract.layers, cfg.extract.pooling)
        prep = backbone.preprocessing
        print(
            f"# {args.backbone} ({args.weights}), {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {len(files)} photos "
            f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, "
            f"{_median([f.stat().st_size for f in files]) / 1e6:.2f} MB median"
        )
        engines = tmp / "engines"
        start = time.perf_counter()
        export_code_model(model, model.specs, prep.input_size, engines / "probe.onnx")
        print(f"one-off onnxruntime engine export: {time.perf_counter() - start:.1f} s")
        engine = engines / "probe.onnx"
        warm = config(args, data, tmp / "warm")
        extract.run(warm)  # also leaves the engine file(s) of the new defaults
        warm_engines = warm.cache_dir
        sample = files[:: max(1, len(files) // args.decode_sample)][
            : args.decode_sample
        ]
        report_costs(decode_costs(sample, prep), forward_costs(model, engine))
        report_agreement(agreement(files, model, prep))
        rates = photo_rates(args, data, tmp, warm_engines, engine, model)
        report_rates(rates, f"{len(files)} photos")
        if args.small:
            small_set(args, tmp, model)


def photo_rates(
    args: argparse.Namespace,
    data: Path,
    tmp: Path,
    engines: Path,
    engine: Path,
    model: CodeModel,
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {
        "quadrant, new defaults": [],
        "quadrant, full decoding + previous loader": [],
        "plain user pipeline (ImageFolder, 2 workers)": [],
        "bare onnxruntime forward, in memory": [],
    }
    count = len(photo_files(data))
    threads = torch.get_num_threads()
    for i in range(args.repeats):  # interleaved: load drifts hit every way alike
        names = list(rates)
        new = config(args, data, tmp / f"new{i}")
        rates[names[0]].append(end_to_end(new, engines))
        old = config(args, data, tmp / f"old{i}", *previous_defaults())
        rates[names[1]].append(end_to_end(old, None))
        rates[names[2]].append(plain_pipeline(data, new, tmp / f"plain{i}.npy"))
        rates[names[3]].append(bare_onnxruntime(engine, model, count, threads))
    return rates


def small_set(args: argparse.Namespace, tmp: Path, model: CodeModel) -> None:
    """New vs previous defaults on benchmarks/extract.py's 256 px JPEGs."""
    from benchmarks.extract import write_images

    data = write_images(tmp / "small", args.small, 256, "jpeg")
    warm = config(args, data, tmp / "small-warm")
    extract.run(warm)
    device = resolve_device(args.device)
    rates: dict[str, list[float]] = {
        "quadrant, new defaults": [],
        "quadrant, full decoding + previous loader": [],
        "bare torch forward (CodeRunner), in memory": [],
    }
    names = list(rates)
    for i in range(args.small_repeats):
        rates[names[0]].append(
            end_to_end(config(args, data, tmp / f"small-new{i}"), warm.cache_dir)
        )
        rates[names[1]].append(
            end_to_end(
                config(args, data, tmp / f"small-old{i}", *previous_defaults()), None
            )
        )
        rates[names[2]].append(bare_torch(model, args.small, device))
    report_rates(rates, f"{args.small} Fashion-MNIST JPEGs of 256 px")
    bare = _median(rates[names[2]])
    for name in names[:2]:
        print(f"{name:44s} {_median(rates[name]) / bare:.2f}x the bare torch forward")


if __name__ == "__main__":
    main()
