"""Extraction at scale: torchrun, finishing, listing, and the unit costs of
docs/scale.md.

Sections (all by default, or name some with --only):

- torchrun: `quadrant extract` as 2 torchrun processes vs 1 process on the
  same files, interleaved; the codes must be identical. On a 2-core machine
  this shows the overhead of the second process, not a speed-up.
- finish: finishing a cache (linking the shards into the cache file) at 10k,
  100k and 1M rows of synthetic codes, interleaved, with and without failed
  decodes; beside it the serial copy that format 1 did, and the time to read
  the codes back through the links vs from the copy; with --compare-cache
  FILE, the finishing of another version of features/cache.py beside it.
- listing: `discover` on a tree of 100k tiny (valid) JPEG files, and on a
  1M-row CSV manifest (1M symbolic links to those files), stage by stage;
  with --compare-data FILE, the same stages of another version of
  features/data.py (e.g. `git show HEAD~1:features/data.py > old.py`),
  interleaved.
- units: the unit costs of the scale model: decoding one 4000x3000 JPEG
  (full, and DCT-scaled with Pillow's draft mode) and resizing it, the
  forward pass per image, the cache's write rate.

Usage:
    python benchmarks/scale.py --work /tmp/qscale
    python benchmarks/scale.py --work /tmp/qscale --only listing \\
        --compare-data /tmp/old_data.py
    python benchmarks/scale.py --work /tmp/qscale --only finish \\
        --compare-cache /tmp/old_cache.py
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features import cache as cache_module  # noqa: E402
from features import data as data_module  # noqa: E402
from features.cache import CodeSpec, ImageTable, ShardStore  # noqa: E402
from features.codes import load_codes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def median_of(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Run each of `runs` `repeats` times, interleaved; the median of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------
# torchrun: 2 processes vs 1


def write_images(root: Path, count: int, size: int) -> Path:
    """Fashion-MNIST images upscaled to `size`, as JPEG class folders."""
    if root.exists():
        return root
    from features.datasets import load_fashion_mnist

    images, labels, names = load_fashion_mnist("train")
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[: count // len(names)]:
            image = Image.fromarray(images[i]).convert("RGB").resize((size, size))
            image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def extract_command(data: Path, out: Path, processes: int) -> list[str]:
    sets = [
        f"data.root='{data}'",
        f"run.out='{out}'",
        "backbone.name='efficientnet_lite0'",
        "backbone.weights='default'",
        "extract.batch_size=64",
        "extract.shard_size=128",
        "run.progress=false",
    ]
    args = ["-m", "pipeline", "extract", *(a for s in sets for a in ("--set", s))]
    if processes == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(processes),
        "--master-port",
        str(_free_port()),
        *args,
    ]


def timed_extract(
    data: Path, out: Path, processes: int, threads: int | None = None
) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(
        extract_command(data, out, processes),
        check=True,
        cwd=data.parent,
        capture_output=True,
        env=env,
    )
    return time.perf_counter() - start


def codes_difference(a: Path, b: Path) -> float:
    """Largest |difference| between the codes of two runs (same cache key)."""
    [fa], [fb] = list(a.glob("cache/*.h5")), list(b.glob("cache/*.h5"))
    assert fa.name == fb.name, "the runs have different cache keys"
    with h5py.File(fa, "r") as x, h5py.File(fb, "r") as y:
        order = json.loads(x.attrs["code_order"])
        return max(
            float(np.abs(x[f"codes/{n}"][:] - y[f"codes/{n}"][:]).max()) for n in order
        )


def bench_torchrun(work: Path, images: int, repeats: int) -> dict[str, Any]:
    data = write_images(work / "photos", images, 256)
    (work / "conf.toml").write_text("")
    runs = {
        f"{p} process(es)": (lambda p=p: timed_extract(data, work / f"out{p}", p))
        for p in (1, 2)
    }
    seconds = median_of(repeats, runs)
    one, two = seconds["1 process(es)"], seconds["2 process(es)"]
    # NOTE: on CPUs the thread count changes float rounding; each of the 2
    # ranks runs 1 thread, so the one-process run that must match it does too.
    timed_extract(data, work / "out1-thread", 1, threads=1)
    return {
        "images": images,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ratio_2_over_1": round(two / one, 3),
        "overhead_seconds": round(two - one, 2),
        "max_abs_difference_vs_1_process_all_cores": codes_difference(
            work / "out1", work / "out2"
        ),
        "max_abs_difference_vs_1_process_1_thread": codes_difference(
            work / "out1-thread", work / "out2"
        ),
    }


# ---------------------------------------------------------------------------
# finishing


def synthetic_store(folder: Path, rows: int, dims: int) -> tuple[ShardStore, float]:
    """A shard folder of `rows` random codes; the seconds its shards took."""
    store = ShardStore(
        folder / "codes-0000000000000000.shards",
        key="0" * 64,
        n_rows=rows,
        shard_rows=1024,
        specs=[CodeSpec("top", "flatten", "none", dims, (dims,))],
        dtype="float32",
    )
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with store:
        for shard in range(store.n_shards):
            n = len(store.rows(shard))
            codes = rng.standard_normal((n, dims), dtype=np.float32)
            store.write(shard, {"top/none": codes}, np.ones(n, bool), [""] * n)
    return store, time.perf_counter() - start


def synthetic_table(rows: int) -> ImageTable:
    return ImageTable(
        paths=[f"class{i % 100:03d}/IMG_{i:08d}.jpg" for i in range(rows)],
        labels=np.arange(rows, dtype=np.int64) % 100,
        splits=["train"] * rows,
        row_image=np.arange(rows, dtype=np.int64),
        row_view=np.zeros(rows, dtype=np.int16),
    )


def timed_finish(
    store: ShardStore,
    table: ImageTable,
    failures: dict[int, str],
    module: ModuleType = cache_module,
) -> tuple[float, float]:
    """(seconds to write the index, seconds to finish) of one cache, with
    `module`'s write_index and finish (another version of features/cache.py)."""
    final = store.parts.with_suffix(".h5")
    final.unlink(missing_ok=True)
    start = time.perf_counter()
    module.write_index(store, table, skipped=[], attrs={"listing": "{}"})
    middle = time.perf_counter()
    module.finish(
        store,
        final,
        table=table,
        failures=failures,
        provenance={},
        environment={},
        label_names=[f"class{i:03d}" for i in range(100)],
        data_root="/data",
    )
    return middle - start, time.perf_counter() - middle


