"""Variational diffusion models (Kingma, Salimans, Poole & Ho 2021, "Variational diffusion models"; VDM) on the
denoiser contract: a learned monotone noise schedule, the continuous- and discrete-time ELBO, and the
variance-minimising update of the schedule.

VDM's forward process is z_t = alpha_t x + s_t eps with alpha_t^2 = sigmoid(-gamma(t)) and s_t^2 = sigmoid(gamma(t)),
gamma(t) = -log SNR(t) increasing on t in [0, 1]. In VE coordinates (x = z_t / alpha_t = x0 + sigma eps) this is
sigma^2 = exp(gamma), so the library's denoiser D(x, sigma) -> x0 gives eps_hat = (x - D) / sigma and
||eps - eps_hat||^2 = SNR ||x0 - D||^2. Per example, in nats (VDM eq. 11, 13, 17 and appendix):

* diffusion loss, continuous time: L_inf = 1/2 E_{t ~ U[0, 1], eps}[gamma'(t) ||eps - eps_hat||^2]
  = -1/2 E[SNR'(t) ||x0 - D||^2]; T steps (s = t - 1/T, t uniform on {1/T, ..., 1}):
  L_T = T/2 E[(SNR(s) - SNR(t)) ||x0 - D||^2];
* prior: KL(q(z_1 | x) || N(0, I)) = 1/2 sum_i (s_1^2 + alpha_1^2 x_i^2 - 1 - log s_1^2);
* reconstruction: E_{q(z_0 | x)}[-log p(x | z_0)], p(x_i | z_0) proportional to q(z_{0,i} | x_i) over the 256
  levels of 8-bit data in [-1, 1] (``discrete``), or the Gaussian N(x; z_0 / alpha_0, sigma_0^2) for continuous
  data (``gaussian``).

The schedule (appendix, "learned noise schedule"): gamma~(t) = l1(t) + l3(phi(l2(l1(t)))) with positive weights
(softplus of raw weights), phi the sigmoid, and gamma(t) = gamma0 + (gamma1 - gamma0) (gamma~(t) - gamma~(0)) /
(gamma~(1) - gamma~(0)), the endpoints gamma0 < gamma1 learned (:class:`LearnedGamma`). The continuous ELBO depends
on the schedule only through its endpoints (VDM eq. 20: L_inf = 1/2 int_{gamma0}^{gamma1} E||x0 - D||^2 e^{-g} dg),
so the parameters between them are trained to minimise the variance of the estimate: they receive the gradient of
the squared diffusion loss, and the endpoints that of the ELBO (VDM sec. 5.2; :class:`SquaredLossGradient`).

The module lives inside the trained network (:func:`attach_learned_gamma`), so the optimizer, the EMA, the
checkpoints and loading treat it as weights; :class:`LearnedSchedule` is its view as a
:class:`~torchdiffusion.schedules.Schedule`, so every sampler spaces its levels between the learned endpoints. The
network's own view of its input and noise level (c_in, c_noise) is the configured base schedule's, a fixed function
of sigma: the denoiser stays a function of (x, sigma) whatever the schedule learns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .schedules import Schedule
from .utils import LOG2, append_dims, check_choice, rand, randn_like
from .variance import DECODERS

GAMMA0_INIT = -13.3           # VDM's initial gamma(0) = -log SNR at t = 0 (their CIFAR-10 setting)
GAMMA1_INIT = 5.0             # VDM's initial gamma(1)
HIDDEN = 1024                 # hidden units of the schedule network (VDM appendix)
SHAPE_INIT = 0.1              # initial total weight of the hidden path l3: gamma starts nearly linear in t
PIXEL_LEVELS = 256            # values of 8-bit data, x = u / 127.5 - 1
GRID_TOLERANCE = 1e-3         # how far data may lie from the 8-bit grid for the discrete decoder
BISECTION_STEPS = 60          # sigma -> t by bisection on the monotone schedule (2^-60 of [0, 1])
T_SAMPLINGS = ("low_discrepancy", "antithetic", "uniform")
GAMMA_ATTR = "vdm_gamma"      # the name of the schedule module inside the trained network


@dataclass
class VDMConfig:
    T: int = 0                          # 0: the continuous-time ELBO; T >= 1: the T-step discrete-time ELBO
    gamma0: float = GAMMA0_INIT         # initial gamma(0) = -log SNR(0) (learned; sigma_min = exp(gamma0 / 2))
    gamma1: float = GAMMA1_INIT         # initial gamma(1) (learned; sigma_max = exp(gamma1 / 2))
    hidden: int = HIDDEN                # hidden units of the schedule network
    t_sampling: str = "low_discrepancy"  # low_discrepancy (VDM), antithetic (t, 1 - t pairs) or uniform
    variance_minimising: bool = True    # continuous time: the schedule's interior follows the squared loss
    decoder: str = "discrete"           # discrete (256 levels of 8-bit data in [-1, 1]) or gaussian (continuous)


def check_vdm_config(cfg: VDMConfig) -> VDMConfig:
    """Refuse options out of range, saying what is allowed."""
    if not isinstance(cfg.T, int) or cfg.T < 0:
        raise ValueError(f"diffusion.objective.vdm.T must be an integer >= 0 (0: continuous time), got {cfg.T!r}")
    _check_endpoints(cfg.gamma0, cfg.gamma1)
    if cfg.hidden < 1:
        raise ValueError(f"diffusion.objective.vdm.hidden must be at least 1, got {cfg.hidden}")
    check_choice("diffusion.objective.vdm.t_sampling", cfg.t_sampling, T_SAMPLINGS)
    check_choice("diffusion.objective.vdm.decoder", cfg.decoder, DECODERS)
    return cfg


def _check_endpoints(gamma0: float, gamma1: float) -> None:
    if not (math.isfinite(gamma0) and math.isfinite(gamma1) and gamma0 < gamma1):
        raise ValueError(f"the schedule's endpoints need finite gamma0 < gamma1 (gamma = -log SNR increases with t; "
                         f"VDM: -13.3 and 5.0), got gamma0={gamma0}, gamma1={gamma1}")


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


# ------------------------------------------------------------------------------------------- the schedule
class LossBox:
    """Carries the per-example loss of a batch from the forward pass (set after it is computed) to the backward
    pass of :class:`SquaredLossGradient`."""

    def __init__(self):
        self.loss: torch.Tensor | None = None  # (N,), detached


class SquaredLossGradient(torch.autograd.Function):
    """Identity on the normalised schedule (f(t), f'(t)) of each example; backward multiplies their gradients by
    2 L_i, L_i the example's diffusion loss (from `box`): the gradient of mean(L) becomes that of mean(L^2) for the
    parameters behind f, VDM's variance-minimising update (sec. 5.2). The endpoints, combined after, keep theirs."""

    @staticmethod
    def forward(ctx, f, df, box):
        ctx.box = box
        return f.clone(), df.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_df):
        loss = ctx.box.loss
        if loss is None:
            raise RuntimeError("SquaredLossGradient: the loss was never put in its LossBox before backward")
        scale = 2 * loss.to(grad_f)  # (N,)
        return grad_f * scale, grad_df * scale, None


