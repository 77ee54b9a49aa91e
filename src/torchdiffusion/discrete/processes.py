"""Forward processes on token sequences: masking schedules, the absorbing (masked) and the uniform process.

A sequence is a LongTensor x of shape (N, L) over a vocabulary of K tokens 0..K-1. Both processes corrupt every
position independently, and both are described by one number per time t in [0, 1], alpha(t), the probability that a
token is still clean (D3PM's cumulative product of the one-step keep probabilities, Austin et al. 2021; MDLM's
alpha_t, Sahoo et al. 2024):

* absorbing: q(x_t | x_0) = Cat(alpha_t onehot(x_0) + (1 - alpha_t) onehot(m)), with one extra token, the mask
  m = ``mask_id`` = K (D3PM sec. 3.1; MDLM's interpolating process with the mask as its prior);
* uniform: q(x_t | x_0) = Cat(alpha_t onehot(x_0) + (1 - alpha_t) / K) (D3PM sec. 3.1).

Both families are closed under composition (a product of two such matrices is one of them with the alphas
multiplied), so the step from s to t > s has alpha_{t|s} = alpha_t / alpha_s, and each posterior
q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0) (D3PM eq. 3) has a closed form, below.

Alphas are passed to the process functions as numbers (a float, or a tensor of shape (N,), one per sequence), so the
functions serve any schedule. Every function that draws takes a `generator` (None, one ``torch.Generator``, or one
per sequence, as :func:`torchdiffusion.utils.rand`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import math

import torch

from ..utils import append_dims, check_choice, rand

DEFAULT_EPS = 1e-3  # alpha(1) = eps: MDLM's log-linear schedule keeps a token clean at t = 1 with this probability


# ----------------------------------------------------------------------------------------------- schedules
class MaskSchedule(ABC):
    """alpha(t): the probability that a token is still clean at time t in [0, 1], decreasing from alpha(0) = 1 to
    alpha(1) = eps. Subclasses give `mask_rate` = 1 - alpha (computed without cancellation near t = 0, where the
    NELBO's weight -alpha'/(1 - alpha) is largest) and `dalpha` = d alpha / dt."""

    name = ""

    def __init__(self, eps: float = DEFAULT_EPS):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps (alpha at t = 1) must be in [0, 1), got {eps}")
        self.eps = float(eps)

    @abstractmethod
    def mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t), the probability that a token is masked (or resampled) at time t."""

    @abstractmethod
    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt (<= 0)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.mask_rate(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)) >= 0, the weight of the continuous-time NELBO (MDLM, sec. 3.2)."""
        return -self.dalpha(t) / self.mask_rate(t)

    def __repr__(self):
        return f"{type(self).__name__}(eps={self.eps})"


class LogLinearSchedule(MaskSchedule):
    """alpha(t) = 1 - (1 - eps) t (MDLM's log-linear schedule: total noise sigma(t) = -log(1 - (1 - eps) t))."""

    name = "log-linear"

    def mask_rate(self, t):
        return (1 - self.eps) * _as_time(t)

    def dalpha(self, t):
        return torch.full_like(_as_time(t), -(1 - self.eps))


class CosineSchedule(MaskSchedule):
    """alpha(t) = eps + (1 - eps) cos(pi t / 2) (MDLM's cosine schedule, sigma(t) = -log(eps + (1 - eps) cos(pi t /
    2))); 1 - alpha = 2 (1 - eps) sin^2(pi t / 4) and alpha' = -(1 - eps) (pi / 2) sin(pi t / 2)."""

    name = "cosine"

    def mask_rate(self, t):
        return 2 * (1 - self.eps) * torch.sin(math.pi * _as_time(t) / 4) ** 2

    def dalpha(self, t):
        return -(1 - self.eps) * (math.pi / 2) * torch.sin(math.pi * _as_time(t) / 2)


MASK_SCHEDULES = {"log-linear": LogLinearSchedule, "cosine": CosineSchedule}


def get_mask_schedule(name: str, eps: float = DEFAULT_EPS) -> MaskSchedule:
    """The masking schedule `name` (one of :data:`MASK_SCHEDULES`) with alpha(1) = eps."""
    check_choice("masking schedule", name, MASK_SCHEDULES)
    return MASK_SCHEDULES[name](eps)


def _as_time(t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t
    return t if t.is_floating_point() else t.double()


# ---------------------------------------------------------------------------------------------- validation
def check_tokens(x: torch.Tensor, num_tokens: int, *, name: str = "x", allow_mask: bool = False) -> torch.Tensor:
    """Check that x is a LongTensor (N, L) of ids in 0..K-1 (0..K with `allow_mask`: id K is the mask)."""
    if not torch.is_tensor(x) or x.dtype != torch.long or x.ndim != 2:
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a LongTensor of token ids of shape (N, L), got {what}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"the vocabulary size must be a positive int, got {num_tokens!r}")
    top = num_tokens if allow_mask else num_tokens - 1
    if x.numel() and (x.min() < 0 or x.max() > top):
        bad = x[(x < 0) | (x > top)][0].item()
        extra = f" (id {num_tokens} is the mask)" if allow_mask else f"; the mask id {num_tokens} is not a data token"
        raise ValueError(f"{name} holds the token id {bad}; allowed values: 0..{top}{extra}")
    return x


def _alpha_col(alpha, x: torch.Tensor) -> torch.Tensor:
    """An alpha (float or (N,) tensor) as a float64 tensor broadcasting against (N, L, K): shape (N or 1, 1, 1)."""
    a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
    if a.ndim == 0:
        return a.reshape(1, 1, 1)
    if a.shape != (x.shape[0],):
        raise ValueError(f"alpha must be a float or have shape ({x.shape[0]},), got {tuple(a.shape)}")
    return append_dims(a, 3)


def _x0_probs(x0: torch.Tensor, num_tokens: int, x_t: torch.Tensor) -> torch.Tensor:
    """x0 as probabilities (N, L, K) in float64: token ids are one-hot encoded, a distribution is checked."""
    if x0.dtype == torch.long:
        check_tokens(x0, num_tokens, name="x0")
        return torch.nn.functional.one_hot(x0, num_tokens).double()
    if x0.shape != (*x_t.shape, num_tokens):
        raise ValueError(f"x0 must be token ids of shape {tuple(x_t.shape)} or probabilities of shape "
                         f"{(*x_t.shape, num_tokens)}, got {tuple(x0.shape)}")
    return x0.double()


# -------------------------------------------------------------------------------------------- categoricals
def sample_categorical(probs: torch.Tensor, *, generator=None) -> torch.Tensor:
    """One draw per row of `probs` (..., C), not necessarily normalised, by inverting the CDF in float64 with one
    uniform number per row; an entry of probability 0 is never drawn."""
    cdf = probs.double().cumsum(-1)  # (..., C)
    u = rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=torch.float64)  # (...)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1).clamp_max(
        probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------- absorbing
