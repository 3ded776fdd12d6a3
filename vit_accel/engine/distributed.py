"""Who this process is among the data-parallel processes, and the few collectives the host needs.

Every answer comes from ``torch.distributed``: one process without a group is rank 0 of 1.
The group itself is joined by the backend that runs the step (``join_process_group`` for
torchrun on CPUs/GPUs, DeepSpeed's own init under ZeRO, a gloo host group over poprun
instances on IPUs); the trainer, evaluation and benchmarks only read and reduce through here.
Python 3.8 / torch 2.0 compatible: the IPU path imports this module.
"""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one process is joined."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only (on the device the backend selected); gloo takes CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over processes (metrics); identity for one process."""
    if not is_distributed():
        return t
    x = t.to(_collective_device())
    dist.all_reduce(x)
    return x.cpu()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def join_process_group(backend: str) -> None:
    """Join the group that torchrun / the deepspeed launcher describes (``WORLD_SIZE`` > 1), if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