class LearnedGamma(nn.Module):
    """gamma(t) = -log SNR(t), monotone in t in [0, 1] with learned endpoints gamma(0) = gamma0, gamma(1) = gamma1
    (VDM appendix): gamma~(t) = l1(t) + l3(sigmoid(l2(l1(t)))), weights softplus(raw) > 0, normalised to [0, 1]."""

    def __init__(
        self,
        gamma0: float = GAMMA0_INIT,     # initial gamma(0)
        gamma1: float = GAMMA1_INIT,     # initial gamma(1)
        hidden: int = HIDDEN,            # units of l2
    ):
        super().__init__()
        _check_endpoints(gamma0, gamma1)
        if hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {hidden}")
        self.gamma0 = nn.Parameter(torch.tensor(float(gamma0)))
        self.gamma1 = nn.Parameter(torch.tensor(float(gamma1)))
        self.w1 = nn.Parameter(torch.tensor(_softplus_inverse(1.0)))           # l1: 1 -> 1
        self.b1 = nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(hidden))                             # l2: 1 -> hidden
        self.b2 = nn.Parameter(torch.randn(hidden))
        self.w3 = nn.Parameter(torch.full((hidden,), _softplus_inverse(SHAPE_INIT / hidden)))  # l3: hidden -> 1

    def rise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma~(t) - gamma~(0), d gamma~ / dt) (N,) for t >= 0, both in closed form without cancellation:
        gamma~(t) - gamma~(0) = w1 t + sum_h w3_h (phi(u_h) - phi(v_h)), u = l2(l1(t)), v = l2(l1(0)), and
        gamma~' = w1 (1 + sum_h w3_h w2_h phi'(u_h)), phi' = phi (1 - phi)."""
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)
        u = (w1 * t + self.b1)[:, None] * w2 + self.b2          # (N, H)
        v = self.b1 * w2 + self.b2                               # (H,)
        h = torch.sigmoid(u)
        l3 = F.linear(_sigmoid_difference(u, v), w3[None])[:, 0]                    # (N,)
        return w1 * t + l3, w1 * (1 + F.linear(h * (1 - h), (w2 * w3)[None])[:, 0])

    def normalised(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), f'(t)) (N,), f = (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)): 0 at t = 0, 1 at t = 1."""
        r, dr = self.rise(t)
        span = self.rise(torch.ones(1, dtype=t.dtype, device=t.device))[0]
        return r / span, dr / span

    def gamma_and_derivative(self, t: torch.Tensor, box: LossBox | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)) (N,) for t (N,) in [0, 1]. With `box`, the gradient reaching the parameters between
        the endpoints is that of the squared loss (:class:`SquaredLossGradient`). Computed in the parameters' dtype
        under any autocast: a bf16 gamma would be off by ~0.05 at gamma = -13."""
        t = t.to(self.gamma0.dtype)
        with torch.autocast(device_type=t.device.type, enabled=False):
            f, df = self.normalised(t)
            if box is not None:
                f, df = SquaredLossGradient.apply(f, df, box)
            span = self.gamma1 - self.gamma0
            return self.gamma0 + span * f, span * df

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_and_derivative(t)[0]


def _sigmoid_difference(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """phi(u) - phi(v) for u >= v with full relative precision (no cancellation, no overflow):
    exp((u - v - |u| - |v|) / 2) (1 - exp(-(u - v))) / ((1 + exp(-|u|)) (1 + exp(-|v|)))."""
    d = u - v
    return (torch.exp((d - u.abs() - v.abs()) / 2) * -torch.expm1(-d)
            / ((1 + torch.exp(-u.abs())) * (1 + torch.exp(-v.abs()))))


def _unwrapped(net: nn.Module) -> nn.Module:
    """The network inside data-parallel (``.module``) and torch.compile (``._orig_mod``) wrappers: modules whose one
    child has one of those names."""
    while True:
        children = dict(net.named_children())
        if len(children) != 1 or not set(children) & {"module", "_orig_mod"}:
            return net
        net = next(iter(children.values()))


def attach_learned_gamma(net: nn.Module, cfg: VDMConfig) -> LearnedGamma:
    """The network's learned schedule (submodule ``vdm_gamma``), created from `cfg` if it has none yet: its
    parameters are then the network's, trained, averaged, saved and loaded with it."""
    raw = _unwrapped(net)
    gamma = getattr(raw, GAMMA_ATTR, None)
    if gamma is None:
        check_vdm_config(cfg)
        gamma = LearnedGamma(cfg.gamma0, cfg.gamma1, cfg.hidden)
        p = next(raw.parameters(), None)
        raw.add_module(GAMMA_ATTR, gamma.to(p.device) if p is not None else gamma)
    return gamma


