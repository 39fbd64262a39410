"""Which device and precision a forward pass runs on, and how many loaders feed it.

Shared by extraction, fine-tuning and evaluation, so `"auto"` means the same
everywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LoaderPlan:
    """How image decoding and the forward pass share the machine.

    Attributes:
        workers: DataLoader worker processes decoding images (0: the main
            process decodes between forward calls).
        worker_threads: torch threads in each worker.
        forward_threads: torch / onnxruntime threads of a CPU forward pass;
            0 when the forward runs on a GPU (the main process's threads are
            left as they are).
        rate: the predicted images/s (0 when nothing was measured).
        basis: what the choice rests on, for the log.
    """

    workers: int
    worker_threads: int
    forward_threads: int
    rate: float
    basis: str

    def describe(self) -> str:
        """One log line: the choice and why."""
        forward = (
            f"the forward on {self.forward_threads} thread(s)"
            if self.forward_threads
            else "the forward on the GPU"
        )
        return (
            f"{self.workers} decode worker(s) x {self.worker_threads} thread(s), "
            f"{forward} ({self.basis})"
        )


def plan_loader(
    *,
    cpus: int,
    forward_on_cpu: bool,
    decode_seconds: float | None,
    forward_seconds: float | None,
    workers: int | None = None,
    threads: int | None = None,
) -> LoaderPlan:
    """Decode workers and forward threads that keep both sides busy on `cpus` cores.

    A simple throughput model, fed with the job's own measured costs:
    `decode_seconds` is one image's decoding and resizing on one core,
    `forward_seconds` one image's forward on one CPU thread (`forward_on_cpu`)
    or on the GPU. On the CPU, W workers and T forward threads give about
    min(W / decode, T / forward, cpus / (decode + forward)) images/s: the
    slower side sets the pace, and together they cannot use more than every
    core. The plan takes the fastest (W, T) with W + T <= cpus + 1 (one
    thread of oversubscription lets a decode-bound job keep every core
    decoding while a light forward runs in the gaps); among equals, the one
    that uses every core without oversubscribing them. On a GPU the workers
    feed the device: enough of them to match its rate, leaving one core to
    the main process.

    Args:
        cpus: cores this process may use.
        forward_on_cpu: whether the forward shares the cores with decoding.
        decode_seconds: measured seconds to decode one image (None: unknown).
        forward_seconds: measured seconds of one image's forward (None:
            unknown).
        workers: a fixed number of workers (None: choose).
        threads: a fixed number of forward threads (None: choose).

    Returns:
        The plan; without measurements, one worker and the remaining cores.
    """
    cpus = max(1, cpus)
    if not forward_on_cpu:
        return _plan_gpu(cpus, decode_seconds, forward_seconds, workers, threads)
    if workers == 0 or cpus == 1 and workers is None:
        chosen = threads if threads is not None else cpus
        basis = "one core: nothing to overlap" if cpus == 1 else "num_workers = 0"
        return LoaderPlan(0, _WORKER_THREADS, chosen, 0.0, basis)
    if decode_seconds is None or forward_seconds is None:
        w = workers if workers is not None else 1
        t = threads if threads is not None else max(1, cpus - w)
        return LoaderPlan(w, _WORKER_THREADS, t, 0.0, "not measured")
    return _plan_cpu(cpus, decode_seconds, forward_seconds, workers, threads)


# NOTE: Pillow decodes and resizes on one thread, so a worker's torch threads
# would only oversubscribe the cores the forward needs.
_WORKER_THREADS = 1


def _plan_cpu(
    cpus: int,
    decode_seconds: float,
    forward_seconds: float,
    workers: int | None,
    threads: int | None,
) -> LoaderPlan:
    """The fastest measured (workers, threads) split of the cores."""
    best = max(
        _cpu_candidates(cpus, workers, threads),
        key=lambda wt: (
            _cpu_rate(wt, cpus, decode_seconds, forward_seconds),
            -abs(cpus - sum(wt)),
        ),
    )
    rate = _cpu_rate(best, cpus, decode_seconds, forward_seconds)
    basis = (
        f"{cpus} cores; measured {1000 * decode_seconds:.1f} ms decoding and "
        f"{1000 * forward_seconds:.1f} ms forward (1 thread) per image; "
        f"predicted {rate:.1f} images/s"
    )
    return LoaderPlan(best[0], _WORKER_THREADS, best[1], rate, basis)


def _cpu_candidates(
    cpus: int, workers: int | None, threads: int | None
) -> list[tuple[int, int]]:
    """(workers, threads) pairs with both >= 1 and at most one extra thread."""
    ws = [workers] if workers is not None else range(1, cpus + 1)
    ts = [threads] if threads is not None else range(1, cpus + 1)
    pairs = [(w, t) for w in ws for t in ts if w + t <= cpus + 1]
    return pairs or [(w, t) for w in ws for t in ts]


def _cpu_rate(pair: tuple[int, int], cpus: int, decode: float, forward: float) -> float:
    """Predicted images/s of `pair` = (workers, forward threads) on `cpus` cores."""
    w, t = pair
    tiny = 1e-9
    return min(
        w / max(decode, tiny),
        t / max(forward, tiny),
        cpus / max(decode + forward, tiny),
    )


def _plan_gpu(
    cpus: int,
    decode: float | None,
    forward: float | None,
    workers: int | None,
    threads: int | None,
) -> LoaderPlan:
    """Workers enough to match the GPU's rate, one core left to the main process."""
    spare = max(1, cpus - 1)
    if workers is not None:
        w, basis = workers, "num_workers set"
    elif decode is None or forward is None:
        w, basis = spare, "not measured: every core but one decodes"
    else:
        w = min(spare, max(1, math.ceil(decode / max(forward, 1e-9))))
        basis = (
            f"{cpus} cores; measured {1000 * decode:.1f} ms decoding per image on "
            f"a core and {1000 * forward:.2f} ms forward per image on the GPU"
        )
    rate = 0.0
    if decode is not None and forward is not None and w > 0:
        rate = min(w / max(decode, 1e-9), 1 / max(forward, 1e-9))
        basis += f"; predicted {rate:.1f} images/s"
    return LoaderPlan(w, 1, threads or 0, rate, basis)
