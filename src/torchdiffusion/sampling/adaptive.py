"""Complexity-adaptive step allocation: each sample gets its own number of steps from a shared budget.

A probe estimates per sample the error constant C_i of the solve; sample i is then solved with k_i steps of a
one-call-per-step multistep solver, samples with the same k together (one solver call per distinct k).

* Difficulty. The difference between the first-order step and the second-order multistep step is the embedded
  local error estimate of the lower-order step (DPM-Solver++(2M) minus DPM-Solver++(1), Lu et al. 2022b,
  Algorithm 2): e_j = (1 - r) (h_j / (2 h_{j-1})) (D_j - D_{j-1}), r = sigma_{j+1} / sigma_j, h the steps in
  lambda = -log sigma, i.e. the change of the predicted x0 between consecutive levels. C_i = sum_{j>=2} RMS(e_j)
  (j = 1, the change from sigma_max where every D is the data mean, is left out). This is the error estimate
  of the adaptive solvers (:func:`~torchdiffusion.sampling.dpm_solver.sample_dpm_solver_adaptive`;
  Jolicoeur-Martineau et al. 2021, "Gotta go fast when generating data with score-based models", sec. 3) used
  once, across samples, instead of step by step.
* Two probes. :func:`sample_adaptive_steps`: a separate coarse DPM-Solver++(1) pass, one call per level of
  `probe_sigmas` (counted in the NFE), then k_i steps on a fresh grid (:func:`step_grid`).
  :func:`sample_adaptive_prefix`: the probe is the solve's own start, the first `prefix` levels of the grid
  shared by all samples; each continues from there with k_i levels (:func:`tail_levels`), nothing repeated.
* Allocation. With the local-error model E_i(k) = C_i k^-p of an order-p solver (Hairer, Norsett & Wanner,
  "Solving ODEs I", sec. II.4), minimizing sum_i C_i k_i^-p subject to sum_i k_i = K (Lagrange:
  p C_i k_i^-(p+1) = const) gives k_i proportional to C_i^(1/(p+1)) (:func:`allocate_steps`).
* Rounding. Continuous shares c C_i^(1/(p+1)) clipped to [min_steps, max_steps] with c found by bisection, then
  floors plus one more step for the largest fractional parts (ties: lower index), so sum_i k_i = K exactly:
  with `mean_nfe` the mean NFE over the batch, probe included, is exactly mean_nfe whenever N (mean_nfe - probe
  calls) is an integer, else the largest multiple of 1/N below it. The budget is shared by the batch; with
  `scale` instead, k_i = clip(round(scale C_i^(1/(p+1)))) depends on sample i alone, so outputs do not depend
  on the batch.
"""
from __future__ import annotations

import math

import torch

from ..utils import check_choice
from .core import expand_sigma, levels, sample_euler
from .dpm_solver import dpmpp_1_step, sample_dpmpp_2m, sample_dpmpp_3m
from .sigmas import append_zero, karras_sigmas, optimized_ramp

# solver name -> (sampler, order); each makes one network call per step, so NFE = the probe's calls + k_i
ADAPTIVE_SOLVERS = {"euler": (sample_euler, 1), "dpmpp_2m": (sample_dpmpp_2m, 2), "dpmpp_3m": (sample_dpmpp_3m, 3)}
ADAPTIVE_SPACINGS = ("optimized", "karras", "logsnr")
# the probe's levels, for data of unit scale: sigma_max, then the range where the paths of unit-scale mixtures
# bend (picked by the rank correlation of C_i with the per-sample error, docs/samplers.md; scale with the data)
PROBE_SIGMAS = (80.0, 2.0, 0.3)
FLOOR = 1e-300  # difficulties are raised to this before the root (a zero difficulty still gets min_steps)
BISECTION_ITERS = 200  # halvings of the bracket of log c, the budget constant (float64 converges long before)