def copy_codes(final: Path, out: Path) -> float:
    """Format 1's finishing: every code copied into one file, hashed on the way."""
    start = time.perf_counter()
    with h5py.File(final, "r") as src, h5py.File(out, "w") as dst:
        for name in ("images/path", "images/label", "images/split", "rows/image"):
            dst.create_dataset(name, data=src[name][:], dtype=src[name].dtype)
        codes = src["codes/top/none"]
        step = int(codes.attrs["rows_per_chunk"])
        target = dst.create_dataset(
            "codes/top/none",
            shape=codes.shape,
            dtype=codes.dtype,
            chunks=(step, codes.shape[1]),
        )
        digest = hashlib.sha256()
        for begin in range(0, codes.shape[0], 1024):
            block = codes[begin : begin + 1024]
            target[begin : begin + len(block)] = block
            digest.update(block.tobytes())
        target.attrs.update(dict(codes.attrs))
        target.attrs["sha256"] = digest.hexdigest()
        dst.attrs.update(dict(src.attrs))
        dst.create_dataset("rows/view", data=src["rows/view"][:])
        for name in ("skipped/path", "skipped/reason"):
            dst.create_dataset(name, data=src[name][:], dtype=src[name].dtype)
    os.fsync(os.open(out, os.O_RDONLY))
    return time.perf_counter() - start


def timed_read(path: Path) -> float:
    start = time.perf_counter()
    load_codes(path, "top")
    return time.perf_counter() - start