class LearnedSchedule(Schedule):
    """A :class:`LearnedGamma` seen as a schedule: t in [0, 1], sigma(t) = exp(gamma(t) / 2), sigma_min and
    sigma_max at the learned endpoints, so every sampler and spacing follows what was learned. The network sees its
    input and noise level as under `base` (its input_scale and net_time), a fixed function of sigma."""

    name = "vdm"

    def __init__(self, gamma: LearnedGamma, base: Schedule):
        self.gamma, self.base = gamma, base
        self.sigma_data = float(getattr(base, "sigma_data", 0.5))

    @property
    def sigma_min(self) -> float:
        return math.exp(float(self.gamma.gamma0.detach()) / 2)

    @property
    def sigma_max(self) -> float:
        return math.exp(float(self.gamma.gamma1.detach()) / 2)

    @property
    def t_range(self):
        return (0.0, 1.0)

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        with torch.no_grad():
            g = self.gamma(t.reshape(-1).clamp(0, 1).to(self.gamma.gamma0.device))
        return (g.double() / 2).exp().reshape(t.shape).cpu()

    def sigma_to_t(self, sigma):
        """t with sigma(t) = sigma, by bisection (the schedule is monotone), clamped to [0, 1]."""
        sigma = torch.as_tensor(sigma)
        target = 2 * sigma.to(torch.float64).reshape(-1).log().cpu()
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            below = 2 * self.t_to_sigma(mid).log() < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = ((lo + hi) / 2).reshape(sigma.shape)
        return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def input_scale(self, sigma):
        return self.base.input_scale(sigma)

    def net_time(self, sigma):
        return self.base.net_time(sigma)

    def sample_sigmas(self, n, *, generator=None, device=None):
        t = rand((n,), generator=generator, dtype=torch.float64)
        return self.t_to_sigma(t).to(device=device, dtype=torch.float32)

    def config(self) -> dict:
        return {"name": self.name, "base": self.base.config()}


