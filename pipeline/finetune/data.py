"""Images and labels for fine-tuning: datasets, augmentation, loaders.

Augmentation randomness comes from (seed, epoch, index) only, never from a
worker's RNG, so an epoch sees the same augmented images with any number of
workers and after a resume.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2 as T

from features.data import ImageSet
from features.devices import default_workers
from features.errors import ImageDecodeError
from features.images import probe_image
from features.interrupts import InterruptibleLoader
from features.settings import TRAIN_CROP_SCALE, Decoding
from features.transforms import INTERPOLATION_MODES, Preprocessing, eval_transform
from pipeline.config import Config

log = logging.getLogger(__name__)


def train_transform(
    prep: Preprocessing, augment: str
) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation to a uint8 (3, S, S) tensor.

    "standard" is Inception-style RandomResizedCrop + horizontal flip;
    "trivialaugment" adds TrivialAugmentWide (Müller & Hutter, 2021); "none"
    is the evaluation transform.
    """
    if augment == "none":
        return eval_transform(prep)
    mode = INTERPOLATION_MODES[prep.interpolation]
    steps: list[Any] = [
        T.RandomResizedCrop(
            prep.input_size,
            scale=TRAIN_CROP_SCALE,
            interpolation=mode,
            antialias=True,
        ),
        T.RandomHorizontalFlip(),
    ]
    if augment == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=mode))
    steps.append(T.PILToTensor())
    return T.Compose(steps)


# Training images whose headers are read to tell whether they are small.
_SIZE_SAMPLE = 64


def resolve_augment(
    augment: str, images: ImageSet, prep: Preprocessing, *, log_it: bool = True
) -> str:
    """`finetune.augment`, with "auto" decided from the training images' size.

    "auto" is "none" when the images are small for the input (the median
    shorter side of a sample of training images is under half the input
    size: they are upscaled, and random crops and flips of an upscaled 8x8
    digit or 28x28 glyph cut away or mirror what tells the classes apart),
    else "standard".

    NOTE: on the digits at 32 px, "standard" gave 0.891 test accuracy and
    "none" 0.992 (LP-FT, frozen BatchNorm; docs/benchmarks.md).
    """
    if augment != "auto":
        return augment
    native = native_side(images)
    chosen = "none" if native < prep.input_size / 2 else "standard"
    if log_it:
        log.info(
            "finetune.augment = 'auto': %s (median shorter side %s px, input %d px)",
            chosen,
            f"{native:.0f}" if math.isfinite(native) else "unknown",
            prep.input_size,
        )
    return chosen


def native_side(images: ImageSet) -> float:
    """The median shorter side of a sample of training images, in pixels
    (infinite when none could be read)."""
    train = [r for r in images.records if r.split == "train"]
    step = max(1, len(train) // _SIZE_SAMPLE)
    sides = []
    for record in train[::step][:_SIZE_SAMPLE]:
        try:
            sides.append(min(probe_image(images.absolute(record))))
        except ImageDecodeError:
            continue
    return float(statistics.median(sides)) if sides else math.inf


def train_decoding(decoding: Decoding, prep: Preprocessing, augment: str) -> Decoding:
    """The decode recipe for `train_transform(prep, augment)`.

    NOTE: random crops get a larger side than evaluation, so that even the
    smallest crop is cut from pixels at least as fine as the network's input;
    evaluation (and augment "none") uses the resize target, as extraction,
    export and `quadrant predict` do.
    """
    if augment == "none":
        return decoding.for_input(prep)
    return decoding.for_input(prep, crop_scale=TRAIN_CROP_SCALE)


Item = tuple[torch.Tensor, int, int, bool]


class LabelledImages(Dataset[Item]):
    """(uint8 image tensor, label, index, decoded?) for the records of a split."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        size: int,
        seed: int,
        decoding: Decoding,
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.size = size
        self.seed = seed
        self.decoding = decoding
        self.epoch = 0  # set before each epoch: part of every sample's seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        try:
            image = self.decoding.open(self.files[index])
        except ImageDecodeError as err:
            log.warning("skipping %s", err)
            blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            return blank, -1, index, False
        with torch.random.fork_rng(devices=[]):
            # NOTE: the CPU generator only: torch.manual_seed also queues a
            # CUDA seeding call with a formatted stack on every call.
            torch.default_generator.manual_seed(
                _sample_seed(self.seed, self.epoch, index)
            )
            return self.transform(image), self.labels[index], index, True


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:7])


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def collate(batch: list[Item]) -> Batch:
    """Stack (images, labels, indices), dropping images that failed to decode."""
    kept = [(x, y, i) for x, y, i, ok in batch if ok]
    if not kept:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), empty, empty
    images = torch.stack([x for x, _, _ in kept])
    labels = torch.tensor([y for _, y, _ in kept])
    return images, labels, torch.tensor([i for _, _, i in kept])


def split_dataset(
    images: ImageSet,
    split: str,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    prep: Preprocessing,
    seed: int,
    decoding: Decoding,
) -> LabelledImages:
    """The labelled images of one split, decoded as `decoding` says."""
    records = [r for r in images.records if r.split == split]
    return LabelledImages(
        [images.absolute(r) for r in records],
        [r.label for r in records],
        transform,
        size=prep.input_size,
        seed=seed,
        decoding=decoding,
    )


class EpochSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch): the same order after a resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def loader(
    dataset: LabelledImages,
    *,
    batch_size: int,
    train: bool,
    workers: int,
    pin_memory: bool,
    seed: int,
    world: int = 1,
    rank: int = 0,
) -> DataLoader[Any]:
    """A DataLoader; training shuffles per epoch (distributed when world > 1)."""
    sampler: Sampler[int] | None = None
    if train:
        sampler = (
            DistributedSampler(
                dataset, num_replicas=world, rank=rank, seed=seed, drop_last=True
            )
            if world > 1
            else EpochSampler(len(dataset), seed)
        )
    return InterruptibleLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=train,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def loaders(
    cfg: Config,
    images: ImageSet,
    prep: Preprocessing,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """The training loader (this rank's share, augmented) and the validation one."""
    ft, decoding = cfg.finetune, cfg.data.decoding
    workers = ft.num_workers if ft.num_workers >= 0 else default_workers(device)
    augment = resolve_augment(ft.augment, images, prep, log_it=rank == 0)
    train = split_dataset(
        images,
        "train",
        train_transform(prep, augment),
        prep=prep,
        seed=cfg.run.seed,
        decoding=train_decoding(decoding, prep, augment),
    )
    val = split_dataset(
        images,
        "val",
        eval_transform(prep),
        prep=prep,
        seed=cfg.run.seed,
        decoding=decoding.for_input(prep),
    )
    pin = device.type == "cuda"
    train_loader = loader(
        train,
        batch_size=ft.batch_size,
        train=True,
        workers=workers,
        pin_memory=pin,
        seed=cfg.run.seed,
        world=world,
        rank=rank,
    )
    _say_what_is_dropped(len(train_loader) * ft.batch_size * world, len(train), rank)
    val_loader = loader(
        val,
        batch_size=ft.batch_size,
        train=False,
        workers=workers,
        pin_memory=pin,
        seed=cfg.run.seed,
    )
    return train_loader, val_loader


def _say_what_is_dropped(used: int, available: int, rank: int) -> None:
    if rank == 0 and used < available:
        log.info(
            "each epoch trains on %d of the %d training images: the last partial "
            "batch is dropped (a different one each epoch, as the order is "
            "reshuffled)",
            used,
            available,
        )
