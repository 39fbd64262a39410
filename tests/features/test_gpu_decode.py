"""Tests for features/gpu_decode.py: routing, fallback and the GPU recipe.

torchvision's CPU JPEG decoder stands in for nvJPEG (the decode function is
injectable), so everything but nvJPEG itself runs without a GPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from features.cache import ImageTable
from features.errors import ConfigError, ImageDecodeError
from features.extractor import _RowDataset
from features.gpu_decode import (
    GpuJpegDecoder,
    fast_reduce,
    jpeg_collate,
    jpeg_source,
    orient,
    resolve_decoder,
)
from features.images import decode_image, read_plain_jpeg
from features.settings import Decoding, decode_side
from features.transforms import Preprocessing, eval_transform
from tests.conftest import write_photo

PREP = Preprocessing(input_size=224, resize_size=256, decode="fast")


def cpu_decode_jpeg(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """torchvision's CPU decoder: the same call and output as nvJPEG's."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in datas]


def cpu_pixels(prep: Preprocessing):  # noqa: ANN201 - a test helper
    transform = eval_transform(prep)
    return lambda f: transform(decode_image(f, min_side=decode_side(prep)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation: int) -> None:
    pixels = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    turned = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation)
    assert np.array_equal(turned.permute(1, 2, 0).numpy(), expected)


def test_fast_reduce_gives_the_sizes_pillow_decodes_at(tmp_path: Path) -> None:
    for size, side in [((1600, 1200), 100), ((1000, 700), 64), ((300, 200), 256)]:
        path = write_photo(tmp_path / f"{size[0]}.jpg", size)
        full = torch.from_numpy(np.array(decode_image(path))).permute(2, 0, 1)
        reduced = fast_reduce(full, size, side)
        assert reduced.shape[1:][::-1] == decode_image(path, min_side=side).size


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu")
    cut = root / "cut.jpg"
    whole = write_photo(root / "whole.jpg", (2400, 1800))
    cut.write_bytes(whole.read_bytes()[:-2000])
    png = root / "flat.png"
    Image.open(whole).save(png)
    return {
        "jpeg": whole,
        "side": write_photo(root / "side.jpg", (2400, 1800), orientation=6),
        "cmyk": write_photo(root / "cmyk.jpg", (1200, 900), mode="CMYK"),
        "png": png,
        "cut": cut,
    }


def test_the_gpu_recipe_matches_the_cpu_fast_path(photos: dict[str, Path]) -> None:
    decoder = GpuJpegDecoder(
        PREP, torch.device("cpu"), cpu_pixels(PREP), decode=cpu_decode_jpeg
    )
    for name in ("jpeg", "side"):
        source = jpeg_source(photos[name], *read_plain_jpeg(photos[name]))  # type: ignore[misc]
        gpu = decoder.finish(cpu_decode_jpeg([source.data])[0], source)
        cpu = cpu_pixels(PREP)(photos[name])
        assert gpu.shape == cpu.shape == (3, 224, 224)
        assert (gpu.float() - cpu.float()).abs().mean() < 2.0, name


def _dataset(files: list[Path]) -> _RowDataset:
    n = len(files)
    table = ImageTable(
        paths=[str(f) for f in files],
        labels=np.zeros(n, dtype=np.int64),
        splits=["train"] * n,
        row_image=np.arange(n, dtype=np.int64),
        row_view=np.zeros(n, dtype=np.int16),
    )
    return _RowDataset(files, table, PREP, Decoding(), gpu_jpeg=True)


def test_only_complete_baseline_jpegs_travel_to_the_gpu(
    photos: dict[str, Path],
) -> None:
    names = ["jpeg", "side", "cmyk", "png", "cut"]
    dataset = _dataset([photos[n] for n in names])
    rows, pixels, ok, reasons, jpegs = jpeg_collate([dataset[i] for i in range(5)])
    assert [slot for slot, _ in jpegs] == [0, 1]  # the plain JPEGs
    assert [j.orientation for _, j in jpegs] == [1, 6]
    # The CPU already decoded the CMYK JPEG and the PNG, and found the cut one.
    assert ok.tolist() == [True, True, True, True, False]
    assert "truncated" in reasons[4]
    assert pixels[2].float().mean() > 0 and pixels[3].float().mean() > 0


def test_gpu_batch_failures_fall_back_to_the_cpu(photos: dict[str, Path]) -> None:
    refused = photos["side"].read_bytes()

    def flaky(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(bytes(d.numpy()) == refused for d in datas):
            raise RuntimeError("nvjpeg: unsupported")
        return cpu_decode_jpeg(datas)

    dataset = _dataset([photos["jpeg"], photos["side"], photos["png"]])
    decoder = GpuJpegDecoder(PREP, torch.device("cpu"), dataset.cpu_pixels, flaky)
    _, pixels, ok, reasons, jpegs = jpeg_collate([dataset[i] for i in range(3)])
    out, ok, reasons = decoder(pixels, ok, reasons, jpegs)
    assert ok.tolist() == [True, True, True] and reasons == ["", "", ""]
    assert (decoder.counts.gpu, decoder.counts.cpu_fallback) == (1, 1)
    expected = cpu_pixels(PREP)(photos["side"])
    assert torch.equal(out[1], expected)  # decoded by the CPU path itself


def test_files_neither_decoder_reads_are_reported(
    photos: dict[str, Path], tmp_path: Path
) -> None:
    # Complete-looking (ends with EOI) but corrupt in the middle.
    data = bytearray(photos["jpeg"].read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4000] = b"\x00" * 4000
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data))
    assert read_plain_jpeg(bad) is not None

    def refuse(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("nvjpeg: corrupt")

    def cpu_refuses(file: Path) -> torch.Tensor:
        raise ImageDecodeError(f"{file}: corrupt image data (OSError: broken)")

    dataset = _dataset([bad])
    decoder = GpuJpegDecoder(PREP, torch.device("cpu"), cpu_refuses, refuse)
    _, pixels, ok, reasons, jpegs = jpeg_collate([dataset[0]])
    out, ok, reasons = decoder(pixels, ok, reasons, jpegs)
    assert ok.tolist() == [False] and reasons == [
        "corrupt image data (OSError: broken)"
    ]
    assert decoder.counts.failed == 1 and int(out.sum()) == 0


def test_resolve_decoder_on_a_cpu_machine() -> None:
    cpu = torch.device("cpu")
    assert resolve_decoder("auto", cpu) == "pillow"
    assert resolve_decoder("pillow", cpu) == "pillow"
    with pytest.raises(ConfigError, match="'nvjpeg' needs a CUDA device"):
        resolve_decoder("nvjpeg", cpu)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_decoder("turbo", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no cuda device")
def test_nvjpeg_decodes_like_the_cpu_fast_path(photos: dict[str, Path]) -> None:
    device = torch.device("cuda")
    assert resolve_decoder("auto", device) == "nvjpeg"
    dataset = _dataset([photos["jpeg"], photos["side"], photos["png"]])
    decoder = GpuJpegDecoder(PREP, device, dataset.cpu_pixels)
    _, pixels, ok, reasons, jpegs = jpeg_collate([dataset[i] for i in range(3)])
    out, ok, _ = decoder(pixels, ok, reasons, jpegs)
    assert out.device.type == "cuda" and ok.all() and decoder.counts.gpu == 2
    for i, name in enumerate(["jpeg", "side"]):
        cpu = cpu_pixels(PREP)(photos[name])
        assert (out[i].cpu().float() - cpu.float()).abs().mean() < 3.0, name