def learned_gamma_of(denoiser) -> LearnedGamma:
    """The learned schedule of a VDM denoiser (through any chain of denoiser transforms)."""
    schedule = getattr(denoiser, "schedule", None)
    if not isinstance(schedule, LearnedSchedule):
        raise ValueError("this denoiser has no learned noise schedule: VDM needs the module of a run with "
                         "diffusion.objective.kind=vdm (build.build_module), whose schedule is a LearnedSchedule")
    return schedule.gamma


# --------------------------------------------------------------------------------------------- the ELBO
def draw_times(n: int, kind: str = "low_discrepancy", *, generator=None, device=None) -> torch.Tensor:
    """t (N,) float64 in [0, 1): uniform; VDM's low-discrepancy t_i = (u_0 + i / N) mod 1 (sec. 5.2), one shift u_0
    (the first example's draw); or antithetic pairs (u, 1 - u). Each example draws one uniform from its generator."""
    check_choice("t_sampling", kind, T_SAMPLINGS)
    u = rand((n,), generator=generator, device=device, dtype=torch.float64)
    if kind == "low_discrepancy":
        return torch.remainder(u[:1] + torch.arange(n, device=u.device, dtype=torch.float64) / n, 1.0)
    if kind == "antithetic":
        odd = torch.arange(n, device=u.device) % 2 == 1
        return torch.where(odd, 1 - u.roll(1), u)
    return u


