"""torch.distributed helpers: the loop runs unchanged under `torchrun`; rank 0 writes artifacts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast(info: DistInfo, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_lists(info: DistInfo, items: list[Any]) -> list[Any]:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
    if not info.enabled:
        return items
    parts: list[list[Any] | None] = [None] * info.world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part or []]


def all_reduce_sum(info: DistInfo, values: list[float], device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(info: DistInfo, module: torch.nn.Module) -> None:
    """Average `module`'s gradients over ranks (for trained modules outside DDP)."""
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size
