"""Training checkpoints: written atomically, loaded without running code.

A checkpoint is written to a temporary file, fsynced, and renamed over the
previous one, so a kill during a save leaves the last good checkpoint intact.
Everything in it is tensors, numbers, strings and containers, so it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from features.atomic import atomic_open
from features.errors import CheckpointError

FORMAT = "quadrant-finetune"
FORMAT_VERSION = 1


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_open(path, "wb") as handle:
        torch.save(
            {"format": FORMAT, "format_version": FORMAT_VERSION, **state}, handle
        )


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`.

    Raises:
        CheckpointError: missing, unreadable or not a quadrant checkpoint.
    """
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and torch errors all mean "unreadable"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); "
            "delete it and use --restart"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a quadrant fine-tuning checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('format_version')}; this "
            f"quadrant writes {FORMAT_VERSION}. Use --restart."
        )
    return state


def rng_state() -> dict[str, Any]:
    """The torch random states (CPU and every CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
