"""Training: the trainer (AdamW, learning-rate schedule, clipping, EMA, mixed precision, checkpoints, resume),
data-parallel processes under torchrun, scalar logging, and the run lock and stop on a signal (guard)."""
from __future__ import annotations

from .distributed import DistInfo, dist_info, init_distributed
from .tracking import ScalarWriter, read_metrics
from .guard import RunLock, RunLockError, StopSignals
from .trainer import EMA, Hook, NonFiniteLossError, PeerFailure, Trainer, config_differences, lr_at, train

__all__ = ["Trainer", "Hook", "EMA", "train", "lr_at", "config_differences", "DistInfo", "dist_info",
           "init_distributed", "ScalarWriter", "read_metrics", "NonFiniteLossError", "PeerFailure", "RunLock",
           "RunLockError", "StopSignals"]
