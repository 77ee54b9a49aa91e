"""Probability-flow ODE samplers: Heun with optional churn (Karras et al. 2022, Algorithm 2), Euler-ancestral,
and the high-accuracy adaptive reference solve.

All work in VE coordinates, where the probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma
(Karras et al. 2022, eq. 3). Written in lambda = -log(sigma) it reads dx/dlambda = D(x, e^-lambda) - x,
the smooth, well-scaled form the reference solve integrates.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..utils import randn_like
from ..utils import check_choice
from .core import _report, euler_step, expand_sigma, levels, to_d

FINAL_STEPS = ("denoise", "heun0")
ODE_METHODS = ("RK45", "DOP853", "Radau")  # scipy solve_ivp methods of the reference solve


def final_step(x, denoised, kind="denoise"):
    """The step from the last positive sigma to 0 (no extra network evaluation).

    'denoise' is the Euler / DDIM / DPM-Solver-1 step, x_0 = D(x, sigma). 'heun0' is the trapezoidal (Heun)
    step using that the ODE derivative (x - D) / sigma tends to 0 as sigma -> 0 for data with a smooth
    density: x_0 = x - sigma (d + 0) / 2 = (x + D) / 2. For a Gaussian mode the exact endpoint factor is
    sqrt(a) with a = s^2 / (s^2 + sigma^2); 'denoise' gives a (error ~ (1 - a) / 2), 'heun0' gives
    (1 + a) / 2 (error ~ (1 - a)^2 / 8). Use 'denoise' for data without a density (quantized pixels).
    """
    if kind == "denoise":
        return denoised
    return 0.5 * (x + denoised)


def check_final(final: str) -> str:
    return check_choice("final", final, FINAL_STEPS)


def heun_step(x, denoised, sigma, sigma_next, denoiser_next):
    """Heun's (trapezoidal) step of the PF-ODE (Karras et al. 2022, Algorithm 1, lines 5-8); `denoiser_next`
    maps the Euler predictor x' to D(x', sigma_next)."""
    d = to_d(x, sigma, denoised)
    x_euler = x + d * (sigma_next - sigma)
    d_next = to_d(x_euler, sigma_next, denoiser_next(x_euler))
    return x + 0.5 * (d + d_next) * (sigma_next - sigma)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. 2022, Algorithm 2: Heun on the PF-ODE, Euler on the last step, optional churn."""
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be non-negative, got {s_churn}, {s_noise}")
    sig = levels(sigmas)
    n = len(sig) - 1
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:  # churn: raise the noise level to sigma_hat by adding fresh noise (lines 5-6)
            x = x + randn_like(x, generator=generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        denoised = denoiser(x, expand_sigma(sigma_hat, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = euler_step(x, denoised, sigma_hat, sigma_next)
        else:
            x = heun_step(x, denoised, sigma_hat, sigma_next,
                          lambda xe: denoiser(xe, expand_sigma(sigma_next, xe)))
    return x


def ancestral_step(sigma, sigma_next, eta=1.0):
    """Split a move to sigma_next into a deterministic move to sigma_down and fresh noise of std sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_next^2 and sigma_up = eta * (DDPM posterior std), capped at sigma_next."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0):
    """Euler-ancestral: an Euler PF-ODE step to sigma_down then noise of std sigma_up (k-diffusion's form of
    DDPM's ancestral step; eta = 0 is Euler)."""
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = euler_step(x, denoised, sigma, sigma_down)
        if sigma_next > 0 and eta > 0:
            x = x + randn_like(x, generator=generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_ode_reference(denoiser, x, sigmas, *, generator=None, callback=None, rtol=1e-9, atol=1e-9,
                         method="DOP853", sigma_end=1e-5, final="heun0", chunk=None):
    """Reference solution of the PF-ODE: scipy's adaptive Runge-Kutta on dx/dlambda = D(x, e^-lambda) - x.

    Integrates float64, the batch flattened into one vector, segment by segment through `sigmas`; the last
    segment goes from the smallest positive sigma down to `sigma_end` (1e-5), then `final` (see
    :func:`final_step`) maps to sigma = 0. scipy controls the RMS error over the vector, so `chunk` (samples
    per solve, default all) can tighten the control per sample; on the benchmark mixtures one solve of 4000
    samples at rtol = atol = 1e-10 agrees with 64-sample solves at 1e-11 to 2.4e-8 (max over samples).
    """
    from scipy.integrate import solve_ivp

    check_final(final)
    check_choice("method", method, ODE_METHODS)
    chunk = chunk or x.shape[0]
    shape, dtype, device = x.shape, x.dtype, x.device
    sig = levels(sigmas)

    def solve(xc, s0, s1):
        n = xc.shape[0]

        def f(lam, y):
            xt = torch.from_numpy(y).view(n, *shape[1:])
            s = torch.full((n,), math.exp(-lam), dtype=torch.float64)  # float32 sigma would make the RHS rough at 1e-8 and stall tight tolerances
            return (denoiser(xt, s).double() - xt).reshape(-1).numpy()

        y0 = xc.double().reshape(-1).cpu().numpy()
        res = solve_ivp(f, (-math.log(s0), -math.log(s1)), y0, method=method, rtol=rtol, atol=atol)
        if not res.success:
            raise RuntimeError(f"reference ODE solve failed: {res.message}")
        return torch.from_numpy(np.ascontiguousarray(res.y[:, -1])).view(n, *shape[1:])

    x = x.double().cpu()
    for i in range(len(sig) - 1):
        s0, s1 = sig[i], sig[i + 1]
        denoised = denoiser(x, torch.full((shape[0],), s0, dtype=torch.float64)).double()
        _report(callback, i, x.to(dtype), s0, s1, denoised.to(dtype))
        target = s1 if s1 > 0 else min(sigma_end, s0)
        if target < s0:
            x = torch.cat([solve(x[j:j + chunk], s0, target) for j in range(0, shape[0], chunk)])
        if s1 == 0:
            x = final_step(x, denoiser(x, torch.full((shape[0],), target, dtype=torch.float64)).double(), final)
    return x.to(device=device, dtype=dtype)
