"""Samplers for discrete diffusion: MDLM ancestral sampling with caching, LLaDA's low-confidence remasking,
BD3-LM's semi-autoregressive blocks and D3PM's ancestral sampler for the uniform process.

Every sampler is a pure function ``sample_x(model, x, grid, *, generator=None, fixed=None, callback=None,
**options) -> DiscreteSample`` on the model contract of :mod:`~torchdiffusion.discrete.objective`
(``model(x_t, t, **cond) -> logits``). ``x`` (N, L) holds the given tokens at the positions where the boolean
``fixed`` (N, L) is True (a prefix for prompting, any positions for infilling); the other positions are ignored
(they may hold anything in 0..K, the mask id K included) and are generated. Fixed positions are never changed.
The result carries the tokens and the number of model calls. Random numbers come from ``generator`` only (None,
one generator, or one per sequence), and the same number of them is drawn whether or not a prediction is reused.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..utils import check_choice, rand
from .objective import bos_shift, call_model, subs_logits
from .processes import (MaskSchedule, absorbing_posterior, check_tokens, get_mask_schedule, sample_categorical,
                        uniform_posterior_logprobs)

REMASKING = ("low_confidence", "random")
BLOCK_SAMPLERS = ("ancestral", "remask")
CONTEXTS = ("prefix", "full")


class DiscreteSample(NamedTuple):
    tokens: torch.Tensor  # (N, L) LongTensor
    model_calls: int      # how many times the model was called


# ------------------------------------------------------------------------------------------------ grids, inputs
def time_grid(steps: int) -> torch.Tensor:
    """t_i = 1 - i / S, i = 0..S: S uniform steps from t = 1 (all masked / uniform noise) to t = 0, float64."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def levels(ts) -> list[float]:
    """A time grid as Python floats, checked: strictly decreasing from at most 1 to exactly 0."""
    grid = [float(t) for t in ts]
    if len(grid) < 2 or grid[0] > 1 or grid[-1] != 0 or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("the time grid must decrease strictly from t <= 1 to t = 0 (e.g. time_grid(steps)), "
                         f"got {grid[:3]}...{grid[-2:]}")
    return grid


def prefix_fixed(x: torch.Tensor, length: int) -> torch.Tensor:
    """The `fixed` mask of prompting: the first `length` positions of every sequence, (N, L) bool."""
    fixed = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    fixed[:, :length] = True
    return fixed


def start_tokens(x: torch.Tensor, fixed, num_tokens: int, fill: torch.Tensor | int):
    """(x at the fixed positions and `fill` elsewhere, fixed (N, L) bool), checked."""
    check_tokens(x, num_tokens, name="x", allow_mask=True)
    if fixed is None:
        fixed = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if not torch.is_tensor(fixed) or fixed.dtype != torch.bool or fixed.shape != x.shape:
        what = f"{fixed.dtype} {tuple(fixed.shape)}" if torch.is_tensor(fixed) else type(fixed).__name__
        raise ValueError(f"fixed must be a bool tensor of x's shape {tuple(x.shape)}, got {what}")
    if (fixed & (x == num_tokens)).any():
        raise ValueError(f"x holds the mask id {num_tokens} at a fixed position; allowed values there: "
                         f"0..{num_tokens - 1}")
    fill = torch.as_tensor(fill, dtype=torch.long, device=x.device).expand(x.shape)
    return torch.where(fixed, x, fill), fixed


def _alpha(schedule: MaskSchedule, t: float) -> float:
    return 1.0 - float(schedule.mask_rate(torch.tensor(t, dtype=torch.float64)))


def _report(callback, info: dict):
    if callback is not None:
        callback(info)


# -------------------------------------------------------------------------------------------------- MDLM
@torch.no_grad()
def sample_mdlm(model, x: torch.Tensor, ts, *, mask_id: int, schedule: MaskSchedule | None = None, generator=None,
                fixed=None, cache: bool = True, callback=None, cond: dict | None = None) -> DiscreteSample:
    """MDLM's ancestral sampler with its caching (Sahoo et al. 2024, sec. 3) over the grid `ts`
    (1 -> 0): x_s ~ q(x_s | x_t, x_0 = x_theta(x_t)), x_theta = SUBS(model(x_t, t)) (:func:`absorbing_posterior`):
    a masked token becomes a draw from x_theta with probability (alpha_s - alpha_t) / (1 - alpha_t), an unmasked
    one stays. With `cache`, a step that changed no token reuses the previous prediction without a model call;
    this is exact for a model that ignores t (the exact denoiser p(x_0 | x_t) does not depend on t)."""
    schedule = schedule or get_mask_schedule("log-linear")
    grid = levels(ts)
    x, fixed = start_tokens(x, fixed, mask_id, mask_id)
    probs, calls = None, 0
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        cached = probs is not None
        if not cached:
            probs = subs_logits(call_model(model, x, t, mask_id + 1, cond), x, mask_id)[..., :mask_id].exp()
            calls += 1
        post = absorbing_posterior(x, probs, _alpha(schedule, s), _alpha(schedule, t), mask_id=mask_id)
        x_next = sample_categorical(post, generator=generator)  # (N, L)
        _report(callback, {"i": i, "t": t, "s": s, "x_t": x, "x": x_next, "probs": probs, "cached": cached,
                           "model_calls": calls})
        if not cache or not torch.equal(x_next, x):
            probs = None
        x = x_next
    return DiscreteSample(x, calls)


