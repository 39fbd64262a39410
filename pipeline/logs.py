"""Console and run-log logging, and the bookkeeping every command shares.

The console shows INFO and up (DEBUG with -v); every command that works on a
configured run also appends everything to `<run.out>/quadrant.log`. Other
libraries' loggers (skl2onnx, onnxruntime's quantiser, matplotlib ...) are
held at WARNING on both, unless `run.log_level = "debug"`.

`run_log` also checks, before any compute, that the run folder can be
written, removes what killed runs left there, and writes the resolved
configuration to `<run.out>/config.toml` once the command has succeeded, so
that file is always the record of a command that worked.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from features.atomic import check_writable, remove_stale, write_text
from pipeline.config import Config, config_to_dict, dump_toml

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN = ("pipeline", "features", "__main__", "benchmarks")


class _OwnOrWarnings(logging.Filter):
    """quadrant's records at any level; other libraries' at WARNING and up."""

    def __init__(self, everything: bool) -> None:
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        if self.everything or record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] in _OWN


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and notebooks swap it)."""

    _quadrant_console = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_console(level: str = "info") -> None:
    """Log to stderr at `level` (once per process)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_quadrant_console", False):
            root.removeHandler(handler)
    handler = _Console()
    handler.setLevel(level.upper())
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_OwnOrWarnings(level == "debug"))
    root.addHandler(handler)


@contextlib.contextmanager
def run_log(cfg: Config, command: str) -> Iterator[Path]:
    """Check and tidy the run folder, log the command to quadrant.log, and
    record the configuration once the command succeeded.

    Yields:
        The run folder.

    Raises:
        OutputError: run.out is not a writable folder (before any compute).
    """
    layout = cfg.layout
    check_writable(layout.root, setting="run.out")
    remove_stale(layout.root)
    if not layout.cache_dir.is_relative_to(layout.root):
        remove_stale(layout.cache_dir)
    started = f"quadrant {command} (config: {cfg.source})"
    with command_log(layout.log, command, started, cfg.run.log_level == "debug"):
        yield layout.root
        write_text(layout.config, dump_toml(config_to_dict(cfg)))


@contextlib.contextmanager
def command_log(
    path: Path, command: str, started: str, debug: bool = False
) -> Iterator[None]:
    """Append what `command` logs to the file `path`, and how it ended."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_OwnOrWarnings(debug))
    root = logging.getLogger()
    root.addHandler(handler)
    _file_only(handler, logging.INFO, started)
    try:
        yield
    except BaseException as err:
        # The console shows the error once, from the CLI; the log keeps it too.
        _file_only(handler, logging.ERROR, f"{command} failed: {err!r}")
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def _file_only(handler: logging.Handler, level: int, message: str) -> None:
    record = logging.LogRecord(__name__, level, __file__, 0, message, None, None)
    handler.handle(record)
