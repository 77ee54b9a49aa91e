"""Complexity-adaptive step allocation (sampling/adaptive.py) on exact Gaussian mixtures."""
import math

import pytest
import torch
from scipy.stats import spearmanr

from torchdiffusion.data.toy import ring_mixture
from torchdiffusion.sampling import SAMPLERS, get_sigmas
from torchdiffusion.sampling import adaptive
from torchdiffusion.sampling.adaptive import (PROBE_SIGMAS, allocate_steps, probe_difficulty, sample_adaptive_prefix,
                                              sample_adaptive_steps, step_grid)
from torchdiffusion.schedules import EDMSchedule

SIGMAS = torch.tensor([80.0, 0.002, 0.0])
S_MAX, S_MIN = float(SIGMAS[0]), float(SIGMAS[1])  # the float32 levels the sampler reads
M = len(PROBE_SIGMAS)


class RowCount(torch.nn.Module):
    """The mixture's exact denoiser, recording the batch size of every call (rows / N is the mean NFE)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x, sigma):
        self.sizes.append(x.shape[0])
        return self.inner(x, sigma)


def _start(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * S_MAX


def _run(mix, x, **opts):
    """Samples, the step count k_i of every sample (from the callback's groups) and the call batch sizes."""
    den, steps = RowCount(mix), torch.zeros(x.shape[0], dtype=torch.long)

    def cb(info):
        steps[info["index"]] = info["steps"]

    return sample_adaptive_steps(den, x.clone(), SIGMAS, callback=cb, **opts), steps, den.sizes


def test_harder_samples_get_more_calls_and_the_estimate_tracks_the_true_error():
    """Ring of 8 modes: the probe's difficulty C_i ranks the per-sample error |x_i - x_i^ODE| of the fixed 6-step
    solve (Spearman > 0.3; the standard error at n = 400 is about 0.05), and the calls spent per sample
    (probe + k_i) rise with C_i: they spread, their rank correlation with C_i is positive, and sorted by C_i
    they never decrease (the rule and its largest-remainder rounding are monotone). A sampler that allocates
    uniformly gives every sample the same calls and fails."""
    mix = ring_mixture(8, 1.0, 0.05)
    x = _start(400, 2)
    c = probe_difficulty(mix, x)
    ref = SAMPLERS["ode_reference"](mix, x, torch.tensor([S_MAX, 0.0]), rtol=1e-8, atol=1e-8)
    fixed = SAMPLERS["dpmpp_3m"](mix, x.clone(), step_grid(6, S_MAX, S_MIN), final="heun0")
    assert spearmanr(c.numpy(), (fixed - ref).norm(dim=1).numpy())[0] > 0.3
    _check_calls_follow_difficulty(mix, x, c)


def _check_calls_follow_difficulty(mix, x, c):
    _, steps, _ = _run(mix, x, mean_nfe=M + 6)
    assert steps.min() < steps.max()
    assert spearmanr(c.numpy(), (M + steps).numpy())[0] > 0.2
    by_difficulty = steps[c.argsort()]
    assert (by_difficulty[1:] >= by_difficulty[:-1]).all()


def test_uniform_allocation_mutant_fails_the_call_ranking(monkeypatch):
    """The mutant: allocate_steps replaced by equal shares; every sample then costs the same calls, and the
    check of the test above rejects it."""
    monkeypatch.setattr(adaptive, "allocate_steps",
                        lambda d, total, order, **_: torch.full_like(d, total // len(d), dtype=torch.long))
    mix = ring_mixture(8, 1.0, 0.05)
    x = _start(400, 2)
    with pytest.raises(AssertionError):
        _check_calls_follow_difficulty(mix, x, probe_difficulty(mix, x))


@pytest.mark.parametrize("n, mean_nfe", [(64, M + 5), (33, M + 4.5)])
def test_mean_nfe_is_exact_and_counted_per_call(n, mean_nfe):
    """Every call is counted: the probe makes M calls on all N rows, the group with k steps makes k calls on its
    rows, so the multiset of call batch sizes is {N x M} + {|G_k| x k} and the rows evaluated are
    N M + sum_i k_i = floor(N mean_nfe) (exact when N mean_nfe is an integer: 33 x 7.5 is not, 64 x 8 is)."""
    mix = ring_mixture(8, 1.0, 0.05)
    _, steps, sizes = _run(mix, _start(n, 2), mean_nfe=mean_nfe)
    expected = [n] * M + [int((steps == k).sum()) for k in steps.unique().tolist()
                          for _ in range(k)]
    assert sorted(sizes) == sorted(expected)
    assert sum(sizes) == math.floor(n * mean_nfe)
    if float(n * mean_nfe).is_integer():
        assert sum(sizes) / n == mean_nfe


def test_uniform_difficulty_equals_the_fixed_step_sampler():
    """N copies of one start have one difficulty: each gets exactly mean_nfe - M steps, and the output is
    DPM-Solver++(3M) on that grid, bitwise."""
    mix = ring_mixture(8, 1.0, 0.05)
    x = _start(1, 2).expand(16, 2).clone()
    out, steps, _ = _run(mix, x, mean_nfe=M + 7)
    assert (steps == 7).all()
    fixed = SAMPLERS["dpmpp_3m"](mix, x.clone(), step_grid(7, S_MAX, S_MIN), final="heun0")
    assert torch.equal(out, fixed)
    assert torch.equal(allocate_steps(torch.full((5,), 0.3), 35, 3), torch.full((5,), 7))


def test_outputs_do_not_depend_on_the_batch():
    """With `scale` each sample's steps depend on its own difficulty: the batch equals its two halves run apart.
    With a shared budget (`mean_nfe`) each output equals that sample run alone with its allotted k."""
    mix = ring_mixture(8, 1.0, 0.05)
    x = _start(40, 2, seed=3)
    whole, _, _ = _run(mix, x, scale=6.0)
    halves = torch.cat([_run(mix, x[:17], scale=6.0)[0], _run(mix, x[17:], scale=6.0)[0]])
    torch.testing.assert_close(whole, halves, rtol=1e-12, atol=1e-12)
    out, steps, _ = _run(mix, x, mean_nfe=M + 5)
    for i in (0, 11, 39):
        alone = SAMPLERS["dpmpp_3m"](mix, x[i:i + 1].clone(), step_grid(int(steps[i]), S_MAX, S_MIN),
                                     final="heun0")
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-12, atol=1e-12)


def test_allocation_rule_shares_and_bounds():
    """k_i ~ c C_i^(1/(p+1)): with a large budget the ratio of steps follows the rule to rounding (< 1 step);
    the sum is the budget exactly; bounds clip the shares (worked by hand below); an infeasible budget is a
    ValueError naming the fix."""
    c = torch.tensor([1.0, 16.0, 81.0, 0.0625])
    k = allocate_steps(c, 4000, 3)
    share = c ** 0.25 / (c ** 0.25).sum() * 4000
    assert int(k.sum()) == 4000 and (k.double() - share).abs().max() < 1
    # clipped to [2, 6] with a budget of 20: C^(1/4) = (1, 2, 3, 0.5), two shares clip at 6, so 1.5 c = 8,
    # c = 16/3: shares (5.33, 6, 6, 2.67) -> floors (5, 6, 6, 2), the one step left to the largest fraction
    k = allocate_steps(c, 20, 3, min_steps=2, max_steps=6)
    assert k.tolist() == [5, 6, 6, 3]
    with pytest.raises(ValueError, match="mean_nfe"):
        allocate_steps(c, 3, 3, min_steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        sample_adaptive_steps(ring_mixture(), _start(4, 2), SIGMAS)
    with pytest.raises(ValueError, match="probe"):
        sample_adaptive_steps(ring_mixture(), _start(4, 2), SIGMAS, mean_nfe=M)


# ------------------------------------------------------------------ the probe as the solve's first steps
GRID = get_sigmas(EDMSchedule(sigma_min=0.002, sigma_max=80.0), 8, "optimized")  # 8 steps, 8 calls
PREFIX = 4


def _run_prefix(mix, x, **opts):
    den, steps = RowCount(mix), torch.zeros(x.shape[0], dtype=torch.long)

    def cb(info):
        steps[info["index"]] = info["steps"]

    return sample_adaptive_prefix(den, x.clone(), GRID, callback=cb, prefix=PREFIX, **opts), steps, den.sizes


def test_prefix_mode_is_the_fixed_sampler_when_difficulty_is_uniform_and_counts_every_call():
    """Identical starts: every sample keeps the grid's 8 - 4 tail levels and the output is DPM-Solver++(3M) on
    GRID bitwise. Distinct starts: the prefix is evaluated once (4 calls on all rows), each group with k tail
    levels makes k calls on its rows, and the mean NFE is the grid's 8 exactly."""
    mix = ring_mixture(8, 1.0, 0.05)
    x = _start(1, 2).expand(12, 2).clone()
    out, steps, _ = _run_prefix(mix, x)
    assert (steps == 4).all()
    assert torch.equal(out, SAMPLERS["dpmpp_3m"](mix, x.clone(), GRID, final="heun0"))
    n = 200
    _, steps, sizes = _run_prefix(mix, _start(n, 2))
    assert steps.min() < steps.max()
    assert sorted(sizes) == sorted([n] * PREFIX + [int((steps == k).sum()) for k in steps.unique().tolist()
                                                   for _ in range(k)])
    assert sum(sizes) == 8 * n


def _prefix_calls_follow_difficulty(mix, x):
    rec = adaptive._Record(mix)
    SAMPLERS["dpmpp_3m"](rec, x.clone(), torch.cat([GRID[:PREFIX], GRID.new_zeros(1)]), final="heun0")
    c = adaptive.prefix_difficulty(rec.outputs, GRID.tolist())
    _, steps, _ = _run_prefix(mix, x)
    assert steps.min() < steps.max() and spearmanr(c.numpy(), steps.numpy())[0] > 0.2
    by_difficulty = steps[c.argsort()]
    assert (by_difficulty[1:] >= by_difficulty[:-1]).all()


def test_prefix_mode_gives_harder_samples_more_calls(monkeypatch):
    """Calls rise with the prefix's difficulty (monotone, positive rank correlation); the uniform-allocation
    mutant fails the same check. With `scale` the batch equals its halves (steps depend on the sample alone)."""
    mix = ring_mixture(8, 1.0, 0.05)
    x = _start(300, 2, seed=5)
    _prefix_calls_follow_difficulty(mix, x)
    whole = _run_prefix(mix, x[:40], scale=3.0)[0]
    halves = torch.cat([_run_prefix(mix, x[:13], scale=3.0)[0], _run_prefix(mix, x[13:40], scale=3.0)[0]])
    torch.testing.assert_close(whole, halves, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(adaptive, "allocate_steps",
                        lambda d, total, order, **_: torch.full_like(d, total // len(d), dtype=torch.long))
    with pytest.raises(AssertionError):
        _prefix_calls_follow_difficulty(mix, x)
