"""Which device and precision a forward pass runs on, and how many loaders feed it.

Shared by extraction, fine-tuning and evaluation, so `"auto"` means the same
everywhere.
"""

from __future__ import annotations

import os

import torch

from features.errors import ConfigError

# Autocast dtype per precision setting; None runs in float32.
PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_device(spec: str) -> torch.device:
    """ "auto" picks CUDA, then Apple MPS, then the CPU.

    Raises:
        ConfigError: a device was named that this machine does not have.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device = {spec!r} but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device = {spec!r} but only {torch.cuda.device_count()} CUDA "
            "device(s) are visible"
        )
    return device


def resolve_precision(spec: str, device: torch.device) -> str:
    """ "auto" is bf16 on GPUs that have it, fp16 on other GPUs, fp32 elsewhere."""
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(device: torch.device) -> int:
    """Data loader processes: enough to feed a GPU, few enough not to starve a CPU."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    # NOTE: on the CPU the network and the decoders share the cores; one
    # helper process overlaps decoding with compute (measured in
    # benchmarks/extract.py), more only steal cores from the network.
    return 1 if cpus > 1 else 0