def absorbing_probs(x0: torch.Tensor, alpha, *, mask_id: int) -> torch.Tensor:
    """q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) onehot(m) per position, shape (N, L, K + 1), float64
    (D3PM sec. 3.1; Sahoo et al. 2024, sec. 2). `mask_id` m is K, the vocabulary size."""
    check_tokens(x0, mask_id, name="x0")
    a = _alpha_col(alpha, x0)
    probs = a * torch.nn.functional.one_hot(x0, mask_id + 1).double()  # (N, L, K + 1)
    probs[..., mask_id] = (1 - a[..., 0]).expand(x0.shape)
    return probs


def absorbing_sample(x0: torch.Tensor, alpha, *, mask_id: int, generator=None) -> torch.Tensor:
    """x_t ~ q(x_t | x_0): each token is replaced by the mask with probability 1 - alpha_t, independently."""
    check_tokens(x0, mask_id, name="x0")
    u = rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)  # (N, L)
    keep = u < _alpha_col(alpha, x0)[..., 0]
    return torch.where(keep, x0, torch.full_like(x0, mask_id))


def absorbing_posterior(x_t: torch.Tensor, x0: torch.Tensor, alpha_s, alpha_t, *, mask_id: int) -> torch.Tensor:
    """q(x_s | x_t, x_0) for s < t (alpha_s >= alpha_t), shape (N, L, K + 1), float64 (D3PM eq. 3; Sahoo et al.
    2024, sec. 3):

    * x_t unmasked: x_s = x_t;
    * x_t = m: x_s = x_0 with probability (alpha_s - alpha_t) / (1 - alpha_t), m with (1 - alpha_s) / (1 - alpha_t).

    `x0` is token ids (N, L) or a distribution over them (N, L, K); the posterior is linear in onehot(x_0) (its
    normaliser q(x_t = m | x_0) = 1 - alpha_t does not depend on x_0), so a distribution gives the model's reverse
    step p(x_s | x_t) = q(x_s | x_t, x_0 ~ p(x_0 | x_t)) (MDLM's reverse process)."""
    check_tokens(x_t, mask_id, name="x_t", allow_mask=True)
    a_s, a_t = _alpha_col(alpha_s, x_t), _alpha_col(alpha_t, x_t)
    if (a_s < a_t).any() or (a_t >= 1).any():
        raise ValueError("the posterior needs s < t, i.e. alpha_s >= alpha_t and alpha_t < 1")
    p0 = _x0_probs(x0, mask_id, x_t)  # (N, L, K)
    masked = (x_t == mask_id).unsqueeze(-1)  # (N, L, 1)
    unmask = (a_s - a_t) / (1 - a_t) * p0  # (N, L, K)
    stay = ((1 - a_s) / (1 - a_t)).expand(*x_t.shape, 1)
    from_mask = torch.cat([unmask, stay], -1)  # (N, L, K + 1)
    copy = torch.nn.functional.one_hot(x_t, mask_id + 1).double()
    return torch.where(masked, from_mask, copy)