def bench_finish(
    work: Path, sizes: list[int], dims: int, repeats: int, compare: Path | None
) -> dict[str, Any]:
    versions = {"": cache_module}
    if compare is not None:
        versions["_compared"] = load_module(compare, "cache_compared")
    stores, tables, out = {}, {}, {}
    for rows in sizes:
        folder = work / f"finish-{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        stores[rows], seconds = synthetic_store(folder, rows, dims)
        tables[rows] = synthetic_table(rows)
        out[rows] = {
            "shards": stores[rows].n_shards,
            "write_shards_s": round(seconds, 2),
            "write_mb_per_s": round(rows * dims * 4 / 1e6 / seconds, 1),
        }
    for label, failed in (("finish_s", 0), ("finish_10_failed_s", 10)):
        for rows in sizes:
            out[rows].setdefault("index_s", [])
        times: dict[tuple[int, str], list[float]] = {
            (rows, v): [] for rows in sizes for v in versions
        }
        for _ in range(repeats):
            for rows in sizes:
                step = rows // (failed + 1)
                failures = {step * (i + 1): "truncated" for i in range(failed)}
                for version, module in versions.items():
                    index_s, finish_s = timed_finish(
                        stores[rows], tables[rows], failures, module
                    )
                    if not version:
                        out[rows]["index_s"].append(index_s)
                    times[rows, version].append(finish_s)
        for (rows, version), seconds in times.items():
            out[rows][label + version] = round(statistics.median(seconds), 4)
    for rows in sizes:
        out[rows]["index_s"] = round(statistics.median(out[rows]["index_s"]), 3)
    largest = max(sizes)
    final = stores[largest].parts.with_suffix(".h5")
    timed_finish(stores[largest], tables[largest], {})  # the linked cache, no failures
    copy = work / "copied.h5"
    out[largest]["copy_like_format_1_s"] = round(copy_codes(final, copy), 2)
    reads = median_of(
        repeats,
        {"linked": lambda: timed_read(final), "copied": lambda: timed_read(copy)},
    )
    out[largest]["load_codes_s"] = {k: round(v, 3) for k, v in reads.items()}
    copy.unlink()
    return {"dims": dims, "sizes": out}


# ---------------------------------------------------------------------------
# listing


def make_tree(root: Path, files: int) -> Path:
    """`files` tiny valid JPEGs (8x8, 632 bytes) in 100 class folders."""
    if root.exists():
        return root
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "JPEG")
    for c in range(100):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True)
        for i in range(files // 100):
            (folder / f"img{i:07d}.jpg").write_bytes(buffer.getvalue())
    return root


def make_manifest(work: Path, tree: Path, rows: int) -> Path:
    """A CSV of `rows` distinct symbolic links to the tree's files."""
    csv = work / "manifest" / "labels.csv"
    if csv.exists():
        return csv
    files = sorted(str(p) for p in tree.rglob("*.jpg"))
    lines = ["path,label"]
    for i in range(rows):
        folder = csv.parent / "links" / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        os.symlink(files[i % len(files)], folder / f"l{i:07d}.jpg")
        lines.append(f"links/d{i // 1000:04d}/l{i:07d}.jpg,c{i % 100}")
    csv.write_text("\n".join(lines) + "\n")
    return csv


def stages(module: ModuleType, root: Path, probe: bool) -> dict[str, float]:
    """Seconds of each stage of `module.discover` on `root`."""
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = now - clock
        clock = now

    m = module
    # The versions that pause the garbage collector while listing do it here too.
    paused = getattr(m, "_gc_paused", contextlib.nullcontext)()
    paused.__enter__()
    if root.is_file():
        listed, _ = m._read_manifest(root)
    else:
        listed, _ = m._scan_folders(root)
    mark("list")
    base = root.parent if root.is_file() else root
    listed = m._one_entry_per_file(base, listed, links=not root.is_file())
    mark("dedupe")
    if probe:
        listed, _ = m._probe_all(base, listed, m.DEFAULT_MAX_PIXELS, 8)
        mark("probe")
    names = m._label_names(listed, root)
    records = m._split(listed, names, 0.1, 0.2, 0, root)
    records.sort(key=lambda r: r.path)
    mark("split")
    m._fingerprint(base, records, names, [], "stat")
    mark("fingerprint")
    paused.__exit__(None, None, None)
    times["total"] = sum(times.values())
    return times


def load_module(path: Path, name: str = "data_compared") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench_listing(
    work: Path, files: int, rows: int, repeats: int, compare: Path | None
) -> dict[str, Any]:
    tree = make_tree(work / "tree", files)
    csv = make_manifest(work, tree, rows)
    versions = {"now": data_module}
    if compare is not None:
        versions["compared"] = load_module(compare)
    cases = {
        f"{files} files, probed": (tree, True),
        f"{rows}-row manifest, not probed": (csv, False),
    }
    out: dict[str, Any] = {}
    for case, (root, probe) in cases.items():
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in versions}
        for _ in range(repeats):
            for version, module in versions.items():
                runs[version].append(stages(module, root, probe))
        out[case] = {
            version: {
                k: round(statistics.median(r[k] for r in results), 2)
                for k in results[0]
            }
            for version, results in runs.items()
        }
    start = time.perf_counter()
    images = data_module.discover(csv)
    out[f"{rows}-row manifest, discover() with the probe"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "images": len(images),
    }
    return out


