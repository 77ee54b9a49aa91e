"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean flows for one-step generative modeling"), trained from scratch,
on the denoiser contract.

On the rectified-flow path z_t = (1 - t) x0 + t n (schedule ``rf``: VE coordinates x = z / (1 - t), sigma = t / (1 - t))
the instantaneous velocity is v = n - x0, and the *average* velocity over [r, t] is

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,   so that   z_r = z_t - (t - r) u(z_t, r, t)       (eq. 3):

one network evaluation for a jump of any length. Differentiating (t - r) u = int_r^t v ds in t gives the MeanFlow
identity (eq. 6, 8)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),     d/dt u = v d_z u + d_t u,

whose right side, with the conditional velocity n - x0 for v and a stop-gradient, is the regression target
(eq. 9-10); d/dt u is one Jacobian-vector product of the network along the tangent (v, 0, 1) in (z, r, t)
(``torch.func.jvp``). The network is u_theta(z, r, t) = F(z, c_noise(t), interval = c_noise(t) - c_noise(r)): it sees
(t, t - r), the paper's best conditioning (Table 1c), through the nets' second time input (``interval_embed=True``).

As a denoiser, D(x, sigma; sigma_next) = z_t - t u(z_t, r, t) with r the path time of ``sigma_next`` (default 0). A DDIM
step of D from sigma to sigma_next is then exactly the jump z_r = z_t - (t - r) u, and at sigma_next = 0 D is the
one-step sample. It is the velocity Precond with the network's output read as u instead of v (at r = t, u = v).
"""
from __future__ import annotations

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..precond import Precond
from ..schedules import RectifiedFlowSchedule
from ..utils import append_dims, rand, randn, randn_like

MEANFLOW_P_MEAN, MEANFLOW_P_STD = -0.4, 1.0  # logit-normal (t, r) sampling (Geng et al. 2025, Table 1d)
MEANFLOW_C = 1e-3                           # the adaptive weight's c in 1 / (||delta||^2 + c)^p (sec. 4.3)


def path_time(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma): the rectified-flow time of a VE level (float64 for sigma up to 1e4)."""
    s = sigma.to(torch.float64)
    return s / (1 + s)


class MeanFlowDenoiser(Precond):
    """The average-velocity network as a denoiser: ``D(x, sigma, sigma_next=None, **cond)`` (see the module
    docstring); ``average_velocity(z, r, t, **cond)`` is u_theta in the path's coordinates."""

    def __init__(self, net, schedule):
        if not isinstance(schedule, RectifiedFlowSchedule):
            raise ValueError("MeanFlow lives on the rectified-flow path: diffusion.schedule must be 'rf' (with "
                             "diffusion.prediction 'velocity')")
        super().__init__(net, schedule, "velocity")

    def average_velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """u_theta(z_t, r, t) (N, ...); r, t (N,) path times in [0, 1]."""
        scale = self.schedule.time_scale
        return self.net(z, scale * t, interval=scale * (t - r), **cond).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor | None = None,
                **cond) -> torch.Tensor:
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        t = path_time(sigma)                                                    # (N,)
        r = torch.zeros_like(t) if sigma_next is None else path_time(sigma_next.expand_as(sigma))
        z = (x.to(torch.float64) / append_dims(1 + sigma.to(torch.float64), x.ndim)).float()  # z_t = (1 - t) x
        u = self.average_velocity(z, r.float(), t.float(), **cond)
        return z - append_dims(t.float(), x.ndim) * u


class MeanFlowObjective:
    """``objective(model, x0, cond, generator=None)``: the MeanFlow loss (Geng et al. 2025, Algorithm 1) for a
    :class:`MeanFlowDenoiser`: (t, r) logit-normal, r = t for a fraction 1 - `ratio` of the examples (plain flow
    matching there), target u_tgt = v - (t - r) (v d_z u + d_t u) with v = n - x0 and a stop-gradient, adaptive weight
    sg(1 / (||delta||^2 + c)^p) on the squared error summed over dimensions (p = 0: plain L2)."""

    def __init__(self, *, ratio: float = 0.25, power: float = 1.0, c: float = MEANFLOW_C,
                 p_mean: float = MEANFLOW_P_MEAN, p_std: float = MEANFLOW_P_STD):
        if not 0.0 <= ratio <= 1.0 or power < 0 or c <= 0:
            raise ValueError(f"need 0 <= ratio <= 1, power >= 0 and c > 0, got {ratio}, {power}, {c}")
        self.ratio, self.power, self.c, self.p_mean, self.p_std = ratio, power, c, p_mean, p_std
        self.last_terms: dict = {}

    def times(self, n: int, *, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t) (N,) each: two logit-normal draws sorted so that r <= t, then r = t with probability 1 - ratio."""
        a, b = (torch.sigmoid(self.p_mean + self.p_std * randn((n,), generator=generator)) for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        same = rand((n,), generator=generator) >= self.ratio
        return torch.where(same, t, r).to(device), t.to(device)

    @staticmethod
    def target(u_fn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
        """(u(z, r, t), u_tgt = v - (t - r) du/dt) with du/dt the JVP of `u_fn` along (v, 0, 1) (eq. 8-10); the
        attention kernels that forward-mode differentiation lacks are replaced by the plain (math) one."""
        with sdpa_kernel(SDPBackend.MATH):
            u, dudt = jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        return u, v - append_dims(t - r, z.ndim) * dudt

    def per_sample(self, model, x0, cond=None, *, generator=None, sigma=None, noise=None) -> torch.Tensor:
        cond = cond or {}
        n = randn_like(x0, generator=generator) if noise is None else noise
        r, t = self.times(x0.shape[0], generator=generator, device=x0.device)
        z = append_dims(1 - t, x0.ndim) * x0 + append_dims(t, x0.ndim) * n       # z_t
        u, u_tgt = self.target(lambda z_, r_, t_: model.average_velocity(z_, r_, t_, **cond), z, r, t, n - x0)
        err = (u - u_tgt.detach()).flatten(1).pow(2).sum(1)                       # ||delta||^2 (N,)
        weight = (err.detach() + self.c).pow(-self.power)                         # adaptive weight, sg
        return weight * err

    def __call__(self, model, x0, cond=None, *, generator=None) -> torch.Tensor:
        return self.per_sample(model, x0, cond, generator=generator).mean()

