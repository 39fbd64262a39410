"""Robust image decoding for the batch feature-extraction pipeline.

Every image goes through two steps:

- `probe_image` reads only the header (size, format) so that empty, unreadable,
  non-image and oversized files are rejected before any compute is spent;
- `decode_image` decodes the pixels into a fully loaded 8-bit "RGB" image whose file
  handle is already closed, applying EXIF orientation and `to_rgb`'s mode rules;
  with `min_side` it decodes large images small (JPEG DCT scaling, then box
  reduction), for callers that resize them to about that size anyway.

Both raise `ImageDecodeError("<path>: <reason>")`, which extraction catches to skip
and report one image. Everything here is a plain function without global state, so
it pickles into torch DataLoader worker processes. Two Pillow globals are left
alone on purpose: `PIL.Image.MAX_IMAGE_PIXELS` (our own `max_pixels` replaces it)
and `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` (a truncated file is an error, never an
image padded with grey).
"""

from __future__ import annotations

import logging
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from features.errors import ImageDecodeError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 89_478_485
"""Pillow's own default decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`)."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".bmp",
        ".dib",
        ".gif",
        ".ico",
        ".jfif",
        ".jpe",
        ".jpeg",
        ".jpg",
        ".pbm",
        ".pgm",
        ".png",
        ".pnm",
        ".ppm",
        ".tga",
        ".tif",
        ".tiff",
        ".webp",
    }
)
"""Extensions (lower case, with the dot) of formats stock Pillow wheels decode.

For documentation and quick filtering only: `decode_image` trusts the file's
content, not its name.
"""

# NOTE: the exceptions Pillow raises for corrupt or truncated data vary by plugin
# (OSError "image file is truncated", SyntaxError "broken PNG file", struct.error
# on a short header, ...). Only calls into Pillow are wrapped with this tuple, so
# bugs in this module still surface with their own traceback.
_PILLOW_DATA_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    IndexError,
    TypeError,
    struct.error,
)
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_HIGH_DEPTH_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}
_REDUCE_BEFORE_RGB = frozenset({"RGB", "L"})
_ORIENTATION_TAG = 0x0112
_UINT16_MAX = 65_535
# NOTE: float arrays are accepted up to one 8-bit level outside 0..1 and clipped,
# because resampling (bicubic, antialiasing) overshoots the range slightly.
_FLOAT_SLACK = 1 / 255


def probe_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check an image file from its header alone, without decoding any pixels.

    Args:
        path: The image file.
        max_pixels: The largest width * height accepted; larger images are refused
            as possible decompression bombs.

    Returns:
        The (width, height) stored in the header, before EXIF orientation:
        `decode_image` returns it transposed for EXIF orientations 5 to 8.

    Raises:
        ImageDecodeError: if the file is missing, empty, unreadable, a directory,
            not an image, of zero size, or larger than `max_pixels`.
    """
    with _open_checked(path, max_pixels) as image:
        return image.size


def decode_image(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, ...] = (255, 255, 255),
    min_side: int | None = None,
) -> Image.Image:
    """Decode an image file into a fully loaded 8-bit RGB image.

    The EXIF orientation is applied, multi-frame files (GIF, TIFF, ...) give
    their first frame, and every mode is converted by `to_rgb`.

    Fast decoding (`min_side` given) makes large images small while decoding
    them, for callers that resize them anyway: a JPEG is decoded at the
    smallest DCT scale (1/2, 1/4 or 1/8, libjpeg's scaled IDCT) whose shorter
    side is still at least `min_side`, and an image of any format whose
    shorter side is still twice `min_side` or more is box-reduced by the
    largest integer factor that keeps it (`Image.reduce`). Images smaller than
    twice `min_side` are decoded exactly as without it.

    Args:
        path: The image file.
        max_pixels: The largest width * height accepted; larger images are refused
            as possible decompression bombs.
        background: The RGB colour transparent pixels are composited over.
        min_side: The shorter side (after EXIF orientation) the result must
            keep at least; None decodes at full size.

    Returns:
        A new image of mode "RGB", independent of the (closed) file.

    Raises:
        ImageDecodeError: if `probe_image` refuses the file, or its data is
            truncated or corrupt, or its mode cannot be converted to RGB.
        ValueError: if `background` is not three integers in 0..255, or
            `min_side` is not a positive integer.
    """
    _check_min_side(min_side)
    with _open_checked(path, max_pixels) as image:
        if min_side is not None:
            _draft(image, min_side)
        _load_pixels(path, image)
        _apply_exif_orientation(path, image)
        source: Image.Image = image
        if min_side is not None and _reduces_before_rgb(image):
            # NOTE: reducing opaque "RGB" or "L" commutes with the conversion
            # to RGB, so the conversion runs on the small image.
            source = reduce_to(image, min_side)
        try:
            # NOTE: to_rgb always returns a new image, so the result outlives the
            # file-backed one that this `with` block closes.
            rgb = to_rgb(source, background=background)
        except ImageDecodeError as error:
            raise ImageDecodeError(f"{path}: {error}") from error
    return rgb if min_side is None else reduce_to(rgb, min_side)


