"""Cache housekeeping: which caches a folder holds, and removing old ones.

A cache folder grows by one cache per setting, image list and backbone; a
nightly job's folder fills its disk. `quadrant cache prune FOLDER` removes
whole caches (the `codes-<key16>.h5` file, its `.shards/` folder and lock),
oldest first, by age (`--older-than 30d`) and/or until the folder fits a
size (`--max-size 50G`), never one a run folder's model was trained on
(`--keep-used-by RUN`) nor one being written (its lock is held), and with
`--dry-run` only says what it would remove.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import filelock

from features.atomic import read_optional_json
from features.errors import ConfigError, RecordError, StageInputError

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]i?B?|B)?$", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BYTES = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class CacheEntry:
    """One cache in a folder: its files, size and age."""

    file: Path  # codes-<key16>.h5, or the .shards folder of an unfinished one
    size_bytes: int
    modified: float  # when it was finished (or last written, unfinished)
    finished: bool

    def paths(self) -> list[Path]:
        """The cache file (when finished), its shards folder and its lock."""
        shards = self.file.with_suffix(".shards")
        lock = Path(f"{shards}.lock")
        return [p for p in dict.fromkeys((self.file, shards, lock)) if p.exists()]


def parse_age(text: str) -> float:
    """Seconds in "90m", "12h", "30d", "2w".

    Raises:
        ConfigError: naming the value and the form.
    """
    match = _AGE.match(text.strip())
    if not match:
        raise ConfigError(f"--older-than {text!r}: give an age such as 12h, 30d or 2w")
    return float(match[1]) * _SECONDS[match[2]]


def parse_size(text: str) -> int:
    """Bytes in "500M", "50G", "1.5T", "200GiB".

    Raises:
        ConfigError: naming the value and the form.
    """
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(f"--max-size {text!r}: give a size such as 500M or 50G")
    unit = (match[2] or "").upper()[:1]
    return int(float(match[1]) * _BYTES[unit])


def list_caches(folder: Path) -> list[CacheEntry]:
    """Every cache in `folder`, finished or not, oldest first.

    Raises:
        StageInputError: `folder` is not a folder.
    """
    if not folder.is_dir():
        raise StageInputError(
            f"{folder} is not a folder; give a cache folder (<run.out>/cache or "
            "extract.cache_dir)"
        )
    entries = []
    for file in folder.glob("codes-*.h5"):
        shards = file.with_suffix(".shards")
        entries.append(
            CacheEntry(file, _bytes(file) + _bytes(shards), file.stat().st_mtime, True)
        )
    for shards in folder.glob("codes-*.shards"):
        if shards.is_dir() and not shards.with_suffix(".h5").exists():
            entries.append(
                CacheEntry(shards, _bytes(shards), _newest(shards), finished=False)
            )
    return sorted(entries, key=lambda e: e.modified)


def used_caches(runs: list[Path]) -> set[Path]:
    """The caches the models of these run folders were trained on."""
    used = set()
    for run in runs:
        for record in Path(run).glob("models/*/model.json"):
            try:
                data = read_optional_json(record)
            except RecordError:
                continue  # an unreadable record names nothing to keep
            cache = ((data or {}).get("codes") or {}).get("cache")
            if cache:
                used.add(Path(cache).resolve())
    return used


def select(
    entries: list[CacheEntry],
    *,
    older_than: float | None,
    max_size: int | None,
    keep: set[Path],
    now: float | None = None,
) -> list[CacheEntry]:
    """The caches to remove: older than the age, then the oldest until the
    rest fit `max_size`; never one in `keep` or one being written."""
    now = time.time() if now is None else now
    candidates = [
        e for e in entries if e.file.resolve() not in keep and not _being_written(e)
    ]
    chosen = [
        e
        for e in candidates
        if older_than is not None and now - e.modified > older_than
    ]
    if max_size is not None:
        total = sum(e.size_bytes for e in entries) - sum(e.size_bytes for e in chosen)
        for entry in candidates:
            if total <= max_size:
                break
            if entry not in chosen:
                chosen.append(entry)
                total -= entry.size_bytes
    return sorted(chosen, key=lambda e: e.modified)


def remove(entry: CacheEntry) -> None:
    """Remove a cache whole: the file first, so no reader finds it half gone."""
    for path in entry.paths():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _being_written(entry: CacheEntry) -> bool:
    lock_paths = [p for p in entry.paths() if p.name.endswith(".lock")]
    for path in lock_paths:
        lock = filelock.FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return True
        lock.release()
    return False


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _newest(folder: Path) -> float:
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()]
    return max(times, default=folder.stat().st_mtime)


def describe(entry: CacheEntry) -> str:
    state = "" if entry.finished else " (unfinished)"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified))
    return f"{entry.file.name}{state}: {entry.size_bytes / 2**20:.1f} MiB, {when}"