def step_grid(k: int, sigma_max: float, sigma_min: float, spacing: str = "optimized") -> torch.Tensor:
    """k levels from sigma_max to sigma_min then 0, (k + 1,) float32, as :func:`~.sigmas.get_sigmas` spaces
    them ('optimized': the tuned rho = 7 ramp, 'karras': rho = 7, 'logsnr': log-uniform)."""
    check_choice("spacing", spacing, ADAPTIVE_SPACINGS)
    if spacing == "optimized" and k >= 2:
        lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
        s = (hi + optimized_ramp(k) * (lo - hi)) ** 7
    elif spacing == "logsnr":
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), k, dtype=torch.float64).exp()
    else:  # karras, and 'optimized' with one step (its ramp needs two)
        s = karras_sigmas(k, sigma_min, sigma_max)
    return append_zero(s).float()


@torch.no_grad()
def probe_difficulty(denoiser, x: torch.Tensor, probe_sigmas=PROBE_SIGMAS):
    """Per-sample difficulty C_i (N,) from one call per level of `probe_sigmas` (decreasing, at least 3) on a
    coarse DPM-Solver++(1) pass: the sum over j >= 2 of RMS((1 - r_j) / 2 (D_j - D_{j-1})) with
    r_j = sigma_j / sigma_{j-1} and h_j = h_{j-1} (the probe's weights for the estimate of the module docstring).
    The difference from the first level is left out: near sigma_max every D is close to the data mean, so it
    measures how far a sample's x0 lies from the mean, not how curved its path is."""
    sig = levels(probe_sigmas)
    if len(sig) < 3 or any(a <= b for a, b in zip(sig, sig[1:])) or sig[-1] <= 0:
        raise ValueError(f"probe_sigmas must be at least 3 positive decreasing levels, got {sig}")
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    prev = None
    for j, sigma in enumerate(sig):
        denoised = denoiser(x, expand_sigma(sigma, x))
        if j >= 2:
            e = 0.5 * (1 - sigma / sig[j - 1]) * (denoised - prev).double()  # (N, ...)
            total += e.flatten(1).pow(2).mean(1).sqrt()
        if j + 1 < len(sig):
            x = dpmpp_1_step(x, denoised, sigma, sig[j + 1])
        prev = denoised
    return total


def _clipped(weights, c, lo, hi):
    return (c * weights).clamp(lo, hi)


def allocate_steps(difficulty: torch.Tensor, total: int, order: int, *, min_steps: int = 1,
                   max_steps: int | None = None) -> torch.Tensor:
    """Integer steps k (N,) with sum k = total, k_i ~ c C_i^(1/(order+1)) clipped to [min_steps, max_steps]
    (the optimal rule for the local-error model C_i k^-order; module docstring), rounded by largest remainder."""
    n = difficulty.shape[0]
    if min_steps < 1:
        raise ValueError(f"min_steps must be at least 1, got {min_steps}")
    hi = max_steps if max_steps is not None else total
    if not n * min_steps <= total <= n * hi:
        raise ValueError(f"a budget of {total} steps cannot give {n} samples between {min_steps} and {hi} steps "
                         "each: raise or lower mean_nfe, or widen min_steps/max_steps")
    w = difficulty.double().clamp_min(FLOOR) ** (1.0 / (order + 1))  # (N,)
    w = w / w.max()
    a, b = float(min_steps), float(hi) / float(w.min())  # the sum is n min_steps at c = a, n hi at c = b
    for _ in range(BISECTION_ITERS):
        c = math.sqrt(a * b)  # bisection in log c: the bracket may span hundreds of decades
        a, b = (c, b) if float(_clipped(w, c, min_steps, hi).sum()) < total else (a, c)
    share = _clipped(w, b, min_steps, hi)
    if torch.allclose(w, torch.ones_like(w)):  # uniform difficulty: the exact share, no bisection residue
        share = torch.full_like(w, total / n)
    k = share.floor().long()
    frac = torch.where(k < hi, share - k, torch.full_like(share, -1.0))
    extra = total - int(k.sum())
    order_ = torch.argsort(-frac, stable=True)  # largest fractional parts first, ties by index
    k[order_[:extra]] += 1
    return k


