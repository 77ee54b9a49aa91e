"""Preconditioning: wrap a raw network into the one contract of the library, a denoiser D(x, sigma) -> x0.

Input x is in VE coordinates, x = x0 + sigma * n. Following Karras et al. 2022 (EDM, Table 1), the wrapper is

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

where c_in and c_noise come from the schedule (how its networks see inputs and time) and c_skip, c_out
from what the network predicts:

    prediction  c_skip                        c_out                            F predicts
    eps         1                             -sigma                           the noise n
    x0          0                             1                                x0
    v           1 / (1 + sigma^2)             -sigma / sqrt(1 + sigma^2)       v = alpha n - s x0 (VP)
    velocity    1 / (1 + sigma)               -sigma / (1 + sigma)             u = n - x0 (rectified flow)
    edm         sd^2 / (sigma^2 + sd^2)       sigma sd / sqrt(sigma^2 + sd^2)  EDM's F

with alpha = 1/sqrt(1 + sigma^2), s = sigma/sqrt(1 + sigma^2) and sd = sigma_data.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from .schedules import Schedule
from .utils import append_dims, check_choice
from .variance import v_from_output

PREDICTIONS = ("eps", "x0", "v", "velocity", "edm")


class Denoiser(Protocol):
    """The contract: x (N, ...) in VE coordinates, sigma (N,) float -> estimate of x0, same shape as x."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor: ...


def skip_out_coefficients(prediction: str, sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out) for a prediction type, as in the table of this module's docstring."""
    check_choice("prediction", prediction, PREDICTIONS)
    one = torch.ones_like(sigma)
    if prediction == "eps":
        return one, -sigma
    if prediction == "x0":
        return torch.zeros_like(sigma), one
    if prediction == "v":
        return 1 / (1 + sigma**2), -sigma / torch.sqrt(1 + sigma**2)
    if prediction == "velocity":
        return 1 / (1 + sigma), -sigma / (1 + sigma)
    sd2 = sigma_data**2
    return sd2 / (sigma**2 + sd2), sigma * sigma_data / torch.sqrt(sigma**2 + sd2)


# ------------------------------------------------------------------------- exact parameter conversions
def x0_from(prediction: str, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5):
    """x0 from a network output `out` of the given prediction type; `x` in VE coordinates."""
    c_skip, c_out = skip_out_coefficients(prediction, sigma, sigma_data)
    return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * out


def x0_to(prediction: str, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5):
    """The network output of the given prediction type that corresponds to `x0` (inverse of :func:`x0_from`)."""
    c_skip, c_out = skip_out_coefficients(prediction, sigma, sigma_data)
    return (x0 - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)


def convert(out: torch.Tensor, src: str, dst: str, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5):
    """Convert a prediction between parameterizations (eps <-> x0 <-> v <-> velocity <-> edm), exactly."""
    return x0_to(dst, x0_from(src, out, x, sigma, sigma_data), x, sigma, sigma_data)


class SigmaModule(nn.Module):
    """A raw network seen in VE coordinates: it receives what it was trained on, the schedule's input
    c_in(sigma) x and time c_noise(sigma) (EDM, Table 1). Base of :class:`Precond` (-> x0) and
    :class:`SigmaClassifier` (-> class logits)."""

    def __init__(self, net: nn.Module, schedule: Schedule):
        super().__init__()
        self.net = net
        self.schedule = schedule

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional (or classifier) network, None when it has none."""
        return getattr(self.net, "num_classes", None)

    def net_input(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_in(sigma) x in float32, c_noise(sigma) (N,) float32), checking that sigma has shape (N,)."""
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        s = sigma.to(torch.float32)
        c_in = self.schedule.input_scale(s).to(torch.float32)
        c_noise = self.schedule.net_time(s).to(torch.float32)
        return append_dims(c_in, x.ndim) * x.to(torch.float32), c_noise


