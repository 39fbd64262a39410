"""The training loop alone: epochs of steps, validation, and the end of each epoch.

`Trainer.fit` trains the remaining epochs. Whatever is kept along the way
(the best model, early stopping, the history, the checkpoint) belongs to the
objects in `pipeline.finetune.checkpoints`, which the loop calls at the end
of every epoch; the optimiser and its schedule belong to `Optimization`.
Under torchrun every process runs the loop; rank 0 validates and saves, and
decides for every rank when early stopping ends the run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from features.backbones import head_name
from features.errors import TrainingError
from features.layers import parameters_before
from features.progress import progress_bar
from pipeline.config import FinetuneConfig
from pipeline.finetune.checkpoints import (
    BestModel,
    CheckpointSaver,
    EarlyStopping,
    History,
)
from pipeline.finetune.optim import Optimization
from pipeline.layout import ModelFiles
from pipeline.models import ImageClassifier, predict_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Keepers:
    """What is kept at the end of every epoch, in order (rank 0 only)."""

    best: BestModel
    stopping: EarlyStopping
    history: History
    saver: CheckpointSaver
    work: ModelFiles  # the history files, to watch a long run

    def end_epoch(
        self, trainer: Trainer, train: dict[str, float], val: dict[str, float]
    ) -> tuple[bool, bool]:
        """Record the epoch's metrics; (improved, stop now)."""
        row = {
            "epoch": trainer.epoch,
            "lr": trainer.optim.lr,
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }
        self.history.epochs.append(row)
        value = row[f"val_{self.history.monitor}"]
        improved = self.best.update(value, trainer.epoch, trainer.model)
        stop = self.stopping.update(improved)
        parts = [trainer, trainer.optim, self.best, self.stopping, self.history]
        self.saver.save(parts, trainer.epoch)
        self.history.write(self.work, self.best)
        return improved, stop

    def restore(self, trainer: Trainer) -> None:
        parts = [trainer, trainer.optim, self.best, self.stopping, self.history]
        trainer.epoch = self.saver.restore(parts)


@dataclass
class Trainer:
    """One training run's loop over its model, data and optimisation."""

    ft: FinetuneConfig
    model: ImageClassifier
    wrapped: nn.Module  # the model as trained: under DDP or torch.compile
    device: torch.device
    amp: torch.dtype | None
    world: Dist
    loaders: tuple[Any, Any]  # (train, val)
    optim: Optimization
    keepers: Keepers
    progress: bool = True
    epoch: int = 0
    deadline: float | None = None  # time.monotonic() by which training must end
    out_of_time: bool = False  # the deadline stopped it before its last epoch
    _criterion: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._criterion = nn.CrossEntropyLoss(label_smoothing=self.ft.label_smoothing)

    def fit(self, budget: Any = None) -> bool:
        """Train the remaining epochs; return True when early stopping ended it.

        With a budget (a pilot's `Budget`), training also stops when the next
        batch would exceed it; an epoch cut short is not checkpointed (a
        checkpoint always holds whole epochs, so a resume is exact).
        """
        last = 0.0
        while self.epoch < self.ft.epochs:
            if budget is not None and not budget.fits(self.ft.batch_size):
                return False
            if _no_time_for(self, last):
                return False
            start = time.monotonic()
            train = self.train_one_epoch(budget=budget)
            if budget is not None and budget.cut:
                return False
            val = self.validate() if self.world.main else {}
            self.epoch += 1
            if _end_epoch(self, train, val):
                return True
            last = time.monotonic() - start
        return False

    def train_one_epoch(self, budget: Any = None) -> dict[str, float]:
        """One pass over the training split; returns mean loss and accuracy.

        With a budget, the pass stops before a batch that would exceed it, and
        the validation accuracy is recorded at each of the budget's points.
        """
        head_only = self.epoch < self.ft.head_epochs
        train_loader = self.loaders[0]
        train_loader.sampler.set_epoch(self.epoch)
        train_loader.dataset.epoch = self.epoch
        sums = _Sums()
        freeze = frozen_body(self.model) if head_only else contextlib.nullcontext()
        with freeze, _epoch_bar(self, head_only) as bar:
            self.train_mode(head_only)
            for i, (images, labels, _) in enumerate(train_loader):
                if len(labels) == 0:
                    continue
                if budget is not None and not budget.fits(len(labels)):
                    budget.cut = True
                    break
                last = (i + 1) % self.ft.accumulate == 0 or i + 1 == len(train_loader)
                logits, loss = self._step(images, labels, self._criterion, sync=last)
                if last:
                    self.optim.step(self.model)
                sums.add(logits, labels, loss)
                bar.update(len(labels))
                bar.set_postfix(loss=f"{sums.loss / sums.seen:.4f}", refresh=False)
                if budget is not None:
                    budget.record(len(labels), self, head_only=head_only)
        return sums.metrics()

    def _step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        criterion: nn.Module,
        *,
        sync: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if channels_last(self.ft, self.device):
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with _synced(self.wrapped, sync):
            with torch.autocast(
                self.device.type,
                dtype=self.amp or torch.float32,
                enabled=self.amp is not None,
            ):
                logits = self.wrapped(images)
                loss = criterion(logits.float(), labels)
            self.optim.backward(loss)
        _check_finite(loss, self.epoch)
        return logits.detach(), loss.detach()

    def train_mode(self, head_only: bool) -> None:
        """The model in training mode, BatchNorm statistics kept where they stay."""
        training_mode(
            self.model,
            head_only=head_only,
            frozen_statistics=self.ft.frozen_batchnorm,
        )

    def validate(self) -> dict[str, float]:
        """Loss, accuracy and balanced accuracy on the validation split."""
        return validate(self.model, self.loaders[1], self.device, self.amp)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


