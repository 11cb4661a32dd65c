"""One run over several processes (``torchrun``): opt-in, only when ``WORLD_SIZE`` > 1 is set.

``info()`` is None in a plain process, and then nothing here is used: the Trainer's single-process path is unchanged.
Under torchrun each rank takes ``cuda:LOCAL_RANK`` (or the CPU), the process group is nccl on CUDA and gloo on CPU,
every rank draws the same global batch from the same seeded generator and trains on its contiguous share of its rows
(``shard``), so the global batch is exactly the single-process one; DDP averages the gradients of the shares.
Anything else a method derives from the training batches (SPION's attention maps) must be summed over the ranks
(``sum_over_ranks``) before a decision is taken on it, so that every rank takes the same decision at the same step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int


def info() -> Dist | None:
    """The torchrun environment, or None when WORLD_SIZE is unset or 1 (a plain run)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)


def rank() -> int:
    d = info()
    return d.rank if d else 0


def is_main() -> bool:
    """Rank 0, or not distributed: the process that prints and writes records."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group (once per process) and return this rank's device."""
    import torch.distributed as dist

    d = info()
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(batch, r: int, world: int, global_bs: int):
    """Rank ``r``'s contiguous share of a batch: every tensor whose first dimension is the global batch size is
    cut to rows [r*bs/world, (r+1)*bs/world); anything else (dicts, lists and tuples are walked) is left as is."""
    if torch.is_tensor(batch):
        if batch.ndim and batch.shape[0] == global_bs:
            n = global_bs // world
            return batch[r * n:(r + 1) * n]
        return batch
    if isinstance(batch, dict):
        return {k: shard(v, r, world, global_bs) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(shard(v, r, world, global_bs) for v in batch)
    return batch


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``t`` over the ranks, the same bits on every rank (a collective: every rank must call
    it at the same point); ``t`` itself in a plain process."""
    if info() is None:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t
