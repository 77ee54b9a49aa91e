"""Learned reverse variances and the terms of the DDPM variational bound (Nichol & Dhariwal 2021, "Improved
denoising diffusion probabilistic models"; Ho et al. 2020).

The reverse step p(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) has a learned variance interpolating, per dimension,
between the two fixed choices of DDPM in log space (Nichol & Dhariwal 2021, eq. 15):

    Sigma_theta = exp(v log beta_t + (1 - v) log beta~_t),      v = (out + 1) / 2,

`out` the network's variance channels (v = 1: beta_t, v = 0: beta~_t; v is not clipped to [0, 1], as in the
paper). beta~ at the first step is 0, so log beta~_1 is replaced by log beta~_2 (the paper's clipped log variance).
At respaced steps, or any pair of noise levels t > s, beta and beta~ are recomputed from the alpha_bar of the two
levels (Sec. 4): beta = 1 - alpha_bar_t / alpha_bar_s, beta~ = beta (1 - alpha_bar_s) / (1 - alpha_bar_t); the
same v applies. In VE coordinates (x = x_VP / sqrt(alpha_bar)) both variances are divided by alpha_bar_s.

The bound's terms (DDPM eq. 5): L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t >= 2 and the
discretized Gaussian decoder L_0 = -log p(x0 | x_1) (DDPM eq. 13). :func:`vlb_term` is the one implementation,
used by the likelihood evaluation (fixed or learned variance) and by the hybrid and VLB training objectives.

Importance sampling of t (Sec. 3.3): p_t proportional to sqrt(E[L_t^2]) over the last HISTORY values of each term,
uniform until every term has HISTORY values, mixed with a uniform share UNIFORM_SHARE as in the paper's code; the
loss L_t / p_t is then an unbiased estimate of sum_t L_t (:class:`ImportanceSampler`).
"""
from __future__ import annotations

import math

import torch

from .schedules import DiscreteSchedule
from .utils import append_dims, rand

BIN_HALF_WIDTH = 1.0 / 255.0   # half the width of one 8-bit level in [-1, 1]
HISTORY = 10                   # values of each term kept for importance sampling (Nichol & Dhariwal 2021, 3.3)
UNIFORM_SHARE = 1e-3           # share of the uniform law mixed into the importance weights (their code)
DECODERS = ("discrete", "gaussian")  # 8-bit discretized Gaussian, or a continuous Gaussian density


def v_from_output(out: torch.Tensor) -> torch.Tensor:
    """The interpolation v = (out + 1) / 2 of the network's variance channels (Nichol & Dhariwal 2021, their code)."""
    return (out + 1) / 2


