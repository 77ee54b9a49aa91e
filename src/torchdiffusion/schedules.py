"""Noise schedules and the closed-form Gaussian process math built on them.

Every schedule describes the same family of processes in the variance-exploding (VE) coordinates that the
rest of the library uses: x_sigma = x0 + sigma * n, n ~ N(0, I). A schedule adds three things on top:

* how its own time variable maps to sigma and back (``t_to_sigma`` / ``sigma_to_t``),
* how its networks see the input (``input_scale``: VP networks see x / sqrt(1 + sigma^2), i.e. the usual
  sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; rectified-flow networks see x / (1 + sigma)),
* how training draws noise levels (``sample_sigmas``) and what the network receives as time (``net_time``).

For a VP schedule, alpha_bar = 1 / (1 + sigma^2), i.e. sigma = sqrt((1 - alpha_bar) / alpha_bar), and the
log signal-to-noise ratio is log SNR = log(alpha_bar / (1 - alpha_bar)) = -2 log sigma.
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch

from .utils import append_dims, check_choice, rand, randn

DISCRETE_SCHEDULES = ("linear", "cosine", "sigmoid")
SCHEDULES = DISCRETE_SCHEDULES + ("vp", "edm", "rf")
MAX_BETA = 0.999  # Nichol & Dhariwal clip betas here so the last step keeps a little signal


# --------------------------------------------------------------------------------------------- betas
def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02, rescaled so any T gives the same process."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = MAX_BETA) -> torch.Tensor:
    """Sigmoid schedule of Jabri et al. 2022 (RIN, Algorithm 1): alpha_bar from a shifted sigmoid."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    f = (-torch.sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    return (1 - f[1:] / f[:-1]).clamp(min=0.0, max=max_beta)


BETA_FUNCTIONS = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma**2)


