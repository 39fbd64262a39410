"""Tests for features/images.py: probing, decoding and RGB conversion of images."""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.errors import ImageDecodeError, PipelineError
from features.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image,
    draft_scale,
    probe_image,
    read_plain_jpeg,
    reduce_to,
    to_rgb,
)
from tests.conftest import write_photo

# NOTE: a non-white, non-grey background proves transparent pixels take this
# colour rather than white or their own (garbage) RGB.
BACKGROUND = (0, 128, 255)


def _palette_image() -> Image.Image:
    """A 2x1 "P" image: index 0 = (10, 20, 30), index 1 = (200, 100, 50)."""
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    return image


def _pa_image() -> Image.Image:
    """The same palette as "PA": an opaque first pixel, a transparent second."""
    image = Image.new("PA", (2, 1), (0, 255))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), (1, 0))
    return image


def _uint16_row() -> Image.Image:
    return Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))


def _int32_row(values: list[int]) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=np.int32))


def _float_row(values: list[float]) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=np.float32))


def _solid(mode: str, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (16, 16), rgb).convert(mode)


GRAY_16 = [(0,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]

# (case id, image to save, format, mode Pillow reads back, expected RGB row, tol)
FILE_MODES = [
    ("1", lambda: Image.new("1", (2, 1), 1), "PNG", "1", [(255,) * 3] * 2, 0),
    (
        "L",
        lambda: Image.fromarray(np.array([[0, 200]], dtype=np.uint8)),
        "PNG",
        "L",
        [(0,) * 3, (200,) * 3],
        0,
    ),
    ("P", _palette_image, "PNG", "P", [(10, 20, 30), (200, 100, 50)], 0),
    ("LA", lambda: Image.new("LA", (1, 1), (100, 255)), "PNG", "LA", [(100,) * 3], 0),
    (
        "RGBA",
        lambda: Image.new("RGBA", (1, 1), (10, 20, 30, 255)),
        "PNG",
        "RGBA",
        [(10, 20, 30)],
        0,
    ),
    ("PA", _pa_image, "TIFF", "PA", [(10, 20, 30), BACKGROUND], 0),
    (
        "CMYK-tiff",
        lambda: _solid("CMYK", (255, 0, 0)),
        "TIFF",
        "CMYK",
        [(255, 0, 0)],
        0,
    ),
    (
        "CMYK-jpeg",
        lambda: _solid("CMYK", (255, 0, 0)),
        "JPEG",
        "CMYK",
        [(255, 0, 0)],
        8,
    ),
    (
        "YCbCr",
        lambda: _solid("YCbCr", (200, 100, 50)),
        "TIFF",
        "YCbCr",
        [(200, 100, 50)],
        3,
    ),
    ("LAB", lambda: _solid("LAB", (255, 0, 0)), "TIFF", "LAB", [(255, 0, 0)], 8),
    ("I;16-png", _uint16_row, "PNG", "I;16", GRAY_16, 0),
    (
        "I;16B-tiff",
        lambda: _uint16_row().convert("I").convert("I;16B"),
        "TIFF",
        "I;16B",
        GRAY_16,
        0,
    ),
    ("I-16bit", lambda: _int32_row([0, 257, 32768, 65535]), "TIFF", "I", GRAY_16, 0),
    (
        "I-32bit",
        lambda: _int32_row([-70_000, 0, 70_000, 140_000]),
        "TIFF",
        "I",
        [(0,) * 3, (85,) * 3, (170,) * 3, (255,) * 3],
        0,
    ),
    (
        "F",
        lambda: _float_row([10.0, 20.0, 30.0, 40.0]),
        "TIFF",
        "F",
        [(0,) * 3, (85,) * 3, (170,) * 3, (255,) * 3],
        0,
    ),
    ("F-constant", lambda: _float_row([3.5, 3.5]), "TIFF", "F", [(0,) * 3] * 2, 0),
]

# Files whose second pixel is transparent but keeps garbage RGB (200, 100, 50).
TRANSPARENT_FILES = [
    ("P-png-trns", _palette_image, "PNG", {"transparency": 1}, "P"),
    ("P-gif-trns", _palette_image, "GIF", {"transparency": 1}, "P"),
    (
        "RGBA",
        lambda: Image.fromarray(
            np.array([[[10, 20, 30, 255], [200, 100, 50, 0]]], dtype=np.uint8)
        ),
        "PNG",
        {},
        "RGBA",
    ),
    (
        "LA",
        lambda: Image.fromarray(np.array([[[10, 255], [200, 0]]], dtype=np.uint8)),
        "PNG",
        {},
        "LA",
    ),
    (
        "RGB-trns",
        lambda: Image.fromarray(
            np.array([[[10, 20, 30], [200, 100, 50]]], dtype=np.uint8)
        ),
        "PNG",
        {"transparency": (200, 100, 50)},
        "RGB",
    ),
]


def _save(image: Image.Image, path: Path, fmt: str, **params: object) -> Path:
    image.save(path, fmt, **params)
    return path


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in pixel) for pixel in np.asarray(image)[0]]


