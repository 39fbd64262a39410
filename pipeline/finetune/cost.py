"""What a fine-tune costs on this machine, measured in seconds before it runs.

The advisor weighs fine-tuning candidates (input size, a frozen prefix) by
their expected wall time, so it times a few real training steps and a few
inference batches of each, on random pixels: the network, the optimiser
and the backward are the fine-tune's own (`build_model`, `Optimization`,
the same BatchNorm mode), only the data loading is left out (the pilot
measures that part on real images).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from features.devices import resolve_device
from pipeline.config import Config
from pipeline.finetune import memory
from pipeline.finetune.loop import training_mode
from pipeline.finetune.optim import Optimization
from pipeline.finetune.stage import build_model

# Steps timed after one warm-up step: few, since at 224 px on two CPU cores
# one step of 16 images takes seconds.
STEPS = 3
BATCH = 16
# At most this much of activations in a timed step on a CPU: a step's time
# per image hardly changes there past a few images, while its memory grows
# with each (16 images at 224 px would hold 1.3 GB, the advice's peak). A
# GPU needs its batch to be fast, so it times the whole BATCH.
TIMING_BYTES = 512 * 2**20


@dataclass(frozen=True)
class StepRate:
    """Images per second of a training step and of inference, compute only."""

    train: float
    infer: float


def step_rate(cfg: Config, num_classes: int) -> StepRate:
    """Time `STEPS` training steps and inference batches of the configured fine-tune.

    The configuration says the input size, the frozen prefix and the
    BatchNorm mode; the head is random (the speed does not depend on it).

    Raises:
        TrainingError: a step of `finetune.batch_size` images would not fit
            in memory (nothing is timed).
    """
    ft = replace(cfg.finetune, head_init="random")
    cfg = replace(cfg, finetune=ft)
    device = resolve_device(ft.device)
    model, prep, _ = build_model(cfg, num_classes, device)
    need = memory.step_memory(model, prep.input_size, ft, device)
    memory.require_fits(
        need, ft, prep.input_size, device, memory.available_bytes(device)
    )
    batch = min(BATCH, ft.batch_size)
    if device.type == "cpu":
        batch = min(batch, max(2, TIMING_BYTES // max(1, need.per_image)))
    size = (batch, 3, prep.input_size, prep.input_size)
    pixels = torch.randint(0, 256, size, dtype=torch.uint8, device=device)
    labels = torch.arange(batch, device=device) % num_classes
    optim = Optimization.create(
        ft, model, steps_per_epoch=10, processes=1, fp16=False, device=device
    )
    criterion = nn.CrossEntropyLoss()
    training_mode(model, head_only=False, frozen_statistics=ft.frozen_batchnorm)
    train = _timed(lambda: _train_step(model, optim, criterion, pixels, labels))
    model.eval()
    with torch.inference_mode():
        infer = _timed(lambda: model(pixels))
    return StepRate(batch / train, batch / infer)


def _train_step(
    model: nn.Module,
    optim: Optimization,
    criterion: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    loss = criterion(model(pixels), labels)
    optim.backward(loss)
    optim.step(model)


def _timed(work: Callable[[], object]) -> float:
    """Median seconds of `STEPS` calls after one warm-up call."""
    work()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
