"""The demo: train a diffusion model on MNIST on this machine, then draw what it learned."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import viz
from ..config import RunConfig
from ..sampling import generate, get_sigmas
from ..training import Trainer
from .hooks import standard_hooks

TRAJECTORY_SAMPLES = 4  # rows of the denoising-trajectory picture (classes as in sample.class_label)
TRAJECTORY_COLUMNS = 8  # steps shown in it
FORWARD_TIMESTEPS = (0, 50, 100, 200, 300, 400, 600, 800)  # DDPM t - 1 shown in the forward-noising picture


@torch.no_grad()
def record_trajectory(denoiser, shape, spec, *, n: int = TRAJECTORY_SAMPLES, columns: int = TRAJECTORY_COLUMNS):
    """Sample n examples as `spec` says and keep x_t and the predicted x0 at `columns` evenly spaced steps (the
    last column is the sample). Returns (xs, x0s, levels)."""
    keep = set(np.linspace(0, spec.steps - 1, columns).round().astype(int).tolist())
    xs, x0s, levels = [], [], []

    def callback(info):
        if info["i"] in keep:
            xs.append(info["x"].clone())
            x0s.append(info["denoised"].clone())
            levels.append(float(info["sigma"]))

    final = generate(denoiser, shape, spec, n=n, callback=callback)
    return xs + [final], x0s + [final], levels + [0.0]


def demo_pictures(trainer: Trainer, out_dir: Path, *, n: int | None = None) -> dict:
    """Samples grid + npz (n samples, default sample.n), forward-noising strip of real digits, denoising
    trajectory, loss curve."""
    cfg = trainer.cfg
    den = trainer.ema_denoiser.eval()
    shape = tuple(trainer.data.sample_shape)
    s = cfg.sample
    t0 = time.time()
    x = generate(den, shape, s, n=s.n if n is None else n, progress=trainer.progress)
    sample_seconds = time.time() - t0
    files = viz.save_samples(x, out_dir)
    sched = den.schedule
    real, _ = trainer.data.batch(torch.arange(6))
    if hasattr(sched, "T"):
        ts = [t for t in (*FORWARD_TIMESTEPS, sched.T - 1) if t < sched.T]
        levels = [float(sched.sigmas[t]) for t in ts]
        titles = [f"t={t + 1}" for t in ts]
    else:
        levels = get_sigmas(sched, 8, "logsnr")[:-1].flip(0).tolist()
        titles = None
    files["forward"] = str(viz.forward_strip(real, sched, levels, out_dir / "forward_noising.png",
                                             generator=torch.Generator().manual_seed(0), col_titles=titles))
    xs, x0s, lv = record_trajectory(den, shape, dataclasses.replace(s, seed=s.seed + 1))
    files["trajectory"] = str(viz.trajectory_strip(xs, x0s, lv, out_dir / "denoising_trajectory.png",
                                                   schedule=sched))
    curve = cfg.run_dir / "loss_curve.png"
    if curve.exists():
        files["loss_curve"] = str(curve)
    files["sample_seconds"] = sample_seconds
    return files


def run_demo(cfg: RunConfig, *, progress: bool | None = None, resume: bool = True) -> dict:
    t0 = time.time()
    trainer = Trainer(cfg, resume=resume, progress=progress, log_lines=True, hooks=standard_hooks(cfg))
    result = trainer.fit()
    result["pictures"] = demo_pictures(trainer, cfg.run_dir)
    result["wall_seconds"] = time.time() - t0
    (cfg.run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    return result
