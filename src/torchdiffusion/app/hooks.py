"""The standard trainer hooks: sample grids during training, the periodic evaluation, and the loss curve."""
from __future__ import annotations

import math

import torch

from .. import viz
from ..evaluate import periodic_evaluation
from ..sampling import generate
from ..build import task_of
from ..training import Hook, read_metrics

GRID_SAMPLES = 64  # samples in each grid drawn during training


class SampleGrid(Hook):
    """Every `every` steps: samples of the EMA weights as the run's sample configuration says, drawn to
    ``samples/step_<step>.png`` (a grid for images, a scatter over the data for 2-D points)."""

    def __init__(self, every: int, n: int = GRID_SAMPLES):
        self.every, self.n = every, n

    @torch.no_grad()
    def __call__(self, trainer):
        shape = tuple(trainer.data.sample_shape)
        x = generate(trainer.ema_denoiser, shape, trainer.cfg.sample, n=self.n, device=trainer.device)
        path = trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png"
        if len(shape) == 3:
            viz.save_grid(x, path, nrow=int(math.sqrt(self.n)))
        else:
            ref, _ = trainer.data.batch(torch.arange(min(len(trainer.data), 2000)))
            viz.scatter_2d(x, path, data=ref, title=f"step {trainer.step}")
        return None


class PeriodicEvaluation(Hook):
    """Every `every` steps: FD, KID, precision/recall and class coverage of train.eval_samples samples (MNIST)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, trainer):
        return periodic_evaluation(trainer.ema_denoiser, trainer.cfg, tuple(trainer.data.sample_shape),
                                   device=trainer.device)


class LossCurve(Hook):
    """After the run: ``loss_curve.png`` from the logged training loss."""

    def end(self, trainer):
        metrics = read_metrics(trainer.run_dir / "logs")
        if metrics:
            viz.loss_curve(metrics, trainer.run_dir / "loss_curve.png")


def standard_hooks(cfg) -> list[Hook]:
    """What `torchdiffusion train` runs beside the trainer: sample grids (train.sample_every) and evaluations
    (train.eval_every) for runs that draw samples, and the loss curve."""
    hooks: list[Hook] = []
    if task_of(cfg).samples:
        if cfg.train.sample_every:
            hooks.append(SampleGrid(cfg.train.sample_every))
        if cfg.train.eval_every:
            hooks.append(PeriodicEvaluation(cfg.train.eval_every))
    return hooks + [LossCurve()]
