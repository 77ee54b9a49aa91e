"""Likelihood bounds for discrete diffusion: MDLM's masked-diffusion NELBO and D3PM's hybrid loss.

The model contract. A model is any callable ``model(x_t, t, **cond) -> logits``:

* ``x_t``: LongTensor (N, L) of token ids; for the absorbing process it holds the mask id m = K where a token is
  masked, for the uniform process only ids 0..K-1;
* ``t``: float32 tensor (N,), the time in [0, 1] of each sequence (a model may ignore it: for the absorbing process
  the exact denoiser p(x_0 | x_t) does not depend on t, and MDLM trains time-independent networks);
* ``logits``: float (N, L, K + 1) for the absorbing process, the last column being the mask's, which SUBS
  overwrites with -inf (MDLM's convention: the network's vocabulary includes the mask), and (N, L, K) for the
  uniform process. They are unnormalised; the objectives normalise them.

All bounds are returned in nats per sequence, shape (N,), an unbiased Monte Carlo estimate of the negative ELBO of
each sequence; :class:`DiscreteObjective` averages them to nats per token, and :func:`bits_per_token` /
:func:`bits_per_character` convert.

The prior term. The absorbing chain ends at alpha(1) = eps; its sampler starts from the all-mask sequence, so the
prior term KL(q(x_1 | x_0) || all-mask) is 0 for eps = 0 and is left out for eps > 0 (as MDLM does), which
understates the bound by about eps times the per-token loss at full masking. The uniform chain's prior term
KL(q(x_1 | x_0) || Uniform(K)) is finite and included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..utils import LOG2, check_choice, rand
from .processes import (DEFAULT_EPS, MaskSchedule, absorbing_sample, check_tokens, get_mask_schedule,
                        uniform_posterior, uniform_posterior_logprobs, uniform_probs, uniform_sample)

PROCESSES = ("absorbing", "uniform")
DEFAULT_HYBRID_WEIGHT = 0.01  # lambda of D3PM's hybrid loss (Austin et al. 2021, sec. 3.4 and their text runs)


# ------------------------------------------------------------------------------------------------- model calls
def call_model(model, x_t: torch.Tensor, t, out_dim: int, cond: dict | None = None) -> torch.Tensor:
    """logits = model(x_t, t (N,) float32, **cond), checked to have shape (N, L, out_dim)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    logits = model(x_t, t.float(), **(cond or {}))
    if not torch.is_tensor(logits) or logits.shape != (*x_t.shape, out_dim):
        got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape {(*x_t.shape, out_dim)} "
                         f"(N, L, {out_dim}) for x_t of shape {tuple(x_t.shape)}, got {got}")
    return logits