def _budget(mean_nfe: float | None, scale: float | None, probe_nfe: int) -> None:
    if (mean_nfe is None) == (scale is None):
        raise ValueError("give exactly one of mean_nfe (a shared budget: exact mean NFE per batch) and scale "
                         "(steps from each sample's own difficulty, independent of the batch)")
    if mean_nfe is not None and mean_nfe <= probe_nfe:
        raise ValueError(f"mean_nfe={mean_nfe} must exceed the probe's {probe_nfe} calls (they count)")
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")


def plan_steps(difficulty, order, *, mean_nfe=None, scale=None, probe_nfe=len(PROBE_SIGMAS), min_steps=2,
               max_steps=None):
    """Steps per sample (N,) from the difficulties: the shared budget floor(N (mean_nfe - probe_nfe)) by
    :func:`allocate_steps`, or k_i = clip(round(scale C_i^(1/(order+1))), min_steps, max_steps)."""
    _budget(mean_nfe, scale, probe_nfe)
    if mean_nfe is not None:
        total = int(math.floor(difficulty.shape[0] * (mean_nfe - probe_nfe) + 1e-9))
        return allocate_steps(difficulty, total, order, min_steps=min_steps, max_steps=max_steps)
    w = difficulty.double().clamp_min(FLOOR) ** (1.0 / (order + 1))
    return (scale * w).round().clamp(min_steps, max_steps).long()


@torch.no_grad()
def sample_adaptive_steps(denoiser, x, sigmas, *, generator=None, callback=None, mean_nfe=None, scale=None,
                          solver="dpmpp_3m", spacing="optimized", probe_sigmas=PROBE_SIGMAS, min_steps=2,
                          max_steps=None, final="heun0"):
    """Per-sample step counts from a probe's difficulty (module docstring), then `solver` on each sample's grid
    (:func:`step_grid` between sigmas[0] and the smallest positive sigma); sample i costs len(probe_sigmas) +
    k_i calls. Deterministic: `generator` is unused. The callback sees the solver's steps (not the probe's),
    with 'steps' (the group's k) and 'index' (its rows)."""
    fn, order = ADAPTIVE_SOLVERS[check_choice("solver", solver, ADAPTIVE_SOLVERS)]
    sig = levels(sigmas)
    s_max, s_min = sig[0], min(s for s in sig if s > 0)
    _budget(mean_nfe, scale, len(probe_sigmas))
    steps = plan_steps(probe_difficulty(denoiser, x, probe_sigmas), order, mean_nfe=mean_nfe, scale=scale,
                       probe_nfe=len(probe_sigmas), min_steps=min_steps, max_steps=max_steps)
    out = torch.empty_like(x)
    opts = {} if solver == "euler" else {"final": final}
    for k in torch.unique(steps).tolist():
        idx = torch.nonzero(steps == k).flatten()
        cb = None if callback is None else (lambda info, k=k, idx=idx: callback({**info, "steps": k, "index": idx}))
        out[idx] = fn(denoiser, x[idx], step_grid(k, s_max, s_min, spacing), callback=cb, **opts)
    return out


