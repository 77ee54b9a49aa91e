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
RECON_IMAGES, RECON_COLUMNS = 32, 8  # an autoencoder's originals and reconstructions: 4 pairs of rows of 8


class SampleGrid(Hook):
    """Every `every` steps: samples of the EMA weights as the run's sample configuration says, drawn to
    ``samples/step_<step>.png`` (a grid for images, a scatter over the data for 2-D points)."""

    def __init__(self, every: int, n: int = GRID_SAMPLES):
        self.every, self.n = every, n

    @torch.no_grad()
    def __call__(self, trainer):
        shape = tuple(trainer.data.sample_shape)
        codec = getattr(trainer.data, "codec", None)  # a model on latents: decode them
        x = generate(trainer.ema_denoiser, shape, trainer.cfg.sample, n=self.n, device=trainer.device,
                     decode=codec.decode if codec is not None else None)
        path = trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png"
        if x.ndim == 4:
            viz.save_grid(x, path, nrow=int(math.sqrt(self.n)))
        else:
            ref = trainer.data.batch(torch.arange(min(len(trainer.data), 2000)))[0]  # (may carry conditioning too)
            viz.scatter_2d(x, path, data=ref, title=f"step {trainer.step}")
        return None


class PeriodicEvaluation(Hook):
    """Every `every` steps: FD, KID, precision/recall and class coverage of train.eval_samples samples (MNIST)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, trainer):
        codec = getattr(trainer.data, "codec", None)  # a model on latents: evaluate the decoded images
        return periodic_evaluation(trainer.ema_denoiser, trainer.cfg, tuple(trainer.data.sample_shape),
                                   device=trainer.device, decode=codec.decode if codec is not None else None)


class ReconstructionGrid(Hook):
    """Every `every` steps (autoencoders): the first training images beside their reconstructions by the EMA
    weights (the posterior mean), drawn to ``samples/step_<step>.png`` with originals and reconstructions in
    alternating rows; returns the reconstructions' mean absolute error."""

    def __init__(self, every: int, n: int = RECON_IMAGES):
        self.every, self.n = every, n

    @torch.no_grad()
    def __call__(self, trainer):
        x, _ = trainer.data.batch(torch.arange(min(self.n, len(trainer.data))), device=trainer.device)[:2]
        rec = trainer.ema_module(x).clamp(-1, 1)
        rows = torch.stack([x, rec], 1).unflatten(0, (-1, RECON_COLUMNS)).transpose(1, 2).flatten(0, 2)
        viz.save_grid(rows.cpu(), trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png", nrow=RECON_COLUMNS)
        return {"recon_mae": float((rec - x).abs().mean())}


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
    if cfg.task == "autoencoder" and cfg.train.sample_every:
        hooks.append(ReconstructionGrid(cfg.train.sample_every))
    if task_of(cfg).samples:
        if cfg.train.sample_every:
            hooks.append(SampleGrid(cfg.train.sample_every))
        if cfg.train.eval_every:
            hooks.append(PeriodicEvaluation(cfg.train.eval_every))
    return hooks + [LossCurve()]