def prior_kl(x0: torch.Tensor, gamma1: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | x) || N(0, I)) in nats (N,): 1/2 sum (s_1^2 + alpha_1^2 x^2 - 1 - log s_1^2),
    alpha_1^2 = sigmoid(-gamma1), s_1^2 = sigmoid(gamma1) (VDM eq. 11's L_prior)."""
    var1, a2 = torch.sigmoid(gamma1), torch.sigmoid(-gamma1)
    return 0.5 * (var1 + a2 * x0**2 - 1 - F.logsigmoid(gamma1)).flatten(1).sum(1)


def reconstruction_loss(x0: torch.Tensor, gamma0: torch.Tensor, decoder: str = "discrete", *,
                        generator=None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """E_{q(z_0 | x)}[-log p(x | z_0)] estimated with one z_0, in nats (N,) (VDM sec. 3.3). In VE coordinates
    z_0 / alpha_0 = x + sigma_0 eps, sigma_0 = exp(gamma0 / 2). ``discrete``: p(x_i | z_0) = softmax over the 256
    levels v of -(z_0 / alpha_0 - v)^2 / (2 sigma_0^2), i.e. proportional to q(z_0 | v); ``gaussian``: the density
    N(x; z_0 / alpha_0, sigma_0^2)."""
    check_choice("decoder", decoder, DECODERS)
    sigma0 = (gamma0 / 2).exp()
    eps = noise if noise is not None else randn_like(x0, generator=generator)
    if decoder == "gaussian":
        return (0.5 * eps**2 + sigma0.log() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    k = (x0 + 1) * (PIXEL_LEVELS - 1) / 2                                # level index, (N, ...)
    off_grid = (k - k.round()).abs().max() > GRID_TOLERANCE * (PIXEL_LEVELS - 1) / 2
    if off_grid or k.min() < -0.5 or k.max() > PIXEL_LEVELS - 0.5:
        raise ValueError("the discrete decoder needs 8-bit data on the grid u / 127.5 - 1 in [-1, 1]; for continuous "
                         "data set diffusion.objective.vdm.decoder=gaussian")
    levels = torch.linspace(-1, 1, PIXEL_LEVELS, device=x0.device, dtype=x0.dtype)
    z = (x0 + sigma0 * eps).flatten(1)                                   # (N, D)
    logits = -((z[..., None] - levels) ** 2) / (2 * sigma0**2)           # (N, D, 256)
    logp = logits.gather(-1, k.round().long().flatten(1)[..., None])[..., 0] - logits.logsumexp(-1)
    return -logp.sum(1)


def elbo_terms(denoiser, x0: torch.Tensor, cond: dict | None = None, *, T: int = 0, t: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, generator=None, t_sampling: str = "low_discrepancy",
               decoder: str = "discrete", variance_minimising: bool = False) -> dict:
    """The VDM ELBO's terms per example in nats (N,): {diffusion, prior, reconstruction} (VDM eq. 11; continuous
    time, eq. 17, for T = 0, else the T-step loss of eq. 13) for a denoiser with a learned schedule. t (N,) in
    [0, 1] and noise may be given, else they are drawn (`t_sampling`). `variance_minimising` (continuous time):
    the schedule's interior receives the gradient of the squared diffusion loss (mean over the batch)."""
    gamma_net = learned_gamma_of(denoiser)
    n = x0.shape[0]
    if t is None:
        t = draw_times(n, t_sampling, generator=generator, device=x0.device)
    box = LossBox() if variance_minimising and T == 0 else None
    if T > 0:
        t = torch.ceil(t.double() * T).clamp(1, T) / T                   # steps 1/T, ..., 1
        g_s, _ = gamma_net.gamma_and_derivative((t - 1.0 / T).to(x0.device))
    g, dg = gamma_net.gamma_and_derivative(t.to(x0.device), box)         # (N,)
    sigma = (g / 2).exp()
    eps = noise if noise is not None else randn_like(x0, generator=generator)
    x = x0 + append_dims(sigma, x0.ndim) * eps
    err = (denoiser(x, sigma, **(cond or {})) - x0).pow(2).flatten(1).sum(1)   # ||x0 - D||^2, (N,)
    if T > 0:  # T/2 (SNR(s) - SNR(t)) ||x0 - D||^2, SNR = exp(-gamma)
        diffusion = 0.5 * T * torch.exp(-g) * torch.expm1(g - g_s) * err
    else:      # 1/2 gamma'(t) ||eps - eps_hat||^2 = 1/2 gamma'(t) exp(-gamma) ||x0 - D||^2
        diffusion = 0.5 * dg * torch.exp(-g) * err
    if box is not None:
        box.loss = diffusion.detach() / (x0[0].numel() * LOG2)   # squared in the training loss's units, bits/dim
    return {"diffusion": diffusion, "prior": prior_kl(x0, gamma_net.gamma1),
            "reconstruction": reconstruction_loss(x0, gamma_net.gamma0, decoder, generator=generator)}


def elbo_bits_per_dim(terms: dict, x0: torch.Tensor) -> torch.Tensor:
    """The sum of the ELBO's terms in bits per dimension (N,)."""
    return sum(terms.values()) / (x0[0].numel() * LOG2)


class VDMLoss:
    """VDM's training loss: the ELBO in bits/dim per example (:func:`elbo_terms`), with the configured t sampling,
    discrete T (0: continuous) and decoder; in training the schedule between its ends minimises the estimate's
    variance (continuous time). A `sigma` given for a validation batch is turned into t by the learned schedule."""

    def __init__(self, cfg: VDMConfig | None = None):
        self.cfg = check_vdm_config(cfg or VDMConfig())
        self.last_terms: dict = {}

    def per_sample(self, denoiser, x0: torch.Tensor, cond: dict | None = None, *, generator=None,
                   sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   t: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
        """The ELBO in bits/dim (N,); t (or sigma, converted) and noise may be given, else they are drawn."""
        if t is None and sigma is not None:
            learned_gamma_of(denoiser)  # a clear error for a denoiser without a learned schedule
            t = denoiser.schedule.sigma_to_t(sigma.detach().double().cpu()).double().to(x0.device)
        c = self.cfg
        terms = elbo_terms(denoiser, x0, cond, T=c.T, t=t, noise=noise, generator=generator,
                           t_sampling=c.t_sampling, decoder=c.decoder,
                           variance_minimising=training and c.variance_minimising)
        d = x0[0].numel() * LOG2
        self.last_terms = {f"vdm_{k}": v.detach().mean() / d for k, v in terms.items()}
        return elbo_bits_per_dim(terms, x0)

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        return self.per_sample(denoiser, x0, cond, generator=generator, training=True).mean()
