"""Single-process and ``torchrun`` (DistributedDataParallel) execution.

Under ``torchrun --nproc_per_node N python -m nel_model.train ...`` the environment carries ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU) and pins each process to its
GPU. Only rank 0 writes records and checkpoints; metrics are computed over all mentions by gathering per-process
shards (:func:`gather_rows`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from data_process.core.devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_spec: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device_spec))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard(n: int, info: DistInfo) -> np.ndarray:
    """This process's contiguous share of ``range(n)`` (used for evaluation; shards are re-joined in order)."""
    return np.array_split(np.arange(n), info.world_size)[info.rank]


def gather_rows(local: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every process's ``local`` rows in rank order (shapes may differ in the first dimension)."""
    if not info.enabled:
        return local
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, local.detach().cpu())
    return torch.cat(parts, 0).to(local.device)


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())
