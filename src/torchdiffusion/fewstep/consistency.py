"""Consistency models (Song et al. 2023; Song & Dhariwal 2023; Geng et al. 2024) on the denoiser contract.

A consistency function maps every point (x, sigma) of a probability-flow trajectory to the trajectory's start at the
boundary level sigma_min, with the boundary condition f(x, sigma_min) = x built in (Song et al. 2023, eq. 3):

    f(x, sigma) = c_skip(sigma) x + (1 - c_skip(sigma)) D(x, sigma),
    c_skip(sigma) = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),

where D is any denoiser of this library (so any network parameterization: eps, x0, v, velocity, EDM). Song et al.
write f = c_skip x + c_out F with the raw network F; here the network enters through D, which is affine in F for
every prediction type, so f is again c_skip' x + c_out' F with c_skip'(sigma_min) = 1 and c_out'(sigma_min) = 0:
the boundary holds exactly whatever D predicts (tests/fewstep/test_consistency.py checks it for each).

The objectives (call as ``objective(student, x0, cond, generator=None, step=0)``; `student` is the trained
denoiser, wrapped here in :class:`ConsistencyFunction`):

* :class:`ConsistencyDistillation` (CD, Song et al. 2023, Algorithm 2): d(f_theta(x_{n+1}, t_{n+1}),
  f_ema(x_hat_n, t_n)) with x_hat_n one ODE step of a frozen teacher from t_{n+1} to t_n;
* :class:`ConsistencyTraining` (improved CT, Song & Dhariwal 2023): no teacher, x_hat_n = x0 + t_n z with the same
  z, the target network is the student itself without gradient, pseudo-Huber distance, lognormal level sampling,
  weights 1 / (t_{n+1} - t_n) and the doubling discretisation curriculum;
* :class:`ConsistencyTuning` (ECT, Geng et al. 2024): continuous time, r = t (1 - q^-(s+1) (1 + k sigmoid(-b t)))
  shrinking towards t as the stage s grows, from a pretrained diffusion model.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..precond import DenoiserTransform
from ..sampling.sigmas import karras_sigmas
from ..utils import append_dims, check_choice, rand, randn, randn_like

DISTANCES = ("l2", "pseudo_huber", "feature")
TEACHER_SOLVERS = ("heun", "euler", "dpmpp_2s")
HUBER_C = 0.00054               # Song & Dhariwal 2023: c = 0.00054 sqrt(d) for d-dimensional data
ICT_P_MEAN, ICT_P_STD = -1.1, 2.0   # iCT / ECT lognormal noise-level distribution


def consistency_skip(sigma: torch.Tensor, sigma_min: float, sigma_data: float) -> torch.Tensor:
    """c_skip(sigma) = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2) (Song et al. 2023, app. C)."""
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


class ConsistencyFunction(DenoiserTransform):
    """f(x, sigma) = c_skip x + (1 - c_skip) D(x, sigma): the boundary condition f(x, sigma_min) = x exactly."""

    def __init__(self, inner, sigma_min: float = 0.002, sigma_data: float | None = None):
        super().__init__(inner)
        if sigma_min < 0:
            raise ValueError(f"sigma_min must be non-negative, got {sigma_min}")
        self.sigma_min = float(sigma_min)
        self.sigma_data = float(sigma_data if sigma_data is not None else getattr(inner, "sigma_data", 0.5))

    def forward(self, x, sigma, **cond):
        # sigma_min rounded to sigma's dtype first, so that sigma == sigma_min gives c_skip = 1 exactly
        s = sigma.to(torch.float64) - torch.tensor(self.sigma_min, dtype=sigma.dtype).to(torch.float64)
        c = append_dims(self.sigma_data**2 / (s**2 + self.sigma_data**2), x.ndim)
        return (c * x + (1 - c) * self.inner(x, sigma, **cond)).to(x.dtype)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per example (N,) (Song & Dhariwal 2023, eq. 9); c = 0.00054 sqrt(d) by default."""
    d2 = (a - b).flatten(1).pow(2).sum(1)
    c = HUBER_C * math.sqrt(a[0].numel()) if c is None else c
    return torch.sqrt(d2 + c**2) - c