def log_snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return -2 * torch.log(sigma)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with increasing `xp`, clamped at the ends (like numpy.interp)."""
    x = x.to(xp.dtype)
    # searchsorted as a count of smaller table entries: the same index, and an operation every exporter knows
    idx = (xp < x.clamp(xp[0], xp[-1])[..., None]).sum(-1).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    w = ((x.clamp(xp[0], xp[-1]) - x0) / (x1 - x0)).clamp(0, 1)
    return fp[idx - 1] + w * (fp[idx] - fp[idx - 1])


# ----------------------------------------------------------------------------------------- schedules
class Schedule(ABC):
    """Base class. Subclasses set sigma_min / sigma_max and the time conventions."""

    name: str = "base"
    sigma_min: float
    sigma_max: float

    @abstractmethod
    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        ...

    @property
    @abstractmethod
    def t_range(self) -> tuple[float, float]:
        """(t at sigma_min, t at sigma_max), the interval uniform time spacing divides."""
        ...

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """The factor that turns VE input x0 + sigma n into what this schedule's networks see."""
        return 1 / torch.sqrt(1 + sigma**2)

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time value a network conditioned on this schedule receives."""
        return self.sigma_to_t(sigma)

    @abstractmethod
    def sample_sigmas(self, n: int, *, generator=None, device=None) -> torch.Tensor:
        """Noise levels for training, shape (n,)."""

    def log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return log_snr_from_sigma(sigma)

    def config(self) -> dict:
        return {"name": self.name}


class DiscreteSchedule(Schedule):
    """A DDPM schedule of T steps given by its betas; timestep index i = 0..T-1 stands for DDPM's t = i+1.

    All tables are float64; ``sigma_to_t``/``t_to_sigma`` interpolate linearly in log-sigma, so they are exact
    inverses at the integer timesteps and continuous in between.
    """

    def __init__(self, betas: torch.Tensor, name: str = "custom", options: dict | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D tensor with at least 2 entries")
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie strictly between 0 and 1")
        self.name = name
        self.options = dict(options or {})  # the beta function's keyword options, for config()
        self.T = len(betas)
        self.betas = betas                                        # (T,)
        self.alphas = 1 - betas                                   # (T,)
        self.alpha_bar = torch.cumprod(self.alphas, 0)            # (T,)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sigmas = alpha_bar_to_sigma(self.alpha_bar)          # (T,) increasing
        self.log_sigmas = self.sigmas.log()
        self.log_snrs = log_snr_from_sigma(self.sigmas)           # (T,) decreasing
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])
        # posterior q(x_{t-1} | x_t, x_0) = N(c0 x0 + ct x_t, beta_tilde), DDPM eq. (6)-(7)
        self.posterior_variance = betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        self.posterior_mean_coef_x0 = betas * self.alpha_bar_prev.sqrt() / (1 - self.alpha_bar)
        self.posterior_mean_coef_xt = (1 - self.alpha_bar_prev) * self.alphas.sqrt() / (1 - self.alpha_bar)

    @classmethod
    def from_name(cls, name: str, T: int = 1000, **options) -> "DiscreteSchedule":
        """The named schedule of T steps; `options` are keyword options of its beta function (e.g. linear's
        beta_start, beta_end; cosine's s; sigmoid's start, end, tau)."""
        check_choice("discrete schedule", name, DISCRETE_SCHEDULES)
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        check_schedule_options(name, options)
        return cls(BETA_FUNCTIONS[name](T, **options), name=name, options=options)

    def config(self) -> dict:
        return {"name": self.name, "T": self.T, **self.options}

    @property
    def t_range(self):
        return (0.0, float(self.T - 1))

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        grid = torch.arange(self.T, dtype=torch.float64)
        return _interp(t, grid, self.log_sigmas).exp()

    def sigma_to_t(self, sigma):
        sigma = torch.as_tensor(sigma)
        grid = torch.arange(self.T, dtype=torch.float64)
        t = _interp(sigma.to(torch.float64).log(), self.log_sigmas, grid)
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def sample_sigmas(self, n, *, generator=None, device=None):
        u = rand((n,), generator=generator, dtype=torch.float64)
        idx = (u * self.T).long().clamp(max=self.T - 1)
        return self.sigmas[idx].to(device=device, dtype=torch.float32)

    # ---- closed-form DDPM quantities, indexed by integer timestep (tensor of shape (N,))
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, DDPM eq. (4), in VP coordinates."""
        ab = append_dims(self.alpha_bar[t].to(x0), x0.ndim)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One forward transition x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), DDPM eq. (2)."""
        b = append_dims(self.betas[t].to(x_prev), x_prev.ndim)
        return (1 - b).sqrt() * x_prev + b.sqrt() * noise

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0), DDPM eq. (6)-(7), VP coordinates."""
        c0 = append_dims(self.posterior_mean_coef_x0[t].to(x0), x0.ndim)
        ct = append_dims(self.posterior_mean_coef_xt[t].to(x0), x0.ndim)
        var = append_dims(self.posterior_variance[t].to(x0), x0.ndim)
        return c0 * x0 + ct * xt, var

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar[t] / (1 - self.alpha_bar[t])


class VPSchedule(Schedule):
    """Continuous-time VP SDE of Song et al. 2021 (eq. 32-33): beta(t) = beta_min + t (beta_max - beta_min),
    alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2), t in [eps_t, 1].

    Networks receive 1000 t, the range the usual sinusoidal time embedding is tuned for.
    """

    name = "vp"
    time_scale = 1000.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps_t: float = 1e-3):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.eps_t = beta_min, beta_max, eps_t
        self.sigma_min = float(self.t_to_sigma(torch.tensor(eps_t, dtype=torch.float64)))
        self.sigma_max = float(self.t_to_sigma(torch.tensor(1.0, dtype=torch.float64)))

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max, "eps_t": self.eps_t}

    @property
    def t_range(self):
        return (self.eps_t, 1.0)

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.sqrt(torch.expm1(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2))

    def sigma_to_t(self, sigma):
        sigma = torch.as_tensor(sigma)
        s = sigma.to(torch.float64)
        d = self.beta_max - self.beta_min
        t = (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * torch.log1p(s**2))) / d
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def net_time(self, sigma):
        return self.sigma_to_t(sigma) * self.time_scale

    def sample_sigmas(self, n, *, generator=None, device=None):
        u = rand((n,), generator=generator, dtype=torch.float64)
        t = self.eps_t + (1 - self.eps_t) * u
        return self.t_to_sigma(t).to(device=device, dtype=torch.float32)


