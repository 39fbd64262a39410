"""Finding labelled images, checking them, and splitting them.

Three layouts are read:

- class folders: `root/<class>/<image>`;
- split folders: `root/{train,val,test}/<class>/<image>` (any of val/test may be
  missing: they are then carved out of train);
- a CSV manifest: columns `path,label[,split]`, paths relative to the CSV file.

Every file is probed (header only) before any compute: files that are not
images, empty, unreadable or decompression bombs are skipped and reported, and
layout problems (no images, an empty class, a class too small for the split)
fail at once with a message saying what to do.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from features.errors import DataError, ImageDecodeError, StageInputError
from features.images import DEFAULT_MAX_PIXELS, probe_image

log = logging.getLogger(__name__)

_CHUNK = 256  # files per thread task when probing and fingerprinting

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: a path relative to the data root, a label, a split."""

    path: str
    label: int
    split: str


@dataclass(frozen=True)
class Skipped:
    """A file that is not used, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """The checked, split list of images a run works on.

    Records are sorted by path, so the order (and every row index derived
    from it) does not depend on the order the file system lists files in.
    """

    root: Path
    records: tuple[ImageRecord, ...]
    label_names: tuple[str, ...]
    skipped: tuple[Skipped, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.records)

    def absolute(self, record: ImageRecord) -> Path:
        return self.base / record.path

    @property
    def base(self) -> Path:
        """The folder record paths are relative to (the CSV's folder for a manifest)."""
        return self.root.parent if self.root.is_file() else self.root

    def subset(
        self, records: Sequence[ImageRecord], *, fingerprint: str = "stat"
    ) -> ImageSet:
        """The same data set restricted to `records` (label names kept)."""
        chosen = tuple(sorted(records, key=lambda r: r.path))
        digest = _fingerprint(self.base, chosen, self.label_names, (), fingerprint)
        return ImageSet(self.root, chosen, self.label_names, (), digest)

    def require_classes(self, what: str) -> None:
        """Refuse data with fewer than two classes before `what` starts.

        Extraction takes one class (codes of a single folder are useful);
        training anything on it gives a model that answers that class always.

        Raises:
            DataError: naming the one class, where it was found and the fix.
        """
        if len(self.label_names) >= 2:
            return
        found = (
            f"only one class ({self.label_names[0]!r})"
            if self.label_names
            else ("no classes")
        )
        raise DataError(
            f"{found} under {self.root}; {what} needs at least two classes: add a "
            "folder of images per class (or manifest rows with another label)"
        )

    def counts(self) -> dict[str, Counter[str]]:
        """Images per class name, per split."""
        out: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
        for r in self.records:
            out[r.split][self.label_names[r.label]] += 1
        return out


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (for listing millions of files).

    NOTE: listing builds millions of small tuples and records, none in a
    cycle; each of them set off collections that walked all the earlier
    ones, more than half of a million-row split. Reference counting still
    frees everything; the collector runs again on the way out.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@_gc_paused()
def discover(
    root: Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fingerprint: str = "stat",
    workers: int = 8,
) -> ImageSet:
    """List, probe and split the labelled images under `root`.

    Args:
        root: a folder (class folders, or split folders) or a CSV manifest.
        val_fraction: share of each class's training images moved to `val` when
            the data has no validation split.
        test_fraction: likewise for `test`.
        seed: seeds the split.
        max_pixels: images with more pixels are refused as decompression bombs.
        fingerprint: "stat" (path, size, mtime) or "content" (sha256 of bytes).
        workers: threads probing image headers.

    Raises:
        StageInputError: `root` does not exist.
        DataError: no images, an empty class, a class too small for the split,
            or a malformed manifest.
    """
    root = Path(root).resolve()
    if not root.exists():
        raise StageInputError(
            f"data.root {root} not found. Point data.root in conf.toml at a folder "
            "of class subfolders or a CSV manifest, or make a demo set with "
            "`quadrant demo-data digits DIR`."
        )
    listed, skipped = _read_manifest(root) if root.is_file() else _scan_folders(root)
    base = root.parent if root.is_file() else root
    listed = _one_entry_per_file(base, listed, links=not root.is_file())
    listed, more = _probe_all(base, listed, max_pixels, workers)
    skipped += more
    skipped.sort(key=lambda s: s.path)
    warn_skipped(root, skipped)
    if not listed:
        raise _no_images_error(root, base, skipped)
    label_names = _label_names(listed, root)
    records = _split(listed, label_names, val_fraction, test_fraction, seed, root)
    records.sort(key=lambda r: r.path)
    digest = _fingerprint(base, records, label_names, skipped, fingerprint)
    return ImageSet(root, tuple(records), label_names, tuple(skipped), digest)


@_gc_paused()
def images_from_paths(
    paths: Sequence[Path | str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fingerprint: str = "stat",
    workers: int = 8,
) -> ImageSet:
    """An unlabelled ImageSet of the given files (label 0, split "train").

    For transforming arbitrary files (`CNNCodes`, prediction): no class
    folders, no splitting. Duplicates are listed once.

    Raises:
        StageInputError: a file does not exist.
    """
    files = sorted({Path(p).resolve() for p in paths})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise StageInputError(f"{len(missing)} file(s) not found, e.g. {missing[:3]}")
    if not files:
        raise DataError("no image paths given")
    base = Path(os.path.commonpath([f.parent for f in files]))
    listed: list[_Listed] = [(_rel(base, f), "images", "train") for f in files]
    good, skipped = _probe_all(base, listed, max_pixels, workers)
    records = [ImageRecord(item[0], 0, "train") for item in good]
    digest = _fingerprint(base, records, ("images",), skipped, fingerprint)
    return ImageSet(base, tuple(records), ("images",), tuple(skipped), digest)


# A listed file before splitting: (relative path, class name, split or None).
_Listed = tuple[str, str, str | None]


def _scan_folders(root: Path) -> tuple[list[_Listed], list[Skipped]]:
    subdirs = _visible_dirs(root)
    split_dirs = {
        _SPLIT_ALIASES[d.name.lower()]: d
        for d in subdirs
        if d.name.lower() in _SPLIT_ALIASES
    }
    if split_dirs:
        if "train" not in split_dirs:
            raise DataError(
                f"{root} has split folders {sorted(split_dirs)} but no train/; "
                "add a train/ folder of class folders"
            )
        others = [d.name for d in subdirs if d.name.lower() not in _SPLIT_ALIASES]
        if others:
            raise DataError(
                f"{root} mixes split folders with other folders {others}; keep "
                "only train/, val/, test/ at the top (each holding class folders)"
            )
    listed: list[_Listed] = []
    skipped: list[Skipped] = []
    folders: list[tuple[str | None, Path]] = [(None, root)]
    if split_dirs:
        folders = list(sorted(split_dirs.items()))
    for split, folder in folders:
        _scan_classes(root, folder, split, listed, skipped)
    return listed, skipped


def _scan_classes(
    root: Path,
    folder: Path,
    split: str | None,
    listed: list[_Listed],
    skipped: list[Skipped],
) -> None:
    classes = _visible_dirs(folder)
    loose = _visible_files(folder)
    if not classes:
        hint = " (it holds files but no class folders)" if loose else ""
        raise DataError(
            f"{folder} has no class folders{hint}. Put each class's images in a "
            "subfolder named after the class, e.g. data/cats/1.jpg"
        )
    for file in loose:
        skipped.append(Skipped(_rel(root, file), "not inside a class folder"))
    # NOTE: paths as strings, not Path objects: Path arithmetic was a third
    # of the listing time of 100k files.
    prefix = len(os.path.join(str(root), ""))
    for class_dir in classes:
        files = sorted(_walk_files(class_dir))
        if not files:
            where = f"{split}/" if split else ""
            raise DataError(
                f"class {class_dir.name!r} has no images ({where}{class_dir.name} "
                f"in {root}); add images or remove the folder"
            )
        listed.extend((_posix(f[prefix:]), class_dir.name, split) for f in files)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in _entries(folder) if p.is_dir())


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in _entries(folder) if p.is_file())


