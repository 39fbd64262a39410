"""Pooling specs: parsed without torch.

Spatial maps (N, C, H, W) are pooled with "avg", "max", "avg+max" or "grid:K";
token sequences (N, L, D) of vision transformers also with "cls" (the class
token), "patch_avg" (the mean of the patch tokens, leaving out the class and
register tokens) or "cls+patch_avg" (both, concatenated, as DINOv2's linear
evaluation does). The config parser validates pooling names with this module,
so reading conf.toml (and `quadrant --help`) does not import torch; the pooling
itself runs in `features.layers.pool`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from features.names import SPATIAL_POOLINGS, TOKEN_POOLINGS

_GRID = re.compile(r"^grid:(\d+)$")
CHOICES = "avg, max, avg+max, grid:K with K >= 1, cls, patch_avg or cls+patch_avg"


@dataclass(frozen=True)
class Pooling:
    """How a spatial map (N, C, H, W) or token sequence (N, L, D) becomes a vector."""

    kind: str  # "avg", "max", "avg+max", "grid", "cls", "patch_avg", "cls+patch_avg"
    grid: int = 0

    @property
    def spec(self) -> str:
        return f"grid:{self.grid}" if self.kind == "grid" else self.kind

    @property
    def tokens_only(self) -> bool:
        """Whether this pooling needs token outputs (N, L, D)."""
        return self.kind in TOKEN_POOLINGS

    def dims(self, channels: int) -> int:
        """Code length for a map with `channels` channels (or tokens of that width)."""
        if self.kind in ("avg+max", "cls+patch_avg"):
            return 2 * channels
        if self.kind == "grid":
            return channels * self.grid * self.grid
        return channels


def parse_pooling(spec: str) -> Pooling:
    """Parse a pooling spec (see the module docstring).

    Raises:
        ValueError: for any other spelling.
    """
    if spec in SPATIAL_POOLINGS or spec in TOKEN_POOLINGS:
        return Pooling(spec)
    match = _GRID.match(spec)
    if match and int(match.group(1)) >= 1:
        return Pooling("grid", int(match.group(1)))
    raise ValueError(f"{spec!r} is not a pooling; use {CHOICES}")
