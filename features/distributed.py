"""Extraction on many processes and machines: which process this is, and how
the processes agree.

Under torchrun (`torchrun --nproc_per_node N --no-python quadrant extract`)
every process runs the same command, and the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
says which one it is. The processes ("ranks") talk through a gloo process
group, on CPUs and GPUs alike: extraction only exchanges a few small
messages (the cache key, lists of shard numbers, failed files), never
tensors of codes. Messages are JSON text sent as bytes, never pickled
objects, so no rank unpickles what another sent.

Rank 0 leads: it lists the images and opens the cache while the others
wait, and finishes it when every rank is done. If rank 0 fails while the
others wait, its error is sent to them and every rank stops with it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from features.devices import available_cpus
from features.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)

T = TypeVar("T")

# NOTE: ranks wait for rank 0 while it lists and probes every file, and for
# the slowest rank before finishing. Listing 10 million files takes tens of
# minutes, so gloo's default of 30 minutes is too short; a rank that dies is
# noticed by torchrun itself, which stops the others, so a long wait only
# matters for a process that hangs.
WAIT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (one process without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The job torchrun describes in the environment (one process if none)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        return cls(
            rank=int(os.environ["RANK"]),
            size=size,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )


def join_world() -> World:
    """Join the torchrun job this process belongs to (no-op without torchrun)."""
    world = World.from_env()
    if world.size == 1:
        return world
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT)
        return world
    # Someone else (a caller's own DDP setup) made the default group: talk
    # over a gloo group of our own, since its backend may not take CPU tensors.
    return World(
        world.rank,
        world.size,
        world.local_rank,
        world.local_size,
        dist.new_group(backend="gloo", timeout=WAIT),
    )


def leave_world(world: World) -> None:
    """Leave the job's process group (after the last message)."""
    if world.size > 1 and world.group is None and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: its own GPU, or its share of the CPU cores.

    Raises:
        ConfigError: more ranks on this machine than visible GPUs.
    """
    if world.size == 1:
        return device
    if device.type == "cuda":
        if device.index is not None and world.local_size > 1:
            raise ConfigError(
                f"extract.device = {str(device)!r} names one GPU, but torchrun "
                f"started {world.local_size} processes on this machine; set "
                'extract.device = "auto" or "cuda": each rank uses cuda:LOCAL_RANK'
            )
        if device.index is None:
            if world.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"torchrun started {world.local_size} processes on this machine "
                    f"but {torch.cuda.device_count()} GPU(s) are visible; start "
                    "at most one process per GPU (--nproc_per_node)"
                )
            device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        return device
    if device.type == "cpu" and world.local_size > 1:
        # NOTE: torchrun sets OMP_NUM_THREADS=1 for every process; with the
        # cores split evenly the ranks of one machine use all of them without
        # oversubscribing.
        threads = rank_cpus(world)
        torch.set_num_threads(threads)
        log.info(
            "rank %d: %d CPU thread(s) (%d cores / %d processes on this machine)",
            world.rank,
            threads,
            available_cpus(),
            world.local_size,
        )
    return device


def rank_cpus(world: World) -> int:
    """This rank's share of the machine's cores: torchrun's ranks on one
    machine split them evenly (all of them for a lone process)."""
    return max(1, available_cpus() // world.local_size)


def run_on_main(world: World, fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 while the other ranks wait; return its value there.

    The other ranks get None once it has returned. If it raises, rank 0
    raises the error and every other rank raises a `DistributedError` with
    its message, so the whole job stops with one reason.
    """
    if world.size == 1:
        return fn()
    if world.main:
        try:
            value = fn()
        except Exception as err:
            share_text(world, json.dumps({"error": f"{type(err).__name__}: {err}"}))
            raise
        share_text(world, json.dumps({"ok": True}))
        return value
    status = json.loads(share_text(world, None))
    if "error" in status:
        raise DistributedError(f"rank 0 stopped the job: {status['error']}")
    return None


def share_text(world: World, text: str | None) -> str:
    """Rank 0's `text`, on every rank (other ranks pass None)."""
    if world.size == 1:
        assert text is not None
        return text
    data = (text or "").encode() if world.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0, group=world.group)
    if int(size.item()) == 0:
        return ""
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if world.main and data
        else torch.zeros(int(size.item()), dtype=torch.uint8)
    )
    dist.broadcast(buffer, src=0, group=world.group)
    return bytes(buffer.numpy()).decode()


def gather_text(world: World, text: str) -> list[str]:
    """Every rank's `text`, in rank order, on every rank."""
    if world.size == 1:
        return [text]
    data = text.encode()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world.size)]
    dist.all_gather(
        sizes, torch.tensor([len(data)], dtype=torch.int64), group=world.group
    )
    longest = max(int(s.item()) for s in sizes)
    if longest == 0:
        return [""] * world.size
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world.size)]
    dist.all_gather(parts, mine, group=world.group)
    return [
        bytes(p[: int(s.item())].numpy()).decode()
        for p, s in zip(parts, sizes, strict=True)
    ]
