"""The demo: train a diffusion model on MNIST on this machine, then draw what it learned."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import viz
from .config import RunConfig
from .guidance import class_labels_for, net_num_classes
from .pipeline import generate, sample_kwargs
from .precond import Conditioned
from .sampling import get_sampler, get_sigmas
from .train import Trainer
from .utils import randn, sample_generators

TRAJECTORY_SAMPLES = 4  # rows of the denoising-trajectory picture (classes as in sample.class_label)


def save_samples(x: torch.Tensor, out_dir: Path, stem: str = "samples") -> dict:
    """Grid PNG and an .npz (uint8 images, N x H x W x C) of a batch of samples in [-1, 1]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = viz.save_grid(x, out_dir / f"{stem}.png", nrow=int(math.ceil(math.sqrt(x.shape[0]))), scale=3)
    npz = out_dir / f"{stem}.npz"
    np.savez_compressed(npz, images=viz.to_uint8(x))
    return {"grid": str(png), "npz": str(npz)}


@torch.no_grad()
def record_trajectory(denoiser, shape, sigmas, *, sampler: str, seed: int, n: int = TRAJECTORY_SAMPLES,
                      columns: int = 8):
    """Run a sampler on n samples and keep x_t and the predicted x0 at `columns` evenly spaced steps."""
    gens = sample_generators(seed, n)
    x = randn((n, *shape), generator=gens) * sigmas[0]
    steps = len(sigmas) - 1
    keep = set(np.linspace(0, steps - 1, columns).round().astype(int).tolist())
    xs, x0s, levels = [], [], []

    def callback(info):
        if info["i"] in keep:
            xs.append(info["x"].clone())
            x0s.append(info["denoised"].clone())
            levels.append(float(info["sigma"]))

    final = get_sampler(sampler)(denoiser, x, sigmas, generator=gens, callback=callback)
    xs.append(final)
    x0s.append(final)
    levels.append(0.0)
    return xs, x0s, levels


def demo_pictures(trainer: Trainer, out_dir: Path, *, n: int | None = None) -> dict:
    """Samples grid + npz (n samples, default sample.n), forward-noising strip of real digits, denoising
    trajectory, loss curve."""
    cfg = trainer.cfg
    den = trainer.ema_denoiser.eval()
    shape = tuple(trainer.data.sample_shape)
    s = cfg.sample
    n = s.n if n is None else n
    t0 = time.time()
    x = generate(den, shape, n=n, progress=trainer.progress, **sample_kwargs(s, shape))
    sample_seconds = time.time() - t0
    files = save_samples(x, out_dir)
    sched = den.schedule
    real, _ = trainer.data.batch(torch.arange(6))
    if hasattr(sched, "T"):
        ts = [0, 50, 100, 200, 300, 400, 600, 800, sched.T - 1]
        ts = [t for t in ts if t < sched.T]
        levels = [float(sched.sigmas[t]) for t in ts]
        titles = [f"t={t + 1}" for t in ts]
    else:
        levels = get_sigmas(sched, 8, "logsnr")[:-1].flip(0).tolist()
        titles = None
    files["forward"] = str(viz.forward_strip(real, sched, levels, out_dir / "forward_noising.png",
                                             generator=torch.Generator().manual_seed(0), col_titles=titles))
    sig = get_sigmas(sched, s.steps, s.spacing)
    labels = class_labels_for(TRAJECTORY_SAMPLES, s.class_label, net_num_classes(den))  # (n,) or None
    xs, x0s, lv = record_trajectory(den if labels is None else Conditioned(den, class_labels=labels), shape, sig,
                                    sampler=s.sampler, seed=s.seed + 1, n=TRAJECTORY_SAMPLES)
    files["trajectory"] = str(viz.trajectory_strip(xs, x0s, lv, out_dir / "denoising_trajectory.png",
                                                   schedule=sched))
    curve = cfg.run_dir / "loss_curve.png"
    if curve.exists():
        files["loss_curve"] = str(curve)
    files["sample_seconds"] = sample_seconds
    return files


def run_demo(cfg: RunConfig, *, progress: bool | None = None, resume: bool = True) -> dict:
    t0 = time.time()
    trainer = Trainer(cfg, resume=resume, progress=progress, log_lines=True)
    result = trainer.fit()
    result["pictures"] = demo_pictures(trainer, cfg.run_dir)
    result["wall_seconds"] = time.time() - t0
    (cfg.run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    return result
