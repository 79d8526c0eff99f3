"""Where a process runs: torchrun's process group (NCCL on GPU, gloo on CPU) or a single process."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """Where this process runs: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> Dist:
    """Join the process group ``torchrun`` set up (NCCL on GPU, gloo on CPU), or run alone.

    Args:
        device: ``cpu``, ``cuda:N`` …; default ``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``.
        timeout_s: How long a collective (a barrier) may wait for the slowest rank; default torch's
            (10 minutes for NCCL, 30 for gloo). Sharded gallery embedding waits at a barrier for
            every shard, so it passes hours.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def finish_distributed(d: Dist | None) -> None:
    """Leave the process group (if this process joined one), so the process exits without warnings."""
    if d is not None and d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if d.world_size > 1:
        dist.barrier()


def autocast(device: torch.device, dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