def read_plain_jpeg(
    path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, int, tuple[int, int]] | None:
    """A file's bytes when a GPU JPEG decoder can take it, else None.

    Taken: complete (ending in the EOI marker) baseline JPEGs in YCbCr or
    grayscale within `max_pixels`. Everything else (other formats, CMYK,
    progressive or truncated JPEGs, refused files) returns None and takes
    `decode_image`, which converts it, or reports why it cannot.

    Returns:
        (the file's bytes, its EXIF orientation 1..8, its stored (width,
        height)), or None.
    """
    try:
        with _open_checked(path, max_pixels) as image:
            if (
                image.format != "JPEG"
                or image.mode not in _REDUCE_BEFORE_RGB
                or image.info.get("progressive")
            ):
                return None
            orientation = _exif_orientation(image)
            size = image.size
        data = path.read_bytes()
    except (ImageDecodeError, OSError):
        return None
    return (data, orientation, size) if data.endswith(b"\xff\xd9") else None


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except _PILLOW_DATA_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def draft_scale(size: tuple[int, int], min_side: int) -> int:
    """The DCT scale divisor (1, 2, 4 or 8) fast decoding uses for a JPEG of `size`.

    The same rule as Pillow's `JpegImageFile.draft` given a `min_side` square:
    the largest divisor that keeps both sides at least `min_side`.
    """
    ratio = min(size) // min_side
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def reduce_to(image: Image.Image, min_side: int) -> Image.Image:
    """`image` box-reduced by the largest integer factor keeping `min_side`.

    Returns `image` itself when it is less than twice `min_side` on its
    shorter side. Pillow rounds the reduced size up, so it never drops below
    `min_side`.
    """
    factor = min(image.size) // min_side
    return image.reduce(factor) if factor >= 2 else image


def _reduces_before_rgb(image: Image.Image) -> bool:
    """Whether `image` may be reduced before `to_rgb` with the same result.

    NOTE: not with transparency: a colour key must match exact pixel values,
    and compositing must come before averaging.
    """
    return image.mode in _REDUCE_BEFORE_RGB and not _has_transparency(image)


def _check_min_side(min_side: int | None) -> None:
    """Refuse a `min_side` that is not None or a positive integer."""
    if min_side is not None and (
        isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1
    ):
        raise ValueError(
            f"min_side must be a positive integer or None, got {min_side!r}"
        )


def _draft(image: ImageFile.ImageFile, min_side: int) -> None:
    """Ask a JPEG decoder for the smallest DCT scale keeping `min_side`.

    NOTE: the box is square, so Pillow's rule (the largest scale that covers
    the box on both sides) constrains the shorter side only, and the choice
    is the same whichever way the EXIF orientation turns the image later: a
    portrait photo stored as landscape keeps `min_side` on its width.
    MPO files (camera JPEGs with extra frames) are JpegImageFiles too.
    """
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        image.draft(image.mode, (min_side, min_side))


def to_rgb(
    image: Image.Image | npt.NDArray[np.generic],
    *,
    background: tuple[int, ...] = (255, 255, 255),
) -> Image.Image:
    """Convert an image of any common mode, or a numpy array, to 8-bit RGB.

    Rules:

    - transparency (an alpha band, a transparent palette index or colour) is
      alpha-composited over `background`, so hidden pixels become `background`;
    - 16-bit data ("I;16*", and "I" within 0..65535) is scaled by round(v / 257);
    - other "I" data and "F" data are min-max scaled per image (constant -> 0);
    - grayscale is replicated to three channels; other modes use Pillow's
      `convert("RGB")`.

    Args:
        image: A PIL image, or an array of shape HxW, HxWx1, HxWx3 or HxWx4 with
            dtype uint8, uint16 or float (values in 0..1).
        background: The RGB colour transparent pixels are composited over.

    Returns:
        A new image of mode "RGB"; the input is never modified.

    Raises:
        ImageDecodeError: if the array's shape, dtype or values are not an image,
            or Pillow cannot convert the image's mode.
        ValueError: if `background` is not three integers in 0..255.
    """
    _check_background(background)
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_gray(image)
    if _has_transparency(image):
        return _composite(image, background)
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageDecodeError(
            f"cannot convert image mode {image.mode!r} to RGB ({error}); "
            "convert the image to RGB before passing it in"
        ) from error