def _assert_close(
    image: Image.Image, expected: list[tuple[int, int, int]], tol: int
) -> None:
    got = np.asarray(image)[0, : len(expected)].astype(int)
    assert np.abs(got - np.array(expected)).max() <= tol, (_pixels(image), expected)


@pytest.mark.parametrize(
    "make, fmt, disk_mode, expected, tol",
    [case[1:] for case in FILE_MODES],
    ids=[case[0] for case in FILE_MODES],
)
def test_decode_image_converts_each_mode(
    tmp_path: Path,
    make: Callable[[], Image.Image],
    fmt: str,
    disk_mode: str,
    expected: list[tuple[int, int, int]],
    tol: int,
) -> None:
    path = _save(make(), tmp_path / f"image.{fmt.lower()}", fmt)
    with Image.open(path) as stored:
        assert stored.mode == disk_mode  # the file really exercises this mode
    image = decode_image(path, background=BACKGROUND)
    assert image.mode == "RGB"
    _assert_close(image, expected, tol)


@pytest.mark.parametrize(
    "make, fmt, params, disk_mode",
    [case[1:] for case in TRANSPARENT_FILES],
    ids=[case[0] for case in TRANSPARENT_FILES],
)
def test_decode_image_composites_transparency_over_background(
    tmp_path: Path,
    make: Callable[[], Image.Image],
    fmt: str,
    params: dict[str, object],
    disk_mode: str,
) -> None:
    path = _save(make(), tmp_path / f"image.{fmt.lower()}", fmt, **params)
    with Image.open(path) as stored:
        assert stored.mode == disk_mode
    image = decode_image(path, background=BACKGROUND)
    first = (10,) * 3 if disk_mode == "LA" else (10, 20, 30)
    assert _pixels(image) == [first, BACKGROUND]


def test_decode_image_blends_partial_alpha(tmp_path: Path) -> None:
    path = _save(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), tmp_path / "a.png", "PNG")
    # 127/255 of the white default background shows through the black pixel.
    _assert_close(decode_image(path), [(127, 127, 127)], 1)


def test_decode_image_applies_16bit_transparency_key(tmp_path: Path) -> None:
    path = _save(_uint16_row(), tmp_path / "a.png", "PNG", transparency=32768)
    image = decode_image(path, background=BACKGROUND)
    assert _pixels(image) == [(0,) * 3, (1,) * 3, BACKGROUND, (255,) * 3]


def test_decode_image_applies_exif_orientation(tmp_path: Path) -> None:
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = _save(stored, tmp_path / "rotated.jpg", "JPEG", exif=exif, quality=95)
    image = decode_image(path)
    assert image.size == (16, 32)
    assert probe_image(path) == (32, 16)  # the header size, as documented
    red, blue = image.getpixel((12, 4)), image.getpixel((4, 4))
    assert red[0] > 200 and red[2] < 60  # stored top-left is now the top-right
    assert blue[2] > 200 and blue[0] < 60


