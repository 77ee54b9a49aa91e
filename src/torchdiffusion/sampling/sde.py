"""Reverse-SDE samplers in VE coordinates (Song et al. 2021, "Score-based generative modeling through SDEs").

The VE forward SDE dx = sqrt(d[sigma^2]/dt) dw has the reverse dx = -d[sigma^2]/dt score dt + sqrt(d[sigma^2]/dt) dw_bar
with score = grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2. Euler-Maruyama on the grid `sigmas` (the reverse
diffusion predictor of Song et al. 2021, eq. 47 / Algorithm 4) is

    x_next = x + (sigma^2 - sigma_next^2) score(x, sigma) + sqrt(sigma^2 - sigma_next^2) z,

and the last step to 0 is x + sigma^2 score = D (no noise). The Langevin corrector (Algorithm 4/5) makes
M steps x <- x + eps score + sqrt(2 eps) z at level sigma_next with eps = 2 (r sigma_next)^2, the value of the
paper's eps = 2 (r ||z|| / ||score||)^2 where ||z|| / ||score|| concentrates (see :func:`langevin_step`).
"""
from __future__ import annotations

import math

import torch

from ..utils import check_choice, randn_like
from .core import _report, expand_sigma, levels

PREDICTORS = ("euler_maruyama", "euler", "none")  # predictor steps of sample_pc


def score_from(x, denoised, sigma):
    """score = (D - x) / sigma^2 (Tweedie / Vincent 2011)."""
    return (denoised - x) / sigma**2


def euler_maruyama_step(x, denoised, sigma, sigma_next, noise):
    """One reverse-SDE Euler-Maruyama step in the variable sigma^2 (Song et al. 2021, eq. 47)."""
    ds2 = sigma**2 - sigma_next**2
    x = x + ds2 * score_from(x, denoised, sigma)
    return x if sigma_next == 0 else x + math.sqrt(ds2) * noise


def langevin_step(x, score, noise, snr, sigma):
    """One Langevin corrector step (Song et al. 2021, Algorithm 4 lines 6-8) with step size eps = 2 (snr sigma)^2.

    The paper sets eps = 2 (snr ||z|| / ||score||)^2 with norms averaged over the batch, which couples the
    samples of a batch; in high dimension, while the data is small against the noise, ||z|| / ||score||
    concentrates near sigma, which gives this eps. Per-sample norms would keep batches independent but make eps
    depend on x, and Langevin dynamics with a state-dependent step eps(x) (no Metropolis correction) has the
    stationary law p / eps(x), i.e. p ||score||^2 here: variance inflated by up to (d + 2) / d in d dimensions
    (1.8x measured in 2-D). A step that does not depend on x keeps p stationary up to the O(eps) bias of
    unadjusted Langevin.
    """
    eps = 2 * (snr * float(sigma)) ** 2
    return x + eps * score + math.sqrt(2 * eps) * noise


@torch.no_grad()
def sample_euler_maruyama(denoiser, x, sigmas, *, generator=None, callback=None, s_noise=1.0):
    """Reverse VE SDE by Euler-Maruyama (Song et al. 2021, eq. 47; = DDPM ancestral with 'large' VE variance)."""
    if s_noise < 0:
        raise ValueError(f"s_noise must be non-negative, got {s_noise}")
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        noise = randn_like(x, generator=generator) * s_noise if sigma_next > 0 else None
        x = euler_maruyama_step(x, denoised, sigma, sigma_next, noise)
    return x


@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, generator=None, callback=None, snr=0.16, n_corrector=1,
              predictor="euler_maruyama"):
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2 and 4): a reverse-SDE (or PF-ODE Euler)
    predictor step, then `n_corrector` Langevin steps at the new level with target signal-to-noise ratio `snr`
    (0.16, the paper's VE CIFAR-10 value). No corrector at sigma = 0. NFE = steps + n_corrector (steps - 1)."""
    check_choice("predictor", predictor, PREDICTORS)
    if snr <= 0 or int(n_corrector) != n_corrector or n_corrector < 0:
        raise ValueError(f"need snr > 0 and an integer n_corrector >= 0, got {snr}, {n_corrector}")
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        if predictor == "euler_maruyama":
            x = euler_maruyama_step(x, denoised, sigma, sigma_next, randn_like(x, generator=generator))
        elif predictor == "euler":
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        for _ in range(int(n_corrector)):
            score = score_from(x, denoiser(x, expand_sigma(sigma_next, x)), sigma_next)
            x = langevin_step(x, score, randn_like(x, generator=generator), snr, sigma_next)
    return x