def _open_checked(path: Path, max_pixels: int) -> ImageFile.ImageFile:
    """Open `path` lazily and refuse it unless its size is within 1..max_pixels."""
    _check_regular_file(path)
    image = _open_lazily(path)
    try:
        _check_size(path, image.size, max_pixels)
    except ImageDecodeError:
        image.close()
        raise
    return image


def _check_regular_file(path: Path) -> None:
    """Refuse missing, unreadable, empty and special files before Pillow sees them."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError(
            f"{path}: file not found; was it moved or deleted after listing?"
        ) from None
    except OSError as error:
        raise ImageDecodeError(f"{path}: cannot read file ({error})") from error
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError(f"{path}: is a directory, not an image file")
    # NOTE: opening a FIFO or a device would block or stream forever.
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError(f"{path}: not a regular file, so not an image")
    if info.st_size == 0:
        raise ImageDecodeError(f"{path}: empty file (0 bytes); re-copy it or delete it")


def _open_lazily(path: Path) -> ImageFile.ImageFile:
    """Identify `path` with Pillow, turning every refusal into ImageDecodeError."""
    try:
        return _open_ignoring_pillow_limit(path)
    except UnidentifiedImageError as error:
        raise ImageDecodeError(
            f"{path}: not an image: Pillow cannot identify the file's format (or "
            "its header is invalid); delete the file or convert it to PNG or JPEG"
        ) from error
    except PermissionError as error:
        raise ImageDecodeError(
            f"{path}: permission denied; make the file readable ({error})"
        ) from error
    except Image.DecompressionBombError as error:
        raise _pillow_limit_error(path, error) from error
    except _PILLOW_DATA_ERRORS as error:
        raise ImageDecodeError(f"{path}: {_describe_data_error(error)}") from error


def _open_ignoring_pillow_limit(path: Path) -> ImageFile.ImageFile:
    """Open `path` with `Image.open`, overruling Pillow's global size limit.

    Pillow warns above `PIL.Image.MAX_IMAGE_PIXELS` pixels and raises above twice
    that. `_check_size` enforces our own `max_pixels` right after opening, so
    Pillow's verdict is only advisory: its warning is silenced (a larger size is
    refused by our check anyway), and after its error the file is reopened
    through the format plugin, which skips that check. So a trusted image above
    Pillow's default opens once `data.max_pixels` is raised, and the global is
    neither read nor changed.
    """
    # NOTE: catch_warnings changes process-wide state and is not thread-safe;
    # fine here because DataLoader workers are processes, not threads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            return _open_with_plugins(path)


def _open_with_plugins(path: Path) -> ImageFile.ImageFile:
    """Open `path` the way `Image.open` does, minus its decompression-bomb check."""
    Image.init()
    with path.open("rb") as file:
        prefix = file.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept is not None else True
        # NOTE: Pillow's accept functions return a str to reject with a warning.
        if not verdict or isinstance(verdict, str):
            continue
        try:
            # NOTE: a path (not a file object) makes the ImageFile own its handle,
            # so closing the image closes the file, as with Image.open.
            return factory(str(path), str(path))  # type: ignore[arg-type]
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format: try the next plugin, as Image.open does
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def _pillow_limit_error(
    path: Path, error: Image.DecompressionBombError
) -> ImageDecodeError:
    """Explain a refusal by a format reader that enforces Pillow's limit itself."""
    return ImageDecodeError(
        f"{path}: {error} This format's reader enforces Pillow's own limit "
        "(PIL.Image.MAX_IMAGE_PIXELS), which raising data.max_pixels in conf.toml "
        "cannot lift; if the image is trusted, convert it to PNG or JPEG"
    )


def _check_size(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse zero-size images and images with more than `max_pixels` pixels."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(
            f"{path}: zero-size image ({width}x{height}); the file is broken"
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the "
            f"limit of {max_pixels:,} pixels (possible decompression bomb); if the "
            "image is trusted, raise data.max_pixels in conf.toml"
        )


def _load_pixels(path: Path, image: ImageFile.ImageFile) -> None:
    """Decode the pixels of the current (first) frame into memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as error:
        raise _pillow_limit_error(path, error) from error
    except _PILLOW_DATA_ERRORS as error:
        raise ImageDecodeError(f"{path}: {_describe_data_error(error)}") from error


def _describe_data_error(error: BaseException) -> str:
    """Turn one of Pillow's decoding exceptions into a short reason."""
    text = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncat" in text.lower():
        return f"truncated file ({text}); re-copy or re-download it"
    return f"corrupt image data ({type(error).__name__}: {text})"


