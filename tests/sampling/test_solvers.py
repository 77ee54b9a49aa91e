"""Solver-specific checks: thresholding, optimized spacing, final steps, benchmark helpers."""
import pytest
import torch

from torchdiffusion.data.toy import gaussian, ring_mixture
from torchdiffusion.sampling import SAMPLERS, dynamic_threshold, final_step, get_sigmas
from torchdiffusion.evaluate.metrics import sliced_w2
from torchdiffusion.precond import CountCalls
from torchdiffusion.sampling.sigmas import OPTIMIZED_RAMPS
from torchdiffusion.schedules import EDMSchedule


def test_dynamic_threshold_bounds_and_identity():
    x = torch.tensor([[0.5, -0.2, 0.9], [3.0, -4.0, 0.1]])
    y = dynamic_threshold(x, 0.9)
    assert torch.equal(y[0], x[0])               # s = max(1, q) = 1 and |x| <= 1: unchanged
    assert y[1].abs().max() <= 1.0 + 1e-6


def test_optimized_spacing_and_counted_nfe():
    sch = EDMSchedule()
    mix = ring_mixture(8, 1.0, 0.05)
    for steps in OPTIMIZED_RAMPS:
        sig = get_sigmas(sch, steps, "optimized")
        assert len(sig) == steps + 1 and sig[0] == 80 and sig[-1] == 0 and (sig[:-1] > sig[1:]).all()
    den = CountCalls(mix)
    SAMPLERS["dpmpp_3m"](den, torch.randn(8, 2) * 80, get_sigmas(sch, 5, "optimized"), final="heun0")
    assert den.calls == 5


def test_untuned_step_counts_resample_a_tuned_ramp():
    """A step count without a tuned ramp resamples the next larger tuned one (the largest beyond it): same ends,
    increasing, and a tuned count gives its table entry exactly."""
    from torchdiffusion.sampling.sigmas import optimized_ramp

    largest = max(OPTIMIZED_RAMPS)
    for steps in (2, 4, 7, 12, 37, 50):
        r = optimized_ramp(steps)
        src = OPTIMIZED_RAMPS[min((c for c in OPTIMIZED_RAMPS if c > steps), default=largest)]
        assert len(r) == steps and r[0] == 0 and float(r[-1]) == pytest.approx(src[-1]) and (r[1:] > r[:-1]).all()
    for steps, ramp in OPTIMIZED_RAMPS.items():
        assert optimized_ramp(steps).tolist() == ramp
    # resampling the largest ramp onto its own grid plus midpoints keeps every tuned position
    r = optimized_ramp(2 * largest - 1)
    assert torch.allclose(r[::2], torch.tensor(OPTIMIZED_RAMPS[largest], dtype=torch.float64))


def test_heun0_final_step_is_second_order_on_gaussian():
    s, sigma = 0.5, 0.05
    g = gaussian(0.0, s, dim=1)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    exact = x * s / (s**2 + sigma**2) ** 0.5
    d = g(x, torch.tensor([sigma]))
    assert (final_step(x, d, "heun0") - exact).abs() < 0.1 * (final_step(x, d, "denoise") - exact).abs()


def test_sliced_w2_and_steps_for(bench):
    steps_for = bench("samplers").steps_for
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_w2(a, a) == 0 and abs(sliced_w2(a, a + 1.0) - 1.0) < 0.1  # E[(u.1)^2] = |1|^2 / 3 = 1
    assert steps_for(lambda s: 2 * s - 1, 10) == 5 and steps_for(lambda s: 3 * s + 1, 2) is None


def test_tune_schedule_improves_its_objective(bench):
    tune_schedule = bench("samplers").tune_schedule

    ramp, final, init = tune_schedule("dpmpp_2m", {"final": "heun0"}, 4, mixes=[ring_mixture(4, 1.0, 0.1)], n=64,
                                      maxiter=40, n_dirs=16)
    assert len(ramp) == 4 and ramp[0] == 0 and all(a < b for a, b in zip(ramp, ramp[1:])) and ramp[-1] <= 1
    assert final <= init
