"""Distributed helpers, after torchvision's references: read torchrun's env, guard rank 0, reduce."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, timeout_s: int = 600) -> DistContext:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a plain process is world 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before init: NCCL binds each rank to its own GPU
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        timeout = datetime.timedelta(seconds=timeout_s)  # explicit: a hung peer fails, not hangs
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # After an elastic restart the rendezvous store still holds the dead round's addresses;
        # a per-round prefix keeps the new ranks from dialling them.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=dist.PrefixStore(f"mlpipe/round-{restart}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if use_cuda else None,
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(obj):
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(module: torch.nn.Module) -> None:
    """Every tensor of `module`'s state (parameters and buffers) becomes rank 0's, in place. For
    state DDP does not keep in step, such as a weight average of batch-norm statistics that each
    rank updates from its own last batch: after this every rank holds what rank 0 checkpoints,
    so a run resumed from that checkpoint continues as the uninterrupted one."""
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
