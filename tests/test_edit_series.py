"""Forecasting and gap filling as inpainting on series windows (N, C, L) (edit.series_mask, edit.impute), with the
exact denoiser of N(0, I) data, D(x, sigma) = x / (1 + sigma^2): the known steps are returned exactly, the unknown
ones are draws of the conditional (here N(0, 1), independent of the known ones), and draw s of window n does not
depend on how many draws are made or how they are batched."""
import math

import pytest
import torch

from torchdiffusion.edit import impute, series_mask
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.schedules import EDMSchedule


def gaussian_denoiser(x, sigma, **cond):
    return x / (1 + sigma[:, None, None] ** 2)


SIGMAS = get_sigmas(EDMSchedule(sigma_data=1.0), 40, "karras")


def test_known_steps_are_exact_and_unknown_ones_follow_the_conditional():
    window = 5 + torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(0))
    mask = series_mask(16, horizon=4, gaps=[(3, 6)])
    draws = impute(gaussian_denoiser, window, mask, SIGMAS, samples=50, seed=1, sampler="heun")  # (50, 8, 2, 16)
    known = mask.bool().expand_as(draws)
    assert torch.equal(draws[known], window.expand_as(draws)[known])
    free = draws[~known].double()  # N(0, 1) under the exact denoiser, whatever the (shifted) known values
    n = free.numel()
    assert abs(float(free.mean())) < 4 / math.sqrt(n)
    assert abs(float(free.var()) - 1) < 4 * math.sqrt(2 / n) + 0.05  # + Heun's discretisation at 40 steps


def test_draws_do_not_depend_on_the_number_of_draws_or_the_batch():
    window = torch.randn(3, 1, 12, generator=torch.Generator().manual_seed(2))
    mask = series_mask(12, horizon=5)
    few = impute(gaussian_denoiser, window, mask, SIGMAS, samples=2, seed=4)
    many = impute(gaussian_denoiser, window, mask, SIGMAS, samples=6, seed=4, batch_size=4)
    assert torch.equal(many[:2], few)


def test_masks_refuse_what_cannot_be_filled():
    with pytest.raises(ValueError, match="nothing to fill"):
        series_mask(8)
    with pytest.raises(ValueError, match=r"gap \(6, 10\) is not a range inside \[0, 8\)"):
        series_mask(8, gaps=[(6, 10)])
    with pytest.raises(ValueError, match="horizon=8 must be in"):
        series_mask(8, horizon=8)