def _no_time_for(trainer: Trainer, epoch_seconds: float) -> bool:
    """Whether another epoch like the last would end after the deadline
    (the first epoch always runs); says so when it stops the run."""
    if trainer.deadline is None or not epoch_seconds:
        return False
    if time.monotonic() + epoch_seconds <= trainer.deadline:
        return False
    trainer.out_of_time = True
    log.warning(
        "run.budget: stopped after epoch %d of %d, since the next (about %.0f "
        "s) would end after the budget; the model is the best epoch so far",
        trainer.epoch,
        trainer.ft.epochs,
        epoch_seconds,
    )
    return True


def _end_epoch(
    trainer: Trainer, train: dict[str, float], val: dict[str, float]
) -> bool:
    """Record the epoch (main process), then whether every process stops."""
    stop = False
    if trainer.world.main:
        improved, stop = trainer.keepers.end_epoch(trainer, train, val)
        _log_epoch(trainer.epoch, trainer.ft.epochs, train, val, improved)
    if trainer.world.world > 1:
        dist.barrier()
    return _agreed_stop(stop, trainer.world, trainer.ft)


def _synced(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    # NOTE: with accumulation, DDP all-reduces gradients only on the last
    # micro-batch of each optimizer step.
    if isinstance(wrapped, DistributedDataParallel) and not sync:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _check_finite(loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"the training loss became {float(loss)} at epoch {epoch + 1}; lower "
            "finetune.lr, set finetune.clip_grad (e.g. 1.0) or use precision = "
            "'bf16'"
        )


def _epoch_bar(trainer: Trainer, head_only: bool) -> Any:
    """The progress bar of one epoch (rank 0's, counting its own batches)."""
    loader, ft = trainer.loaders[0], trainer.ft
    world = trainer.world
    total = len(loader.sampler) if world.world > 1 else len(loader) * ft.batch_size
    desc = f"epoch {trainer.epoch + 1}/{ft.epochs}"
    return progress_bar(
        total,
        desc=desc + (" (head)" if head_only else ""),
        enabled=trainer.progress and world.main,
    )


def _agreed_stop(stop: bool, world: Dist, ft: FinetuneConfig) -> bool:
    """Rank 0's early-stopping decision, shared with every rank."""
    flag = torch.tensor(int(stop))
    if world.world > 1:
        dist.broadcast(flag, src=0)
    if flag.item():
        log.info(
            "early stopping: no better val %s for %d epochs", ft.monitor, ft.patience
        )
    return bool(flag.item())


class _Sums:
    """Running loss and accuracy over an epoch's batches."""

    def __init__(self) -> None:
        self.loss, self.correct, self.seen = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(
        self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor
    ) -> None:
        self.loss += float(loss) * len(labels)
        self.correct += int((logits.argmax(1) == labels.to(logits.device)).sum())
        self.seen += len(labels)

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss / max(self.seen, 1),
            "accuracy": self.correct / max(self.seen, 1),
            "images_per_second": self.seen / (time.perf_counter() - self.start),
        }