class Precond(SigmaModule):
    """Wrap `net(x_in, t, **cond)` into a denoiser. `schedule` fixes c_in and c_noise, `prediction` c_skip/c_out."""

    def __init__(
        self,
        net: nn.Module,                 # raw network F(x_in, t, **cond) -> tensor shaped like x_in
        schedule: Schedule,             # time and input conventions the network was trained under
        prediction: str = "eps",        # what F predicts: eps, x0, v, velocity or edm
        learned_variance: bool = False,  # F's variance channels (learn_sigma) were trained: use them (Improved DDPM)
    ):
        super().__init__(net, schedule)
        check_choice("prediction", prediction, PREDICTIONS)
        if learned_variance and not getattr(net, "learn_sigma", False):
            raise ValueError("learned_variance=True needs a network with variance channels: build it with "
                             "learn_sigma=True (model.unet.learn_sigma or model.dit.learn_sigma)")
        self.learned_variance = bool(learned_variance)
        self.prediction = prediction
        self.sigma_data = float(getattr(schedule, "sigma_data", 0.5))

    def out_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """|c_out|: an error in x0 divided by this is the error in the network's own output space."""
        return skip_out_coefficients(self.prediction, sigma.to(torch.float32), self.sigma_data)[1].abs()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self._x0(x, sigma, self.net(*self.net_input(x, sigma), **cond))

    def _x0(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = skip_out_coefficients(self.prediction, sigma.to(torch.float32), self.sigma_data)
        out = out.to(torch.float32)
        if out.shape != x.shape:
            raise ValueError(f"network returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return append_dims(c_skip, x.ndim) * x.to(torch.float32) + append_dims(c_out, x.ndim) * out

    @property
    def learns_variance(self) -> bool:
        """Whether samplers and the bound use the network's variance channels (learned_variance; a learn_sigma
        network trained with the simple loss has untrained ones, and keeps the fixed variances)."""
        return self.learned_variance

    def with_variance(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, v): D(x, sigma) and the interpolation v = (out + 1) / 2 of the variance channels, shaped like x,
        in Sigma = exp(v log beta + (1 - v) log beta~) (Nichol & Dhariwal 2021, eq. 15; docs/likelihood.md)."""
        if not self.learns_variance:
            raise ValueError("this denoiser has no learned variance: wrap a learn_sigma network with "
                             "learned_variance=True (a run with diffusion.objective.kind hybrid or vlb)")
        mean, var = self.net(*self.net_input(x, sigma), return_variance=True, **cond)
        return self._x0(x, sigma, mean), v_from_output(var.to(torch.float32))


class SigmaClassifier(SigmaModule):
    """A noise-conditional classifier net(x_in, t) -> logits seen in VE coordinates: (x, sigma) -> logits (N, K),
    the network receiving exactly what a :class:`Precond` network of the same schedule receives."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net(*self.net_input(x, sigma)).float()  # (N, K)


def denoiser_from_eps(eps_fn: Callable, schedule: Schedule) -> Precond:
    """Convenience: wrap a plain function eps(x_in, t) as a denoiser (for tests and quick experiments)."""

    class _Fn(nn.Module):
        def forward(self, x, t, **cond):
            return eps_fn(x, t, **cond)

    return Precond(_Fn(), schedule, "eps")


class DenoiserTransform(nn.Module):
    """Base of denoiser -> denoiser transforms (clamping, conditioning, guidance). It forwards what the wrapped
    denoiser declares about itself (schedule, prediction, out_scale, num_classes), so code that needs them sees
    through any chain of transforms."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def schedule(self) -> Schedule:
        return self.inner.schedule

    @property
    def prediction(self) -> str | None:
        return getattr(self.inner, "prediction", None)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.inner, "num_classes", None)

    @property
    def learns_variance(self) -> bool:
        """False unless the transform passes a learned variance through (:meth:`with_variance`)."""
        return type(self).with_variance is not DenoiserTransform.with_variance and getattr(
            self.inner, "learns_variance", False)

    def with_variance(self, x, sigma, **cond):
        raise ValueError(f"{type(self).__name__} does not pass a learned variance through")

    def out_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.inner, "out_scale"):
            raise AttributeError(f"{type(self.inner).__name__} declares no out_scale")
        return self.inner.out_scale(sigma)


class ClampX0(DenoiserTransform):
    """Clip the predicted x0 to the data range [lo, hi] (DDPM's clip_denoised for pixel-space models)."""

    def __init__(self, inner, lo: float = -1.0, hi: float = 1.0):
        super().__init__(inner)
        if not lo < hi:
            raise ValueError(f"need lo < hi, got {lo}, {hi}")
        self.lo, self.hi = lo, hi

    def forward(self, x, sigma, **cond):
        return self.inner(x, sigma, **cond).clamp(self.lo, self.hi)

    def with_variance(self, x, sigma, **cond):
        x0, v = self.inner.with_variance(x, sigma, **cond)
        return x0.clamp(self.lo, self.hi), v


class Conditioned(DenoiserTransform):
    """Bind conditioning arguments (e.g. class_labels) so samplers see a plain D(x, sigma)."""

    def __init__(self, inner, **cond):
        super().__init__(inner)
        self.cond = cond

    def forward(self, x, sigma, **cond):
        return self.inner(x, sigma, **{**self.cond, **cond})

    def with_variance(self, x, sigma, **cond):
        return self.inner.with_variance(x, sigma, **{**self.cond, **cond})


class CountCalls(DenoiserTransform):
    """Count the calls of a denoiser (the NFE of a sampler run): ``.calls`` after sampling."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.inner(x, sigma, **cond)

    def with_variance(self, x, sigma, **cond):
        self.calls += 1
        return self.inner.with_variance(x, sigma, **cond)
