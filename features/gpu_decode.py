"""JPEG decoding on CUDA (nvJPEG through torchvision), the CPU as fallback.

Extraction with `extract.decoder = "nvjpeg"` (or "auto" on a CUDA device)
splits the work: DataLoader workers read each file and its header
(`features.images.read_plain_jpeg`); complete baseline JPEGs travel as
bytes, every other file is decoded on the CPU as usual. The main process
then decodes a batch's JPEGs in one `torchvision.io.decode_jpeg(...,
device="cuda")` call and finishes them on the GPU with the same recipe as
the CPU path: EXIF orientation, the box reduction fast decoding does (the
JPEG DCT scale emulated by averaging, then `reduce_to`'s factor), resize and
centre crop. A JPEG nvJPEG cannot decode is decoded on the CPU instead, and
a file neither can read is reported like every bad file.

The decode function is injectable, so the routing and fallback logic are
tested without a GPU (torchvision's CPU decoder stands in for nvJPEG).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from features.errors import ConfigError, ImageDecodeError
from features.images import draft_scale
from features.names import DECODERS
from features.settings import Decoding
from features.transforms import Preprocessing, resize_crop

log = logging.getLogger(__name__)

JpegDecode = Callable[[list[torch.Tensor]], list[torch.Tensor]]
CpuDecode = Callable[[Path], torch.Tensor]


@dataclass(frozen=True)
class JpegSource:
    """A JPEG file's bytes, waiting for the GPU (built in a loader worker)."""

    path: str
    data: torch.Tensor
    orientation: int
    size: tuple[int, int]


