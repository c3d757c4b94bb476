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
import torch.distributed

from .device import launched_with_torchrun

__all__ = [
    "DistInfo",
    "SINGLE_PROCESS",
    "launched_with_torchrun",
    "init_distributed",
    "shutdown_distributed",
    "initialized",
    "rank_and_world_size",
    "barrier",
    "broadcast_object",
    "broadcast_",
    "all_gather_rows",
    "all_reduce_sum_",
    "all_reduce_max_",
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


SINGLE_PROCESS = DistInfo()  # one process, no torchrun: what DistInfo() means everywhere


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
    if not initialized():
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown_distributed() -> None:
    if initialized():
        if torch.distributed.get_world_size() > 1:
            try:  # every rank is done with the group before any tears it down: gloo can abort
                torch.distributed.barrier()  # a rank whose peer closed its sockets first ("terminate called")
            except Exception:  # a peer already died (torchrun then stops us): nothing to wait for
                pass
        torch.distributed.destroy_process_group()


def initialized() -> bool:
    """Whether torch.distributed is built in and its default process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) without a process group)."""
    if initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _active() -> bool:
    return rank_and_world_size()[1] > 1


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (identity without a process group)."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s values into ``t`` on every rank, in place; returns ``t``."""
    if _active():
        torch.distributed.broadcast(t, src=src)
    return t


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor [n_r, ...] (n_r may differ between ranks), in rank order.

    Rows are padded to the largest n_r for the collective and trimmed afterwards.
    """
    if not _active():
        return [t]
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    biggest = max(sizes_i)
    padded = t.new_zeros((biggest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return [o[:s] for o, s in zip(out, sizes_i)]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no autograd); returns ``t``."""
    if _active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks in place; returns ``t``."""
    if _active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list:
    """Every rank's picklable object, in rank order (``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
