"""Every file quadrant writes goes through here: whole or not at all.

A file is written under a hidden temporary name beside its final name,
fsynced, and renamed over the final name; the folder entry is fsynced too. So
a reader, or a run killed at any instant, sees the old file or the new one,
never half of one. On an exception the temporary is removed; a process killed
outright (SIGKILL, power loss) leaves it behind, and `remove_stale` (called at
the start of every command on its output folders) deletes it.

Temporary names are `.<name>.tmp-<pid>-<n>@<host>`: hidden, so data discovery
and a user listing the folder do not see them, and marked with the process
that owns them, so only the leftovers of dead processes are removed.

Writing errors that the user can fix (a full disk, a read-only folder, a file
where a folder should be) become one `OutputError` naming the path and the
fix, with the temporary already removed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from features.errors import (
    OutputError,
    PipelineError,
    RecordError,
    StageInputError,
)

log = logging.getLogger(__name__)

_HOST = socket.gethostname().replace("/", "_") or "localhost"
_COUNTER = itertools.count()
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-\d+@(?P<host>.+)$"
)

# errno values that mean "this path cannot be written", each with its fix.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)


def _leftover_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{next(_COUNTER)}@{_HOST}")


@contextlib.contextmanager
def atomic_path(path: Path, *, setting: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; publish it on success.

    For libraries that write to a file name themselves (onnx.save, h5py,
    matplotlib, the ONNX quantisers). The caller writes the whole file to the
    yielded path; on leaving the block it is fsynced and renamed over `path`.

    Raises:
        OutputError: the file cannot be written (no space, read-only, a file
            where a folder should be); the temporary is removed.
    """
    path = Path(path)
    make_folder(path.parent, setting=setting)
    tmp = _leftover_name(path, "tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError | RuntimeError) and writing_error(err):
            raise output_error(path, err, setting=setting) from err
        raise


@contextlib.contextmanager
def atomic_open(
    path: Path, mode: str = "w", *, setting: str | None = None, **kwargs: Any
) -> Iterator[IO[Any]]:
    """`open(path, mode)` whose result appears at `path` only once complete.

    `setting`: the option that chose `path`, named in a write error's fix.
    """
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, setting=setting) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON (non-JSON values as strings) atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def require_file(
    path: Path,
    *,
    what: str = "",
    fix: str,
    error: type[PipelineError] = StageInputError,
) -> Path:
    """`path`, when it is a file; else one `error` saying it is missing or a
    folder (a path to a folder is a different mistake from a typo).

    Args:
        path: the file wanted.
        what: what the file is ("config file"), put before the path.
        fix: how the user gets it right.
        error: the exception class to raise.
    """
    path = Path(path)
    if path.is_file():
        return path
    name = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise error(f"{name} is a folder, not a file; {fix}")
    raise error(f"{name} not found; {fix}")


def read_json(path: Path, *, fix: str = "") -> Any:
    """The data of a JSON record `write_json` wrote, read back whole.

    Args:
        path: the record.
        fix: how the user gets a good record back (the command that writes
            it), added to either error.

    Raises:
        StageInputError: the record is missing.
        RecordError: it is not readable JSON (changed since quadrant wrote it).
    """
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        text = path.read_bytes().decode("utf-8")
    except (FileNotFoundError, IsADirectoryError):
        require_file(path, fix=fix or "run the command that writes it")
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path} cannot be read ({err}){hint}") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise RecordError(
            f"{path} is not valid JSON ({err}): it changed since quadrant wrote "
            f"it{hint}"
        ) from None


def read_optional_json(path: Path, *, fix: str = "") -> Any:
    """`read_json`, or None when the record does not exist (yet).

    Raises:
        RecordError: it exists but is not readable JSON.
    """
    try:
        return read_json(path, fix=fix)
    except StageInputError:
        return None


