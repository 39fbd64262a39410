"""Console and run-log logging.

The console shows INFO and up (DEBUG with -v); every command that works on a
configured run also appends everything to `<run.out>/quadrant.log` and keeps a
copy of the resolved configuration beside it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from features.cache import atomic_write_text
from pipeline.config import Config, config_to_dict, dump_toml

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    root.addHandler(handler)
    # Third-party chatter stays out of the console.
    for noisy in ("matplotlib", "PIL", "h5py", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def run_log(cfg: Config, command: str) -> Iterator[Path]:
    """Append this command's log to `<run.out>/quadrant.log`; save the config.

    Yields:
        The run folder.
    """
    out = cfg.run.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.toml", dump_toml(config_to_dict(cfg)))
    handler = logging.FileHandler(out / "quadrant.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    _file_only(handler, logging.INFO, f"quadrant {command} (config: {cfg.source})")
    try:
        yield out
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