def interpolate_log_variance(v: torch.Tensor, log_large: torch.Tensor, log_small: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta = v log beta + (1 - v) log beta~ (Nichol & Dhariwal 2021, eq. 15), broadcast."""
    return v * log_large + (1 - v) * log_small


def clipped_log_variances(sch: DiscreteSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(log beta_t, log beta~_t) (T,) of a discrete schedule, log beta~_1 replaced by log beta~_2."""
    small = torch.cat([sch.posterior_variance[1:2], sch.posterior_variance[1:]])
    return sch.betas.log(), small.log()


def schedule_log_variance(sch: DiscreteSchedule, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta in VP coordinates at integer steps t (B,) for v (B, ...) (eq. 15 on the schedule's grid)."""
    log_large, log_small = clipped_log_variances(sch)
    return interpolate_log_variance(v, append_dims(log_large[t].to(v), v.ndim), append_dims(log_small[t].to(v), v.ndim))


def step_variance(sigma: float, sigma_next: float, v: torch.Tensor | None = None, variance: str = "small"):
    """Variance of the ancestral step sigma -> sigma_next > 0 in VE coordinates: beta~ / alpha_bar_s ('small'),
    beta / alpha_bar_s ('large'), or with v given the learned interpolation of the two (eq. 15, Sec. 4)."""
    small = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    large = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
    if v is None:
        return small if variance == "small" else large
    return torch.exp(interpolate_log_variance(v, math.log(large), math.log(small)))


def normal_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for x on the 8-bit grid in [-1, 1] under N(mean, std^2) integrated over the bin
    [x - 1/255, x + 1/255], the edge bins extended to -inf / +inf (DDPM eq. 13). Stable in both tails."""
    lo = torch.where(x <= -1 + BIN_HALF_WIDTH / 2, torch.full_like(x, -math.inf), (x - BIN_HALF_WIDTH - mean) / std)
    hi = torch.where(x >= 1 - BIN_HALF_WIDTH / 2, torch.full_like(x, math.inf), (x + BIN_HALF_WIDTH - mean) / std)
    flip = lo > 0                                     # upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b).clamp(max=1 - 1e-15))


def vlb_term(sch: DiscreteSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor,
             log_var: torch.Tensor, decoder: str = "discrete") -> torch.Tensor:
    """The bound's term of each pair, in nats summed over dimensions (B,): L_{t-1} = KL(q(x_{t-1} | x_t, x0) ||
    N(mu(x0_hat, x_t), exp(log_var))) where t >= 1 (0-based step index), the decoder -log p(x0 | x_1) where t = 0
    (its mean x0_hat, the posterior mean at the first step). VP coordinates; x0_hat (B, ...), log_var broadcast."""
    dims = tuple(range(1, x0.ndim))
    log_var = log_var.expand_as(x0)
    out = x0.new_zeros(x0.shape[0])
    first = t == 0
    if (~first).any():
        k = ~first
        mq, vq = sch.posterior(x0[k], xt[k], t[k])
        mp, _ = sch.posterior(x0_hat[k], xt[k], t[k])
        out = out.index_put((k.nonzero()[:, 0],), normal_kl(mq, vq, mp, log_var[k].exp()).sum(dims))
    if first.any():
        k = first
        std = (0.5 * log_var[k]).exp()
        if decoder == "discrete":
            ll = discretized_gaussian_log_likelihood(x0[k], x0_hat[k], std)
        else:
            ll = -0.5 * ((x0[k] - x0_hat[k]) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
        out = out.index_put((k.nonzero()[:, 0],), -ll.sum(dims))
    return out


class ImportanceSampler:
    """Importance sampling of the step t of the VLB (Nichol & Dhariwal 2021, Sec. 3.3): p_t proportional to
    sqrt(E[L_t^2]) over the last HISTORY values of each term, uniform until every term has HISTORY of them; the
    weight 1 / (T p_t) keeps the loss unbiased. Its history is state: :meth:`state_dict` / :meth:`load_state_dict`."""

    def __init__(self, T: int, history: int = HISTORY, uniform_share: float = UNIFORM_SHARE):
        self.T, self.history, self.uniform_share = T, history, uniform_share
        self.values = torch.zeros(T, history, dtype=torch.float64)  # (T, H): the last values, oldest first
        self.counts = torch.zeros(T, dtype=torch.int64)             # (T,): values seen per term, at most H

    def probabilities(self) -> torch.Tensor:
        """p_t (T,) float64: uniform before warm-up (or while every term is 0), else sqrt(mean L_t^2) normalised,
        mixed with the uniform law."""
        w = self.values.pow(2).mean(1).sqrt()
        if (self.counts < self.history).any() or not w.sum() > 0:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = w / w.sum()
        return w * (1 - self.uniform_share) + self.uniform_share / self.T

    def sample(self, n: int, *, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (n,) int64, weight 1 / (T p_t) (n,) float32): one uniform number per draw (per-example generators
        welcome) turned into a step by the inverse of the cumulative p."""
        p = self.probabilities()
        u = rand((n,), generator=generator, dtype=torch.float64)
        t = torch.searchsorted(p.cumsum(0), u, right=True).clamp(max=self.T - 1)
        return t.to(device), (1.0 / (self.T * p[t])).to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append the term values `losses` (n,) of steps `t` (n,), in order; each term keeps its last HISTORY."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ti] == self.history:
                self.values[ti] = torch.roll(self.values[ti], -1)
                self.values[ti, -1] = li
            else:
                self.values[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        values, counts = state["values"], state["counts"]
        if tuple(values.shape) != (self.T, self.history) or tuple(counts.shape) != (self.T,):
            raise ValueError(f"importance-sampling history of shape {tuple(values.shape)} does not fit a schedule of "
                             f"{self.T} steps with {self.history} values per term")
        self.values, self.counts = values.double().clone(), counts.long().clone()
