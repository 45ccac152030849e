"""torch.distributed plumbing shared by extraction and probing (torchrun sets the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimprobe.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA (one GPU per local
    rank), gloo on CPU. Returns the context and this rank's device; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank), device


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj=None, src: int = 0):
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(ctx: DistContext, obj) -> list:
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def run_on_main(ctx: DistContext, fn):
    """Run ``fn`` on rank 0 only and share its result; a UserError there is raised on every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
        if ctx.active:
            broadcast_object(ctx, (None, error))  # results stay local: other ranks re-open what rank 0 made
    else:
        _, error = broadcast_object(ctx)
    if error is not None:
        raise UserError(error)
    return result


def shared_from_main(ctx: DistContext, fn):
    """``fn()`` on rank 0, its result shared with every rank (a UserError there is raised everywhere)."""
    return broadcast_object(ctx, run_on_main(ctx, fn))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)
