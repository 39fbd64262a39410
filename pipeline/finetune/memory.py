"""How much memory a training step holds, known before the first epoch.

Fine-tuning keeps every activation that the backward pass needs, per image
of the batch: about 80 MB per image for EfficientNet-Lite0 at 224 px, so
the default batch of 64 holds some 5 GB beside the weights, which is what
made the README demo peak at 7 GB. A step that does not fit ends, hours
into a run, in the kernel's out-of-memory killer on a CPU, or in a CUDA
out-of-memory error on a GPU. So the stage measures the activations that
autograd saves for one small batch (`torch.autograd.graph.saved_tensors_hooks`
sees each tensor the backward keeps: exact, and cheap: one forward of two
images, no backward), scales it to the configured batch, adds the weights'
gradients and the optimiser's state, and refuses a step that the device
cannot hold, naming the batch that fits.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from features.devices import PRECISION_DTYPES, resolve_precision
from features.errors import TrainingError
from pipeline.config import FinetuneConfig

# Images in the measuring forward: two, since BatchNorm in training needs two.
PROBE_BATCH = 2
# Past this share of the memory available now a step is warned about: the
# data loader's batches and the allocator's slack need some of the rest.
WARN_SHARE = 0.8
# The backward's peak over the saved activations: the gradients of the
# activations it works through (measured peaks: 1.0-1.5 times the saved
# activations on ResNet-18 at 128 px and EfficientNet-Lite0 at 64 and 224 px).
BACKWARD_PEAK = 1.2
# Optimiser state per trainable parameter, in parameter-sized tensors.
STATE_PER_PARAM = {"adamw": 2, "sgd": 1}
GIB = 2**30

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMemory:
    """Bytes a training step holds.

    Attributes:
        per_image: activations autograd keeps for the backward, per image.
        fixed: the trainable weights' gradients and the optimiser's state
            (the weights themselves are resident already).
    """

    per_image: int
    fixed: int

    def bytes_for(self, batch: int) -> int:
        """The step's peak: the backward working through the activations."""
        return self.fixed + math.ceil(BACKWARD_PEAK * self.per_image * batch)

    def largest_batch(self, available: int) -> int:
        """The largest batch whose step fits in `available` bytes (0: none)."""
        per_image = max(1.0, BACKWARD_PEAK * self.per_image)
        return max(0, math.floor((available - self.fixed) / per_image))


def step_memory(
    model: nn.Module, input_size: int, ft: FinetuneConfig, device: torch.device
) -> StepMemory:
    """Measure the memory of a training step of `model` at `input_size`.

    The forward runs in eval mode on zeros, so neither the BatchNorm
    statistics nor any random state change; frozen layers save nothing,
    as in training.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # NOTE: one storage saved by two operations is held once, and the
        # weights that convolutions save are resident already.
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    pixels = torch.zeros(
        PROBE_BATCH, 3, input_size, input_size, dtype=torch.uint8, device=device
    )
    was_training = model.training
    model.eval()
    try:
        with (
            torch.enable_grad(),
            _autocast(ft, device),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model(pixels)
    finally:
        model.train(was_training)
    trainable = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )
    states = STATE_PER_PARAM.get(ft.optimizer, 2)
    return StepMemory(sum(saved.values()) // PROBE_BATCH, trainable * (1 + states))


def _autocast(
    ft: FinetuneConfig, device: torch.device
) -> contextlib.AbstractContextManager[object]:
    precision = resolve_precision(ft.precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def available_bytes(device: torch.device) -> int | None:
    """Memory a step on `device` may take now; None where it cannot be known.

    On a GPU the free device memory; on a CPU the smaller of the kernel's
    MemAvailable and what the cgroup (a container's or a batch job's limit)
    still allows.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    limits = [_meminfo_available(), _cgroup_left()]
    known = [n for n in limits if n is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None  # not Linux: nothing to check against
    return None


def _cgroup_left() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None  # no cgroup v2 limit visible
    if limit == "max":
        return None
    return int(limit) - int(used)


def require_fits(
    need: StepMemory,
    ft: FinetuneConfig,
    input_size: int,
    device: torch.device,
    available: int | None,
) -> None:
    """Refuse a batch whose training step would not fit in memory.

    A step that needs more than `WARN_SHARE` of `available` is logged as a
    warning: it may still fit, but with little room.

    Raises:
        TrainingError: the step needs more than `available`; the message
            names the batch that fits and how to keep the effective batch
            (finetune.accumulate).
    """
    if available is None:
        return
    batch, bytes_needed = ft.batch_size, need.bytes_for(ft.batch_size)
    where = "GPU memory" if device.type == "cuda" else "memory"
    said = (
        f"a training step of {batch} images at {input_size} px needs about "
        f"{bytes_needed / GIB:.1f} GiB ({need.per_image / 2**20:.0f} MiB of "
        f"activations per image) of the {available / GIB:.1f} GiB of {where} "
        "available"
    )
    if bytes_needed <= WARN_SHARE * available:
        return
    fits = need.largest_batch(int(WARN_SHARE * available))
    fix = (
        f"set finetune.batch_size = {fits} and finetune.accumulate = "
        f"{-(-batch * ft.accumulate // fits)} (the same effective batch)"
        if fits >= 2
        else "lower finetune.input_size, freeze more layers with "
        "finetune.train_from, or use a machine with more memory"
    )
    if bytes_needed <= available:
        log.warning("%s: it may not fit; to be safe, %s", said, fix)
        return
    raise TrainingError(f"{said}: it cannot fit; {fix}")
