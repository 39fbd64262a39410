"""What training keeps: checkpoints, the best model, early stopping, the history.

Each is a small object that owns its state and saves and restores it, as
timm's `CheckpointSaver` and Lightning's `EarlyStopping` do, so the training
loop only loops:

- `BestModel` tracks the best epoch by the monitored value and keeps its
  weights in `best.pt`;
- `EarlyStopping` counts epochs without improvement against the patience;
- `History` holds the metrics per epoch and writes them (JSON, CSV, plot);
- `CheckpointSaver` writes `last.pt` after every epoch, with everything a
  resume needs, and restores it exactly.

A checkpoint is written to a temporary file, fsynced, and renamed over the
previous one, so a kill during a save leaves the last good checkpoint intact.
Everything in it is tensors, numbers, strings and containers, so it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from features.atomic import atomic_open, read_torch, write_json, write_text
from features.errors import CheckpointError
from pipeline import plots
from pipeline.layout import ModelFiles

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
    state = read_torch(
        path,
        what="a readable checkpoint",
        fix="delete it and use --restart",
        error=CheckpointError,
    )
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


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's weights (a state_dict: loads with weights_only=True)."""
    with atomic_open(path, "wb") as handle:
        torch.save(model.state_dict(), handle)


@dataclass
class BestModel:
    """The best epoch by the monitored value, its weights kept in `path`."""

    monitor: str
    path: Path
    value: float | None = None
    epoch: int = -1

    def update(self, value: float, epoch: int, model: nn.Module) -> bool:
        """Whether `value` is the best so far; if so its weights are saved."""
        lower = self.monitor == "loss"
        better = self.value is None or (
            value < self.value if lower else value > self.value
        )
        if better:
            self.value, self.epoch = value, epoch
            save_weights(model, self.path)
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.value, "best_epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value, self.epoch = state["best_value"], int(state["best_epoch"])


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without a better value (0: never)."""

    patience: int
    bad_epochs: int = 0

    def update(self, improved: bool) -> bool:
        """Count this epoch; whether training should stop now."""
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bad_epochs = int(state["bad_epochs"])


@dataclass
class History:
    """The metrics of every epoch, and the files that show them."""

    monitor: str
    title: str
    epochs: list[dict[str, float]] = field(default_factory=list)

    def write(self, files: ModelFiles, best: BestModel) -> None:
        """finetune.json, finetune.csv and training_curves.png into `files`."""
        write_json(
            files.history_json,
            {
                "epochs": self.epochs,
                "best_epoch": best.epoch,
                "best_value": best.value,
                "monitor": self.monitor,
            },
        )
        keys = list(self.epochs[0])
        lines = [",".join(keys)] + [
            ",".join(f"{row[k]:.6g}" for k in keys) for row in self.epochs
        ]
        write_text(files.history_csv, "\n".join(lines) + "\n")
        plots.training_curves(self.epochs, files.curves, title=self.title)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epochs = list(state["history"])


@dataclass
class CheckpointSaver:
    """`last.pt`: the whole training state after every epoch, for --resume.

    Attributes:
        path: the checkpoint file.
        identity: the backbone, init and preprocessing it belongs to.
        label_names: the classes it was trained on.
    """

    path: Path
    identity: dict[str, Any]
    label_names: tuple[str, ...]

    def save(self, parts: Sequence[Any], epoch: int) -> None:
        """Every part's state (model, optimiser, trackers ...), the epoch, RNG."""
        state: dict[str, Any] = {
            "identity": self.identity,
            "label_names": list(self.label_names),
            "epoch": epoch,
            "rng": rng_state(),
        }
        for part in parts:
            state.update(part.state_dict())
        save(self.path, state)

    def check_unasked(self, *, resume: bool, restart: bool) -> None:
        """Refuse to overwrite an existing checkpoint unless asked to.

        Raises:
            CheckpointError: naming the epoch it holds and both flags.
        """
        if self.path.exists() and not (resume or restart):
            done = load(self.path)["epoch"]
            raise CheckpointError(
                f"a checkpoint after epoch {done} exists at {self.path}; pass "
                "--resume to continue it or --restart to start over"
            )

    def restore(self, parts: Sequence[Any]) -> int:
        """Load every part's state from the checkpoint; return its epoch.

        Raises:
            CheckpointError: unreadable, or made for other classes or another
                setup (naming each difference).
        """
        state = load(self.path)
        self._check(state)
        for part in parts:
            part.load_state_dict(state)
        set_rng_state(state["rng"])
        return int(state["epoch"])

    def _check(self, state: Mapping[str, Any]) -> None:
        if tuple(state["label_names"]) != self.label_names:
            raise CheckpointError(
                f"{self.path} was trained on classes {state['label_names']}, the "
                f"data now has {list(self.label_names)}; use --restart"
            )
        if state["identity"] != self.identity:
            from features.cache import diff_provenance

            raise CheckpointError(
                f"{self.path} belongs to another setup:\n  "
                + "\n  ".join(diff_provenance(self.identity, state["identity"]))
                + "\nRestore the config it was trained with, or use --restart."
            )
