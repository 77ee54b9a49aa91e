"""The first-order samplers on the denoiser contract: DDPM ancestral, DDIM and Euler.

All work in VE coordinates (x = x0 + sigma n), where the VP posterior of DDPM becomes
q(x_s | x_t, x0) = N(x0 + (s^2/t^2)(x_t - x0), s^2 (t^2 - s^2) / t^2) for noise levels t > s
(the VP posterior of Ho et al. 2020, eq. 6-7, divided by sqrt(alpha_bar_s)). Each sampler is a loop
over a pure batched single step that other code (distillation, guidance) can reuse.

One rule for noise levels in every sampler: the loop reads the grid as Python floats (:func:`levels`), the step
coefficients are computed from those floats, and :func:`expand_sigma` makes the (N,) float32 tensor the denoiser
contract asks for. Callbacks receive the floats.
"""
from __future__ import annotations

import torch

from ..utils import check_choice, randn_like
from ..variance import step_variance

VARIANCES = ("small", "large")


def levels(sigmas) -> list[float]:
    """The noise-level grid as Python floats (a tensor, list or tuple in)."""
    return [float(s) for s in sigmas]


def expand_sigma(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """A scalar noise level as the (N,) float32 tensor on x's device that the denoiser contract asks for."""
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def posterior_variance(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Variance of q(x_s | x_t, x0) in VE coordinates: s^2 (t^2 - s^2) / t^2 (DDPM's beta-tilde)."""
    return sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2


def ddpm_step(x, denoised, sigma, sigma_next, noise, variance="small", v=None):
    """One ancestral DDPM step (Ho et al. 2020, Algorithm 2) from level sigma to sigma_next.

    variance 'small' is the posterior variance beta-tilde, 'large' is beta (both in VE coordinates); a learned
    interpolation `v` (shaped like x) replaces them by exp(v log beta + (1 - v) log beta-tilde) of the two levels
    (Nichol & Dhariwal 2021, eq. 15 and Sec. 4; :func:`~torchdiffusion.variance.step_variance`).
    """
    mean = denoised + (sigma_next**2 / sigma**2) * (x - denoised)
    if sigma_next == 0:
        return mean
    if v is None and variance == "small":
        var = posterior_variance(sigma, sigma_next)
    else:  # beta_ts / alpha_bar_s with alpha_bar = 1 / (1 + sigma^2), or the learned interpolation
        var = step_variance(sigma, sigma_next, v, variance)
    return mean + var**0.5 * noise


def ddim_step(x, denoised, sigma, sigma_next, noise=None, eta=0.0):
    """One DDIM step (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 has DDPM's posterior variance."""
    eps = (x - denoised) / sigma
    if sigma_next == 0:
        return denoised
    var = eta**2 * posterior_variance(sigma, sigma_next)
    x_next = denoised + max(sigma_next**2 - var, 0.0) ** 0.5 * eps
    if eta > 0:
        x_next = x_next + var**0.5 * noise
    return x_next


def euler_step(x, denoised, sigma, sigma_next):
    """One Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the Heun correction)."""
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


def _report(callback, i, x, sigma, sigma_next, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, variance="small"):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2); with all T levels this is DDPM exactly. A denoiser that
    learns its variance (``learns_variance``) steps with it at any grid, `variance` then unused (Nichol & Dhariwal
    2021, Sec. 4)."""
    check_choice("variance", variance, VARIANCES)
    learned = getattr(denoiser, "learns_variance", False)
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        if learned:
            denoised, v = denoiser.with_variance(x, expand_sigma(sigma, x))
        else:
            denoised, v = denoiser(x, expand_sigma(sigma, x)), None
        _report(callback, i, x, sigma, sigma_next, denoised)
        noise = randn_like(x, generator=generator) if sigma_next > 0 else None
        x = ddpm_step(x, denoised, sigma, sigma_next, noise, variance, v)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): deterministic for eta = 0, DDPM-like for eta = 1."""
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        noise = randn_like(x, generator=generator) if eta > 0 and sigma_next > 0 else None
        x = ddim_step(x, denoised, sigma, sigma_next, noise, eta)
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with the Heun step off)."""
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = euler_step(x, denoised, sigma, sigma_next)
    return x
