from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from features import load_codes
from features.cache import ShardStore, verify
from features.errors import BackboneError, CacheCorruptError
from pipeline import extract
from pipeline.config import Config
from tests.conftest import TINY, write_photo, write_png

REPO = Path(__file__).resolve().parents[2]
MakeConfig = Callable[..., Config]


def codes_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        out: dict[str, np.ndarray] = {}
        h5.visititems(
            lambda n, o: (
                out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
        )
        return out


def assert_same_codes(a: Path, b: Path) -> None:
    ca, cb = codes_of(a), codes_of(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        np.testing.assert_array_equal(ca[name], cb[name], err_msg=name)


def test_extract_writes_every_layer_and_pooling(
    image_folder: Path, make_config: MakeConfig
) -> None:
    cfg = make_config(
        image_folder,
        'extract.layers=["top", "layer2"]',
        'extract.pooling=["avg", "grid:2", "avg+max"]',
    )
    result = extract.run(cfg)
    assert not result.reused and result.n_images == 20
    dims = {s.name: s.dims for s in result.specs}
    assert dims == {
        "top/none": 512,
        "layer2/avg": 128,
        "layer2/grid:2": 512,
        "layer2/avg+max": 256,
    }
    codes = load_codes(result.path, "layer2", "grid:2")
    assert codes.X.shape == (20, 512) and codes.X.dtype == np.float32
    assert codes.label_names == ("cat", "dog")
    assert sorted(set(codes.split)) == ["test", "train", "val"]
    assert verify(result.path) == []
    assert (cfg.run.out / "extract.json").is_file()


def test_extract_codes_match_a_plain_forward_pass(
    image_folder: Path, make_config: MakeConfig
) -> None:
    import torch
    from torchvision.models import resnet18

    from features.images import decode_image

    cfg = make_config(image_folder)
    result = extract.run(cfg)
    codes = load_codes(result.path, "top")
    torch.manual_seed(cfg.run.seed)
    model = resnet18().eval()
    model.fc = torch.nn.Identity()
    image = decode_image(image_folder / codes.paths[0])
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        expected = model(((x - mean) / std)[None])[0].numpy()
    np.testing.assert_allclose(codes.X[0], expected, rtol=1e-4, atol=1e-5)


def test_extract_cache_hit_runs_no_forward_pass(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(image_folder)
    first = extract.run(cfg)

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("forward pass ran on a cache hit")

    monkeypatch.setattr("features.extractor._forward", no_forward)
    again = extract.run(cfg)
    assert again.reused and again.path == first.path and again.computed_rows == 0


@pytest.mark.parametrize(
    "change",
    [
        "backbone.input_size=40",
        "backbone.mean=[0.5, 0.5, 0.5]",
        "extract.layers=['top', 'layer3']",
        "extract.pooling=['max']",
        "extract.batch_size=2",
        "extract.dtype='float16'",
        "run.seed=1",  # random weights are seeded by run.seed
        "data.seed=3",  # another split
        "data.decode='full'",  # fast decoding is on by default
    ],
)
def test_extract_config_change_gives_new_key(
    image_folder: Path, make_config: MakeConfig, change: str
) -> None:
    layers = "extract.layers=['top', 'layer2']"
    base = extract.run(make_config(image_folder, layers))
    changed = extract.run(make_config(image_folder, layers, change))
    assert changed.key != base.key and not changed.reused
    assert base.path.exists() and changed.path.exists()


@pytest.mark.parametrize("edit", ["add", "remove", "modify"])
def test_extract_image_change_gives_new_key(
    image_folder: Path, make_config: MakeConfig, edit: str
) -> None:
    cfg = make_config(image_folder)
    base = extract.run(cfg)
    target = image_folder / "cat" / "04.png"
    if edit == "add":
        write_png(image_folder / "cat" / "new.png", seed=77)
    elif edit == "remove":
        target.unlink()
    else:
        stat = target.stat()
        write_png(target, seed=77)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))
    changed = extract.run(cfg)
    assert changed.key != base.key and not changed.reused
    assert changed.n_images == {"add": 21, "remove": 19, "modify": 20}[edit]


def test_extract_weights_file_change_gives_new_key(
    image_folder: Path, tmp_path: Path, make_config: MakeConfig
) -> None:
    import torch
    from torchvision.models import resnet18

    file = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), file)
    first = extract.run(make_config(image_folder, f"backbone.weights='{file}'"))
    torch.manual_seed(1)
    torch.save(resnet18().state_dict(), file)
    second = extract.run(make_config(image_folder, f"backbone.weights='{file}'"))
    assert second.key != first.key


