"""Pooling specs ("avg", "max", "avg+max", "grid:K"): parsed without torch.

The config parser validates pooling names with this module, so reading
conf.toml (and `quadrant --help`) does not import torch; the pooling itself
runs in `features.layers.pool`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GRID = re.compile(r"^grid:(\d+)$")
SPATIAL = ("avg", "max", "avg+max")


@dataclass(frozen=True)
class Pooling:
    """How a spatial map (N, C, H, W) or token sequence (N, L, D) becomes a vector."""

    kind: str  # "avg", "max", "avg+max" or "grid"
    grid: int = 0

    @property
    def spec(self) -> str:
        return f"grid:{self.grid}" if self.kind == "grid" else self.kind

    def dims(self, channels: int) -> int:
        """Code length for a map with `channels` channels."""
        if self.kind == "avg+max":
            return 2 * channels
        if self.kind == "grid":
            return channels * self.grid * self.grid
        return channels


def parse_pooling(spec: str) -> Pooling:
    """Parse "avg", "max", "avg+max" or "grid:K" (adaptive average to K x K).

    Raises:
        ValueError: for any other spelling.
    """
    if spec in SPATIAL:
        return Pooling(spec)
    match = _GRID.match(spec)
    if match and int(match.group(1)) >= 1:
        return Pooling("grid", int(match.group(1)))
    raise ValueError(
        f"{spec!r} is not a pooling; use avg, max, avg+max or grid:K with K >= 1"
    )
