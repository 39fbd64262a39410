"""Progress bars for long work: items/s and ETA on a terminal, sparse in logs."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(
    total: int, *, initial: int = 0, desc: str, enabled: bool, unit: str = "img"
) -> tqdm:
    """A tqdm bar with items/s and ETA; one update per 30 s when stderr is a file."""
    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