def read_torch(
    path: Path,
    *,
    what: str,
    fix: str,
    error: type[PipelineError] = RecordError,
) -> Any:
    """A file `torch.save` wrote, loaded without running any code it holds.

    `weights_only=True` refuses pickled objects other than tensors and
    containers; a planted pickle, a damaged zip or another format is one
    `error` naming the file, `what` it should be, the reason and `fix`.

    Raises:
        StageInputError: the file is missing.
        PipelineError: `error`, when the file cannot be loaded safely.
    """
    import torch

    path = require_file(path, fix=fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "unreadable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise error(
            f"{path} is not {what} that loads safely ({type(err).__name__}: "
            f"{reason}); {fix}"
        ) from None


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file with LF line ends (not the csv module's CRLF) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty hidden folder; on success it replaces `final` as a whole.

    A folder of files that belong together (a trained model and its record)
    is published in one step: readers see the old folder or the new one. A
    non-empty folder cannot be renamed over another, so the old one moves
    aside first; `remove_stale` puts it back if the process dies in between.
    """
    final = Path(final)
    make_folder(final.parent)
    staging = _leftover_name(final, "tmp")
    try:
        staging.mkdir()
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _swap_into_place(staging, final)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError | RuntimeError) and writing_error(err):
            raise output_error(final, err) from err
        raise


def _swap_into_place(staging: Path, final: Path) -> None:
    if not final.exists():
        os.replace(staging, final)
    else:
        old = _leftover_name(final, "old")
        os.replace(final, old)
        try:
            os.replace(staging, final)
        except BaseException:
            os.replace(old, final)  # NOTE: put the old folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(final.parent)


def make_folder(folder: Path, *, setting: str | None = None) -> Path:
    """`mkdir -p folder`, with an error that says what to fix.

    Raises:
        OutputError: `folder` (or a parent) is a file, or cannot be created.
    """
    folder = Path(folder)
    if folder.is_dir():
        return folder
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputError(
                f"cannot write into {folder}: {parent} is a file, not a folder. "
                f"Fix: remove or rename that file, or {_choose(setting)}"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(folder, err, setting=setting) from err
    return folder


def check_writable(folder: Path, *, setting: str | None = None) -> Path:
    """Make `folder` and prove a file can be created in it, before any compute.

    Raises:
        OutputError: naming the folder, the reason and the fix.
    """
    make_folder(folder, setting=setting)
    probe = _leftover_name(Path(folder) / "write-check", "tmp")
    try:
        probe.touch()
    except OSError as err:
        raise output_error(Path(folder), err, setting=setting) from err
    _remove(probe)
    return Path(folder)


def check_free_space(
    folder: Path, needed: int, *, what: str, setting: str | None = None
) -> None:
    """Refuse, before writing, work that the disk under `folder` cannot hold.

    NOTE: some writers cannot fail cleanly halfway (HDF5 leaves its library
    state broken after a failed write and can crash the process at exit), so
    a write whose size is known is checked against the free space first.

    Raises:
        OutputError: naming the folder, the free and needed space, the fix.
    """
    free = shutil.disk_usage(folder).free
    margin = 1 << 20  # metadata, chunk indices, small files beside
    if free < needed + margin:
        raise OutputError(
            f"cannot write {what} into {folder}: {free / 2**20:.1f} MiB free, about "
            f"{(needed + margin) / 2**20:.1f} MiB needed. Fix: free space there, or "
            f"{_choose(setting)}; then run the same command again: finished work "
            "is kept"
        )


def check_output_file(path: Path, *, setting: str | None = None) -> Path:
    """Check, before any compute, that a result file can be written at `path`.

    Raises:
        OutputError: `path` is a folder, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"cannot write {path}: it is a folder. Fix: give the path of a file, "
            f"e.g. {path / 'predictions.csv'}"
        )
    check_writable(path.parent, setting=setting)
    return path


def writing_error(err: BaseException) -> bool:
    """Whether `err` means "this path cannot be written" (not a bug of ours)."""
    return _writing_cause(err) is not None


def _writing_cause(err: BaseException) -> BaseException | None:
    """`err`, or the exception it was raised from or during, that says the
    path cannot be written.

    NOTE: torch.save on a full disk raises RuntimeError("... unexpected pos
    ...") while handling the file's OSError(ENOSPC), which stays only as the
    context; h5py reports HDF5 write failures as RuntimeError or OSError
    whose text carries the C errno ("errno = 28") but whose .errno is None.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None)
        if code in (*_NO_SPACE, *_NOT_WRITABLE, *_NOT_A_FOLDER, errno.EISDIR):
            return current
        text = str(current)
        if "errno = 28" in text or "No space left" in text or "Read-only" in text:
            return current
        current = current.__cause__ or current.__context__
    return None


def output_error(
    path: Path, err: BaseException, *, setting: str | None = None
) -> OutputError:
    """The one error for a path that cannot be written, with its fix."""
    err = _writing_cause(err) or err
    code = getattr(err, "errno", None)
    text = str(err)
    if code in _NO_SPACE or "errno = 28" in text or "No space left" in text:
        return OutputError(
            f"cannot write {path}: no space left on that disk (the partial file was "
            f"removed). Fix: free space there, or {_choose(setting)}; then run the "
            "same command again: finished work is kept"
        )
    if code in _NOT_WRITABLE or "Read-only" in text:
        return OutputError(
            f"cannot write {path}: {os.strerror(code) if code else text}. Fix: make "
            f"the folder writable, or {_choose(setting)}"
        )
    if code == errno.EISDIR:
        return OutputError(
            f"cannot write {path}: it is a folder. Fix: give the path of a file "
            "inside it, e.g. " + str(Path(path) / "predictions.csv")
        )
    return OutputError(f"cannot write {path} ({err}). Fix: {_choose(setting)}")


def _choose(setting: str | None) -> str:
    if setting:
        return f"set {setting} to a writable folder with free space"
    return "point run.out (or extract.cache_dir) at a writable folder with free space"


def remove_stale(folder: Path) -> list[Path]:
    """Remove what killed processes of this host left behind under `folder`.

    Temporary files and folders are deleted; a model folder that was moved
    aside when a process died between the two renames of `staged_folder` is
    put back. Leftovers of live processes and of other hosts are kept.

    Returns:
        The paths removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            match = _LEFTOVER.match(name)
            if match is None or not _dead(match):
                continue
            path = Path(dirpath) / name
            target = path.with_name(match["name"])
            if match["kind"] == "old" and not target.exists():
                os.replace(path, target)
                dirnames.append(target.name)  # and tidy inside it too
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove(path)
            done.append(path)
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).is_dir()]
    for path in done:
        log.info("removed %s, left by a process that was killed", path)
    return done


def _dead(match: re.Match[str]) -> bool:
    if match["host"] != _HOST:
        return False  # NOTE: another machine's process may still be writing it
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
        path.unlink()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    # NOTE: a rename is durable only once the folder entry is on disk too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
