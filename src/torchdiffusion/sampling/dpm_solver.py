"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b) on the denoiser contract, in VE coordinates.

With alpha = 1 and lambda = -log(sigma) (half the log-SNR), h = lambda_next - lambda = log(sigma / sigma_next),
the exact solution of the PF-ODE is (Lu et al. 2022a eq. 3.4, 2022b eq. 8)

    noise prediction:  x_t = x_s - sigma_t int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} ... = x_s - int e^{-lambda} eps dlambda
    data prediction:   x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} D dlambda

and the solvers Taylor-expand eps or D in lambda. In VE coordinates DPM-Solver-1 = DPM-Solver++(1) = DDIM = Euler:
x_t = x_s + (sigma_t - sigma_s) eps_s = (sigma_t / sigma_s) x_s + (1 - sigma_t / sigma_s) D_s.
The step to sigma = 0 (lambda = inf) is taken by :func:`~torchdiffusion.sampling.ode.final_step`.
"""
from __future__ import annotations

import math

import torch

from ..utils import append_dims, check_choice, randn_like
from .core import _report, expand_sigma, levels
from .ode import check_final, final_step

SDE_SOLVER_TYPES = ("midpoint", "heun")  # second-order correction of sample_dpmpp_2m_sde


# ------------------------------------------------------------------------------------ thresholding
def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995, max_value: float | None = None):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): s = max(1, p-quantile of |x0|) per sample,
    x0 -> clamp(x0, -s, s) / s; `max_value` optionally caps s (as diffusers' sample_max_value)."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp_min(1.0)
    if max_value is not None:
        s = s.clamp_max(max_value)
    s = append_dims(s.to(x0.dtype), x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _thresholded(denoiser, thresholding, max_value=None):
    if thresholding is None:
        return denoiser
    if not 0 < thresholding <= 1:
        raise ValueError(f"thresholding is a percentile in (0, 1], got {thresholding}")
    return lambda x, s: dynamic_threshold(denoiser(x, s), thresholding, max_value)


def _eps(denoiser, x, sigma):
    """Noise prediction eps = (x - D(x, sigma)) / sigma; sigma a float or an (N,) tensor."""
    if isinstance(sigma, torch.Tensor):
        d = denoiser(x, sigma.float())
        return (x - d) / append_dims(sigma.to(x.dtype), x.ndim), d
    d = denoiser(x, expand_sigma(sigma, x))
    return (x - d) / sigma, d


# --------------------------------------------------------------- DPM-Solver (noise prediction, single-step)
def _mid(sigma, sigma_next, r):
    """The level at lambda + r h, i.e. sigma^(1 - r) sigma_next^r."""
    return sigma ** (1 - r) * sigma_next**r


def dpm_solver_1_step(x, eps, sigma, sigma_next):
    """DPM-Solver-1 (Lu et al. 2022a, eq. 3.7) = DDIM: x_t = x_s + (sigma_t - sigma_s) eps_s."""
    return x + (sigma_next - sigma) * eps


def dpm_solver_2_step(x, eps, sigma, sigma_next, eps_fn, r1=0.5, return_lower=False):
    """DPM-Solver-2 (Lu et al. 2022a, Algorithm 1); `eps_fn(u, s)` evaluates the noise prediction.

    x_t = x_s - sigma_t (e^h - 1) eps_s - sigma_t / (2 r1) (e^h - 1) (eps(u, s1) - eps_s), sigma_t (e^h - 1)
    = sigma_s - sigma_t, where u is the DPM-Solver-1 step to s1 at lambda_s + r1 h.
    """
    s1 = _mid(sigma, sigma_next, r1)
    u = x + (s1 - sigma) * eps
    eps_u = eps_fn(u, s1)
    x_next = x + (sigma_next - sigma) * eps - (sigma - sigma_next) / (2 * r1) * (eps_u - eps)
    return (x_next, x + (sigma_next - sigma) * eps) if return_lower else x_next


def dpm_solver_3_step(x, eps, sigma, sigma_next, eps_fn, r1=1 / 3, r2=2 / 3, return_lower=False):
    """DPM-Solver-3 (Lu et al. 2022a, Algorithm 2). With return_lower also the DPM-Solver-2 (r1) solution that
    shares its first two evaluations (the pair of DPM-Solver-23, Algorithm 5)."""
    h = torch.log(sigma / sigma_next) if isinstance(sigma, torch.Tensor) else math.log(sigma / sigma_next)
    s1, s2 = _mid(sigma, sigma_next, r1), _mid(sigma, sigma_next, r2)
    u1 = x + (s1 - sigma) * eps
    d1 = eps_fn(u1, s1) - eps
    u2 = x + (s2 - sigma) * eps - (r2 / r1) * ((sigma - s2) / (r2 * h) - s2) * d1
    d2 = eps_fn(u2, s2) - eps
    x_next = x + (sigma_next - sigma) * eps - (1 / r2) * ((sigma - sigma_next) / h - sigma_next) * d2
    if return_lower:
        return x_next, x + (sigma_next - sigma) * eps - (sigma - sigma_next) / (2 * r1) * d1
    return x_next


@torch.no_grad()
def sample_dpm_solver(denoiser, x, sigmas, *, generator=None, callback=None, order=3, final="denoise"):
    """Single-step DPM-Solver of order 1, 2 or 3 (Lu et al. 2022a, Algorithms 1-2) on every step; the step to 0
    is `final`. NFE = order * (steps - 1) + 1."""
    check_choice("order", order, (1, 2, 3))
    check_final(final)

    def eps_fn(u, s):
        return _eps(denoiser, u, s)[0]

    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps, denoised = _eps(denoiser, x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = final_step(x, denoised, final)
        elif order == 1:
            x = dpm_solver_1_step(x, eps, sigma, sigma_next)
        elif order == 2:
            x = dpm_solver_2_step(x, eps, sigma, sigma_next, eps_fn)
        else:
            x = dpm_solver_3_step(x, eps, sigma, sigma_next, eps_fn)
    return x


def sample_dpm_solver_1(denoiser, x, sigmas, *, generator=None, callback=None, final="denoise"):
    """DPM-Solver-1 (Lu et al. 2022a, eq. 3.7; = DDIM)."""
    return sample_dpm_solver(denoiser, x, sigmas, callback=callback, order=1, final=final)


def sample_dpm_solver_2(denoiser, x, sigmas, *, generator=None, callback=None, final="denoise"):
    """DPM-Solver-2 (Lu et al. 2022a, Algorithm 1, r1 = 1/2)."""
    return sample_dpm_solver(denoiser, x, sigmas, callback=callback, order=2, final=final)


def sample_dpm_solver_3(denoiser, x, sigmas, *, generator=None, callback=None, final="denoise"):
    """DPM-Solver-3 (Lu et al. 2022a, Algorithm 2, r1 = 1/3, r2 = 2/3)."""
    return sample_dpm_solver(denoiser, x, sigmas, callback=callback, order=3, final=final)


@torch.no_grad()
def sample_dpm_solver_adaptive(denoiser, x, sigmas, *, generator=None, callback=None, order=3, rtol=0.05,
                               atol=0.0078, h_init=0.05, safety=0.9, final="denoise", max_steps=10000):
    """Adaptive DPM-Solver-12 (order=2) or -23 (order=3) (Lu et al. 2022a, Algorithm 5), per sample.

    Each segment sigmas[i] -> sigmas[i+1] > 0 is integrated with steps in lambda chosen from the difference of
    the embedded lower/higher-order solutions, E = RMS((x_low - x_high) / (atol + rtol max(|x_low|, |x_prev|))),
    accepting when E <= 1 and setting h <- h * clip(safety E^(-1/order), 0.2, 5). Step sizes are per sample,
    so a sample's result does not depend on its batch. The step to 0 is `final`.
    """
    check_choice("order (2: DPM-Solver-12, 3: DPM-Solver-23)", order, (2, 3))
    if rtol <= 0 or atol <= 0 or h_init <= 0:
        raise ValueError("rtol, atol and h_init must be positive")
    check_final(final)
    nd = x.ndim

    def eps_fn(u, s):  # s: (n, 1, ...) float64
        return _eps(denoiser, u, s.flatten())[0]

    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        s0, s1 = sig[i], sig[i + 1]
        eps, denoised = _eps(denoiser, x, s0)
        _report(callback, i, x, s0, s1, denoised)
        if s1 == 0:
            x = final_step(x, denoised, final)
            continue
        lam_end = -math.log(s1)
        lam = torch.full((x.shape[0],), -math.log(s0), dtype=torch.float64, device=x.device)
        h = torch.full_like(lam, h_init)
        x, first = x.clone(), True
        for _ in range(max_steps):
            idx = torch.nonzero(lam < lam_end - 1e-9).flatten()
            if len(idx) == 0:
                break
            xa, la = x[idx], lam[idx]
            lt = torch.minimum(la + h[idx], torch.full_like(la, lam_end))
            s_a, s_b = append_dims((-la).exp(), nd), append_dims((-lt).exp(), nd)  # (n, 1, ...) per sample
            e = eps if first else eps_fn(xa, s_a)  # the segment's first evaluation is reused
            first = False
            if order == 2:
                x_high, x_low = dpm_solver_2_step(xa, e, s_a, s_b, eps_fn, 0.5, return_lower=True)
            else:
                x_high, x_low = dpm_solver_3_step(xa, e, s_a, s_b, eps_fn, return_lower=True)
            delta = atol + rtol * torch.maximum(x_low.abs(), xa.abs())
            err = ((x_low - x_high) / delta).flatten(1).pow(2).mean(1).sqrt().double()
            acc = err <= 1
            x[idx[acc]] = x_high[acc].to(x.dtype)
            lam[idx[acc]] = lt[acc]
            h[idx] = h[idx] * (safety * err.clamp_min(1e-10) ** (-1 / order)).clamp(0.2, 5.0)
    return x


# ------------------------------------------------------------------ DPM-Solver++ (data prediction)
def dpmpp_1_step(x, denoised, sigma, sigma_next):
    """DPM-Solver++(1) (Lu et al. 2022b, eq. 9 with k = 1): x_t = (sigma_t/sigma_s) x_s + (1 - sigma_t/sigma_s) D_s."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


