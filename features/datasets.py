"""Demo data sets, written as folders of PNG class subfolders.

Two real data sets that work offline are turned into the layout the tool reads
(`<out>/<class>/<index>.png`, or `<out>/train/<class>/...` and
`<out>/test/<class>/...`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
- ``fashion-mnist``: Zalando's 28x28 Fashion-MNIST (60,000 train + 10,000 test),
  read from the Debian package ``dataset-fashion-mnist`` or downloaded once with
  torchvision.

File names are the image's index in its source array (`00042.png` is
``images[42]``), so every PNG can be traced back to its label in the source.
Writers build the data set in a hidden sibling folder and rename it into place
only when it is complete, so a crash never leaves a half-written data set behind.
"""

from __future__ import annotations

import gzip
import inspect
import logging
import math
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from joblib import Parallel, delayed
from PIL import Image

from features.atomic import staged_folder
from features.errors import ConfigError, DataError, StageInputError

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]

_DIGITS_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
_FASHION_SPLITS = ("train", "test")
_WRITE_SPLITS = ("train", "test", "both")
# NOTE: the IDX files are named after the split's prefix: `train-*` and `t10k-*`.
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension
# NOTE: the official split has 6,000 train and 1,000 test images per class; a
# subset written with split="both" keeps that 6 : 1 ratio.
_TRAIN_PER_TEST = 6
# NOTE: torchvision opens its URLs without a timeout; where a firewall drops
# packets instead of refusing them, an offline download would hang for minutes.
_DOWNLOAD_TIMEOUT_S = 30.0
# NOTE: one task per 2,000 images keeps the pool's overhead negligible, and a
# data set smaller than that (digits) is written without starting a pool.
_PNGS_PER_TASK = 2000


# ------------------------------------------------------------------------------ loading


def load_digits_images() -> tuple[Images, Labels, tuple[str, ...]]:
    """Load scikit-learn's bundled 8x8 digits as uint8 grayscale images.

    The pixel values 0..16 are scaled to 0..255 as ``np.rint(v * 255 / 16)``; the
    only tie, v = 8 -> 127.5, rounds to 128 both half-to-even and half-up.

    Returns:
        The images (N, 8, 8) as uint8, the labels (N,) as int64 and the class
        names ``("0", ..., "9")``, where ``class_names[label]`` names a label.
    """
    # NOTE: imported here because `sklearn.datasets` takes about 2 s to import.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return images, labels, _DIGITS_CLASSES


def load_fashion_mnist(
    split: str = "train", *, source: Path | None = None
) -> tuple[Images, Labels, tuple[str, ...]]:
    """Load one split of Fashion-MNIST from its IDX files.

    The files are looked for in `source` when it is given (and only there, so a
    mistyped folder is reported instead of silently replaced by a download), else
    in `DEFAULT_FASHION_MNIST_DIR` (Debian's ``dataset-fashion-mnist``), else in
    the download cache ``$XDG_CACHE_HOME/quadrant/fashion-mnist`` (default
    ``~/.cache/quadrant/fashion-mnist``), where torchvision downloads them once.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        source: A folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
            gzipped (``.gz``) or not.

    Returns:
        The images (N, 28, 28) as uint8, the labels (N,) as int64 and
        `FASHION_MNIST_CLASSES`, where ``class_names[label]`` names a label.

    Raises:
        ConfigError: if `split` is neither "train" nor "test".
        StageInputError: if the files are in none of the places above and cannot
            be downloaded.
        DataError: if a file is corrupt or not an IDX file of the expected kind.
    """
    if split not in _FASHION_SPLITS:
        raise ConfigError(
            f"Fashion-MNIST split must be one of {list(_FASHION_SPLITS)}, "
            f"got {split!r}."
        )
    if source is not None:
        source = Path(source)  # NOTE: a str from a config file works too
        files = _find_split_files(source, split)
        if files is None:
            raise StageInputError(
                f"{source} holds no Fashion-MNIST {split} files; expected "
                f"{_expected_names(split)} (optionally gzipped, ending in .gz). "
                "Point source at the folder that holds them, or leave it unset to "
                f"use {DEFAULT_FASHION_MNIST_DIR} or the download cache."
            )
    else:
        files = _find_split_files(DEFAULT_FASHION_MNIST_DIR, split)
        if files is None:
            files = _download_fashion_mnist(split)
    images, labels = _read_split(*files)
    return images, labels, FASHION_MNIST_CLASSES