def _log_epoch(
    epoch: int,
    epochs: int,
    train: dict[str, float],
    val: dict[str, float],
    improved: bool,
) -> None:
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f%s",
        epoch,
        epochs,
        train["loss"],
        train["accuracy"],
        val["loss"],
        val["accuracy"],
        "  (best)" if improved else "",
    )


def channels_last(ft: FinetuneConfig, device: torch.device) -> bool:
    """Whether training runs in channels_last memory layout.

    NOTE: measured on a 2-core CPU, channels_last made EfficientNet-Lite0
    training about 30% slower (depthwise convolution backward), while it
    speeds up tensor-core GPUs.
    """
    return ft.channels_last and device.type == "cuda"


def _body_batchnorms(model: ImageClassifier) -> Iterator[nn.Module]:
    head = head_name(model.net)
    for name, module in model.net.named_modules():
        if not name.startswith(head) and isinstance(
            module, nn.modules.batchnorm._BatchNorm
        ):
            yield module


@contextlib.contextmanager
def frozen_body(model: ImageClassifier) -> Iterator[None]:
    """Train the head alone: body parameters frozen, body BatchNorm in eval mode.

    Parameters frozen for good (`freeze_before`) stay frozen afterwards.
    """
    head = head_name(model.net)
    body = [
        p
        for n, p in model.net.named_parameters()
        if not n.startswith(head + ".") and p.requires_grad
    ]
    for p in body:
        p.requires_grad_(False)
    for module in _body_batchnorms(model):
        module.eval()
    try:
        yield
    finally:
        for p in body:
            p.requires_grad_(True)


def freeze_before(net: nn.Module, layer: str) -> list[str]:
    """Freeze every parameter that runs before `layer`; return their names.

    The frozen layers get no gradient (so nothing backpropagates through
    them), are left out of the optimiser, and their BatchNorm layers keep
    their statistics (`training_mode` puts them in eval mode).

    Raises:
        BackboneError: `layer` is not in the network.
    """
    names = set(parameters_before(net, layer))
    for name, param in net.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sorted(names)


def _batchnorms(model: ImageClassifier) -> Iterator[nn.Module]:
    for module in model.net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            yield module


def _frozen_batchnorms(model: ImageClassifier) -> Iterator[nn.Module]:
    """BatchNorm layers whose parameters do not train (a frozen prefix)."""
    for module in _batchnorms(model):
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            yield module


def training_mode(
    model: ImageClassifier, *, head_only: bool, frozen_statistics: bool = False
) -> None:
    """Training mode, with BatchNorm in eval mode where its statistics stay:
    the body's during head-only epochs, a frozen prefix's (`freeze_before`),
    and every layer's with `frozen_statistics` (finetune.batchnorm)."""
    model.train()
    if frozen_statistics:
        frozen: Iterable[nn.Module] = _batchnorms(model)
    elif head_only:
        frozen = _body_batchnorms(model)
    else:
        frozen = _frozen_batchnorms(model)
    for module in frozen:
        module.eval()


@torch.inference_mode()
def validate(
    model: ImageClassifier,
    loader: Any,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, float]:
    """Mean loss, accuracy and balanced accuracy on a loader's images."""
    probs, labels, _ = predict_batches(model, loader, device, amp)
    y = labels.numpy()
    loss = float(nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), labels))
    predicted = probs.argmax(1).numpy()
    return {
        "loss": loss,
        "accuracy": float((predicted == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
    }