def dpmpp_2m_step(x, denoised, denoised_prev, sigma, sigma_next, h_prev):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_prev/h."""
    h = math.log(sigma / sigma_next)
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
    return dpmpp_1_step(x, d, sigma, sigma_next)


def dpmpp_3m_step(x, denoised, d1, d2, sigma, sigma_next, h1, h2):
    """DPM-Solver++(3M): x_t = e^-h x_s - (e^-h - 1) D + h phi_2 D' - h^2 phi_3 D'' with phi_2 = (e^-h - 1)/h + 1,
    phi_3 = phi_2/h - 1/2 and D', D'' from divided differences of the last three D in lambda
    (Lu et al. 2022b, sec. 3.3 / eq. 9 with k = 3; k-diffusion's dpmpp_3m_sde at eta = 0)."""
    h = math.log(sigma / sigma_next)
    r0, r1 = h1 / h, h2 / h
    g0, g1 = (denoised - d1) / r0, (d1 - d2) / r1
    D1 = g0 + (g0 - g1) * r0 / (r0 + r1)
    D2 = (g0 - g1) / (r0 + r1)
    phi2 = math.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    return math.exp(-h) * x - math.expm1(-h) * denoised + phi2 * D1 - 2 * phi3 * D2


@torch.no_grad()
def sample_dpmpp_2s(denoiser, x, sigmas, *, generator=None, callback=None, r=0.5, thresholding=None,
                    threshold_max=None, final="denoise"):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1): single-step, 2 NFE per step, intermediate level at
    lambda + r h."""
    if not 0 < r < 1:
        raise ValueError(f"r must be in (0, 1), got {r}")
    check_final(final)
    den = _thresholded(denoiser, thresholding, threshold_max)
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = den(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = final_step(x, denoised, final)
            continue
        s_mid = sigma ** (1 - r) * sigma_next**r
        u = dpmpp_1_step(x, denoised, sigma, s_mid)
        d_mid = den(u, expand_sigma(s_mid, x))
        d = (1 - 1 / (2 * r)) * denoised + (1 / (2 * r)) * d_mid
        x = dpmpp_1_step(x, d, sigma, sigma_next)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, thresholding=None,
                    threshold_max=None, final="denoise"):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, 1 NFE per step, first step first order."""
    check_final(final)
    den = _thresholded(denoiser, thresholding, threshold_max)
    sig = levels(sigmas)
    prev, h_prev = None, None  # multistep history, local to this call
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = den(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = final_step(x, denoised, final)
        elif prev is None:
            x = dpmpp_1_step(x, denoised, sigma, sigma_next)
        else:
            x = dpmpp_2m_step(x, denoised, prev, sigma, sigma_next, h_prev)
        if sigma_next > 0:
            prev, h_prev = denoised, math.log(sigma / sigma_next)
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x, sigmas, *, generator=None, callback=None, thresholding=None,
                    threshold_max=None, final="denoise"):
    """DPM-Solver++(3M) multistep (Lu et al. 2022b, sec. 3.3): orders 1, 2, then 3 as history accumulates."""
    check_final(final)
    den = _thresholded(denoiser, thresholding, threshold_max)
    sig = levels(sigmas)
    hist, hs = [], []  # last denoised values and step sizes in lambda, newest first
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = den(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = final_step(x, denoised, final)
            continue
        if len(hist) == 0:
            x = dpmpp_1_step(x, denoised, sigma, sigma_next)
        elif len(hist) == 1:
            x = dpmpp_2m_step(x, denoised, hist[0], sigma, sigma_next, hs[0])
        else:
            x = dpmpp_3m_step(x, denoised, hist[0], hist[1], sigma, sigma_next, hs[0], hs[1])
        hist, hs = [denoised] + hist[:1], [math.log(sigma / sigma_next)] + hs[:1]
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint", thresholding=None, threshold_max=None, final="denoise"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, sec. 5 / appendix; k-diffusion's dpmpp_2m_sde): with eta_h = eta h,
    x_t = (sigma_t/sigma_s) e^{-eta h} x_s + (1 - e^{-(1+eta) h}) D + 2nd-order term + sigma_t sqrt(1 - e^{-2 eta h}) z."""
    check_choice("solver_type", solver_type, SDE_SOLVER_TYPES)
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    check_final(final)
    den = _thresholded(denoiser, thresholding, threshold_max)
    sig = levels(sigmas)
    prev, h_prev = None, None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = den(x, expand_sigma(sigma, x))
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = final_step(x, denoised, final)
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        c = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + c * denoised
        if prev is not None:
            r = h_prev / h
            if solver_type == "heun":
                x = x + (c / (-h - eta_h) + 1) * (1 / r) * (denoised - prev)
            else:
                x = x + 0.5 * c * (1 / r) * (denoised - prev)
        if eta > 0:
            x = x + randn_like(x, generator=generator) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        prev, h_prev = denoised, h
    return x