def test_extract_skips_corrupt_images_found_while_decoding(
    image_folder: Path, make_config: MakeConfig
) -> None:
    # Header intact, pixel data cut: the probe passes, the decode fails.
    data = (image_folder / "dog" / "02.png").read_bytes()
    (image_folder / "dog" / "02.png").write_bytes(data[: len(data) // 2])
    result = extract.run(make_config(image_folder))
    assert result.n_images == 19
    [(path, reason)] = result.skipped
    assert path == "dog/02.png" and "truncat" in reason
    codes = load_codes(result.path)
    assert "dog/02.png" not in set(codes.paths)
    assert np.isfinite(codes.X).all()


def test_extract_drops_every_view_of_a_failed_image_and_keeps_rows_aligned(
    image_folder: Path, make_config: MakeConfig
) -> None:
    """The linked cache leaves out the failed image's rows, shard by shard, and
    every remaining row still holds its own image's codes."""
    settings = ("extract.views=3", "extract.shard_size=4")
    good = extract.run(make_config(image_folder, *settings, "extract.cache_dir='a'"))
    bad = image_folder / "dog" / "02.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    failed = extract.run(make_config(image_folder, *settings, "extract.cache_dir='b'"))
    assert verify(failed.path) == []
    full = load_codes(good.path, views="all")
    kept = load_codes(failed.path, views="all")
    lost = int((full.paths == "dog/02.png").sum())
    assert lost >= 1 and len(kept) == failed.n_rows == len(full) - lost
    assert "dog/02.png" not in set(kept.paths)
    assert failed.skipped == (("dog/02.png", failed.skipped[0][1]),)
    pairs = zip(full.paths, full.views, strict=True)
    where = {(p, v): i for i, (p, v) in enumerate(pairs)}
    same = [where[(p, v)] for p, v in zip(kept.paths, kept.views, strict=True)]
    np.testing.assert_allclose(kept.X, full.X[same], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kept.y, full.y[same])
    assert (np.diff(kept.groups[kept.views == 0]) == 1).all()  # renumbered


def test_extract_views_add_seeded_augmented_rows(
    image_folder: Path, make_config: MakeConfig
) -> None:
    result = extract.run(make_config(image_folder, "extract.views=3"))
    n_train = int(sum(load_codes(result.path, split="train").y >= 0))
    assert result.n_rows == 20 + 2 * n_train
    codes = load_codes(result.path, views="all", split="train")
    first = codes.X[codes.views == 0]
    for view in (1, 2):
        assert not np.allclose(codes.X[codes.views == view], first)
    # Same seed, fresh cache: the same augmented codes.
    again = extract.run(
        make_config(image_folder, "extract.views=3", "extract.cache_dir='other-cache'")
    )
    assert again.path != result.path or not again.reused
    assert_same_codes(result.path, again.path)


def test_extract_unknown_layer_fails_before_reading_images(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    with pytest.raises(
        BackboneError,
        match=r"layer 'layer9' is not in ResNet.*"
        r"Did you mean .*quadrant layers",
    ):
        extract.run(
            make_config(tmp_path / "does-not-exist", "extract.layers=['layer9']")
        )


def test_extract_resumes_after_a_crash_with_identical_codes(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ("extract.shard_size=4", "extract.cache_dir='straight'")
    straight = extract.run(make_config(image_folder, *overrides))

    crashing = make_config(image_folder, "extract.shard_size=4")
    real_write = ShardStore.write
    calls = {"n": 0}

    def write_then_crash(self: ShardStore, *args: object, **kwargs: object) -> None:
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed after two committed shards
        calls["n"] += 1
        real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ShardStore, "write", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        extract.run(crashing)
    assert not list(crashing.cache_dir.glob("*.h5"))  # nothing reads as complete
    monkeypatch.setattr(ShardStore, "write", real_write)
    resumed = extract.run(crashing)
    assert resumed.computed_rows == 20 - 2 * 4
    assert_same_codes(straight.path, resumed.path)


def _shards(cache_dir: Path) -> list[Path]:
    return list(cache_dir.glob("*.shards/shard-*.h5"))


def test_extract_survives_sigkill_and_resumes_identically(tmp_path: Path) -> None:
    """kill -9 a real `quadrant extract` mid-run, run it again, compare."""
    root = tmp_path / "many"
    for c in ("a", "b"):
        for i in range(60):
            write_png(root / c / f"{i:03d}.png", seed=i + (1000 if c == "b" else 0))
    common = [*TINY, "extract.shard_size=8", f"data.root='{root}'"]

    def command(out: str) -> list[str]:
        sets = [
            arg
            for item in [*common, f"run.out='{tmp_path / out}'"]
            for arg in ("--set", item)
        ]
        return [sys.executable, "-m", "pipeline", "extract", "-q", *sets]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "conf.toml").write_text("")  # all settings come from --set
    subprocess.run(command("straight"), check=True, cwd=tmp_path, env=env)
    [straight] = (tmp_path / "straight" / "cache").glob("*.h5")

    cache = tmp_path / "killed" / "cache"
    for _ in range(3):  # kill it at several points, each after >= 1 new shard
        before = len(_shards(cache))
        proc = subprocess.Popen(command("killed"), cwd=tmp_path, env=env)
        deadline = time.monotonic() + 120
        while len(_shards(cache)) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard was committed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finals = list(cache.glob("*.h5"))
        assert all(verify(f) == [] for f in finals)  # never a partial final file
        if finals:
            break
    result = subprocess.run(command("killed"), cwd=tmp_path, env=env, check=True)
    assert result.returncode == 0
    [resumed] = cache.glob("*.h5")
    assert_same_codes(straight, resumed)
    shutil.rmtree(tmp_path / "many")


# --- decoding, loader plan, engines ------------------------------------------------

# NOTE: the tolerance recorded in docs/benchmarks.md: EfficientNet-Lite0 codes
# of fast-decoded camera photos had cosine >= 0.995 to full decoding's.
FAST_DECODE_MIN_COSINE = 0.995


def test_fast_decoding_codes_match_full_decoding_on_a_real_photo(
    tmp_path: Path,
) -> None:
    import torch

    from features.backbones import build_backbone
    from features.extractor import CodeModel, CodeRunner
    from features.images import decode_image
    from features.settings import ExtractOptions, decode_side
    from features.transforms import eval_transform

    backbone = build_backbone(
        "efficientnet_lite0", "default", preprocessing={"decode": "fast"}
    )
    model = CodeModel(backbone, ["top"], ["avg"])
    prep = model.preprocessing
    runner = CodeRunner(
        model, ExtractOptions(device="cpu"), torch.device("cpu"), "fp32"
    )
    photos = [
        write_photo(tmp_path / "cat.jpg"),  # 4000x3000: decoded at 1/4, 1000x750
        write_photo(tmp_path / "side.jpg", orientation=6),  # stored sideways
    ]
    transform = eval_transform(prep)
    full = torch.stack([transform(decode_image(f)) for f in photos])
    fast = torch.stack(
        [transform(decode_image(f, min_side=decode_side(prep))) for f in photos]
    )
    assert not torch.equal(full, fast)  # fast decoding did change the pixels
    a, b = (runner(x)["top/none"].astype(np.float64) for x in (full, fast))
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert (cosine >= FAST_DECODE_MIN_COSINE).all(), cosine


def test_extract_fast_decodes_rotated_and_cmyk_photos_and_reports_truncated(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    """Each JPEG kind takes its path on the CPU, with the codes of that path."""
    import torch

    from features.extractor import CodeModel, CodeRunner
    from features.images import decode_image
    from features.settings import ExtractOptions, decode_side
    from features.transforms import eval_transform
    from pipeline.inputs import load_backbone

    root = tmp_path / "photos"
    for c in ("a", "b"):
        write_photo(root / c / "side.jpg", (480, 360), orientation=6)
        write_photo(root / c / "cmyk.jpg", (480, 360), mode="CMYK")
        write_png(root / c / "flat.png", seed=7)
    cut = write_photo(root / "a" / "cut.jpg", (480, 360))
    cut.write_bytes(cut.read_bytes()[:-800])
    cfg = make_config(root)
    result = extract.run(cfg)
    assert [(path, "truncated" in why) for path, why in result.skipped] == [
        ("a/cut.jpg", True)
    ]
    codes = load_codes(result.path, "top")
    prep = load_backbone(cfg).preprocessing
    assert decode_side(prep) == 64  # 360 // 64: the JPEGs decode at 1/4 scale
    transform = eval_transform(prep)
    pixels = torch.stack(
        [
            transform(decode_image(root / p, min_side=decode_side(prep)))
            for p in codes.paths
        ]
    )
    model = CodeModel(load_backbone(cfg), ["top"], ["avg"])
    runner = CodeRunner(
        model, ExtractOptions(device="cpu"), torch.device("cpu"), "fp32"
    )
    expected = runner(pixels)["top/none"]
    np.testing.assert_allclose(codes.X, expected, rtol=1e-4, atol=1e-5)
    # The sideways photo is turned upright before decoding small: its codes
    # are the ones of the same photo stored upright.
    upright = write_photo(tmp_path / "upright.jpg", (480, 360))
    turned = transform(decode_image(upright, min_side=decode_side(prep)))
    side_row = list(codes.paths).index("a/side.jpg")
    assert (pixels[side_row].float() - turned.float()).abs().mean() < 3.0


def test_extract_records_the_decoding_in_the_provenance(
    image_folder: Path, make_config: MakeConfig
) -> None:
    from features.cache import read_provenance

    result = extract.run(make_config(image_folder))
    provenance = read_provenance(result.path)
    assert provenance["preprocessing"]["decode"] == "fast"
    assert provenance["compute"]["decoder"] == "pillow"


def test_extract_logs_the_loader_plan_and_restores_torch_threads(
    image_folder: Path, make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    threads = torch.get_num_threads()
    cfg = make_config(image_folder, "extract.num_workers=-1")
    with caplog.at_level("INFO", logger="features.extractor"):
        extract.run(cfg)
    [line] = [r.message for r in caplog.records if r.message.startswith("loader:")]
    assert "decode worker(s)" in line and "ms decoding" in line
    assert torch.get_num_threads() == threads


def test_extract_through_the_gpu_decoding_path_on_the_cpu(
    tmp_path: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nvJPEG route end to end, torchvision's CPU decoder standing in."""
    from features import gpu_decode
    from tests.features.test_gpu_decode import cpu_decode_jpeg

    root = tmp_path / "photos"
    for c in ("a", "b"):
        for i in range(4):
            write_photo(
                root / c / f"{i}.jpg", (400 + 40 * i, 300), orientation=6 * (i % 2)
            )
        write_png(root / c / "flat.png", seed=3)
    cut = root / "a" / "0.jpg"
    cut.write_bytes(cut.read_bytes()[:-500])
    size = ("backbone.input_size=64", "backbone.resize_size=72")
    cpu = extract.run(make_config(root, *size, "extract.cache_dir='cpu'"))
    monkeypatch.setattr(
        "features.extractor.resolve_decoder", lambda spec, device: "nvjpeg"
    )
    monkeypatch.setattr(gpu_decode, "nvjpeg_decode", lambda device: cpu_decode_jpeg)
    gpu = extract.run(make_config(root, *size, "extract.cache_dir='gpu'"))
    assert gpu.skipped == cpu.skipped and len(gpu.skipped) == 1
    assert "truncated" in gpu.skipped[0][1]
    a, b = load_codes(cpu.path).X, load_codes(gpu.path).X
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert (cosine > 0.99).all(), cosine


def test_resolve_engine_prefers_onnxruntime_for_fp32_on_the_cpu() -> None:
    import torch

    from features.extractor import resolve_engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine("auto", cpu, "fp32") == "onnxruntime"
    assert resolve_engine("auto", cpu, "bf16") == "torch"
    assert resolve_engine("auto", cuda, "bf16") == "torch"
    assert resolve_engine("torch", cpu, "fp32") == "torch"


def test_an_engine_the_exporter_refuses_says_to_use_torch(
    image_folder: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exporting the operator 'foo' is not supported")

    monkeypatch.setattr("features.onnx_engine.export_code_model", refuse)
    with pytest.raises(BackboneError, match=r"extract.engine = 'auto'\) cannot export"):
        extract.run(make_config(image_folder, "extract.engine=auto"))


def _flip_a_code_byte(shard: Path) -> None:
    """One flipped byte in the codes, as on a bad disk; the size is unchanged."""
    with h5py.File(shard, "r") as h5:
        offset = h5["codes/top/none"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[offset + 17] ^= 0xFF
    shard.write_bytes(bytes(data))


def _truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-100])


def _small_shards(
    image_folder: Path, make_config: MakeConfig
) -> tuple[Config, Path, np.ndarray]:
    """A cache in shards of 4 rows: (config, cache file, its top codes)."""
    cfg = make_config(image_folder, "extract.shard_size=4")
    path = extract.run(cfg).path
    return cfg, path, load_codes(path, "top", "none").X


@pytest.mark.parametrize("damage", [_flip_a_code_byte, _truncate])
def test_a_damaged_shard_is_refused_then_repaired_by_extract(
    image_folder: Path,
    make_config: MakeConfig,
    damage: Callable[[Path], None],
) -> None:
    cfg, path, expected = _small_shards(image_folder, make_config)
    shard = path.with_suffix(".shards") / "shard-000002.h5"
    damage(shard)
    # Readers refuse it before serving a row, naming the shard and the fix.
    with pytest.raises(
        CacheCorruptError,
        match=r"shard-000002.h5: .*Fix: run `quadrant extract` again with the same "
        r"settings: it checks every shard's checksum",
    ):
        load_codes(path, "top", "none")
    assert verify(path)[0].startswith(f"{path.stem}.shards/shard-000002")
    # The fix, followed literally: only that shard is computed again.
    repaired = extract.run(cfg)
    assert (repaired.reused, repaired.computed_rows) == (False, 4)
    assert verify(repaired.path) == []
    np.testing.assert_array_equal(load_codes(repaired.path, "top", "none").X, expected)


def test_a_damaged_cache_file_is_rebuilt_from_its_sound_shards(
    image_folder: Path, make_config: MakeConfig
) -> None:
    cfg, path, expected = _small_shards(image_folder, make_config)
    path.write_bytes(path.read_bytes()[:300])  # the index, truncated
    with pytest.raises(CacheCorruptError, match=r"Delete it and run `quadrant extract"):
        load_codes(path, "top", "none")
    rebuilt = extract.run(cfg)
    assert rebuilt.computed_rows == 0 and verify(rebuilt.path) == []
    np.testing.assert_array_equal(load_codes(rebuilt.path, "top", "none").X, expected)


def test_a_copy_with_new_file_times_is_checked_and_read(
    image_folder: Path, make_config: MakeConfig
) -> None:
    cfg, path, expected = _small_shards(image_folder, make_config)
    for shard in _shards(cfg.cache_dir):
        os.utime(shard, ns=(1, 1))  # copied without its times (cp without -p)
    np.testing.assert_array_equal(load_codes(path, "top", "none").X, expected)
    assert extract.run(cfg).reused
