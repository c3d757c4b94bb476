"""torch.distributed plumbing for `torchrun` launches: process group, rank facts, collectives.

Single-process runs get a ``DistInfo`` with world_size 1 and every helper here degrades to a
no-op, so the training and evaluation code reads the same either way.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .device import launched_with_torchrun

__all__ = [
    "DistInfo",
    "launched_with_torchrun",
    "init_distributed",
    "shutdown_distributed",
    "barrier",
    "broadcast_object",
    "broadcast_",
    "all_gather_rows",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_objects",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files (config, metrics, TensorBoard, checkpoints)."""
        return self.rank == 0



def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (nccl on CUDA, else gloo).

    Without torchrun's variables this returns a single-process ``DistInfo`` and starts nothing.
    On CUDA each process uses GPU ``LOCAL_RANK``.
    """
    if not launched_with_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            try:  # every rank is done with the group before any tears it down: gloo can abort
                dist.barrier()  # a rank whose peer closed its sockets first ("terminate called")
            except Exception:  # a peer already died (torchrun then stops us): nothing to wait for
                pass
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (identity without a process group)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s values into ``t`` on every rank, in place; returns ``t``."""
    if _active():
        dist.broadcast(t, src=src)
    return t


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor [n_r, ...] (n_r may differ between ranks), in rank order.

    Rows are padded to the largest n_r for the collective and trimmed afterwards.
    """
    if not _active():
        return [t]
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    biggest = max(sizes_i)
    padded = t.new_zeros((biggest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:s] for o, s in zip(out, sizes_i)]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no autograd); returns ``t``."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks in place; returns ``t``."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list:
    """Every rank's picklable object, in rank order (``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
