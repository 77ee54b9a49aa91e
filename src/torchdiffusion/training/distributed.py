"""Data-parallel training with torch.distributed: one process per device, launched by ``torchrun``.

Each of the world_size processes holds a full copy of the network and trains on its slice of every global
batch (:class:`~torchdiffusion.data.EpochSampler` shards it); DistributedDataParallel averages the gradients
over the processes during backward, so every optimizer step sees the gradient of the whole global batch
(Goyal et al. 2017, "Accurate, large minibatch SGD"). The backend is gloo on CPU and NCCL on CUDA.

    torchrun --nproc-per-node 2 -m torchdiffusion train --config demo    # two processes, one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-id run1 --rdzv-backend c10d \\
        --rdzv-endpoint host0:29500 -m torchdiffusion train --config demo  # the same on every machine

Without the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) everything runs in one process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..utils import check_choice

BACKENDS = ("gloo", "nccl")
# words of the errors a collective raises when a peer died, stopped answering or closed its connection
PEER_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "gloo", "nccl")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among world_size processes, local_rank on its node, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, samples, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        """cuda:local_rank under NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def dist_info() -> DistInfo:
    """The state of the default process group (a single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group described by torchrun's RANK, WORLD_SIZE and LOCAL_RANK (MASTER_ADDR/PORT set
    the rendezvous). backend: gloo or nccl (None: nccl when CUDA is available, else gloo). timeout_s: how long
    a collective waits for the other processes before it fails (None: torch's default), so that a stopped or
    frozen peer ends the run with an error instead of hanging it. Idempotent (an existing group is used as it
    is); with no WORLD_SIZE or WORLD_SIZE=1 it returns a single-process DistInfo and creates no group."""
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    check_choice("backend", backend, BACKENDS)
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, rank=_env_int("RANK", 0), world_size=world, **timeout)
    return dist_info()


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process died, froze or timed out."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in PEER_FAILURE_WORDS)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `x` over all processes (x itself in a single process)."""
    if not info.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / info.world_size


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """Rank 0's value of `flag` on every process (so that all stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def any_flag(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` is set on any process (so that all stop at the same step when one is asked to)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(net: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `net` when world_size > 1 (else `net`). Parameters are broadcast from
    rank 0 at construction; gradients are all-reduced (averaged) in buckets during backward."""
    if not info.enabled:
        return net
    device_ids = [info.local_rank] if info.backend == "nccl" else None
    return DistributedDataParallel(net, device_ids=device_ids)


def per_rank_batch(batch_size: int, info: DistInfo, grad_accum: int = 1) -> int:
    """Examples per process and optimizer step; the global batch must split evenly over the processes."""
    if batch_size % info.world_size:
        raise ValueError(f"train.batch_size {batch_size} is not divisible by the world size {info.world_size}")
    local = batch_size // info.world_size
    if not 1 <= grad_accum <= local:
        raise ValueError(f"train.grad_accum must be between 1 and the per-process batch {local}, got {grad_accum}")
    return local


__all__ = ["DistInfo", "dist_info", "init_distributed", "barrier", "all_mean", "broadcast_flag", "any_flag",
           "wrap_ddp", "per_rank_batch", "is_peer_failure", "BACKENDS"]