# ---------------------------------------------------------------------------
# unit costs


def camera_jpeg(path: Path) -> Path:
    """A 4000x3000 JPEG (quality 90) from scikit-image's bundled photo, with noise."""
    if path.exists():
        return path
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((4000, 3000), Image.BICUBIC)
    pixels = np.asarray(photo).astype(np.int16)
    noise = np.random.default_rng(0).integers(-12, 13, pixels.shape)
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(
        path, quality=90
    )
    return path


def decode(path: Path, draft: bool, size: int = 256) -> float:
    start = time.perf_counter()
    with Image.open(path) as image:
        if draft:
            image.draft("RGB", (size, size))
        rgb = image.convert("RGB")
    scale = size / min(rgb.size)
    rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BILINEAR)
    return time.perf_counter() - start


def forward_per_image(batches: int = 5) -> float:
    """Seconds per image of EfficientNet-Lite0 at 224 px, quadrant's CPU runner."""
    import torch

    from features.backbones import build_backbone
    from features.extractor import CodeModel, CodeRunner
    from features.settings import ExtractOptions

    model = CodeModel(build_backbone("efficientnet_lite0", "default"), ["top"], ["avg"])
    runner = CodeRunner(
        model, ExtractOptions(batch_size=64), torch.device("cpu"), "fp32"
    )
    batch = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
    runner(batch)
    start = time.perf_counter()
    for _ in range(batches):
        runner(batch)
    return (time.perf_counter() - start) / (batches * 64)


def bench_units(work: Path, repeats: int) -> dict[str, Any]:
    photo = camera_jpeg(work / "camera.jpg")
    decodes = median_of(
        max(repeats, 5),
        {"full": lambda: decode(photo, False), "draft": lambda: decode(photo, True)},
    )
    return {
        "photo_mb": round(photo.stat().st_size / 1e6, 2),
        "decode_resize_s": {k: round(v, 4) for k, v in decodes.items()},
        "draft_over_full": round(decodes["draft"] / decodes["full"], 3),
        "forward_s_per_image": round(forward_per_image(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--only", nargs="*", default=["torchrun", "finish", "listing", "units"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000, help="torchrun section")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--dims", type=int, default=256, help="synthetic code size")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="manifest rows")
    parser.add_argument("--compare-data", type=Path)
    parser.add_argument(
        "--compare-cache", type=Path, help="another features/cache.py to finish with"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sections = {
        "units": lambda: bench_units(args.work, args.repeats),
        "finish": lambda: bench_finish(
            args.work, args.sizes, args.dims, args.repeats, args.compare_cache
        ),
        "listing": lambda: bench_listing(
            args.work, args.files, args.rows, args.repeats, args.compare_data
        ),
        "torchrun": lambda: bench_torchrun(args.work, args.images, args.repeats),
    }
    for name, run in sections.items():
        if name in args.only:
            print(f"# {name}", flush=True)
            print(json.dumps(run(), indent=1), flush=True)


if __name__ == "__main__":
    main()