# ----------------------------------------------------------------------------------------- LLaDA remasking
def transfer_counts(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each step unmasks, (N, S): M // S each, the first M mod S steps one more (LLaDA's linear
    schedule: after step i about M (1 - (i + 1) / S) tokens remain masked)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    base, rem = num_masked // steps, num_masked % steps
    extra = torch.arange(steps, device=num_masked.device) < rem.unsqueeze(1)
    return base.unsqueeze(1) + extra.long()


def _predict(logp: torch.Tensor, mask_id: int, temperature: float, remasking: str, generator):
    """(x0_hat, confidence) (N, L) from SUBS log-probabilities: the argmax (temperature 0) or a draw from
    softmax(log p / temperature); confidence = p(x0_hat) for low_confidence, a uniform number for random."""
    logp = logp[..., :mask_id]  # (N, L, K)
    if temperature == 0:
        x0 = logp.argmax(-1)
    else:
        x0 = sample_categorical((logp / temperature).softmax(-1), generator=generator)
    if remasking == "random":
        return x0, rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    return x0, logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1).double().exp()


def _top_k(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (N, L): the k[n] highest entries of each row of conf (ties: the earlier position)."""
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device)
                                            .expand_as(order).contiguous())
    return rank < k.unsqueeze(1)


@torch.no_grad()
def sample_remask(model, x: torch.Tensor, steps: int, *, mask_id: int, generator=None, fixed=None,
                  remasking: str = "low_confidence", temperature: float = 0.0, cache: bool = True, callback=None,
                  cond: dict | None = None) -> DiscreteSample:
    """LLaDA's reverse process with low-confidence remasking (Nie et al. 2025, sec. 2.4): at each
    of S steps predict every masked token (argmax, or a draw at `temperature` > 0), then keep the predictions of
    the most confident masked positions and remask the rest, so that after step i exactly M - sum_{j <= i} c_j of
    the M masked tokens remain masked (:func:`transfer_counts`); ``remasking='random'`` picks them at random
    instead. The model sees t = 1 - i / S. With `cache`, a step that unmasked nothing reuses the prediction."""
    check_choice("remasking", remasking, REMASKING)
    if temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    x, fixed = start_tokens(x, fixed, mask_id, mask_id)
    counts = transfer_counts((x == mask_id).sum(1), steps)  # (N, S)
    logp, calls = None, 0
    for i in range(steps):
        cached = logp is not None
        if not cached:
            logp = subs_logits(call_model(model, x, 1 - i / steps, mask_id + 1, cond), x, mask_id)
            calls += 1
        x0, conf = _predict(logp, mask_id, temperature, remasking, generator)
        conf = torch.where(x == mask_id, conf, torch.full_like(conf, float("-inf")))
        x_next = torch.where(_top_k(conf, counts[:, i]), x0, x)
        _report(callback, {"i": i, "x_t": x, "x": x_next, "x0": x0, "confidence": conf, "cached": cached,
                           "model_calls": calls})
        if not cache or not torch.equal(x_next, x):
            logp = None
        x = x_next
    return DiscreteSample(x, calls)


# ------------------------------------------------------------------------------------------------ BD3-LM blocks
@torch.no_grad()
def sample_blocks(model, x: torch.Tensor, *, block_size: int, steps: int, mask_id: int, sampler: str = "ancestral",
                  context: str = "prefix", schedule: MaskSchedule | None = None, generator=None, fixed=None,
                  cache: bool = True, callback=None, cond: dict | None = None, **options) -> DiscreteSample:
    """Semi-autoregressive block diffusion (Arriola et al. 2025, BD3-LM; LLaDA's semi-autoregressive remasking):
    blocks of `block_size` B are generated left to right, block b by `sampler` ('ancestral': :func:`sample_mdlm`
    on ``time_grid(steps)``; 'remask': :func:`sample_remask` with `steps` and `options`) with the finished blocks
    fixed. `context` 'prefix' (BD3-LM) shows the model only x_{<b} and block b; 'full' (LLaDA) shows the whole
    sequence, later blocks masked except their fixed tokens. With B = 1 this is autoregressive sampling; with
    B = L it is the inner sampler."""
    check_choice("block sampler", sampler, BLOCK_SAMPLERS)
    check_choice("context", context, CONTEXTS)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if sampler == "ancestral" and options:
        raise ValueError(f"the ancestral block sampler takes no options, got {sorted(options)}")
    x, fixed = start_tokens(x, fixed, mask_id, mask_id)
    calls = 0
    for b, begin in enumerate(range(0, x.shape[1], block_size)):
        end = min(begin + block_size, x.shape[1])
        inner_fixed = fixed[:, :end].clone()
        inner_fixed[:, :begin] = True
        seen = model if context == "prefix" else _with_suffix(model, x[:, end:])
        report = None if callback is None else (lambda info, b=b: callback({**info, "block": b}))
        common = dict(mask_id=mask_id, generator=generator, fixed=inner_fixed, cache=cache, callback=report, cond=cond)
        if sampler == "ancestral":
            out = sample_mdlm(seen, x[:, :end], time_grid(steps), schedule=schedule, **common)
        else:
            out = sample_remask(seen, x[:, :end], steps, **common, **options)
        x = torch.cat([out.tokens, x[:, end:]], 1)
        calls += out.model_calls
    return DiscreteSample(x, calls)


def _with_suffix(model, suffix: torch.Tensor):
    """The model on the prefix x (N, e) as it sees the full sequence [x, suffix], logits of the prefix only."""
    def seen(x_t, t, **cond):
        return model(torch.cat([x_t, suffix], 1), t, **cond)[:, : x_t.shape[1]]
    return seen


# ------------------------------------------------------------------------------------------------ D3PM uniform
@torch.no_grad()
def sample_d3pm(model, x: torch.Tensor, ts, *, num_tokens: int, schedule: MaskSchedule | None = None,
                generator=None, fixed=None, callback=None, cond: dict | None = None) -> DiscreteSample:
    """Ancestral sampling of the uniform process (Austin et al. 2021, eq. 4): x_1 ~ Uniform(K)^L, then
    x_s ~ p_theta(x_s | x_t) proportional to q(x_t | x_s) sum_x0 q(x_s | x_0) p~_theta(x_0 | x_t) over the grid `ts`
    (1 -> 0; the last step, alpha_s = 1, draws x_0). Fixed positions are reset to their tokens after each step
    (the model sees them clean throughout)."""
    schedule = schedule or get_mask_schedule("log-linear")
    grid = levels(ts)
    noise = sample_categorical(torch.ones(*x.shape, num_tokens, device=x.device), generator=generator)
    x, fixed = start_tokens(x, fixed, num_tokens, noise)
    given = x.clone()
    calls = 0
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        log_p0 = call_model(model, x, t, num_tokens, cond).log_softmax(-1)  # (N, L, K)
        calls += 1
        log_post = uniform_posterior_logprobs(x, log_p0, _alpha(schedule, s), _alpha(schedule, t),
                                              num_tokens=num_tokens)
        x_next = torch.where(fixed, given, sample_categorical(log_post.exp(), generator=generator))
        _report(callback, {"i": i, "t": t, "s": s, "x_t": x, "x": x_next, "model_calls": calls})
        x = x_next
    return DiscreteSample(x, calls)


# ------------------------------------------------------------------------------------------------ autoregressive
def sample_causal(model, x: torch.Tensor, fixed: torch.Tensor, *, bos_id: int, generator=None) -> DiscreteSample:
    """Ancestral sampling of an autoregressive model, left to right (the baseline the diffusion samplers are
    measured against): x_i ~ softmax(model([BOS, x_<i], None)[:, i]) at every position that is not `fixed` (for
    a causal model the fixed positions are a prefix: a prompt). One model call per generated position."""
    x, calls = x.clone(), 0
    for i in range(x.shape[1]):
        if bool(fixed[:, i].all()):
            continue
        logits = model(bos_shift(x[:, :i + 1], bos_id), None)[:, i]  # (N, K): [BOS, x_<i] -> x_i
        calls += 1
        drawn = sample_categorical(logits.double().softmax(-1), generator=generator)  # (N,)
        x[:, i] = torch.where(fixed[:, i], x[:, i], drawn)
    return DiscreteSample(x, calls)
