"""Training: the trainer (AdamW, learning-rate schedule, clipping, EMA, mixed precision, checkpoints, resume),
data-parallel processes under torchrun, and scalar logging."""
from __future__ import annotations

from .distributed import DistInfo, dist_info, init_distributed
from .tracking import ScalarWriter, read_metrics
from .trainer import EMA, Hook, Trainer, config_differences, lr_at, train

__all__ = ["Trainer", "Hook", "EMA", "train", "lr_at", "config_differences", "DistInfo", "dist_info",
           "init_distributed", "ScalarWriter", "read_metrics"]