def _expected_names(split: str) -> list[str]:
    """File names (without .gz) of a split's images and labels."""
    prefix = _IDX_PREFIX[split]
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def _find_split_files(
    folder: Path, split: str, *, allow_gzip: bool = True
) -> tuple[Path, Path] | None:
    """The images and labels files of `split` in `folder`, or None if either is missing.

    An uncompressed file wins over its ``.gz``: in torchvision's cache the
    uncompressed file only exists once the download has completed, while the
    ``.gz`` of an interrupted download may be truncated.
    """
    suffixes = ("", ".gz") if allow_gzip else ("",)
    found = []
    for name in _expected_names(split):
        candidates = [folder / f"{name}{suffix}" for suffix in suffixes]
        path = next((path for path in candidates if path.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _fashion_mnist_cache() -> Path:
    """The folder torchvision downloads Fashion-MNIST into."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quadrant" / "fashion-mnist"


def _download_fashion_mnist(split: str) -> tuple[Path, Path]:
    """Return the cached files of `split`, downloading them with torchvision first.

    Raises:
        StageInputError: if the download fails (offline, say).
    """
    cache = _fashion_mnist_cache()
    # NOTE: torchvision keeps the files in <root>/FashionMNIST/raw.
    raw = cache / "FashionMNIST" / "raw"
    files = _find_split_files(raw, split, allow_gzip=False)
    if files is not None:
        return files
    # NOTE: imported here because torchvision takes about 5 s to import.
    from torchvision.datasets import FashionMNIST

    logger.info("Downloading Fashion-MNIST %s into %s", split, cache)
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            FashionMNIST(root=cache, train=split == "train", download=True)
    except (RuntimeError, OSError) as err:
        raise StageInputError(_not_found_message(split, cache, err)) from err
    files = _find_split_files(raw, split, allow_gzip=False)
    if files is None:
        raise StageInputError(
            f"torchvision reported a complete download, but {raw} lacks "
            f"{_expected_names(split)}; delete {cache} and try again."
        )
    return files


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened inside the block a timeout, restoring the old one after."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _not_found_message(split: str, cache: Path, err: Exception) -> str:
    """Explain where Fashion-MNIST was looked for and the three ways to get it."""
    reason = " ".join(str(err).split())  # torchvision's message spans lines
    return (
        f"Fashion-MNIST {split} files {_expected_names(split)} were not found in "
        f"{DEFAULT_FASHION_MNIST_DIR}, and downloading them into {cache} failed "
        f"({reason}). Either install them (Debian/Ubuntu: "
        "`sudo apt-get install dataset-fashion-mnist`), or pass source=<folder> "
        "that holds them, or run once with internet access so torchvision "
        f"downloads them into {cache} (set XDG_CACHE_HOME to move that cache)."
    )


def _read_split(images_path: Path, labels_path: Path) -> tuple[Images, Labels]:
    """Read and cross-check one split's images and labels files.

    Raises:
        DataError: if a file is corrupt, or the two files disagree.
    """
    images = _read_idx(images_path, magic=_IMAGES_MAGIC, ndim=3)
    labels = _read_idx(labels_path, magic=_LABELS_MAGIC, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the files belong to different data sets. "
            "Reinstall or re-download both."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{labels_path}: label {labels.max()} found, Fashion-MNIST has only "
            f"labels 0..{len(FASHION_MNIST_CLASSES) - 1}; the file is corrupt."
        )
    return images, labels


def _read_idx(path: Path, *, magic: int, ndim: int) -> Images:
    """Read an IDX file of unsigned bytes (gzipped or not) into an array.

    Raises:
        DataError: if the file cannot be decompressed, has another magic number, or
            its size disagrees with its header.
    """
    hint = (
        "The file is damaged or not a Fashion-MNIST IDX file: reinstall it "
        "(`sudo apt-get install --reinstall dataset-fashion-mnist`) or delete it "
        "so that it is downloaded again."
    )
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({err}). {hint}") from err
    header = 4 * (1 + ndim)  # big-endian int32s: the magic number, then the sizes
    if len(raw) < header:
        raise DataError(
            f"{path}: {len(raw)} bytes is shorter than an IDX header. {hint}"
        )
    found, *shape = struct.unpack(f">{1 + ndim}i", raw[:header])
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic}. {hint}")
    expected = header + math.prod(shape)
    if min(shape) < 0 or len(raw) != expected:
        raise DataError(
            f"{path}: the header promises shape {tuple(shape)} ({expected} bytes) "
            f"but the file holds {len(raw)} bytes. {hint}"
        )
    # NOTE: copied so callers get a writable array, not a view of immutable bytes.
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


# ------------------------------------------------------------------------------ writing


def write_digits(out: Path, *, overwrite: bool = False) -> Path:
    """Write scikit-learn's 1,797 digits as ``out/<digit>/<index:05d>.png``.

    The PNGs are 8x8 grayscale (mode "L"), scaled as in `load_digits_images`.

    Args:
        out: The folder to create; it must not exist or be empty unless
            `overwrite` is set.
        overwrite: Replace an existing data set in `out` (only once the new one
            is complete).

    Returns:
        `out`.

    Raises:
        DataError: if `out` is not empty and `overwrite` is False, or holds files
            other than PNGs (which overwrite never deletes).
    """
    out = Path(out)  # NOTE: a str from a config file works too
    _check_target(out, overwrite=overwrite)
    images, labels, classes = load_digits_images()
    indices = np.arange(len(labels), dtype=np.int64)
    with _staged_folder(out, overwrite=overwrite) as staging:
        _write_pngs(staging, images, labels, indices, classes)
    return out


def write_fashion_mnist(
    out: Path,
    *,
    classes: Sequence[str | int] | None = None,
    per_class: int | None = None,
    split: str = "both",
    seed: int = 0,
    source: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write Fashion-MNIST, or a subset of it, as 28x28 grayscale PNG class folders.

    With split "train" or "test" the PNGs go to ``out/<class>/<index:05d>.png``;
    with "both" to ``out/train/<class>/...`` and ``out/test/<class>/...``, from
    the official train and t10k files. `index` is the image's index in its split.

    Args:
        out: The folder to create; it must not exist or be empty unless
            `overwrite` is set.
        classes: Class names (see `FASHION_MNIST_CLASSES`) or indices 0..9;
            None writes all ten.
        per_class: How many train images to draw per class, at random (seeded);
            None writes all. With split "both" the test split gets
            ``ceil(per_class / 6)`` per class, the official 6 : 1 ratio (5 -> 1,
            60 -> 10, 6000 -> 1000); with "test" alone it gets `per_class`.
        split: "train", "test" or "both".
        seed: The subset of a class depends only on (seed, class, split), not on
            which other classes are written.
        source: A folder holding the IDX files; see `load_fashion_mnist`.
        overwrite: Replace an existing data set in `out` (only once the new one
            is complete).

    Returns:
        `out`.

    Raises:
        ConfigError: for an unknown class, split, or a bad per_class or seed.
        StageInputError: if the IDX files are nowhere to be found.
        DataError: if an IDX file is corrupt, or `out` is not empty and
            `overwrite` is False, or holds files other than PNGs.
    """
    out = Path(out)  # NOTE: a str from a config file works too
    class_ids = _class_ids(classes)
    counts = _counts_per_split(split, per_class)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}.")
    _check_target(out, overwrite=overwrite)
    # NOTE: everything is loaded before the staging folder is made, so a missing
    # or corrupt file fails without writing anything.
    data = {name: load_fashion_mnist(name, source=source) for name in counts}
    with _staged_folder(out, overwrite=overwrite) as staging:
        for name, count in counts.items():
            images, labels, _ = data[name]
            indices = _draw(labels, class_ids, count, seed=seed, split=name)
            root = staging / name if split == "both" else staging
            _write_pngs(root, images, labels, indices, FASHION_MNIST_CLASSES)
    return out


_WRITERS: dict[str, Callable[..., Path]] = {
    "digits": write_digits,
    "fashion-mnist": write_fashion_mnist,
}


def write_dataset(name: str, out: Path, **options: Any) -> Path:
    """Write the demo data set `name` into `out` (see `write_digits` and friends).

    Args:
        name: One of `DATASETS`.
        out: The folder to create.
        **options: Keyword options of that data set's writer.

    Returns:
        `out`.

    Raises:
        ConfigError: for an unknown data set or an option its writer lacks.
    """
    writer = _WRITERS.get(name)
    if writer is None:
        raise ConfigError(f"Unknown data set {name!r}; valid: {', '.join(DATASETS)}.")
    valid = set(inspect.signature(writer).parameters) - {"out"}
    if unknown := set(options) - valid:
        raise ConfigError(
            f"Data set {name!r} has no option(s) {sorted(unknown)}; "
            f"valid: {sorted(valid)}."
        )
    return writer(out, **options)


def _class_ids(classes: Sequence[str | int] | None) -> list[int]:
    """Turn class names or indices into unique label indices, keeping their order.

    Raises:
        ConfigError: for an unknown name, an index out of range, or no classes.
    """
    if classes is None:
        return list(range(len(FASHION_MNIST_CLASSES)))
    if isinstance(classes, str):  # NOTE: one name, not a sequence of letters
        classes = [classes]
    ids: list[int] = []
    for cls in classes:
        class_id = _class_id(cls)
        if class_id not in ids:
            ids.append(class_id)
    if not ids:
        raise ConfigError(
            "classes is empty; give class names or indices, or None for all of "
            f"{', '.join(FASHION_MNIST_CLASSES)}."
        )
    return ids


def _class_id(cls: str | int) -> int:
    """The label index of one class given by name or index."""
    valid = ", ".join(FASHION_MNIST_CLASSES)
    if isinstance(cls, str) and cls.isdigit():  # an index typed on a command line
        cls = int(cls)
    if isinstance(cls, str):
        if cls not in FASHION_MNIST_CLASSES:
            raise ConfigError(
                f"Unknown Fashion-MNIST class {cls!r}; valid names: {valid} "
                f"(or indices 0..{len(FASHION_MNIST_CLASSES) - 1})."
            )
        return FASHION_MNIST_CLASSES.index(cls)
    if isinstance(cls, bool) or not isinstance(cls, int | np.integer):
        raise ConfigError(f"A class must be a name or an index, got {cls!r}.")
    if not 0 <= cls < len(FASHION_MNIST_CLASSES):
        raise ConfigError(
            f"Fashion-MNIST class index {cls} is out of range "
            f"0..{len(FASHION_MNIST_CLASSES) - 1}; names: {valid}."
        )
    return int(cls)


def _counts_per_split(split: str, per_class: int | None) -> dict[str, int | None]:
    """How many images per class to draw from each source split (None: all)."""
    if split not in _WRITE_SPLITS:
        raise ConfigError(f"split must be one of {list(_WRITE_SPLITS)}, got {split!r}.")
    if per_class is not None and (
        isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1
    ):
        raise ConfigError(f"per_class must be an int >= 1 or None, got {per_class!r}.")
    if split != "both":
        return {split: per_class}
    test = None if per_class is None else math.ceil(per_class / _TRAIN_PER_TEST)
    return {"train": per_class, "test": test}


def _draw(
    labels: Labels,
    class_ids: list[int],
    per_class: int | None,
    *,
    seed: int,
    split: str,
) -> npt.NDArray[np.int64]:
    """Sorted indices of up to `per_class` random images of each class in `class_ids`.

    Raises:
        ConfigError: if a class has fewer than `per_class` images.
    """
    chosen = []
    for class_id in class_ids:
        indices = np.flatnonzero(labels == class_id)
        if per_class is not None:
            if per_class > len(indices):
                raise ConfigError(
                    f"per_class={per_class}, but class "
                    f"{FASHION_MNIST_CLASSES[class_id]!r} has only {len(indices)} "
                    f"{split} images; ask for at most that many, or None for all."
                )
            # NOTE: seeded per class and split, so a class's subset does not change
            # when other classes are added or removed.
            rng = np.random.default_rng([seed, class_id, _FASHION_SPLITS.index(split)])
            indices = np.sort(rng.choice(indices, size=per_class, replace=False))
        chosen.append(indices)
    return np.concatenate(chosen).astype(np.int64)


def _check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse to write into a non-empty `out`, or to overwrite anything but PNGs.

    Raises:
        DataError: if `out` is a file, or a non-empty folder and `overwrite` is
            False, or holds files other than PNGs.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another path.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"{out} already exists and is not empty; choose another folder, or "
            "replace it: `quadrant demo-data ... --overwrite` (overwrite=True "
            "from Python)."
        )
    # NOTE: overwrite deletes `out`; a mistyped path (the home folder, say) must
    # not cost the user their files, so only a tree of PNGs is ever replaced.
    stray = next((p for p in out.rglob("*") if _is_stray(p)), None)
    if stray is not None:
        raise DataError(
            f"{out} holds {stray}, which is not a PNG image, so it is not replaced "
            "even with --overwrite; remove the folder yourself or choose "
            "another one."
        )