# ------------------------------------------------------------------ the probe as the first steps of the solve
class _Record(torch.nn.Module):
    """The denoiser, keeping every output (the shared prefix's x0 predictions)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.outputs = inner, []

    def forward(self, x, sigma, **cond):
        self.outputs.append(self.inner(x, sigma, **cond))
        return self.outputs[-1]


class _Replay(torch.nn.Module):
    """The denoiser whose first len(recorded) calls return the recorded outputs of rows `idx` (the prefix that
    every sample shares: same inputs, so the same values) and whose later calls go to the network."""

    def __init__(self, inner, recorded, idx):
        super().__init__()
        self.inner, self.recorded, self.idx, self.calls = inner, recorded, idx, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        if self.calls <= len(self.recorded):
            return self.recorded[self.calls - 1][self.idx]
        return self.inner(x, sigma, **cond)


def tail_levels(sig: list[float], prefix: int, k: int) -> list[float]:
    """The k levels of a sample after the shared prefix: the grid's positive levels after sig[prefix - 1]
    resampled piecewise-linearly in sigma^(1/7) (the coordinate of the Karras and optimized ramps) from
    sig[prefix - 1] to the smallest positive level; k equal to their number gives them unchanged."""
    pos = sig[prefix - 1:-1]  # the anchor, then the grid's positive levels after the prefix
    if k == len(pos) - 1:
        return pos[1:]
    r = torch.tensor(pos, dtype=torch.float64) ** (1 / 7)
    u = torch.linspace(0, len(pos) - 1, k + 1, dtype=torch.float64)[1:]
    i = u.floor().long().clamp(max=len(pos) - 2)
    return ((r[i] + (u - i) * (r[i + 1] - r[i])) ** 7).tolist()


def prefix_difficulty(outputs: list[torch.Tensor], sig: list[float]) -> torch.Tensor:
    """C_i (N,) from the shared prefix's x0 predictions D_0..D_{m-1} on the grid `sig`: the sum over j >= 2 of
    RMS((1 - r_j) h_j / (2 h_{j-1}) (D_j - D_{j-1})), r_j = sig[j+1] / sig[j], h = log-sigma steps, the
    DPM-Solver++(2M)-minus-(1) difference of step j (module docstring)."""
    total = torch.zeros(outputs[0].shape[0], dtype=torch.float64, device=outputs[0].device)
    for j in range(2, len(outputs)):
        h_prev = math.log(sig[j - 1] / sig[j])
        r, h = (sig[j + 1] / sig[j], math.log(sig[j] / sig[j + 1])) if sig[j + 1] > 0 else (0.0, h_prev)
        e = (1 - r) * (h / (2 * h_prev)) * (outputs[j] - outputs[j - 1]).double()
        total += e.flatten(1).pow(2).mean(1).sqrt()
    return total


@torch.no_grad()
def sample_adaptive_prefix(denoiser, x, sigmas, *, generator=None, callback=None, mean_nfe=None, scale=None,
                           prefix=4, solver="dpmpp_3m", min_steps=1, max_steps=None, final="heun0"):
    """Adaptive allocation whose probe is the solve's own start: every sample takes the first `prefix` levels of
    `sigmas` with `solver` (prefix calls), the x0 predictions there give C_i (:func:`prefix_difficulty`), and
    sample i continues with k_i levels (:func:`tail_levels`) from the same solver state (the prefix's calls are
    replayed, never repeated), so it costs prefix + k_i calls. Budget: mean_nfe (default the grid's, len(sigmas)
    - 1) or `scale`. With equal k_i the grid is `sigmas` and the output is the fixed-step sampler's, bitwise."""
    fn, order = ADAPTIVE_SOLVERS[check_choice("solver", solver, ADAPTIVE_SOLVERS)]
    sig = levels(sigmas)
    if not 3 <= prefix < len(sig) - 1:
        raise ValueError(f"prefix must be at least 3 (two differences of x0) and leave a level of the {len(sig) - 1}"
                         f"-step grid, got {prefix}")
    mean_nfe = len(sig) - 1 if mean_nfe is None and scale is None else mean_nfe
    opts = {} if solver == "euler" else {"final": final}
    rec = _Record(denoiser)
    fn(rec, x, torch.tensor(sig[:prefix] + [0.0], dtype=torch.float64), **opts)  # `prefix` calls
    steps = plan_steps(prefix_difficulty(rec.outputs, sig), order, mean_nfe=mean_nfe, scale=scale,
                       probe_nfe=prefix, min_steps=min_steps, max_steps=max_steps)
    out = torch.empty_like(x)
    for k in torch.unique(steps).tolist():
        idx = torch.nonzero(steps == k).flatten()
        grid = torch.tensor(sig[:prefix] + tail_levels(sig, prefix, k) + [0.0], dtype=torch.float64)
        cb = None if callback is None else (lambda info, k=k, idx=idx: callback({**info, "steps": k, "index": idx}))
        out[idx] = fn(_Replay(denoiser, rec.outputs, idx), x[idx], grid, callback=cb, **opts)
    return out
