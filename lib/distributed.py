"""Data-parallel training under torchrun, and the identity of all of it in a single process.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) starts one
process per device; each trains on its shard of every batch and DistributedDataParallel averages
the gradients. Without those variables everything here is a no-op and the script runs as one
process.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.cli import UserError
from lib.runtime import pick_device, sum_dtype


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: str = None  # this process's device under torchrun; None: as the user asked

    @property
    def is_main(self):
        """Rank 0 alone writes checkpoints, logs, pictures and shows progress."""
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1


ALONE = Context()  # a single process


def init(device_name):
    """-> this process's Context: one GPU per process (NCCL) or CPU processes (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ALONE
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device_type = pick_device(device_name).type  # --device cuda without a GPU: a UserError
    if device_type == "mps":
        raise UserError(
            "torchrun starts several processes, and an Apple GPU trains one: run sd_train.py without "
            "torchrun, or pass --device cpu"
        )
    use_cuda = device_type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(rank, world_size, f"cuda:{local_rank}" if use_cuda else "cpu")


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value, ctx, device):
    """A float summed over all ranks (itself when alone)."""
    if not ctx.active:
        return value
    t = torch.tensor(float(value), dtype=sum_dtype(device), device=device)
    dist.all_reduce(t)
    return t.item()


def any_rank(flag, ctx, device):
    """True on every rank if it is true on any: a stop request must stop all ranks at the same
    step, or the others would wait forever in the next gradient all-reduce."""
    return all_sum(float(flag), ctx, device) > 0 if ctx.active else flag


def shard(order, batch_size, ctx):
    """Global batches of world_size * batch_size indices from `order`; each rank takes its own
    contiguous slice, so within a global step the shards are disjoint and together cover the
    batch. A last global batch too small to give every rank an image is dropped."""
    global_batches = order.split(batch_size * ctx.world_size)
    slices = [gb.tensor_split(ctx.world_size)[ctx.rank] for gb in global_batches if len(gb) >= ctx.world_size]
    return slices
