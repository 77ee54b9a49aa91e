"""Multistep consistency sampling (Song et al. 2023, "Consistency models", Algorithm 1).

With a consistency function f(x, sigma) (a denoiser that maps any point of a probability-flow trajectory to its
start, see :class:`~torchdiffusion.fewstep.consistency.ConsistencyFunction`) one evaluation gives a sample:
x0 = f(x_T, sigma_0). More steps trade compute for quality: re-noise to the next level tau and map again,

    x_tau = x0 + sqrt(tau^2 - sigma_min^2) z,    x0 = f(x_tau, tau),

for each positive level of the grid after the first. NFE = the number of positive levels. With an ordinary
denoiser in place of f this is the "denoise, then re-noise" sampler of the same paper.

:func:`sample_meanflow` is the deterministic few-step sampler of MeanFlow (Geng et al. 2025, eq. 12) for a denoiser
that is told the level it jumps to (``sigma_next``; :class:`~torchdiffusion.fewstep.meanflow.MeanFlowDenoiser`).
"""
from __future__ import annotations

import math

import torch

from ..utils import randn_like
from .core import _report, ddim_step, expand_sigma, levels


@torch.no_grad()
def sample_consistency(denoiser, x, sigmas, *, generator=None, callback=None, sigma_min=0.0):
    """Song et al. 2023, Algorithm 1 on the positive levels of `sigmas` (decreasing, ending in 0); `sigma_min` is
    the consistency function's boundary level epsilon (re-noising adds sqrt(tau^2 - epsilon^2) of noise)."""
    if sigma_min < 0:
        raise ValueError(f"sigma_min must be non-negative, got {sigma_min}")
    sig = [s for s in levels(sigmas) if s > 0]
    for i, sigma in enumerate(sig):
        if i > 0:
            if sigma <= sigma_min:
                raise ValueError(f"every level must exceed sigma_min={sigma_min}, got {sigma}")
            x = x + math.sqrt(sigma**2 - sigma_min**2) * randn_like(x, generator=generator)
        denoised = denoiser(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sig[i + 1] if i + 1 < len(sig) else 0.0, denoised)
        x = denoised
    return x


@torch.no_grad()
def sample_meanflow(denoiser, x, sigmas, *, generator=None, callback=None):
    """MeanFlow's sampler (Geng et al. 2025, eq. 12): for each interval sigma -> sigma_next of `sigmas` (decreasing,
    ending in 0) one jump z_r = z_t - (t - r) u(z_t, r, t), which is a DDIM step of the denoiser called with
    ``sigma_next`` (the level it lands on). Deterministic; NFE = the number of intervals."""
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, expand_sigma(sigma, x), sigma_next=expand_sigma(sigma_next, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = ddim_step(x, denoised, sigma, sigma_next)
    return x