def nvjpeg_decode(device: torch.device) -> JpegDecode:
    """torchvision's batched nvJPEG decode to RGB on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # NOTE: torchvision 0.29 deprecates its decoders in favour of
            # torchcodec; the call itself is unchanged since 0.19.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return list(out)

    return decode


def resolve_decoder(spec: str, device: torch.device) -> str:
    """ "auto" is nvjpeg on a CUDA device where nvJPEG works, else pillow.

    Raises:
        ConfigError: "nvjpeg" was asked for without a CUDA device, or
            torchvision cannot decode JPEGs on it.
    """
    if spec not in DECODERS:
        raise ConfigError(f"[extract] decoder = {spec!r} is not one of {DECODERS}")
    if spec == "pillow" or (spec == "auto" and device.type != "cuda"):
        return "pillow"
    if device.type != "cuda":
        raise ConfigError(
            f"[extract] decoder = 'nvjpeg' needs a CUDA device, but extraction "
            f"runs on {device}; use decoder = 'auto' or 'pillow'"
        )
    problem = _nvjpeg_problem(str(device))
    if problem is None:
        return "nvjpeg"
    if spec == "auto":
        log.warning("nvJPEG unavailable (%s): decoding on the CPU", problem)
        return "pillow"
    raise ConfigError(
        f"[extract] decoder = 'nvjpeg' but torchvision cannot decode JPEGs on "
        f"{device} ({problem}); use decoder = 'auto' or 'pillow'"
    )


@lru_cache(maxsize=8)
def _nvjpeg_problem(device: str) -> str | None:
    """None when a tiny JPEG decodes on `device`, else the error's text."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        nvjpeg_decode(torch.device(device))([data])
    except (RuntimeError, ValueError, ImportError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a (C, H, W) image as EXIF `orientation` says, as exif_transpose does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return torch.rot90(image.transpose(-1, -2), 2, (-2, -1))
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def fast_reduce(
    image: torch.Tensor, stored_size: tuple[int, int], min_side: int
) -> torch.Tensor:
    """Box-reduce a fully decoded (C, H, W) JPEG as fast decoding would on the CPU.

    First by the DCT scale Pillow's draft picks for the stored size (a scaled
    IDCT keeps each block's mean, as averaging does), then by `reduce_to`'s
    integer factor.
    """
    scale = draft_scale(stored_size, min_side)
    if scale > 1:
        image = _box(image, scale)
    factor = min(image.shape[-2:]) // min_side
    return _box(image, factor) if factor >= 2 else image


def _box(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average `factor` x `factor` blocks (partial edge blocks: what is there)."""
    pooled = F.avg_pool2d(image[None].float(), factor, ceil_mode=True)[0]
    return pooled.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class DecodeCounts:
    """How a run's images were decoded, for the log."""

    gpu: int = 0
    cpu_fallback: int = 0
    failed: int = 0


@dataclass
class GpuJpegDecoder:
    """Finishes a loader batch: decodes its JPEGs on the GPU, falls back to the CPU.

    Attributes:
        prep: the preprocessing every image gets (resize, crop, decode mode).
        device: where the JPEGs are decoded and the batch goes.
        cpu_decode: decodes and transforms one file on the CPU (the fallback);
            raises ImageDecodeError for a file it cannot read.
        decode: the batched JPEG decoder (default: nvJPEG on `device`).
    """

    prep: Preprocessing
    device: torch.device
    cpu_decode: CpuDecode
    decode: JpegDecode | None = None
    counts: DecodeCounts = field(default_factory=DecodeCounts)

    def __post_init__(self) -> None:
        self._decode = self.decode or nvjpeg_decode(self.device)
        self._resize_crop = resize_crop(self.prep)
        self._side = Decoding().for_input(self.prep).side

    def __call__(
        self,
        pixels: torch.Tensor,
        ok: torch.Tensor,
        reasons: Sequence[str],
        jpegs: Sequence[tuple[int, JpegSource]],
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The batch with every JPEG slot filled on `device`.

        Args:
            pixels: (N, 3, S, S) uint8; JPEG slots are placeholders.
            ok: (N,) bool, whether each row's image was decoded.
            reasons: why each failed row failed ("" otherwise).
            jpegs: (slot in the batch, the JPEG waiting for it).

        Returns:
            (pixels on `device`, ok, reasons), with JPEGs that could not be
            read anywhere marked failed and their reason given.
        """
        pixels = pixels.to(self.device, non_blocking=True)
        ok, reasons = ok.clone(), list(reasons)
        decoded = self._decode_each([source.data for _, source in jpegs])
        for (slot, source), image in zip(jpegs, decoded, strict=True):
            if image is not None:
                pixels[slot] = self.finish(image, source)
                self.counts.gpu += 1
                continue
            try:
                pixels[slot] = self.cpu_decode(Path(source.path)).to(self.device)
                self.counts.cpu_fallback += 1
            except ImageDecodeError as err:
                pixels[slot] = 0
                ok[slot] = False
                reasons[slot] = str(err).removeprefix(f"{source.path}: ")
                self.counts.failed += 1
        return pixels, ok, reasons

    def finish(self, image: torch.Tensor, source: JpegSource) -> torch.Tensor:
        """Orient, reduce (fast decoding), resize and crop one decoded image."""
        image = orient(image, source.orientation)
        if self._side is not None:
            image = fast_reduce(image, source.size, self._side)
        return self._resize_crop(image)

    def _decode_each(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Every JPEG decoded, or None where the decoder refused it.

        NOTE: one batched call is fastest; when it fails (one bad file fails
        the whole call), each file is decoded alone to find the culprits.
        """
        if not datas:
            return []
        try:
            return list(self._decode(datas))
        except (RuntimeError, ValueError) as err:
            log.debug("batched JPEG decoding failed (%s): one at a time", err)
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(self._decode([data])[0])
            except (RuntimeError, ValueError) as err:
                log.debug("GPU JPEG decoding failed (%s): the CPU decodes it", err)
                out.append(None)
        return out


def jpeg_collate(
    items: Sequence[tuple[int, torch.Tensor, bool, str, JpegSource | None]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[Any]]:
    """Stack loader items; JPEGs stay a list of (slot, source) beside the pixels."""
    rows = torch.tensor([item[0] for item in items], dtype=torch.int64)
    pixels = torch.stack([item[1] for item in items])
    ok = torch.tensor([item[2] for item in items], dtype=torch.bool)
    reasons = [item[3] for item in items]
    jpegs = [(i, item[4]) for i, item in enumerate(items) if item[4] is not None]
    return rows, pixels, ok, reasons, jpegs


def jpeg_source(
    path: Path, data: bytes, orientation: int, size: tuple[int, int]
) -> JpegSource:
    """A `JpegSource` holding `data` as a 1-D uint8 tensor (what decode_jpeg takes)."""
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return JpegSource(str(path), tensor, orientation, size)