class EDMSchedule(Schedule):
    """Karras et al. 2022 (EDM): t = sigma, networks see x / sqrt(sigma^2 + sigma_data^2) and ln(sigma)/4,
    training draws ln(sigma) ~ N(P_mean, P_std^2)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 p_mean: float = -1.2, p_std: float = 1.2):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.p_mean, self.p_std = p_mean, p_std

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std}

    @property
    def t_range(self):
        return (self.sigma_min, self.sigma_max)

    def t_to_sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64)

    def sigma_to_t(self, sigma):
        return torch.as_tensor(sigma)

    def input_scale(self, sigma):
        return 1 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def net_time(self, sigma):
        return torch.log(sigma) / 4

    def sample_sigmas(self, n, *, generator=None, device=None):
        z = randn((n,), generator=generator, dtype=torch.float32)
        return (self.p_mean + self.p_std * z).exp().to(device)


class RectifiedFlowSchedule(Schedule):
    """Rectified flow / flow matching path (Liu et al. 2023; Lipman et al. 2023): x_t = (1 - t) x0 + t n,
    so sigma = t / (1 - t) and the network sees x / (1 + sigma) and 1000 t. Training draws t from a
    logit-normal (Esser et al. 2024), or uniformly when logit_std = 0."""

    name = "rf"
    time_scale = 1000.0

    def __init__(self, t_min: float = 1e-4, t_max: float = 0.9999, logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.t_min, self.t_max, self.logit_mean, self.logit_std = t_min, t_max, logit_mean, logit_std
        self.sigma_min = t_min / (1 - t_min)
        self.sigma_max = t_max / (1 - t_max)

    def config(self):
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max,
                "logit_mean": self.logit_mean, "logit_std": self.logit_std}

    @property
    def t_range(self):
        return (self.t_min, self.t_max)

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return t / (1 - t)

    def sigma_to_t(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma / (1 + sigma)

    def input_scale(self, sigma):
        return 1 / (1 + sigma)

    def net_time(self, sigma):
        return self.sigma_to_t(sigma) * self.time_scale

    def sample_sigmas(self, n, *, generator=None, device=None):
        if self.logit_std > 0:
            t = torch.sigmoid(self.logit_mean + self.logit_std * randn((n,), generator=generator))
        else:
            t = rand((n,), generator=generator)
        t = t.clamp(self.t_min, self.t_max).to(torch.float64)
        return self.t_to_sigma(t).to(device=device, dtype=torch.float32)


CONTINUOUS_SCHEDULES = {"vp": VPSchedule, "edm": EDMSchedule, "rf": RectifiedFlowSchedule}


def schedule_option_names(name: str) -> list[str]:
    """The keyword options a schedule takes: its constructor's parameters (continuous schedules) or its beta
    function's beyond T (discrete ones)."""
    check_choice("schedule", name, SCHEDULES)
    fn = BETA_FUNCTIONS[name] if name in DISCRETE_SCHEDULES else CONTINUOUS_SCHEDULES[name].__init__
    skip = {"self", "T"}
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def check_schedule_options(name: str, options: dict) -> dict:
    """Refuse options the named schedule does not take, naming the ones it does; returns `options`."""
    allowed = schedule_option_names(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} takes no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(allowed)}")
    return dict(options)


def get_schedule(name: str = "linear", T: int = 1000, **options) -> Schedule:
    """Build a schedule by name: 'linear', 'cosine', 'sigmoid' (discrete, T steps), 'vp', 'edm' or 'rf';
    `options` are its keyword options (:func:`schedule_option_names`), e.g. EDM's sigma_data or VP's beta_max."""
    check_choice("schedule", name, SCHEDULES)
    if name in DISCRETE_SCHEDULES:
        return DiscreteSchedule.from_name(name, T, **options)
    return CONTINUOUS_SCHEDULES[name](**check_schedule_options(name, options))


def schedule_from_config(cfg: dict) -> Schedule:
    """Rebuild a schedule from its :meth:`Schedule.config` dict."""
    return get_schedule(**cfg)