def _entries(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as err:
        _unreadable_folder(err)


def _unreadable_folder(err: OSError) -> NoReturn:
    """A folder the listing cannot open: never "no images", which it may hold.

    Raises:
        DataError: naming the folder, the reason and the fix.
    """
    raise DataError(
        f"cannot list the folder {err.filename} ({err.strerror}); give the user "
        f"running quadrant read access to it (chmod -R u+rX '{err.filename}') "
        "or move it out of data.root"
    )


def list_files(folder: Path) -> list[str]:
    """Every visible file under `folder`, sorted, as extraction lists them:
    links followed (no folder twice), dot files and folders left out;
    entries that are not regular files (FIFOs, dangling links) included, for
    the caller to report.

    Raises:
        DataError: a folder cannot be listed.
    """
    return sorted(_walk_files(folder))


def _walk_files(folder: Path) -> Iterable[str]:
    # NOTE: dot files (.DS_Store, editor swap files) are never images; nested
    # folders inside a class folder belong to the class. Symbolic links to
    # folders are followed (data sets are often assembled from links), but no
    # folder is visited twice, so a link to a parent cannot loop.
    seen: set[tuple[int, int]] = set()
    walk = os.walk(folder, onerror=_unreadable_folder, followlinks=True)
    for dirpath, dirnames, filenames in walk:
        here = os.stat(dirpath)
        if (here.st_dev, here.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield os.path.join(dirpath, name)


def _rel(root: Path, file: Path) -> str:
    return file.relative_to(root).as_posix()


def _posix(relative: str) -> str:
    return relative if os.sep == "/" else relative.replace(os.sep, "/")


def _manifest_columns(csv_path: Path, header: list[str]) -> dict[str, int]:
    """Where path, label and split are (the last column of a name wins, as
    with csv.DictReader).

    Raises:
        DataError: no path or label column.
    """
    columns = [c.strip().lower() for c in header]
    if "path" not in columns or "label" not in columns:
        raise DataError(
            f"{csv_path} needs a header row with columns path,label[,split]; "
            f"found {header or None}"
        )
    wanted = ("path", "label", "split")
    return {c: i for i, c in enumerate(columns) if c in wanted}


def _read_manifest(csv_path: Path) -> tuple[list[_Listed], list[Skipped]]:
    if csv_path.suffix.lower() != ".csv":
        raise DataError(
            f"data.root {csv_path} is a file but not a .csv manifest; point it at "
            "a folder of class folders or a CSV with columns path,label[,split]"
        )
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        at = _manifest_columns(csv_path, header)
        # NOTE: one pass over plain rows (no dict per row, no list of all
        # rows, the common cells checked inline): a million-row manifest
        # loads in about a second.
        at_path, at_label, at_split = at["path"], at["label"], at.get("split")
        width = max(at.values()) + 1
        splits: dict[str, str | None] = {"": None}
        listed: list[_Listed] = []
        first: dict[str, tuple[int, _Listed]] = {}
        clashes: dict[str, list[tuple[int, _Listed]]] = {}
        for line, row in enumerate(reader, start=2):
            if not row:
                continue  # a blank line, as csv.DictReader skips them
            if len(row) > len(header):
                raise DataError(
                    f"{csv_path} line {line} has {len(row)} cells, the header "
                    f"{len(header)} ({','.join(header)}); quote a path or label "
                    'that holds a comma ("a,b.jpg"), or remove the extra cells'
                )
            if len(row) < width:
                item = _manifest_row(csv_path, line, row, at)
            else:
                path, label = row[at_path].strip(), row[at_label].strip()
                raw = "" if at_split is None else row[at_split].strip()
                if not path or not label or raw not in splits:
                    item = _manifest_row(csv_path, line, row, at)
                    splits[raw] = item[2]
                else:
                    item = (_manifest_path(path), label, splits[raw])
            seen = first.setdefault(item[0], (line, item))
            if seen[0] != line:
                others = clashes.get(item[0], [seen])
                if any(entry == item for _, entry in others):
                    log.warning(
                        "%s line %d repeats an earlier row; dropped", csv_path, line
                    )
                    continue
                clashes[item[0]] = [*others, (line, item)]
            listed.append(item)
    for path, entries in sorted(clashes.items(), key=lambda kv: kv[1][0][0]):
        raise DataError(
            f"{csv_path} lists {path} on lines {[n for n, _ in entries]} with "
            f"different labels or splits ({[e[1:] for _, e in entries]}); one "
            "image has one label and one split: keep one of the rows"
        )
    if not listed:
        raise DataError(f"{csv_path} lists no images")
    return listed, []


def _manifest_row(
    csv_path: Path, line: int, row: list[str], at: dict[str, int]
) -> _Listed:
    def cell(name: str) -> str:
        i = at.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    path, label, split = cell("path"), cell("label"), cell("split") or None
    if not path or not label:
        raise DataError(f"{csv_path} line {line}: path and label must not be empty")
    if split is not None:
        if split.lower() not in _SPLIT_ALIASES:
            raise DataError(
                f"{csv_path} line {line}: split {split!r} is not one of "
                f"{list(SPLITS)} (or empty to split automatically)"
            )
        split = _SPLIT_ALIASES[split.lower()]
    return _manifest_path(path), label, split


def _manifest_path(text: str) -> str:
    """A manifest's path as Path(text) spells it (posix form if relative)."""
    # NOTE: a Path per row was a third of a million-row manifest's load
    # time; most paths are already in the form Path gives them.
    if os.sep == "/" and not _not_plain(text):
        return text
    path = Path(text)
    return path.as_posix() if not path.is_absolute() else str(path)


def _not_plain(text: str) -> bool:
    """Whether Path() may spell `text` otherwise: absolute, "./" or "/./"
    parts, "//", a trailing "/" or "/.", a lone "." (and, to be safe, any
    name starting with "." and any "/." such as "/..")."""
    return text[0] in "./" or "//" in text or "/." in text or text[-1] == "/"


def _one_entry_per_file(
    base: Path, listed: list[_Listed], *, links: bool
) -> list[_Listed]:
    """Each file once: the same file reached twice (links, two spellings of a
    path) keeps one entry when label and split agree, and is refused when
    they do not, since one image in two classes or two splits poisons both.

    `links`: resolve symbolic links (folders); a manifest's paths are only
    normalised, which keeps a million-row CSV quick.

    Raises:
        DataError: naming the entries of a file listed with different labels
            or splits.
    """
    same = _real_paths(str(base)) if links else _normal_paths(str(base))
    first: dict[str, _Listed] = {}
    repeats: dict[str, list[_Listed]] = {}
    for item in listed:
        file = same(item[0])
        if file in first:
            repeats.setdefault(file, [first[file]]).append(item)
        else:
            first[file] = item
    kept = []
    for file, item in first.items():
        items = repeats.get(file)
        if items is None:
            kept.append(item)
            continue
        file = os.path.join(base, file)  # absolute, for the messages
        if len({(label, split) for _, label, split in items}) > 1:
            shown = [
                f"{path} ({label}, {split or 'auto split'})"
                for path, label, split in items
            ]
            raise DataError(
                f"{file} is listed {len(items)} times with different labels or "
                f"splits: {shown}. One image must have one label and one split: "
                "remove the extra links or rows"
            )
        log.warning(
            "%s is reached %d times (%s); using it once",
            file,
            len(items),
            ", ".join(path for path, _, _ in items),
        )
        kept.append(min(items))
    return kept


def _normal_paths(base: str) -> Callable[[str], str]:
    """A key per file for a manifest's paths: the path relative to `base`.

    NOTE: a manifest's relative paths without ".." are already their own
    key (the reader spelled them as Path does); only absolute paths and ".."
    parts need normpath, which was most of a million-row manifest's dedupe.
    """
    prefix = os.path.join(base, "")

    def normal(relative: str) -> str:
        if relative[0] != "/" and ".." not in relative:
            return relative
        full = os.path.normpath(os.path.join(base, relative))
        return full[len(prefix) :] if full.startswith(prefix) else full

    return normal


def _real_paths(base: str) -> Callable[[str], str]:
    """realpath of files under `base`, resolving each folder once.

    NOTE: os.path.realpath checks every component of every path; a file
    that is not itself a link lies in its folder's real path, so one lstat
    per file (and one realpath per folder) gives the same answer.
    """
    folders: dict[str, str] = {}

    def real(relative: str) -> str:
        path = os.path.join(base, relative)
        if os.path.islink(path):
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        return os.path.join(folders[folder], name)

    return real


def _probe_all(
    base: Path, listed: list[_Listed], max_pixels: int, workers: int
) -> tuple[list[_Listed], list[Skipped]]:
    def probe(item: _Listed) -> str | None:
        try:
            probe_image(base / item[0], max_pixels=max_pixels)
        except ImageDecodeError as err:
            return str(err).removeprefix(f"{base / item[0]}: ")
        return None

    def probe_many(items: Sequence[_Listed]) -> list[str | None]:
        return [probe(item) for item in items]

    # Header reads are I/O bound: threads overlap them. Files go to the
    # threads in chunks: one future per file cost more than the probe.
    chunks = [listed[i : i + _CHUNK] for i in range(0, len(listed), _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = [r for part in pool.map(probe_many, chunks) for r in part]
    good = [
        item for item, reason in zip(listed, reasons, strict=True) if reason is None
    ]
    bad = [
        Skipped(item[0], reason)
        for item, reason in zip(listed, reasons, strict=True)
        if reason is not None
    ]
    return good, bad


# How many skipped files an error about them lists.
_SHOWN_SKIPS = 5

# (root, path, reason) already warned about in this process: one command
# lists the data once per stage, and each skipped file is said once.
_WARNED: set[tuple[str, str, str]] = set()


def warn_skipped(root: Path, skipped: Sequence[Skipped]) -> None:
    """Log each skipped file and its reason once per process."""
    for s in skipped:
        key = (str(root), s.path, s.reason)
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("skipped %s: %s", s.path, s.reason)


def _no_images_error(root: Path, base: Path, skipped: Sequence[Skipped]) -> DataError:
    """Why nothing under `root` is usable: the first skipped files and reasons."""
    if not skipped:
        return DataError(
            f"no images under {root}; put images (.jpg, .png, ...) in one folder "
            "per class, or list them in a CSV manifest"
        )
    shown = "\n".join(f"  {s.path}: {s.reason}" for s in skipped[:_SHOWN_SKIPS])
    more = len(skipped) - _SHOWN_SKIPS
    if more > 0:
        shown += f"\n  ... and {more} more (all are in the log)"
    fix = "fix or remove these files"
    if root.is_file() and all("not found" in s.reason for s in skipped):
        fix = (
            f"a manifest's paths are relative to the CSV's own folder, {base}: "
            "rewrite them relative to it, or make them absolute"
        )
    return DataError(
        f"no readable images under {root}: all {len(skipped)} listed files were "
        f"skipped; {fix}:\n{shown}"
    )


def _label_names(listed: Sequence[_Listed], root: Path) -> tuple[str, ...]:
    names = sorted({item[1] for item in listed})
    if len(names) == 1:
        log.warning("only one class (%r) under %s", names[0], root)
    return tuple(names)


def _split(
    listed: Sequence[_Listed],
    label_names: tuple[str, ...],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    root: Path,
) -> list[ImageRecord]:
    index = {name: i for i, name in enumerate(label_names)}
    given = {item[2] for item in listed if item[2] is not None}
    carve = {"val": val_fraction, "test": test_fraction}
    carve = {s: f for s, f in carve.items() if s not in given and f > 0}
    by_class: dict[str, list[_Listed]] = defaultdict(list)
    records = []
    for item in listed:
        if item[2] in (None, "train"):
            by_class[item[1]].append(item)
        else:
            records.append(ImageRecord(item[0], index[item[1]], str(item[2])))
    _check_classes_have_training_images(listed, label_names, by_class, root)
    for name, items in sorted(by_class.items()):
        records.extend(_split_class(items, index[name], carve, seed, root))
    return records


def _check_classes_have_training_images(
    listed: Sequence[_Listed],
    label_names: tuple[str, ...],
    by_class: dict[str, list[_Listed]],
    root: Path,
) -> None:
    for name in label_names:
        if name not in by_class:
            splits = sorted({str(i[2]) for i in listed if i[1] == name})
            raise DataError(
                f"class {name!r} has {'/'.join(splits)} images but no training "
                f"images in {root}; add training images for it or remove it"
            )


def _split_class(
    items: list[_Listed],
    label: int,
    carve: dict[str, float],
    seed: int,
    root: Path,
) -> list[ImageRecord]:
    """Carve val/test out of one class's training images with a seeded shuffle."""
    name = items[0][1]
    needed = 1 + len(carve)
    if len(items) < needed:
        raise DataError(
            f"class {name!r} has {len(items)} usable image(s) in {root}, too few "
            f"to split into train/{'/'.join(carve)} (needs >= {needed}); add "
            "images, or set data.val_fraction / data.test_fraction to 0"
        )
    items = sorted(items)
    # A per-class seed makes each class's split independent of the other classes.
    class_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8])
    # NOTE: a list, not an array: indexing a list with numpy integers was
    # half of a million-row split.
    order = np.random.default_rng(class_seed).permutation(len(items)).tolist()
    records, start = [], 0
    for done, (split, fraction) in enumerate(carve.items()):
        later = len(carve) - done - 1  # each later split and train keep >= 1 image
        count = max(1, round(fraction * len(items)))
        count = min(count, len(items) - start - later - 1)
        for i in order[start : start + count]:
            records.append(ImageRecord(items[i][0], label, split))
        start += count
    records.extend(ImageRecord(items[i][0], label, "train") for i in order[start:])
    return records


def _fingerprint(
    base: Path,
    records: Sequence[ImageRecord],
    label_names: Sequence[str],
    skipped: Sequence[Skipped],
    how: str,
) -> str:
    """A digest that changes when any image is added, removed or modified."""
    digest = hashlib.sha256(f"{how}\n".encode())
    entries = [(r.path, label_names[r.label], r.split) for r in records]
    entries += [(s.path, "<skipped>", "") for s in skipped]
    entries.sort()
    ids = _file_ids(str(base), [path for path, _, _ in entries], how)
    # NOTE: one update per block of lines, not per line: the same digest
    # (sha256 of the concatenation), a fraction of the calls.
    lines = [
        f"{path}\t{label}\t{split}\t{file_id}\n"
        for (path, label, split), file_id in zip(entries, ids, strict=True)
    ]
    for begin in range(0, len(lines), 65536):
        digest.update("".join(lines[begin : begin + 65536]).encode())
    return digest.hexdigest()


def _file_ids(base: str, paths: Sequence[str], how: str) -> list[str]:
    if how != "content":
        # NOTE: stat calls in threads were slower here than in one loop (the
        # GIL); a plain prefix instead of os.path.join saves a third.
        if os.sep != "/":
            return [_file_id(os.path.join(base, path), how) for path in paths]
        prefix = os.path.join(base, "")
        return [
            _file_id(path if path[:1] == "/" else prefix + path, how) for path in paths
        ]
    # Reading and hashing whole files is I/O bound (hashlib releases the GIL).
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [
            file_id
            for part in pool.map(
                lambda part: [_file_id(os.path.join(base, p), how) for p in part],
                chunks,
            )
            for file_id in part
        ]


def _file_id(file: str, how: str) -> str:
    try:
        if how == "content":
            with open(file, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        stat = os.stat(file)
    except OSError as err:
        return f"unreadable:{err.errno}"
    return f"{stat.st_size}:{stat.st_mtime_ns}"
