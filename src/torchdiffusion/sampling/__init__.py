"""Samplers: functions `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **opts)`.

`sigmas` is a decreasing 1-D tensor ending in 0 (see :func:`get_sigmas`) and x starts as sigmas[0] * noise.
`SAMPLERS` maps names to the functions; :func:`sample` is the one-call convenience.
"""
from __future__ import annotations

import torch

from ..utils import randn
from .core import (ddim_step, ddpm_step, euler_step, expand_sigma, posterior_variance, sample_ddim,
                   sample_ddpm, sample_euler, to_d)
from .sigmas import SPACINGS, get_sigmas, karras_sigmas

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed values: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def sample(denoiser, shape, sigmas, sampler="ddim", *, generator=None, callback=None, device=None, **opts):
    """Draw x_T = sigmas[0] * noise of `shape` and run the named sampler; returns x at sigma = 0."""
    fn = get_sampler(sampler)
    sigmas = sigmas.to(device) if device is not None else sigmas
    x = randn(shape, generator=generator, device=device) * sigmas[0]
    return fn(denoiser, x, sigmas, generator=generator, callback=callback, **opts)


__all__ = [
    "SAMPLERS", "SPACINGS", "get_sampler", "get_sigmas", "karras_sigmas", "sample", "sample_ddim",
    "sample_ddpm", "sample_euler", "ddim_step", "ddpm_step", "euler_step", "to_d", "expand_sigma",
    "posterior_variance",
]
