"""Samplers: functions `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **opts)`.

`sigmas` is a decreasing 1-D tensor ending in 0 (see :func:`get_sigmas`) and x starts as sigmas[0] * noise.
`SAMPLERS` maps names to the functions; :func:`generate` (module :mod:`.generate`) is the one front door that
turns a denoiser and a :class:`SampleConfig` into samples.
"""
from __future__ import annotations

from .adaptive import allocate_steps, probe_difficulty, sample_adaptive_prefix, sample_adaptive_steps
from .consistency import sample_consistency, sample_meanflow
from .core import (ddim_step, ddpm_step, euler_step, expand_sigma, levels, posterior_variance, sample_ddim,
                   sample_ddpm, sample_euler, to_d)
from .dpm_solver import (dpm_solver_1_step, dpm_solver_2_step, dpm_solver_3_step, dpmpp_1_step, dpmpp_2m_step,
                         dpmpp_3m_step, dynamic_threshold, sample_dpm_solver, sample_dpm_solver_1,
                         sample_dpm_solver_2, sample_dpm_solver_3, sample_dpm_solver_adaptive, sample_dpmpp_2m,
                         sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m)
from .generate import (SAMPLER_ARGS, SAMPLERS, SampleConfig, SamplingPlan, check_sampler_options, generate, get_sampler,
                       grid_steps, plan_sampling, sampler_option_names, sampler_options)
from .ode import (ancestral_step, final_step, heun_step, sample_euler_ancestral, sample_heun,
                  sample_ode_reference)

from .sde import euler_maruyama_step, langevin_step, sample_euler_maruyama, sample_pc
from .sigmas import SPACINGS, get_sigmas, karras_sigmas
from .unipc import sample_unipc, unipc_update

__all__ = [
    "grid_steps",
    "SAMPLERS", "SAMPLER_ARGS", "SPACINGS", "SampleConfig", "SamplingPlan", "generate", "plan_sampling",
    "sampler_options", "get_sampler", "check_sampler_options", "sampler_option_names", "get_sigmas",
    "karras_sigmas", "levels", "sample_ddim", "sample_ddpm", "sample_euler", "ddim_step", "ddpm_step",
    "euler_step", "to_d", "expand_sigma", "posterior_variance", "sample_heun", "sample_euler_ancestral",
    "sample_ode_reference", "sample_dpm_solver", "sample_dpm_solver_1", "sample_dpm_solver_2",
    "sample_dpm_solver_3", "sample_dpm_solver_adaptive", "sample_dpmpp_2s", "sample_dpmpp_2m", "sample_dpmpp_3m",
    "sample_dpmpp_2m_sde", "sample_unipc", "sample_euler_maruyama", "sample_pc", "heun_step", "ancestral_step",
    "final_step", "dpm_solver_1_step", "dpm_solver_2_step", "dpm_solver_3_step", "dpmpp_1_step", "dpmpp_2m_step",
    "dpmpp_3m_step", "dynamic_threshold", "unipc_update", "euler_maruyama_step", "langevin_step",
    "sample_consistency", "sample_meanflow", "sample_adaptive_steps", "allocate_steps", "probe_difficulty",
    "sample_adaptive_prefix",
]
