"""Data-parallel training under `torchrun --nproc-per-node=N` (DDP).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a world of one and
every function here is a no-op, so the single-process path stays exactly as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexops.errors import AlexopsError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, outputs and MLflow records."""
        return self.rank == 0


ALONE = World()  # one process, no torchrun


def from_env() -> World:
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); return this rank's device."""
    if world.size == 1:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise AlexopsError(
                f"rank {world.rank} wants GPU {world.local_rank} but only {torch.cuda.device_count()} "
                "are visible. Fix: --nproc-per-node at most the number of GPUs."
            )
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def total(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `value` over all ranks."""
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    if world.size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def weights_agree(model: torch.nn.Module, world: World) -> bool:
    """Whether every rank ends with the same weights (a checksum compared across ranks)."""
    if world.size == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checksum = checksum.to(next(model.parameters()).device).reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world.size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)
