"""Who this process is among the data-parallel processes, and the few collectives the host needs.

Every answer comes from ``torch.distributed``: one process without a group is rank 0 of 1.
The group itself is joined by the backend that runs the step (``join_process_group`` for
torchrun on CPUs/GPUs, DeepSpeed's own init under ZeRO, a gloo host group over poprun
instances on IPUs); the trainer, evaluation and benchmarks only read and reduce through here.
Python 3.8 / torch 2.0 compatible: the IPU path imports this module.
"""
from __future__ import annotations

import collections
import io
import os
import sys
from typing import Any, Deque, List

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


# The tensors of the latest collectives, held for the life of the process. A gloo worker
# thread drops its reference to a collective's tensors after the caller's wait() returns;
# when that is the last reference to a tensor Python created, freeing it takes the GIL.
# Two ways that ends a process: torch 2.0.1's destroy_process_group joins those threads
# with the GIL held (a poprun instance never exited), and when the interpreter is already
# finalizing, a thread that asks for the GIL is stopped by Python, which aborts through
# C++ (SIGABRT, "terminate called without an active exception", after a run that
# succeeded; seen on a loaded machine). Held here, the last reference is always Python's.
_RECENT: Deque[torch.Tensor] = collections.deque(maxlen=64)


def _hold(*tensors: Any) -> None:
    for t in tensors:
        if isinstance(t, (list, tuple)):
            _RECENT.extend(t)
        else:
            _RECENT.append(t)


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only (on the device the backend selected); gloo takes CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over processes (metrics); identity for one process."""
    if not is_distributed():
        return t
    x = t.to(_collective_device(), copy=True)
    dist.all_reduce(x)
    _hold(x)
    return x.cpu()


def _to_bytes(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(_collective_device())


def _from_bytes(t: torch.Tensor, n: int) -> Any:
    # plain types and tensors only (what the host exchanges), never the full unpickler
    return torch.load(io.BytesIO(t[:n].cpu().numpy().tobytes()), weights_only=True)


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    data = _to_bytes(obj)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=data.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=data.device)
    padded[:data.numel()] = data
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    _hold(data, size, sizes, padded, out)
    return [_from_bytes(t, int(s.item())) for t, s in zip(out, sizes)]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    data = _to_bytes(obj) if dist.get_rank() == 0 else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=_collective_device())
    dist.broadcast(size, src=0)
    if data is None:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=size.device)
    dist.broadcast(data, src=0)
    _hold(size, data)
    return _from_bytes(data, int(size.item()))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def join_process_group(backend: str) -> None:
    """Join the group that torchrun / the deepspeed launcher describes (``WORLD_SIZE`` > 1), if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        store = _attempt_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))


def _attempt_store() -> Any:
    """torchrun's store, its keys under this attempt's prefix; None outside torchrun.

    torchrun serves one store at MASTER_ADDR:MASTER_PORT for every restart of a group (its static
    rendezvous keeps the store across attempts), and torch's env:// handler no longer prefixes the
    keys by attempt (torch 2.14). A restarted group then reads the dead group's addresses and waits
    in gloo's connect until the 30 minute timeout. Under the prefix ``vit-accel/attempt_N``
    (``TORCHELASTIC_RESTART_COUNT``) every attempt meets only its own processes.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore("vit-accel/attempt_%s" % attempt, store)


_WAS_IN_GROUP = False


def leave_process_group() -> None:
    global _WAS_IN_GROUP
    if dist.is_available() and dist.is_initialized():
        _WAS_IN_GROUP = True
        dist.destroy_process_group()


def end_process(code: int) -> None:
    """Exit the command-line process with ``code``.

    A process that was in a group ends without the interpreter's finalization (files are
    written and closed by then; stdout and stderr are flushed here). Objects that still hold
    the group (DeepSpeed's engine, DDP) keep its gloo threads alive after it is left; a
    collective still completing there frees its tensors with the GIL while Python finalizes,
    Python stops that thread, and the C++ runtime aborts the process (SIGABRT, "terminate
    called without an active exception") after a run that succeeded.
    """
    if _WAS_IN_GROUP or (dist.is_available() and dist.is_initialized()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