def distance(kind: str, a: torch.Tensor, b: torch.Tensor, *, feature=None, huber_c: float | None = None):
    """Per-example distance (N,): 'l2' (mean squared error), 'pseudo_huber', or 'feature' (a perceptual distance
    `feature(a, b)`, never the evaluation network: see torchdiffusion.latent.perceptual)."""
    check_choice("distance", kind, DISTANCES)
    if kind == "l2":
        return (a - b).flatten(1).pow(2).mean(1)
    if kind == "pseudo_huber":
        return pseudo_huber(a, b, huber_c)
    if feature is None:
        raise ValueError("distance 'feature' needs a feature distance (distill.feature: 'own' or an LPIPS folder)")
    return feature(a, b)


@torch.no_grad()
def teacher_step(teacher, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, solver: str = "heun",
                 **cond) -> torch.Tensor:
    """One probability-flow ODE step from per-example levels sigma (N,) to sigma_next (N,) with the teacher:
    Euler; Heun (EDM, Algorithm 1); or DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with r = 1/2: a first-order
    step to the log-sigma midpoint sqrt(sigma sigma_next), then the full step with the denoiser there). Both second-
    order steps fall back to Euler where sigma_next = 0."""
    check_choice("teacher solver", solver, TEACHER_SOLVERS)
    s, sn = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    positive = append_dims(sigma_next > 0, x.ndim)
    denoised = teacher(x, sigma, **cond)
    x_next = x + (sn - s) * (x - denoised) / s  # Euler = DDIM in these coordinates
    if solver == "euler":
        return x_next
    if solver == "dpmpp_2s":
        mid = torch.sqrt(sigma * sigma_next).clamp_min(torch.finfo(sigma.dtype).tiny)  # (N,)
        m = append_dims(mid, x.ndim)
        u = (m / s) * x + (1 - m / s) * denoised
        step = (sn / s) * x + (1 - sn / s) * teacher(u, torch.where(sigma_next > 0, mid, sigma), **cond)
        return torch.where(positive, step, x_next)
    d_next = (x_next - teacher(x_next, torch.where(sigma_next > 0, sigma_next, sigma), **cond)) / torch.where(
        positive, sn, s)
    heun = x + (sn - s) * 0.5 * ((x - denoised) / s + d_next)
    return torch.where(positive, heun, x_next)


class EMATarget:
    """The target network theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, Algorithm 2), a frozen copy."""

    def __init__(self, student: nn.Module, mu: float):
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"the target network's EMA rate mu must be in [0, 1), got {mu}")
        self.mu = mu
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for t, s in zip(self.model.state_dict().values(), student.state_dict().values()):
            if t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - self.mu)


class _ConsistencyObjective:
    """Shared parts: the boundary level, the distance, and wrapping a denoiser into a consistency function."""

    takes_step = True

    def __init__(self, *, sigma_min: float, sigma_data: float, distance: str, feature=None,
                 huber_c: float | None = None):
        check_choice("distance", distance, DISTANCES)
        self.sigma_min, self.sigma_data = float(sigma_min), float(sigma_data)
        self.kind, self.feature, self.huber_c = distance, feature, huber_c
        self.last_terms: dict = {}

    def f(self, denoiser) -> ConsistencyFunction:
        return ConsistencyFunction(denoiser, self.sigma_min, self.sigma_data)

    def dist(self, a, b):
        return distance(self.kind, a, b, feature=self.feature, huber_c=self.huber_c)