def test_decode_image_takes_first_frame_of_animated_gif(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), colour) for colour in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as stored:
        assert stored.n_frames == 3
    assert decode_image(path).getpixel((0, 0)) == (255, 0, 0)


def test_decode_image_takes_first_page_of_multipage_tiff(tmp_path: Path) -> None:
    pages = [Image.new("L", (4, 4), value) for value in (30, 60)]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert decode_image(path).getpixel((0, 0)) == (30, 30, 30)


def test_decode_image_returns_loaded_image_and_closes_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "a.png", "PNG")
    fd_dir = Path("/proc/self/fd")
    before = len(os.listdir(fd_dir)) if fd_dir.exists() else None
    image = decode_image(path)
    path.unlink()  # the pixels must not depend on the file any more
    assert image.getpixel((3, 3)) == (1, 2, 3)
    if before is not None:
        assert len(os.listdir(fd_dir)) == before


def test_decode_image_reads_real_photo(tmp_path: Path) -> None:
    data = pytest.importorskip("skimage.data")
    path = _save(Image.fromarray(data.astronaut()), tmp_path / "astro.jpg", "JPEG")
    image = decode_image(path)
    assert (image.mode, image.size) == ("RGB", (512, 512))
    assert probe_image(path) == (512, 512)


# --- bad files -------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _make_dir(path: Path) -> Path:
    path.mkdir()
    return path


BAD_FILES = [
    ("empty", lambda p: _write(p / "empty.jpg", b""), "empty file \\(0 bytes\\)"),
    ("directory", lambda p: _make_dir(p / "folder.png"), "is a directory"),
    ("missing", lambda p: p / "missing.png", "file not found"),
    (
        "random-bytes",
        lambda p: _write(p / "noise.jpg", np.random.default_rng(0).bytes(2048)),
        "not an image",
    ),
    ("text", lambda p: _write(p / "notes.png", b"hello, world\n"), "not an image"),
    ("zero-width", lambda p: _write(p / "zero.png", _png_header_only(0, 5)), "not an"),
]


@pytest.mark.parametrize("read", [probe_image, decode_image])
@pytest.mark.parametrize(
    "make, pattern", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_files_raise_image_decode_error(
    tmp_path: Path,
    read: Callable[[Path], object],
    make: Callable[[Path], Path],
    pattern: str,
) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageDecodeError, match=pattern) as caught:
        read(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_probe_image_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        probe_image(fifo)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root reads files regardless of permissions",
)
def test_unreadable_file_raises_image_decode_error(tmp_path: Path) -> None:
    path = _save(Image.new("L", (4, 4)), tmp_path / "secret.png", "PNG")
    path.chmod(0)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        probe_image(path)


def test_permission_error_while_opening_becomes_image_decode_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTE: simulates the chmod test above, which root (CI containers) skips.
    path = _save(Image.new("L", (4, 4)), tmp_path / "secret.png", "PNG")

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        decode_image(path)


