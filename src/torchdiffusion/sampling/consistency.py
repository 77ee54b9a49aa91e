"""Multistep consistency sampling (Song et al. 2023, "Consistency models", Algorithm 1).

With a consistency function f(x, sigma) (a denoiser that maps any point of a probability-flow trajectory to its
start, see :class:`~torchdiffusion.fewstep.consistency.ConsistencyFunction`) one evaluation gives a sample:
x0 = f(x_T, sigma_0). More steps trade compute for quality: re-noise to the next level tau and map again,

    x_tau = x0 + sqrt(tau^2 - sigma_min^2) z,    x0 = f(x_tau, tau),

for each positive level of the grid after the first. NFE = the number of positive levels. With an ordinary
denoiser in place of f this is the "denoise, then re-noise" sampler of the same paper.
"""
from __future__ import annotations

import math

import torch

from ..utils import randn_like
from .core import _report, expand_sigma, levels


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
