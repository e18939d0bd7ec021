"""Data-parallel meta-training with PyTorch's distributed package: the meta-batch split across processes.

Every process draws the same meta-batch (the task generator is seeded alike on every rank) and keeps
its own contiguous share of the tasks; after the local meta-gradient, the processes average the
gradients (and BatchNorm running statistics) with one all-reduce, so each takes the same optimizer
step. With equal shares the average of the shares' mean-loss gradients is the gradient of the whole
meta-batch's mean loss: the update equals the single-process one up to floating-point summation order.
Gloo serves CPUs, NCCL GPUs. Processes are started by `torchrun`, which sets RANK and WORLD_SIZE.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

B = TypeVar("B")


def env_world_size() -> int:
    """Processes of this job as `torchrun` announces them (1 when started directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as `torchrun` announces it (0 when started directly), before joining the job."""
    return int(os.environ.get("RANK", "0"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_process_group() -> None:
    """Join the job `torchrun` started (no-op for a single process or when already joined): Gloo for
    CPU tensors and, where there are GPUs, NCCL for CUDA tensors, each process on its local GPU."""
    if env_world_size() <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch.distributed.fsdp (imported by torch._dynamo, which the algorithms import when they compile
    # or ask whether they are being compiled) stores `dist.group.WORLD` in default arguments when it is
    # first imported. Imported after joining, it would hold the group for good: `leave()` could not
    # free it and its Gloo threads would die with the interpreter. Imported first, it stores None.
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def leave() -> None:
    """Leave the job (no-op when not joined); every process calls this before it exits. A process that
    exits still joined leaves Gloo's worker threads running while the interpreter is torn down, and
    one of them releasing a tensor then aborts the process (SIGABRT), after which torchrun stops the
    other processes as failed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(value: str) -> str:
    """Rank 0's `value` on every process (e.g. the run directory, which embeds a timestamp)."""
    if env_world_size() <= 1:
        return value
    init_process_group()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def any_rank(flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. a stop signal reached one of them)."""
    if world_size() == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def shard(batch: B, part: int, parts: int) -> B:
    """The `part`-th of `parts` equal, contiguous shares of a batch dataclass's leading dimension."""
    if not is_dataclass(batch):
        raise TypeError(f"cannot shard a {type(batch).__name__}")
    size = len(getattr(batch, fields(batch)[0].name))
    if size % parts:
        raise ValueError(f"meta_batch_size={size}: must be divisible by the number of processes ({parts})")
    step = size // parts
    return replace(batch, **{f.name: getattr(batch, f.name)[part * step:(part + 1) * step]
                             for f in fields(batch)})  # type: ignore[type-var]


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the processes, in one all-reduce of a flat buffer."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64 if t.is_floating_point() else t.dtype) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def average_gradients(module: torch.nn.Module) -> None:
    """Average every parameter's `.grad` and every floating-point buffer (BatchNorm running statistics)
    over the processes, so that all ranks step identically and stay identical."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    average_(grads)
    average_([b for b in module.buffers() if b.is_floating_point()])


def mean_of(values: dict[str, float]) -> dict[str, Any]:
    """Scalars averaged over the processes (for logging on rank 0)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    average_([tensor])
    return dict(zip(keys, tensor.tolist(), strict=True))