def _encode(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_image_refuses_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = _encode(fmt)
    path = _write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    assert probe_image(path) == (64, 64)  # the header alone is intact
    with pytest.raises(ImageDecodeError, match="truncated file"):
        decode_image(path)


def test_decode_image_refuses_corrupt_data(tmp_path: Path) -> None:
    data = bytearray(_encode("PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # zeroed compressed stream
    with pytest.raises(ImageDecodeError, match="corrupt|truncated"):
        decode_image(_write(tmp_path / "corrupt.png", bytes(data)))


# --- decompression bombs and Pillow's global limit -----------------------------------


@pytest.mark.parametrize("read", [probe_image, decode_image])
def test_images_above_max_pixels_are_refused(
    tmp_path: Path, read: Callable[..., object]
) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png", "PNG")
    with pytest.raises(ImageDecodeError) as caught:
        read(path, max_pixels=100)
    message = str(caught.value)
    assert "20x20 = 400 pixels" in message
    assert "limit of 100 pixels" in message
    assert "data.max_pixels" in message


# Pillow warns above its global limit and raises above twice that (400 px here).
@pytest.mark.parametrize(
    "pillow_limit", [300, 100], ids=["pillow-warns", "pillow-raises"]
)
def test_raised_max_pixels_overrules_pillow_global_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pillow_limit: int
) -> None:
    path = _save(Image.new("RGB", (20, 20), (9, 8, 7)), tmp_path / "big.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        assert probe_image(path, max_pixels=1_000) == (20, 20)
        image = decode_image(path, max_pixels=1_000)
    assert image.getpixel((19, 19)) == (9, 8, 7)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # global left untouched
    with pytest.raises(ImageDecodeError, match="limit of 399 pixels"):
        decode_image(path, max_pixels=399)


def test_max_pixels_applies_without_pillow_global_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError, match="limit of 399 pixels"):
        probe_image(path, max_pixels=399)


def test_default_max_pixels_matches_pillow_default() -> None:
    assert DEFAULT_MAX_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


def test_image_decode_error_is_caught_as_pipeline_and_os_error() -> None:
    assert issubclass(ImageDecodeError, PipelineError)
    assert issubclass(ImageDecodeError, OSError)


# --- to_rgb on in-memory images and arrays ---------------------------------------


IN_MEMORY_MODES = [
    ("HSV", lambda: _solid("HSV", (255, 0, 0)), [(255, 0, 0)]),
    ("YCbCr", lambda: _solid("YCbCr", (200, 100, 50)), [(200, 100, 50)]),
    (
        "I;16L",
        lambda: Image.frombytes(
            "I;16L", (4, 1), np.array([0, 257, 32768, 65535], "<u2").tobytes()
        ),
        GRAY_16,
    ),
    (
        "I;16B",
        lambda: Image.frombytes(
            "I;16B", (4, 1), np.array([0, 257, 32768, 65535], ">u2").tobytes()
        ),
        GRAY_16,
    ),
    ("RGBA", lambda: Image.new("RGBA", (1, 1), (200, 100, 50, 0)), [BACKGROUND]),
    ("PA", _pa_image, [(10, 20, 30), BACKGROUND]),
]


@pytest.mark.parametrize(
    "make, expected",
    [c[1:] for c in IN_MEMORY_MODES],
    ids=[c[0] for c in IN_MEMORY_MODES],
)
def test_to_rgb_converts_in_memory_modes(
    make: Callable[[], Image.Image], expected: list[tuple[int, int, int]]
) -> None:
    image = make()
    converted = to_rgb(image, background=BACKGROUND)
    assert converted.mode == "RGB" and converted is not image
    _assert_close(converted, expected, 1)


ARRAYS = [
    ("HxW-uint8", np.array([[0, 200]], np.uint8), [(0,) * 3, (200,) * 3]),
    ("HxWx1-uint8", np.array([[[0], [200]]], np.uint8), [(0,) * 3, (200,) * 3]),
    ("HxWx3-uint8", np.array([[[1, 2, 3]]], np.uint8), [(1, 2, 3)]),
    (
        "HxWx4-uint8",
        np.array([[[1, 2, 3, 255], [200, 100, 50, 0]]], np.uint8),
        [(1, 2, 3), BACKGROUND],
    ),
    ("HxW-uint16", np.array([[0, 257, 32768, 65535]], np.uint16), GRAY_16),
    (
        "HxWx3-uint16-bigendian",
        np.array([[[65535, 32768, 0]]], ">u2"),
        [(255, 128, 0)],
    ),
    (
        "HxWx3-float",
        np.array([[[0.0, 0.5, 1.0]]], np.float32),
        [(0, 128, 255)],
    ),
    ("HxW-float-overshoot", np.array([[-0.001, 1.002]]), [(0,) * 3, (255,) * 3]),
]


@pytest.mark.parametrize(
    "array, expected", [c[1:] for c in ARRAYS], ids=[c[0] for c in ARRAYS]
)
def test_to_rgb_converts_arrays(
    array: np.ndarray, expected: list[tuple[int, int, int]]
) -> None:
    image = to_rgb(array, background=BACKGROUND)
    assert image.mode == "RGB"
    assert image.size == (array.shape[1], array.shape[0])
    assert _pixels(image) == expected


BAD_ARRAYS = [
    ("CxHxW", np.zeros((3, 8, 8), np.uint8), "transpose\\(1, 2, 0\\)"),
    ("4-d", np.zeros((1, 8, 8, 3), np.uint8), "not an image"),
    ("empty", np.zeros((0, 4), np.uint8), "zero-size"),
    ("int64", np.zeros((4, 4), np.int64), "dtype int64 is not supported"),
    ("float-0..255", np.full((4, 4), 200.0), "divide 0..255 data by 255"),
    ("float-nan", np.full((4, 4), np.nan), "NaN"),
]


@pytest.mark.parametrize(
    "array, pattern", [c[1:] for c in BAD_ARRAYS], ids=[c[0] for c in BAD_ARRAYS]
)
def test_to_rgb_refuses_bad_arrays(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(ImageDecodeError, match=pattern):
        to_rgb(array)


@pytest.mark.parametrize("background", [(0, 0), (0, 0, 256), (0.5, 0, 0)])
def test_to_rgb_refuses_bad_background(background: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="three integers in 0..255"):
        to_rgb(Image.new("RGB", (1, 1)), background=background)


def test_to_rgb_leaves_input_unchanged() -> None:
    image = Image.new("RGBA", (1, 1), (200, 100, 50, 0))
    to_rgb(image)
    assert image.mode == "RGBA" and image.getpixel((0, 0)) == (200, 100, 50, 0)


# --- module-level contract ---------------------------------------------------------


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert {".jpg", ".jpeg", ".png"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_decode_image_runs_in_spawned_worker_process(tmp_path: Path) -> None:
    path = _save(Image.new("L", (4, 4), 77), tmp_path / "a.png", "PNG")
    assert pickle.loads(pickle.dumps(decode_image)) is decode_image
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        image = pool.submit(decode_image, path).result(timeout=60)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (77, 77, 77)


# --- fast decoding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1600x1200 JPEG of chelsea (DCT scale 1/4 for min_side 256)."""
    return write_photo(tmp_path_factory.mktemp("photo") / "cat.jpg", (1600, 1200))


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    b = b.resize(a.size, Image.Resampling.BILINEAR)
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize(
    "size, side, scale",
    [
        ((4000, 3000), 256, 8),
        ((1600, 1200), 256, 4),
        ((600, 450), 224, 2),
        ((400, 300), 256, 1),
        ((200, 100), 256, 1),
    ],
)
def test_draft_scale_keeps_the_shorter_side(
    size: tuple[int, int], side: int, scale: int
) -> None:
    assert draft_scale(size, side) == scale
    assert min(size) / scale >= side or scale == 1


def test_decode_image_fast_decodes_a_large_jpeg_at_a_dct_scale(photo: Path) -> None:
    fast = decode_image(photo, min_side=256)
    assert fast.size == (400, 300)  # 1/4 scale: the shorter side stays >= 256
    full = decode_image(photo)
    assert full.size == (1600, 1200)
    assert _mean_abs_diff(fast, full) < 3.0


def test_decode_image_fast_reduces_other_formats(tmp_path: Path, photo: Path) -> None:
    png = tmp_path / "cat.png"
    Image.open(photo).save(png)
    fast = decode_image(png, min_side=256)
    assert fast.size == (400, 300)  # Image.reduce by 4, the largest keeping 256
    assert _mean_abs_diff(fast, decode_image(png)) < 3.0


def test_decode_image_fast_changes_nothing_below_twice_the_side(
    tmp_path: Path,
) -> None:
    path = write_photo(tmp_path / "small.jpg", (480, 360))
    assert np.array_equal(
        np.asarray(decode_image(path, min_side=256)), np.asarray(decode_image(path))
    )


def test_decode_image_fast_turns_exif_rotated_photos(tmp_path: Path) -> None:
    # Stored 1200x1600 sideways with orientation 6, displayed as 1600x1200.
    path = write_photo(tmp_path / "side.jpg", (1600, 1200), orientation=6)
    assert probe_image(path) == (1200, 1600)
    fast = decode_image(path, min_side=256)
    assert fast.size == (400, 300)
    reference = decode_image(write_photo(tmp_path / "flat.jpg", (1600, 1200)))
    assert _mean_abs_diff(fast, reference) < 3.0


def test_decode_image_fast_converts_cmyk_jpegs(tmp_path: Path) -> None:
    path = write_photo(tmp_path / "cmyk.jpg", (1600, 1200), mode="CMYK")
    assert Image.open(path).mode == "CMYK"
    fast = decode_image(path, min_side=256)
    assert (fast.mode, fast.size) == ("RGB", (400, 300))
    assert _mean_abs_diff(fast, decode_image(path)) < 3.0


def test_decode_image_fast_reduces_grayscale_and_transparent_images(
    tmp_path: Path,
) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (900, 600), 90).save(gray)
    assert decode_image(gray, min_side=100).getpixel((0, 0)) == (90, 90, 90)
    # A colour key must be composited before reducing, not lost by it.
    keyed = tmp_path / "keyed.png"
    Image.new("RGB", (900, 600), (1, 2, 3)).save(keyed, transparency=(1, 2, 3))
    image = decode_image(keyed, min_side=100, background=BACKGROUND)
    assert image.size == (150, 100) and image.getpixel((5, 5)) == BACKGROUND


def test_decode_image_fast_still_reports_truncated_jpegs(photo: Path) -> None:
    data = photo.read_bytes()
    path = photo.parent / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(path, min_side=256)


@pytest.mark.parametrize("side", [0, -5, 2.5, True])
def test_decode_image_refuses_a_bad_min_side(photo: Path, side: object) -> None:
    with pytest.raises(ValueError, match="min_side must be a positive integer"):
        decode_image(photo, min_side=side)  # type: ignore[arg-type]


def test_reduce_to_uses_the_largest_factor_keeping_the_side() -> None:
    image = Image.new("RGB", (1001, 700))
    assert reduce_to(image, 200).size == (334, 234)  # factor 3, sizes rounded up
    assert reduce_to(image, 400) is image  # 700 // 400 = 1: unchanged


def test_read_plain_jpeg_takes_complete_baseline_jpegs(
    tmp_path: Path, photo: Path
) -> None:
    found = read_plain_jpeg(photo)
    assert found is not None
    data, orientation, size = found
    assert data == photo.read_bytes() and orientation == 1 and size == (1600, 1200)
    side = write_photo(tmp_path / "side.jpg", (320, 240), orientation=6)
    assert read_plain_jpeg(side)[1:] == (6, (240, 320))  # type: ignore[index]


def test_read_plain_jpeg_leaves_other_files_to_the_cpu(
    tmp_path: Path, photo: Path
) -> None:
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[:-100])
    others = [
        png,
        write_photo(tmp_path / "cmyk.jpg", (64, 48), mode="CMYK"),
        write_photo(tmp_path / "prog.jpg", (64, 48), progressive=True),
        cut,
        tmp_path / "missing.jpg",
    ]
    assert [read_plain_jpeg(p) for p in others] == [None] * len(others)