def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The CM discretisation t_1 = sigma_min < ... < t_N = sigma_max (Karras et al. 2022, eq. 5), increasing."""
    if n < 2:
        raise ValueError(f"the discretisation needs at least 2 levels, got {n}")
    return karras_sigmas(n, sigma_min, sigma_max, rho).flip(0).float()


class ConsistencyDistillation(_ConsistencyObjective):
    """CD (Song et al. 2023, Algorithm 2): n ~ U{1, ..., N-1}, x_{n+1} = x0 + t_{n+1} z, x_hat_n = one teacher ODE step
    to t_n, loss d(f_theta(x_{n+1}, t_{n+1}), f_ema(x_hat_n, t_n)) with the EMA target network."""

    def __init__(self, teacher, *, levels: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, solver: str = "heun", mu: float = 0.95, sigma_data: float = 0.5,
                 distance: str = "l2", feature=None, huber_c: float | None = None):
        super().__init__(sigma_min=sigma_min, sigma_data=sigma_data, distance=distance, feature=feature,
                         huber_c=huber_c)
        check_choice("teacher solver", solver, TEACHER_SOLVERS)
        self.teacher = teacher.eval().requires_grad_(False) if isinstance(teacher, nn.Module) else teacher
        self.t = karras_grid(levels, sigma_min, sigma_max, rho)  # (N,) increasing
        self.solver, self.mu = solver, mu
        self.target: EMATarget | None = None

    def after_step(self, student) -> None:
        """Move the target network towards the student (call after every optimizer step with the plain student
        denoiser, not a data-parallel wrapper). Before the first call the target is the student itself."""
        if self.target is None:
            self.target = EMATarget(student, self.mu)
        self.target.update(student)

    def state_dict(self) -> dict:
        """The target network's tensors (what an exact resume needs)."""
        return {} if self.target is None else dict(self.target.model.state_dict())

    def load_state_dict(self, state: dict, student) -> None:
        if state:
            self.target = EMATarget(student, self.mu)
            self.target.model.load_state_dict(state)

    def per_sample(self, student, x0, cond=None, *, generator=None, sigma=None, noise=None, step: int = 0):
        cond = cond or {}
        n = x0.shape[0]
        idx = (rand((n,), generator=generator) * (len(self.t) - 1)).long().clamp(max=len(self.t) - 2)  # n - 1
        t_lo, t_hi = self.t[idx].to(x0.device), self.t[idx + 1].to(x0.device)
        z = randn_like(x0, generator=generator) if noise is None else noise
        x_hi = x0 + append_dims(t_hi, x0.ndim) * z
        x_lo = teacher_step(self.teacher, x_hi, t_hi, t_lo, self.solver, **cond)
        target_net = self.target.model if self.target is not None else student
        with torch.no_grad():
            target = self.f(target_net)(x_lo, t_lo, **cond)
        return self.dist(self.f(student)(x_hi, t_hi, **cond), target)

    def __call__(self, student, x0, cond=None, *, generator=None, step: int = 0):
        return self.per_sample(student, x0, cond, generator=generator, step=step).mean()


