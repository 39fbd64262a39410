"""The advisor's pilot: the first part of the full fine-tune, under a budget.

`pilot` runs the same training as `quadrant finetune` (same settings,
schedule and seed) under a `Budget` of training images, validated at even
steps, and stops when the budget is spent. The advisor sets it against the
frozen codes; its checkpoint, when it ends on an epoch boundary, is where the
full fine-tune continues.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.finetune.loop import Dist
from pipeline.finetune.stage import prepare
from pipeline.models import predict_batches

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """A pilot's allowance of training images, and its validation curve so far.

    Attributes:
        images: training images (forward + backward) it may process at most.
        points: validation points spread evenly over `images`.
        init: the pilot's init, for the log.
        used: training images processed so far.
        curve: (images processed, validation accuracy) at each point reached.
        cut: training stopped part-way through an epoch.
        passed: intermediate validation points passed so far.
    """

    images: int
    points: int
    init: str = "pretrained"
    used: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    cut: bool = False
    passed: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.0
    _last: float | None = None

    def fits(self, batch: int) -> bool:
        """Whether a batch of `batch` images stays within the budget."""
        return self.used + batch <= self.images

    def next_point(self) -> bool:
        """Whether an intermediate validation point was just passed.

        Points lie at images x k / points for k < points (the end is the
        last point, recorded by the caller); a batch that passes several
        records one.
        """
        if self.used >= self.images:
            return False
        reached = min(self.points - 1, self.used * self.points // self.images)
        if reached > self.passed:
            self.passed = reached
            return True
        return False

    def record(self, batch: int, trainer: Any, *, head_only: bool) -> None:
        """Count a trained batch; validate mid-epoch at each point passed."""
        self.used += batch
        now = time.perf_counter()
        if self._last is not None:  # the first batch also waited for the loader
            self.timed_images += batch
            self.timed_seconds += now - self._last
        self._last = now
        if not self.next_point():
            return
        accuracy = trainer.validate()["accuracy"]
        self.curve.append((self.used, accuracy))
        log.info(
            "pilot (%s): %d of %d images, val accuracy %.4f",
            self.init,
            self.used,
            self.images,
            accuracy,
        )
        trainer.train_mode(head_only)
        self._last = time.perf_counter()  # the validation's time is not training's


@dataclass(frozen=True)
class PilotRun:
    """What a budgeted pilot fine-tune did and how it scored on validation.

    Attributes:
        init: "pretrained" or "scratch".
        budget: the training images it was allowed.
        images: the training images it processed (<= budget).
        full: the training images the full fine-tune processes.
        epochs: whole epochs completed (its checkpoint holds the last one).
        curve: (images processed, validation accuracy) along the way; the last
            point is the end of the pilot.
        val_paths: the validation images scored at the end (relative paths).
        val_correct: whether the pilot got each of them right.
        seconds: wall time.
        resumable: it ended on an epoch boundary with a checkpoint the full
            fine-tune can continue.
        warmup: training images in the learning-rate warm-up.
        images_per_second: training images per second, data loading
            included, validation excluded (the unit cost of the full run).
    """

    init: str
    budget: int
    images: int
    full: int
    epochs: int
    curve: tuple[tuple[int, float], ...]
    val_paths: tuple[str, ...]
    val_correct: tuple[bool, ...]
    seconds: float
    resumable: bool
    warmup: int = 0

    images_per_second: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.curve[-1][1]


def pilot(cfg: Config, *, share: float, points: int) -> PilotRun:
    """The first `share` of the full fine-tune, validated at `points` even steps.

    The pilot is the full fine-tune's own beginning: the same settings,
    schedule (warm-up and cosine over all `finetune.epochs`) and seed, in
    `<run.out>/finetune/` of the config it is given, which it starts afresh.
    Its budget is `share` of the full run's training images, in whole epochs
    when that is at least one epoch (so its checkpoint can be continued),
    else in batches. One process, whatever torchrun says.

    Raises:
        DataError: as `pipeline.finetune.run`.
    """
    start = time.perf_counter()
    prepared = prepare(cfg, Dist(), resume=False, restart=True)
    ft, trainer = prepared.cfg.finetune, prepared.trainer
    per_epoch = len(trainer.loaders[0]) * ft.batch_size
    allowed = pilot_budget(share, ft.epochs, per_epoch, ft.batch_size)
    budget = Budget(allowed, points, ft.init)
    log.info(
        "pilot fine-tune (%s init): %d training images, %.0f%% of the full "
        "fine-tune's %d (%d epochs x %d)",
        ft.init,
        budget.images,
        100 * budget.images / (per_epoch * ft.epochs),
        per_epoch * ft.epochs,
        ft.epochs,
        per_epoch,
    )
    trainer.fit(budget)
    val_paths, correct = _final_point(prepared, budget)
    return PilotRun(
        ft.init,
        budget.images,
        budget.used,
        per_epoch * ft.epochs,
        trainer.epoch,
        tuple(budget.curve),
        val_paths,
        correct,
        time.perf_counter() - start,
        not budget.cut and trainer.epoch >= 1,
        round(ft.warmup_epochs * per_epoch),
        budget.timed_images / budget.timed_seconds if budget.timed_seconds else 0.0,
    )


def _final_point(
    prepared: Any, budget: Budget
) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """Score every validation image at the pilot's end; the curve's last point."""
    trainer = prepared.trainer
    probs, labels, index = predict_batches(
        trainer.model, trainer.loaders[1], trainer.device, trainer.amp
    )
    correct = (probs.argmax(1) == labels).tolist() if len(labels) else []
    budget.curve.append((budget.used, float(sum(correct) / max(len(correct), 1))))
    val = [r.path for r in prepared.images.records if r.split == "val"]
    log.info(
        "pilot (%s): %d of %d images, val accuracy %.4f (end)",
        budget.init,
        budget.used,
        budget.images,
        budget.curve[-1][1],
    )
    return tuple(val[i] for i in index.tolist()), tuple(bool(c) for c in correct)


def pilot_budget(share: float, epochs: int, per_epoch: int, batch: int) -> int:
    """Training images for a pilot of `share` of `epochs` x `per_epoch` images.

    Whole epochs when the share covers at least one (rounded down, so the
    pilot never exceeds it); else whole batches, one at least.
    """
    whole = math.floor(share * epochs + 1e-9)
    if whole >= 1:
        return whole * per_epoch
    part = math.floor(share * epochs * per_epoch)
    return max(batch, part - part % batch)
