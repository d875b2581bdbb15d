"""The process group: one process, or one rank of a launcher (``torchrun`` / ``accelerate launch`` set
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); gloo on CPU, NCCL on GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from kdflow.train.job import TrainingError


@dataclass
class Dist:
    """This process's place in the run: its rank, the world size, its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """One process, or one rank of a launcher (env WORLD_SIZE/RANK/LOCAL_RANK): gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(
                f"training device {device!r} asked for, but torch sees no GPU (torch "
                f"{torch.__version__}); set training.defaults.device: cpu or run on a GPU node"
            )
        dev = torch.device(f"cuda:{local}") if world > 1 or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def all_reduce(values: torch.Tensor, ctx: Dist, op: Literal["sum", "min", "max"] = "sum") -> torch.Tensor:
    """``values`` reduced in place over the ranks (unchanged in one process)."""
    if ctx.active:
        dist.all_reduce(values, op=getattr(dist.ReduceOp, op.upper()))
    return values


def gather(obj: Any, ctx: Dist) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not ctx.active:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Dist) -> None:
    if ctx.active:
        dist.barrier()


def teardown(ctx: Dist) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
