"""Samplers: functions `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **opts)`.

`sigmas` is a decreasing 1-D tensor ending in 0 (see :func:`get_sigmas`) and x starts as sigmas[0] * noise.
`SAMPLERS` maps names to the functions; :func:`sample` is the one-call convenience.
"""
from __future__ import annotations

import torch

from ..utils import randn
from .core import (ddim_step, ddpm_step, euler_step, expand_sigma, posterior_variance, sample_ddim,
                   sample_ddpm, sample_euler, to_d)
from .dpm_solver import (dpm_solver_1_step, dpm_solver_2_step, dpm_solver_3_step, dpmpp_1_step, dpmpp_2m_step,
                         dpmpp_3m_step, dynamic_threshold, sample_dpm_solver, sample_dpm_solver_1,
                         sample_dpm_solver_2, sample_dpm_solver_3, sample_dpm_solver_adaptive, sample_dpmpp_2m,
                         sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m)
from .ode import (ancestral_step, final_step, heun_step, sample_euler_ancestral, sample_heun,
                  sample_ode_reference)
from .sde import euler_maruyama_step, langevin_step, sample_euler_maruyama, sample_pc
from .sigmas import SPACINGS, get_sigmas, karras_sigmas
from .unipc import sample_unipc, unipc_update

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpm_solver_1": sample_dpm_solver_1,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpm_solver_3": sample_dpm_solver_3,
    "dpm_solver_adaptive": sample_dpm_solver_adaptive,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "ode_reference": sample_ode_reference,
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
    "posterior_variance", "sample_heun", "sample_euler_ancestral", "sample_ode_reference", "sample_dpm_solver",
    "sample_dpm_solver_1", "sample_dpm_solver_2", "sample_dpm_solver_3", "sample_dpm_solver_adaptive",
    "sample_dpmpp_2s", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpmpp_2m_sde", "sample_unipc",
    "sample_euler_maruyama", "sample_pc", "heun_step", "ancestral_step", "final_step", "dpm_solver_1_step",
    "dpm_solver_2_step", "dpm_solver_3_step", "dpmpp_1_step", "dpmpp_2m_step", "dpmpp_3m_step",
    "dynamic_threshold", "unipc_update", "euler_maruyama_step", "langevin_step",
]
