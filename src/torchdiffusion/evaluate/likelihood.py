"""Likelihood of held-out data in bits/dim: the discrete variational bound (Ho et al. 2020; Nichol & Dhariwal 2021)
and the probability-flow ODE with a Hutchinson trace estimator (Song et al. 2021; Grathwohl et al. 2019).

Conventions. 8-bit data u in {0..255} is mapped to x0 = u / 127.5 - 1 in [-1, 1].

* VLB: an upper bound on the model's *discrete* negative log-likelihood of u, in bits per dimension:
  L = L_T + sum_{t=2}^T L_{t-1} + L_0 (DDPM eq. 5), with the discretized Gaussian decoder L_0 (DDPM eq. 13) whose
  bins are 2/255 wide in x. No Jacobian term: L_0 is a probability mass.
* ODE: the continuous density of the model's probability flow at sigma_min, log p(x), turned into a bound on the
  same discrete NLL by uniform dequantization centred on the grid, x = (u + U - 1/2) / 127.5 - 1 with
  U ~ U[0, 1)^D: -log2 P(u) <= E_U[-log2 p(x)] + D log2(127.5) (Jensen; the log2(127.5) per dim is the Jacobian of
  x = u / 127.5 - 1). Song et al. 2021 use y = (u + U) / 256 and 2y - 1, i.e. log2(128) = 7 and bins shifted by
  half a level; the two differ by D log2(128 / 127.5) = 0.0056 bits/dim.

The prior of the ODE is N(0, sigma_max^2 I), the distribution the samplers start from; the exact marginal at
sigma_max is the data convolved with N(0, sigma_max^2 I), so the prior term errs by about
(|E x0|^2 + tr Cov x0) / (2 sigma_max^2) nats per image (1e-5 bits/dim for MNIST with the linear schedule,
sigma_max = 157). The VLB's L_T uses DDPM's N(0, I) in VP coordinates, i.e. N(0, (1 + sigma_max^2) I) in VE ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..schedules import DiscreteSchedule
from ..utils import LOG2, append_dims, check_choice, rand, randn
from ..variance import (BIN_HALF_WIDTH, DECODERS, clipped_log_variances,  # noqa: F401 (BIN_HALF_WIDTH and
                        discretized_gaussian_log_likelihood, normal_kl,     # the decoder re-exported here)
                        schedule_log_variance, vlb_term)
from ..vdm import LearnedSchedule, elbo_terms

VARIANCES = ("small", "large")            # beta_tilde_t (DDPM "fixedsmall") or beta_t ("fixedlarge")
PROBES = ("rademacher", "gaussian", "exact")
PIXEL_SCALE = 127.5                       # x = u / 127.5 - 1
Z95 = 1.959963984540054                   # two-sided 95 % normal quantile


def _summary(per_sample: torch.Tensor, **extra) -> dict:
    """mean, stderr (std / sqrt(n)), 95 % CI of per-sample values, plus `extra`."""
    v = per_sample.double()
    n = len(v)
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    m = float(v.mean())
    return {"mean": m, "stderr": se, "ci95": [m - Z95 * se, m + Z95 * se], "n": n, "per_sample": v, **extra}


def _model_dtype(denoiser) -> torch.dtype:
    p = next(iter(denoiser.parameters()), None) if hasattr(denoiser, "parameters") else None
    return p.dtype if p is not None else torch.float64


# ------------------------------------------------------------------------------------------------- VLB


def respaced_schedule(schedule: DiscreteSchedule, T: int | None) -> tuple[DiscreteSchedule, torch.Tensor]:
    """A T-step DDPM sharing the noise levels of `schedule` at T evenly spaced timesteps (Nichol & Dhariwal 2021,
    Sec. 4): beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}. Returns (schedule, indices into the original)."""
    if T is None or T == schedule.T:
        return schedule, torch.arange(schedule.T)
    if not 2 <= T <= schedule.T:
        raise ValueError(f"T must lie in [2, {schedule.T}], got {T}")
    idx = torch.linspace(0, schedule.T - 1, T, dtype=torch.float64).round().long()
    ab = schedule.alpha_bar[idx]
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return DiscreteSchedule(betas, name=f"{schedule.name}-respaced{T}"), idx


@torch.no_grad()
def vlb_terms(denoiser, x0: torch.Tensor, *, T: int | None = None, schedule: DiscreteSchedule | None = None,
              variance: str = "large", decoder: str = "discrete", generator=None, batch_size: int = 1000,
              progress: bool = False) -> torch.Tensor:
    """The terms of the DDPM bound per sample, in nats: (N, T + 1) = [L_0, L_1, ..., L_{T-1}, L_T] (DDPM eq. 5).

    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with x_t ~ q(x_t | x0) drawn once per term, the model
    mean the posterior mean at the denoiser's x0 estimate (DDPM eq. 7 with x0 -> D(x_t)), and fixed variance
    beta_t ("large", the default: much tighter when few steps follow sigma_min) or beta_tilde_t ("small",
    beta_tilde_2 at t = 1 as in Improved DDPM). L_0 = -log p(x0 | x_1):
    the discretized Gaussian for 8-bit data, or a Gaussian density ("gaussian", for continuous data). L_T =
    KL(q(x_T | x0) || N(0, I)). The terms t = 1..T are evaluated in batches of up to `batch_size` (sample, t) pairs.
    A denoiser that learns its variance (``learns_variance``, Improved DDPM) is evaluated with it: Sigma =
    exp(v log beta_t + (1 - v) log beta_tilde_t) on the (respaced) grid, `variance` then unused (docs/likelihood.md).
    Each term is :func:`~torchdiffusion.variance.vlb_term`, the one the hybrid and VLB objectives train on.
    """
    check_choice("variance", variance, VARIANCES)
    check_choice("decoder", decoder, DECODERS)
    base = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if not isinstance(base, DiscreteSchedule):
        raise ValueError("the variational bound needs a DiscreteSchedule (denoiser.schedule or schedule=)")
    sch, _ = respaced_schedule(base, T)
    x0 = x0.double()
    n, Tn = x0.shape[0], sch.T
    dtype = _model_dtype(denoiser)
    log_large, log_small = clipped_log_variances(sch)
    log_var = log_small if variance == "small" else log_large                # (T,), unless the model learns it
    terms = torch.zeros(n, Tn + 1, dtype=torch.float64)
    dims = tuple(range(1, x0.ndim))
    # L_T: q(x_T | x0) = N(sqrt(ab_T) x0, 1 - ab_T) against N(0, 1) in VP coordinates
    abT = sch.alpha_bar[-1]
    terms[:, Tn] = normal_kl(abT.sqrt() * x0, (1 - abT).expand_as(x0), torch.zeros_like(x0),
                             torch.ones_like(x0)).sum(dims)
    total, chunk = n * Tn, max(1, int(batch_size))
    starts = range(0, total, chunk)
    if progress:
        starts = tqdm(starts, desc=f"VLB ({Tn} terms x {n} samples)", unit="batch")
    for s in starts:
        pair = torch.arange(s, min(s + chunk, total))                        # pair p = (sample p % n, term p // n)
        idx_i, idx_t = pair % n, pair // n
        xb = x0[idx_i]                                                        # (B, ...)
        eps = randn(xb.shape, generator=generator, dtype=torch.float64)
        xt = sch.q_sample(xb, idx_t, eps)                                     # VP coordinates
        sigma = sch.sigmas[idx_t]                                             # (B,)
        ab = append_dims(sch.alpha_bar[idx_t], xb.ndim)
        x_ve, s_in = (xt / ab.sqrt()).to(dtype), sigma.to(dtype)             # VE input x0 + sigma n
        if getattr(denoiser, "learns_variance", False):                       # eq. 15 on the (respaced) grid
            x0_hat, v = (o.double() for o in denoiser.with_variance(x_ve, s_in))
            lv = schedule_log_variance(sch, idx_t, v)
        else:
            x0_hat, lv = denoiser(x_ve, s_in).double(), append_dims(log_var[idx_t], xb.ndim)
        terms[idx_i, idx_t] = vlb_term(sch, xb, xt, idx_t, x0_hat, lv, decoder)
    return terms


def vlb_bits_per_dim(denoiser, x0: torch.Tensor, *, T: int | None = None, generator=None,
                     schedule: DiscreteSchedule | None = None, variance: str = "large", decoder: str = "discrete",
                     batch_size: int = 1000, progress: bool = False) -> dict:
    """The DDPM variational bound in bits/dim per sample of x0 (8-bit data in [-1, 1], (N, ...)); see
    :func:`vlb_terms`. Returns mean, stderr, ci95, n, per_sample (N,), and terms_mean (T + 1,) in bits/dim:
    [L_0, ..., L_T] averaged over samples. With decoder="gaussian" the result is a bound on the continuous
    -log2 p(x0) / D instead. A VDM denoiser (a learned schedule) reports its own ELBO (:func:`vdm_bits_per_dim`;
    T: its discrete-time bound, None the continuous one)."""
    if schedule is None and isinstance(getattr(denoiser, "schedule", None), LearnedSchedule):
        return vdm_bits_per_dim(denoiser, x0, T=T or 0, decoder=decoder, generator=generator,
                                batch_size=batch_size, progress=progress)
    terms = vlb_terms(denoiser, x0, T=T, schedule=schedule, variance=variance, decoder=decoder,
                      generator=generator, batch_size=batch_size, progress=progress)
    D = x0[0].numel()
    bpd = terms / (D * LOG2)
    return _summary(bpd.sum(1), terms_mean=bpd.mean(0), T=terms.shape[1] - 1)


@torch.no_grad()
def vdm_bits_per_dim(denoiser, x0: torch.Tensor, *, T: int = 0, n_times: int = 1, decoder: str = "discrete",
                     generator=None, batch_size: int = 256, progress: bool = False) -> dict:
    """The VDM ELBO (Kingma et al. 2021, eq. 11 and 17; :func:`~torchdiffusion.vdm.elbo_terms`) of a denoiser with a
    learned schedule, in bits/dim per sample of 8-bit x0 in [-1, 1] (N, ...): continuous time (T = 0) or T steps,
    the diffusion term a mean over `n_times` low-discrepancy t per sample. Returns mean, stderr, ci95, n,
    per_sample (N,), and terms_mean [reconstruction, diffusion, prior] in bits/dim (the places of L_0, the middle
    terms and L_T of :func:`vlb_bits_per_dim`)."""
    if n_times < 1:
        raise ValueError(f"n_times must be at least 1, got {n_times}")
    dtype, D = _model_dtype(denoiser), x0[0].numel()
    per = []
    starts = range(0, x0.shape[0], batch_size)
    if progress:
        starts = tqdm(starts, desc=f"VDM ELBO ({n_times} t per sample)", unit="batch")
    for s in starts:
        xb = x0[s:s + batch_size].to(dtype)
        rep = [elbo_terms(denoiser, xb, T=T, decoder=decoder, generator=generator) for _ in range(n_times)]
        per.append(torch.stack([sum(r[k] for r in rep).double() / n_times
                                for k in ("reconstruction", "diffusion", "prior")], 1))  # (B, 3) nats
    bpd = torch.cat(per) / (D * LOG2)
    return _summary(bpd.sum(1), terms_mean=bpd.mean(0), T=T)


# ------------------------------------------------------------------------------------------------- ODE


def _probe(shape, kind: str, generator, dtype) -> torch.Tensor:
    z = randn(shape, generator=generator, dtype=torch.float64)
    return (z.sign() if kind == "rademacher" else z).to(dtype)


def ode_log_likelihood(denoiser, x: torch.Tensor, *, hutchinson: str = "rademacher", n_probes: int = 1,
                       sigma_min: float | None = None, sigma_max: float | None = None, rtol: float = 1e-5,
                       atol: float = 1e-5, method: str = "RK45", generator=None, **cond) -> dict:
    """log p_{sigma_min}(x) in nats per sample under the probability-flow ODE of `denoiser` (Song et al. 2021,
    eq. 13 and Appendix D.2), in VE coordinates and log-sigma time s = log sigma:

        dx/ds = x - D(x, sigma),    d log p / ds = -(D_dim - div_x D(x, sigma)),
        log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int_{s_min}^{s_max} (D_dim - div D) ds.

    div D is estimated by Hutchinson's v^T (dD/dx) v (one vector-Jacobian product per probe; `hutchinson`
    'rademacher' or 'gaussian', probes fixed along the path), or computed exactly with 'exact' (D_dim products;
    for low dimensions). Integrated with scipy's solve_ivp on the whole batch. Returns logp (N,), x_T, nfe.
    """
    from scipy.integrate import solve_ivp

    check_choice("hutchinson", hutchinson, PROBES)
    sch = getattr(denoiser, "schedule", None)
    s_min = float(sigma_min if sigma_min is not None else sch.sigma_min)
    s_max = float(sigma_max if sigma_max is not None else sch.sigma_max)
    if not 0 < s_min < s_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {s_min}, {s_max}")
    dtype = _model_dtype(denoiser)
    n, shape = x.shape[0], tuple(x.shape)
    D = x[0].numel()
    if hutchinson == "exact":
        probes = [torch.zeros(shape, dtype=dtype).flatten(1).index_fill_(1, torch.tensor([j]), 1.0).view(shape)
                  for j in range(D)]
    else:
        probes = [_probe(shape, hutchinson, generator, dtype) for _ in range(int(n_probes))]
    nfe = 0

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xs = torch.from_numpy(y[: n * D]).view(shape).to(dtype).requires_grad_(True)
        sigma = torch.full((n,), math.exp(s), dtype=dtype)
        with torch.enable_grad():
            d = denoiser(xs, sigma, **cond)
            tr = torch.zeros(n, dtype=torch.float64)
            for j, v in enumerate(probes):
                (g,) = torch.autograd.grad(d, xs, v, retain_graph=j < len(probes) - 1)
                tr += (g * v).flatten(1).sum(1).double()
        div = tr if hutchinson == "exact" else tr / len(probes)
        dx = (xs.detach() - d.detach()).double().flatten()
        return np.concatenate([dx.numpy(), (D - div).numpy()])

    y0 = np.concatenate([x.double().flatten().numpy(), np.zeros(n)])
    sol = solve_ivp(rhs, (math.log(s_min), math.log(s_max)), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"ODE solver failed: {sol.message}")
    yT = torch.from_numpy(sol.y[:, -1])
    xT = yT[: n * D].view(n, D)
    delta = yT[n * D:]
    prior = -0.5 * (xT**2).sum(1) / s_max**2 - D * math.log(s_max) - 0.5 * D * math.log(2 * math.pi)
    return {"logp": prior + delta, "prior_logp": prior, "delta_logp": delta, "x_T": xT.view(shape), "nfe": nfe}


def dequantize(x0: torch.Tensor, *, generator=None) -> torch.Tensor:
    """Uniform dequantization centred on the 8-bit grid: x0 + (U - 1/2) / 127.5, U ~ U[0, 1)^D."""
    return x0 + (rand(x0.shape, generator=generator, dtype=x0.dtype) - 0.5) / PIXEL_SCALE


def ode_bits_per_dim(denoiser, x0: torch.Tensor, *, hutchinson: str = "rademacher", n_probes: int = 1,
                     rtol: float = 1e-5, atol: float | None = None, generator=None, dequantize_8bit: bool = True,
                     batch_size: int = 256, progress: bool = False, **kwargs) -> dict:
    """Bits/dim from the probability-flow ODE (:func:`ode_log_likelihood`). For 8-bit data in [-1, 1]
    (dequantize_8bit=True) each x0 is dequantized once and the result is
    -log2 p(x) / D + log2(127.5), an upper bound (in expectation over U) on the discrete NLL, as the VLB is;
    otherwise -log2 p(x0) / D of continuous data. Returns mean, stderr, ci95, n, per_sample, nfe (per batch)."""
    x0 = x0.double()
    per, nfes = [], []
    starts = range(0, x0.shape[0], batch_size)
    if progress:
        starts = tqdm(starts, desc="ODE likelihood", unit="batch")
    for s in starts:
        xb = x0[s:s + batch_size]
        if dequantize_8bit:
            xb = dequantize(xb, generator=generator)
        r = ode_log_likelihood(denoiser, xb, hutchinson=hutchinson, n_probes=n_probes, rtol=rtol,
                               atol=rtol if atol is None else atol, generator=generator, **kwargs)
        per.append(r["logp"])
        nfes.append(r["nfe"])
    D = x0[0].numel()
    bpd = -torch.cat(per) / (D * LOG2) + (math.log2(PIXEL_SCALE) if dequantize_8bit else 0.0)
    return _summary(bpd, nfe=nfes[0] if len(nfes) == 1 else nfes)