# ------------------------------------------------------------------------------------------------ uniform
def uniform_probs(x0: torch.Tensor, alpha, *, num_tokens: int) -> torch.Tensor:
    """q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) / K per position, shape (N, L, K), float64 (D3PM
    sec. 3.1)."""
    check_tokens(x0, num_tokens, name="x0")
    a = _alpha_col(alpha, x0)
    return a * torch.nn.functional.one_hot(x0, num_tokens).double() + (1 - a) / num_tokens


def uniform_sample(x0: torch.Tensor, alpha, *, num_tokens: int, generator=None) -> torch.Tensor:
    """x_t ~ q(x_t | x_0): each token is kept with probability alpha_t, else redrawn uniformly from all K tokens."""
    return sample_categorical(uniform_probs(x0, alpha, num_tokens=num_tokens), generator=generator)


def uniform_posterior_logprobs(x_t: torch.Tensor, x0_logprobs: torch.Tensor, alpha_s, alpha_t, *,
                               num_tokens: int) -> torch.Tensor:
    """log p(x_s | x_t) proportional to log q(x_t | x_s) + log sum_x0 q(x_s | x_0) p(x_0), normalised, (N, L, K)
    float64: D3PM's x0-parameterisation (eq. 4), p(x_s | x_t) ~ sum_x0 q(x_s, x_t | x_0) p(x_0 | x_t). With a
    one-hot p it is the posterior q(x_s | x_t, x_0) (eq. 3). Here q(x_t | x_s = j) = a [j = x_t] + (1 - a) / K with
    a = alpha_t / alpha_s, and sum_x0 q(x_s = j | x_0) p(x_0) = alpha_s p_j + (1 - alpha_s) / K."""
    check_tokens(x_t, num_tokens, name="x_t")
    if x0_logprobs.shape != (*x_t.shape, num_tokens):
        raise ValueError(f"x0_logprobs must have shape {(*x_t.shape, num_tokens)}, got {tuple(x0_logprobs.shape)}")
    a_s, a_t = _alpha_col(alpha_s, x_t), _alpha_col(alpha_t, x_t)
    if (a_s < a_t).any() or (a_s <= 0).any():
        raise ValueError("the posterior needs s < t, i.e. alpha_s >= alpha_t and alpha_s > 0")
    a = a_t / a_s
    fact1 = torch.log(a * torch.nn.functional.one_hot(x_t, num_tokens).double() + (1 - a) / num_tokens)
    fact2 = torch.logaddexp(torch.log(a_s) + x0_logprobs.double(), torch.log((1 - a_s) / num_tokens))
    logits = fact1 + fact2  # (N, L, K)
    return logits - logits.logsumexp(-1, keepdim=True)


def uniform_posterior(x_t: torch.Tensor, x0: torch.Tensor, alpha_s, alpha_t, *, num_tokens: int) -> torch.Tensor:
    """q(x_s | x_t, x_0) for token ids x0 (N, L), or D3PM's p(x_s | x_t) for a distribution x0 (N, L, K); (N, L,
    K) float64. See :func:`uniform_posterior_logprobs`."""
    log_p0 = _x0_probs(x0, num_tokens, x_t).log()
    return uniform_posterior_logprobs(x_t, log_p0, alpha_s, alpha_t, num_tokens=num_tokens).exp()