def ict_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2023, eq. 5): N(k) = min(s0 2^floor(k / K'), s1) + 1,
    K' = floor(K / (log2(s1 / s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_level_probs(t: torch.Tensor, p_mean: float = ICT_P_MEAN, p_std: float = ICT_P_STD) -> torch.Tensor:
    """p(n) proportional to erf((log t_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log t_n - P_mean) / (sqrt 2 P_std))
    (Song & Dhariwal 2023, sec. 3.5), over the N - 1 intervals of the increasing grid t."""
    e = torch.erf((t.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = (e[1:] - e[:-1]).clamp_min(0)
    return (p / p.sum()).float()


class ConsistencyTraining(_ConsistencyObjective):
    """Improved consistency training (Song & Dhariwal 2023): x_hat_n = x0 + t_n z (the same z as x_{n+1}), the target
    is the student itself without gradient, pseudo-Huber distance, lognormal levels, weight 1 / (t_{n+1} - t_n),
    and N doubling from s0 to s1 over `total_steps`."""

    def __init__(self, *, total_steps: int, s0: int = 10, s1: int = 1280, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5, distance: str = "pseudo_huber",
                 feature=None, huber_c: float | None = None, p_mean: float = ICT_P_MEAN, p_std: float = ICT_P_STD):
        super().__init__(sigma_min=sigma_min, sigma_data=sigma_data, distance=distance, feature=feature,
                         huber_c=huber_c)
        if total_steps < 1 or not 1 < s0 <= s1:
            raise ValueError(f"need total_steps >= 1 and 1 < s0 <= s1, got {total_steps}, {s0}, {s1}")
        self.total_steps, self.s0, self.s1 = total_steps, s0, s1
        self.sigma_max, self.rho, self.p_mean, self.p_std = sigma_max, rho, p_mean, p_std

    def grid(self, step: int) -> torch.Tensor:
        return karras_grid(ict_levels(step, self.total_steps, self.s0, self.s1), self.sigma_min, self.sigma_max,
                           self.rho)

    def per_sample(self, student, x0, cond=None, *, generator=None, sigma=None, noise=None, step: int = 0):
        cond = cond or {}
        t = self.grid(step)
        probs = lognormal_level_probs(t, self.p_mean, self.p_std)  # (N - 1,)
        u = rand((x0.shape[0],), generator=generator)
        idx = torch.searchsorted(probs.cumsum(0), u.to(probs.dtype)).clamp(max=len(probs) - 1)
        t_lo, t_hi = t[idx].to(x0.device), t[idx + 1].to(x0.device)
        z = randn_like(x0, generator=generator) if noise is None else noise
        x_hi, x_lo = self.points(x0, z, t_lo, t_hi)
        f = self.f(student)
        with torch.no_grad():
            target = f(x_lo, t_lo, **cond)
        return self.dist(f(x_hi, t_hi, **cond), target) / (t_hi - t_lo)

    @staticmethod
    def points(x0, z, t_lo, t_hi):
        """(x0 + t_hi z, x0 + t_lo z): given x_hi, the second is on average the Euler (DDIM) step of the exact
        denoiser from t_hi to t_lo, which is why no teacher is needed (Song et al. 2023, Theorem 2)."""
        return x0 + append_dims(t_hi, x0.ndim) * z, x0 + append_dims(t_lo, x0.ndim) * z

    def __call__(self, student, x0, cond=None, *, generator=None, step: int = 0):
        return self.per_sample(student, x0, cond, generator=generator, step=step).mean()


class ConsistencyTuning(_ConsistencyObjective):
    """ECT (Geng et al. 2024, "Consistency models made easy", eq. 8-10), tuning a pretrained diffusion model:
    t ~ lognormal(P_mean, P_std), r = t (1 - q^-(s+1) (1 + k sigmoid(-b t))) clamped at 0 with stage
    s = floor(step / stage_steps), loss w(t) (sqrt(||f(x_t, t) - sg f(x_r, r)||^2 + c^2) - c) with x_t, x_r on the same
    noise, w(t) = 1 / t^2 + 1 / sigma_d^2, and f(x_r, 0) = x0 at the boundary (sigma_min = 0)."""

    def __init__(self, *, stage_steps: int, q: float = 2.0, k: float = 8.0, b: float = 1.0, c: float = 0.0,
                 sigma_data: float = 0.5, p_mean: float = ICT_P_MEAN, p_std: float = ICT_P_STD,
                 distance: str = "pseudo_huber", feature=None):
        super().__init__(sigma_min=0.0, sigma_data=sigma_data, distance=distance, feature=feature, huber_c=c)
        if stage_steps < 1 or q <= 1:
            raise ValueError(f"need stage_steps >= 1 and q > 1, got {stage_steps}, {q}")
        self.stage_steps, self.q, self.k, self.b = stage_steps, q, k, b
        self.p_mean, self.p_std = p_mean, p_std

    def r_of(self, t: torch.Tensor, step: int) -> torch.Tensor:
        stage = step // self.stage_steps
        return (t * (1 - self.q ** -(stage + 1) * (1 + self.k * torch.sigmoid(-self.b * t)))).clamp_min(0)

    def per_sample(self, student, x0, cond=None, *, generator=None, sigma=None, noise=None, step: int = 0):
        cond = cond or {}
        t = (self.p_mean + self.p_std * randn((x0.shape[0],), generator=generator)).exp().to(x0.device)
        r = self.r_of(t, step)
        z = randn_like(x0, generator=generator) if noise is None else noise
        f = self.f(student)
        with torch.no_grad():
            positive = r > 0
            target = f(x0 + append_dims(r, x0.ndim) * z, torch.where(positive, r, t), **cond)
            target = torch.where(append_dims(positive, x0.ndim), target, x0)  # f(x, 0) = x0 at the boundary
        loss = self.dist(f(x0 + append_dims(t, x0.ndim) * z, t, **cond), target)
        return loss * (1 / t**2 + 1 / self.sigma_data**2)

    def __call__(self, student, x0, cond=None, *, generator=None, step: int = 0):
        return self.per_sample(student, x0, cond, generator=generator, step=step).mean()


def consistency_sigmas(levels: list[float]) -> torch.Tensor:
    """The grid for :func:`~torchdiffusion.sampling.sample_consistency`: the given levels, decreasing, then 0."""
    s = sorted((float(v) for v in levels), reverse=True)
    return torch.tensor(s + [0.0], dtype=torch.float32)


class LatentConsistencyDistillation(ConsistencyDistillation):
    """Latent consistency distillation (LCM, Luo et al. 2023, Algorithm 1): consistency distillation whose teacher
    is classifier-free guided, D_w = D(x, null) + w (D(x, y) - D(x, null)), with the scale w drawn per example from
    `guidance_range` and given to the student as the input ``guidance_scale`` (its network needs
    guidance_embed=True); the teacher's solver jumps between the levels of a coarse grid in one step (the
    "skipping-step" schedule: `grid` is every k-th level of the teacher's own). Sampling then takes 1-4 steps with
    guidance 'embedded': no second network call."""

    def __init__(self, teacher, grid: torch.Tensor, *, null_label: int, guidance_range=(2.0, 8.0),
                 solver: str = "euler", mu: float = 0.95, sigma_data: float = 0.5, distance: str = "pseudo_huber",
                 feature=None, huber_c: float | None = None):
        grid = torch.as_tensor(grid, dtype=torch.float32).sort().values
        super().__init__(teacher, levels=2, sigma_min=float(grid[0]), sigma_max=float(grid[-1]), solver=solver,
                         mu=mu, sigma_data=sigma_data, distance=distance, feature=feature, huber_c=huber_c)
        if len(grid) < 2 or not 0 <= guidance_range[0] <= guidance_range[1]:
            raise ValueError(f"need a grid of at least 2 levels and 0 <= w_min <= w_max, got {len(grid)} levels and "
                             f"{guidance_range}")
        self.t = grid                          # (N,) increasing; the boundary is its first level
        self.null_label, self.w_range = int(null_label), tuple(float(w) for w in guidance_range)

    def guided(self, w: torch.Tensor):
        """The teacher under classifier-free guidance with per-example scales w (N,)."""
        def den(x, sigma, class_labels=None, **cond):
            if class_labels is None:
                raise ValueError("latent consistency distillation distils a class-conditional teacher: the data "
                                 "set must have labels")
            both = self.teacher(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                class_labels=torch.cat([class_labels, torch.full_like(class_labels, self.null_label)]),
                                **{k: torch.cat([v, v]) for k, v in cond.items()})
            d_c, d_u = both.chunk(2)
            return d_u + append_dims(w.to(d_c.dtype), x.ndim) * (d_c - d_u)
        return den

    def per_sample(self, student, x0, cond=None, *, generator=None, sigma=None, noise=None, step: int = 0):
        cond = cond or {}
        n = x0.shape[0]
        lo, hi = self.w_range
        w = lo + (hi - lo) * rand((n,), generator=generator).to(x0.device)  # (N,) one scale per example
        idx = (rand((n,), generator=generator) * (len(self.t) - 1)).long().clamp(max=len(self.t) - 2)
        t_lo, t_hi = self.t[idx].to(x0.device), self.t[idx + 1].to(x0.device)
        z = randn_like(x0, generator=generator) if noise is None else noise
        x_hi = x0 + append_dims(t_hi, x0.ndim) * z
        x_lo = teacher_step(self.guided(w), x_hi, t_hi, t_lo, self.solver, **cond)
        student_cond = {**cond, "guidance_scale": w}
        target_net = self.target.model if self.target is not None else student
        with torch.no_grad():
            target = self.f(target_net)(x_lo, t_lo, **student_cond)
        return self.dist(self.f(student)(x_hi, t_hi, **student_cond), target)