def subs_logits(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation (Sahoo et al. 2024, sec. 3) as log-probabilities (N, L, K + 1):

    * zero masking probabilities: the mask's logit is set to -inf, so x_theta never predicts the mask;
    * carry-over unmasking: an unmasked position copies x_t, log-probability 0 for x_t and -inf elsewhere.

    The masked positions get log_softmax of the remaining K logits. `logits` (N, L, K + 1) with m = K = `mask_id`."""
    check_tokens(x_t, mask_id, name="x_t", allow_mask=True)
    if logits.shape != (*x_t.shape, mask_id + 1):
        raise ValueError(f"SUBS needs logits of shape (N, L, K + 1) = {(*x_t.shape, mask_id + 1)} with the mask "
                         f"column last, got {tuple(logits.shape)}")
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    logp = logits.log_softmax(-1)  # (N, L, K + 1)
    copy = torch.full_like(logp, float("-inf")).scatter(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where((x_t == mask_id).unsqueeze(-1), logp, copy)


# ------------------------------------------------------------------------------------------------- drawing time
def draw_times(n: int, *, generator=None, device=None, antithetic: bool = False) -> torch.Tensor:
    """t in (0, 1], float64 (N,): i.i.d. uniform, or low-discrepancy over the batch, t_i = 1 - ((u_i + i) / N)
    (MDLM's antithetic sampling: one uniform per stratum [i / N, (i + 1) / N))."""
    u = rand((n,), generator=generator, device=device, dtype=torch.float64)
    if antithetic:
        u = (u + torch.arange(n, device=u.device, dtype=torch.float64)) / n
    return 1 - u


def draw_steps(n: int, steps: int, *, generator=None, device=None) -> torch.Tensor:
    """i ~ Uniform{1, ..., T}, LongTensor (N,): the step whose KL term a discrete-time bound estimates."""
    _check_steps(steps)
    u = rand((n,), generator=generator, device=device, dtype=torch.float64)
    return (u * steps).long().clamp_max(steps - 1) + 1


def _check_steps(steps):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of steps T must be a positive int, got {steps!r}")


def _given(value, n, device, dtype):
    value = torch.as_tensor(value, device=device, dtype=dtype)
    value = value.expand(n) if value.ndim == 0 else value
    if value.shape != (n,):
        raise ValueError(f"t / i must be a scalar or have shape ({n},), got {tuple(value.shape)}")
    return value


def _steps_of(x0, steps, i, generator) -> torch.Tensor:
    """The step index i in 1..T of each sequence, (N,): drawn, or the given one checked."""
    _check_steps(steps)
    n = x0.shape[0]
    if i is None:
        return draw_steps(n, steps, generator=generator, device=x0.device)
    i = _given(i, n, x0.device, torch.long)
    if (i < 1).any() or (i > steps).any():
        raise ValueError(f"step indices must be in 1..{steps}, got {i.min().item()}..{i.max().item()}")
    return i


def _masked_ce(logp: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """-log p(x_0^l | x_t) summed over the masked positions, (N,)."""
    ce = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (N, L)
    return torch.where(masked, ce, torch.zeros_like(ce)).sum(1)


# --------------------------------------------------------------------------------------------- absorbing bounds
def mdlm_nelbo(model, x0: torch.Tensor, schedule: MaskSchedule, *, mask_id: int, generator=None, t=None,
               antithetic: bool = False, cond: dict | None = None) -> torch.Tensor:
    """MDLM's continuous-time NELBO per sequence in nats, (N,) (Sahoo et al. 2024, sec. 3):

        NELBO(x_0) = int_0^1 -alpha'_t / (1 - alpha_t) E_{q(x_t | x_0)} [ sum_{l: x_t^l = m} -log x_theta^l(x_0^l) ] dt,

    x_theta = SUBS(model(x_t, t)), estimated with one t ~ U(0, 1] per sequence (or the given `t`, or
    low-discrepancy over the batch with `antithetic`) and one x_t ~ q(x_t | x_0)."""
    check_tokens(x0, mask_id, name="x0")
    n = x0.shape[0]
    if t is None:
        t = draw_times(n, generator=generator, device=x0.device, antithetic=antithetic)
    t = _given(t, n, x0.device, torch.float64)
    x_t = absorbing_sample(x0, schedule.alpha(t), mask_id=mask_id, generator=generator)  # (N, L)
    logp = subs_logits(call_model(model, x_t, t, mask_id + 1, cond), x_t, mask_id)
    ce = _masked_ce(logp, x0, x_t == mask_id)
    return schedule.weight(t).to(ce.dtype) * ce


def absorbing_elbo_discrete(model, x0: torch.Tensor, schedule: MaskSchedule, steps: int, *, mask_id: int,
                            generator=None, i=None, cond: dict | None = None) -> torch.Tensor:
    """The T-step negative ELBO of the absorbing chain on t_i = i / T per sequence in nats, (N,):

        sum_{i=1}^T E_q KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)),  s = t_{i-1}, t = t_i,

    where with SUBS each masked position's KL is (alpha_s - alpha_t) / (1 - alpha_t) (-log x_theta(x_0)) and each
    unmasked one's is 0 (Sahoo et al. 2024, sec. 3; the i = 1 term, alpha_s = 1, is the reconstruction
    -log p(x_0 | x_{t_1})). Estimated as T times the term of one step i ~ U{1..T} (or the given `i`)."""
    check_tokens(x0, mask_id, name="x0")
    i = _steps_of(x0, steps, i, generator)
    t, s = i.double() / steps, (i.double() - 1) / steps
    rate_t, rate_s = schedule.mask_rate(t), schedule.mask_rate(s)  # 1 - alpha
    x_t = absorbing_sample(x0, 1 - rate_t, mask_id=mask_id, generator=generator)
    logp = subs_logits(call_model(model, x_t, t, mask_id + 1, cond), x_t, mask_id)
    ce = _masked_ce(logp, x0, x_t == mask_id)
    return (steps * (rate_t - rate_s) / rate_t).to(ce.dtype) * ce


# ------------------------------------------------------------------------------------------------ D3PM (uniform)
class D3PMTerms(NamedTuple):
    vb: torch.Tensor  # (N,) estimate of L_vb = L_T + sum_t L_{t-1} (nats per sequence)
    ce: torch.Tensor  # (N,) -log p~_theta(x_0 | x_t), summed over positions, at the same x_t


def uniform_prior_kl(x0: torch.Tensor, alpha_1, *, num_tokens: int) -> torch.Tensor:
    """L_T = sum_l KL(q(x_1^l | x_0^l) || Uniform(K)), (N,) nats (D3PM eq. 1's prior term; no model)."""
    q = uniform_probs(x0, alpha_1, num_tokens=num_tokens)  # (N, L, K)
    return torch.xlogy(q, q * num_tokens).sum((1, 2))


def _kl(q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the last axis, with 0 log 0 = 0, summed over positions: (N,)."""
    terms = torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(q))
    return terms.sum((1, 2))


def d3pm_terms(model, x0: torch.Tensor, schedule: MaskSchedule, steps: int, *, num_tokens: int, generator=None,
               i=None, cond: dict | None = None) -> D3PMTerms:
    """D3PM's L_vb and auxiliary cross-entropy for the uniform process on t_i = i / T (Austin et al. 2021, eq. 1
    and 5): L_vb = L_T + sum_{i=1}^T E_q KL(q(x_s | x_t, x_0) || p_theta(x_s | x_t)), p_theta in the
    x0-parameterisation of eq. 4 with p~_theta(x_0 | x_t) = softmax(model(x_t, t)); the i = 1 term is
    L_0 = -log p_theta(x_0 | x_{t_1}). The sum is estimated as T times one step i ~ U{1..T} (or the given `i`)."""
    check_tokens(x0, num_tokens, name="x0")
    i = _steps_of(x0, steps, i, generator)
    t, s = i.double() / steps, (i.double() - 1) / steps
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    x_t = uniform_sample(x0, a_t, num_tokens=num_tokens, generator=generator)  # (N, L)
    log_p0 = call_model(model, x_t, t, num_tokens, cond).log_softmax(-1)  # (N, L, K)
    log_p = uniform_posterior_logprobs(x_t, log_p0, a_s, a_t, num_tokens=num_tokens)
    q = uniform_posterior(x_t, x0, a_s, a_t, num_tokens=num_tokens)
    prior = uniform_prior_kl(x0, schedule.alpha(torch.ones((), dtype=torch.float64)), num_tokens=num_tokens)
    vb = steps * _kl(q, log_p) + prior
    ce = -log_p0.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum(1)
    return D3PMTerms(vb=vb.to(log_p0.dtype), ce=ce)


def d3pm_hybrid_loss(model, x0, schedule, steps, *, num_tokens, hybrid_weight=DEFAULT_HYBRID_WEIGHT,
                     generator=None, i=None, cond=None) -> torch.Tensor:
    """D3PM's hybrid loss L_vb + lambda E[-log p~_theta(x_0 | x_t)] per sequence in nats, (N,) (Austin et al.
    2021, eq. 5)."""
    if hybrid_weight < 0:
        raise ValueError(f"hybrid_weight (lambda) must be non-negative, got {hybrid_weight}")
    terms = d3pm_terms(model, x0, schedule, steps, num_tokens=num_tokens, generator=generator, i=i, cond=cond)
    return terms.vb + hybrid_weight * terms.ce


# ---------------------------------------------------------------------------------------------------- units
def bits_per_token(nats_per_token):
    """nats per token / ln 2."""
    return nats_per_token / LOG2


def bits_per_character(nats_per_token, *, tokens: int, characters: int):
    """Bits per character of a text of `characters` characters cut into `tokens` tokens: the total nats
    (nats per token x tokens) over characters x ln 2 (for a character-level vocabulary, tokens = characters)."""
    if tokens < 1 or characters < 1:
        raise ValueError(f"tokens and characters must be positive, got {tokens} and {characters}")
    return nats_per_token * tokens / (characters * LOG2)


# ------------------------------------------------------------------------------------------------ the objective
@dataclass
class DiscreteObjectiveConfig:
    process: str = "absorbing"      # absorbing (masked diffusion, MDLM) or uniform (D3PM)
    schedule: str = "log-linear"    # alpha(t): log-linear or cosine
    eps: float = DEFAULT_EPS        # alpha(1), the probability that a token is still clean at t = 1
    steps: int = 0                  # 0: continuous time (absorbing only); T > 0: the T-step discrete-time bound
    antithetic: bool = True         # continuous time: low-discrepancy t over the batch
    hybrid_weight: float = DEFAULT_HYBRID_WEIGHT  # uniform: lambda of D3PM's hybrid loss


class DiscreteObjective:
    """``objective(model, x0, cond=None, generator=None) -> loss``: the mean bound in nats per token (for the
    uniform process, D3PM's hybrid loss per token). `vocab_size` K counts the data tokens; the mask is id K."""

    def __init__(self, vocab_size: int, cfg: DiscreteObjectiveConfig | None = None, **kwargs):
        cfg = cfg or DiscreteObjectiveConfig(**kwargs)
        check_choice("process", cfg.process, PROCESSES)
        if cfg.steps < 0 or (cfg.process == "uniform" and cfg.steps == 0):
            raise ValueError(f"steps must be 0 (continuous time, absorbing only) or a positive T, got {cfg.steps} "
                             f"for the {cfg.process} process")
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.schedule = get_mask_schedule(cfg.schedule, cfg.eps)

    def per_sample(self, model, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        """The bound (or hybrid loss) per sequence in nats, (N,)."""
        cfg, k = self.cfg, self.vocab_size
        if cfg.process == "uniform":
            return d3pm_hybrid_loss(model, x0, self.schedule, cfg.steps, num_tokens=k,
                                    hybrid_weight=cfg.hybrid_weight, generator=generator, cond=cond)
        if cfg.steps:
            return absorbing_elbo_discrete(model, x0, self.schedule, cfg.steps, mask_id=k, generator=generator,
                                           cond=cond)
        return mdlm_nelbo(model, x0, self.schedule, mask_id=k, generator=generator, antithetic=cfg.antithetic,
                          cond=cond)

    def __call__(self, model, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        return self.per_sample(model, x0, cond, generator=generator).mean() / x0.shape[1]


# ------------------------------------------------------------------------------------------------ autoregressive
def bos_shift(x: torch.Tensor, bos_id: int) -> torch.Tensor:
    """The inputs [BOS, x_0 .. x_{L-2}] (N, L) of a causal model whose logits at position i score x_i given
    x_{<i} (the convention of nets.TextTransformer with causal=True; `bos_id` = K)."""
    return torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], dim=1)


class NextTokenObjective:
    """The autoregressive baseline's loss (Radford et al. 2019): -log p(x) = sum_i CE(logits_i, x_i) with inputs
    `bos_shift(x, K)`, exact, in nats per sequence (`per_sample`, (N,)) or per token (the call). `vocab_size` K;
    BOS is id K."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def per_sample(self, model, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        logits = model(bos_shift(x0, self.vocab_size), None, **(cond or {}))  # (N, L, K)
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none").sum(1)

    def __call__(self, model, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        return self.per_sample(model, x0, cond).mean() / x0.shape[1]
