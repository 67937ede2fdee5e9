"""Distributed data parallel under torchrun: process group, rank and the model wrapper."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, batch_size: int) -> tuple[int, int]:
        """Rows of the global batch that this process trains on."""
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the {self.world_size} processes"
            )
        per_rank = batch_size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` names ("auto": CUDA when available, else CPU); one not here is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: no Apple GPU is available here; use cpu or auto")
    return device


def start(device: str = "auto") -> Cluster:
    """One process (no torchrun) or this process's place in a torchrun job (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device)
    if world_size == 1:
        return Cluster(device=target)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Cluster(rank, world_size, target)


def stop(cluster: Cluster) -> None:
    if cluster.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