def _apply_exif_orientation(path: Path, image: Image.Image) -> None:
    """Rotate or flip `image` in place as its EXIF orientation tag says."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except _PILLOW_DATA_ERRORS as error:
        # NOTE: broken metadata does not make the pixels unusable; keeping the
        # stored orientation beats dropping the image from the data set.
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, error)


def _check_background(background: tuple[int, ...]) -> None:
    """Refuse a background that is not an RGB triple of 8-bit integers."""
    if len(background) != 3 or not all(
        isinstance(value, int) and 0 <= value <= 255 for value in background
    ):
        raise ValueError(
            f"background must be three integers in 0..255, got {background!r}; "
            "e.g. (255, 255, 255) for white"
        )


def _has_transparency(image: Image.Image) -> bool:
    """Whether `image` has an alpha band, a transparent key or an RGBA palette."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    palette = image.palette if image.mode == "P" else None
    return palette is not None and palette.mode == "RGBA"


def _composite(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Alpha-composite `image` over a solid `background` and drop the alpha."""
    # NOTE: compositing (not dropping alpha) matters: fully transparent pixels
    # often hold arbitrary RGB that would otherwise leak into the features.
    rgba = image.convert("RGBA")
    backdrop = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(backdrop, rgba).convert("RGB")


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float image to "L" (or "LA")."""
    values = np.asarray(image)
    if image.mode == "F" or (
        image.mode == "I" and (values.min() < 0 or values.max() > _UINT16_MAX)
    ):
        gray = _min_max_to_uint8(values)
    else:
        gray = _uint16_to_uint8(values)
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return Image.fromarray(gray)
    # NOTE: the transparent key is a 16-bit value, so build the mask before
    # scaling, when it still matches exactly one input value.
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.merge("LA", (Image.fromarray(gray), Image.fromarray(alpha)))


def _uint16_to_uint8(values: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Map 0..65535 to 0..255 by round(v / 257), in integer arithmetic.

    NOTE: /257 with rounding, not v >> 8: it is the exact inverse of the standard
    8-to-16-bit expansion (v * 257, used by PNG and TIFF writers), it is what
    libpng's accurate png_set_scale_16 computes, and its error is at most half a
    level where >> 8 truncates (biased low by up to one level). The two differ by
    at most 1; 65535 -> 255 and 32768 -> 128 with both.
    """
    wide = values.astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


def _min_max_to_uint8(values: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Stretch one image's finite range onto 0..255 (constant -> 0, NaN -> 0).

    NOTE: 32-bit integer and float images have no conventional range (depth maps,
    HDR, scientific data, negative values), so a fixed scale would clip most of
    them to black or white; stretching each image keeps its structure visible to
    a backbone trained on 8-bit photos. A constant image has no structure to
    keep and maps to 0 instead of dividing by zero.
    """
    wide = values.astype(np.float64)
    finite = np.isfinite(wide)
    if not finite.any():
        return np.zeros(wide.shape, dtype=np.uint8)
    low, high = wide[finite].min(), wide[finite].max()
    if high == low:
        return np.zeros(wide.shape, dtype=np.uint8)
    scaled = (np.clip(wide, low, high) - low) / (high - low) * 255
    return np.nan_to_num(np.rint(scaled), nan=0.0).astype(np.uint8)


def _array_to_image(array: npt.NDArray[np.generic]) -> Image.Image:
    """Turn an HxW, HxWx1, HxWx3 or HxWx4 array into an "L", "RGB" or "RGBA" image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(
            f"array of shape {array.shape} is not an image; expected HxW, HxWx1, "
            "HxWx3 or HxWx4 (for a CxHxW tensor pass array.transpose(1, 2, 0))"
        )
    if array.size == 0:
        raise ImageDecodeError(f"zero-size array of shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(_array_to_uint8(array)))


def _array_to_uint8(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Scale a uint8, uint16 or 0..1 float array to uint8."""
    # NOTE: dtype.kind/itemsize also match non-native byte orders such as ">u2".
    if array.dtype.kind == "u" and array.dtype.itemsize == 1:
        return array.astype(np.uint8, copy=False)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return _uint16_to_uint8(array)
    if array.dtype.kind == "f":
        return _unit_float_to_uint8(array)
    raise ImageDecodeError(
        f"array dtype {array.dtype} is not supported; use uint8, uint16 or float "
        "with values in 0..1"
    )


def _unit_float_to_uint8(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Map floats in 0..1 to 0..255, refusing values clearly outside that range.

    NOTE: unlike float "F" images read from files, float arrays handed in by users
    follow the 0..1 convention (skimage's img_as_float, torchvision's ToTensor), so
    they keep their absolute brightness instead of being stretched.
    """
    wide = array.astype(np.float64)
    if not np.isfinite(wide).all():
        raise ImageDecodeError("float array holds NaN or infinite values")
    low, high = wide.min(), wide.max()
    if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
        raise ImageDecodeError(
            f"float array values must lie in 0..1, got {low:.4g}..{high:.4g}; "
            "divide 0..255 data by 255 first"
        )
    return np.rint(np.clip(wide, 0.0, 1.0) * 255).astype(np.uint8)