def _is_stray(path: Path) -> bool:
    """Whether `path` is anything but a folder or a PNG file."""
    if path.is_symlink() or not (path.is_dir() or path.is_file()):
        return True
    return path.is_file() and path.suffix.lower() != ".png"


@contextmanager
def _staged_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out`; it replaces `out` on success.

    On an exception the sibling is deleted; a run killed outright leaves only
    a hidden staging folder, never a half-written `out` (the next command
    removes it).
    """
    started = time.perf_counter()
    with staged_folder(out) as staging:
        yield staging
        # NOTE: checked again at the end: someone may have filled `out` since.
        _check_target(out, overwrite=overwrite)
    logger.info("Wrote %s in %.1f s", out, time.perf_counter() - started)


def _write_pngs(
    root: Path,
    images: Images,
    labels: Labels,
    indices: npt.NDArray[np.int64],
    class_names: Sequence[str],
) -> None:
    """Write each ``images[i]``, i in `indices`, as ``root/<class>/<i:05d>.png``."""
    for class_id in np.unique(labels[indices]):
        (root / class_names[class_id]).mkdir(parents=True)
    paths = [root / class_names[labels[i]] / f"{i:05d}.png" for i in indices]
    tasks = []
    for start in range(0, len(indices), _PNGS_PER_TASK):
        chunk = slice(start, start + _PNGS_PER_TASK)
        tasks.append(delayed(_save_pngs)(paths[chunk], images[indices[chunk]]))
    # NOTE: threads, since most of the time goes to creating files and to zlib,
    # both of which release the GIL.
    n_jobs = min(len(tasks), os.cpu_count() or 1)
    Parallel(n_jobs=max(n_jobs, 1), prefer="threads")(tasks)


def _save_pngs(paths: Sequence[Path], images: Images) -> None:
    """Save each image as an 8-bit grayscale PNG at the matching path."""
    for path, image in zip(paths, images, strict=True):
        _save_png(path, image)


def _save_png(path: Path, image: Images) -> None:
    """Save one 2-D uint8 image as an 8-bit grayscale (mode "L") PNG."""
    Image.fromarray(image).save(path, format="PNG")
