"""MaskDiT's training side (objectives.DiffusionObjective with mask_ratio, mae_weight): the masks, the loss."""
import pytest
import torch

from torchdiffusion.objectives import DiffusionObjective, ObjectiveConfig
from torchdiffusion.schedules import get_schedule
from torchdiffusion.utils import append_dims, sample_generators

SCHEDULE = get_schedule("edm")


def objective(**kw):
    return DiffusionObjective(SCHEDULE, ObjectiveConfig(**kw), prediction="x0", patch_size=2)


class Recorder(torch.nn.Module):
    """A denoiser D(x, sigma) = 0.5 x that records the token masks it is given."""
    prediction = "x0"

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x, sigma, token_mask=None, **cond):
        self.masks.append(token_mask)
        return 0.5 * x


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g), torch.exp(torch.randn(n, generator=g)), torch.randn(n, 2, 8, 8,
                                                                                                    generator=g)


def test_masks_keep_a_fixed_count_and_follow_each_examples_generator():
    obj = objective(mask_ratio=0.6)
    x0 = torch.zeros(8, 1, 8, 8)
    mask = obj.token_mask(x0, generator=sample_generators(7, 8))
    assert mask.shape == (8, 16) and mask.dtype == torch.bool
    assert ((~mask).sum(1) == int(16 * 0.4)).all()  # floor(L (1 - r)) kept, as MaskDiT
    assert len({tuple(m.tolist()) for m in mask}) == 8  # a different subset per example
    # example 5 draws the same mask alone as in its batch: masks do not depend on batching or world size
    alone = obj.token_mask(x0[:1], generator=sample_generators(7, 1, offset=5))
    assert torch.equal(alone[0], mask[5])


def test_masked_loss_is_an_unbiased_estimate_of_the_full_loss():
    """The kept set is uniform, so averaging the weighted loss over the kept patches has the full loss as its
    expectation (same x, sigma, noise): Monte Carlo over 2000 masks, within 5 standard errors."""
    obj = objective(mask_ratio=0.5)
    den = Recorder()
    x0, sigma, noise = data()
    full = obj.per_sample(den, x0, sigma=sigma, noise=noise)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([obj.per_sample(den, x0, sigma=sigma, noise=noise, generator=g, masked=True)
                         for _ in range(2000)])  # (2000, N)
    se = draws.std(0) / 2000 ** 0.5
    assert ((draws.mean(0) - full).abs() < 5 * se).all(), (draws.mean(0), full, se)
    assert (draws.std(0) > 0.01 * full).all()  # the masks really vary


def test_denoising_loss_counts_the_kept_patches_only():
    """A denoiser exact on the kept patches and wrong by 1 on the dropped ones has zero masked loss; wrong on the
    kept ones only, its loss is the full per-patch error there."""
    obj = objective(mask_ratio=0.5)
    x0, sigma, noise = data()

    def exact_where(kept_exact):
        def den(x, sigma, token_mask):
            dropped = token_mask.reshape(4, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # (N, 1, 8, 8)
            return x0 + (dropped if kept_exact else ~dropped).float()
        return den

    zero = obj.per_sample(exact_where(True), x0, sigma=sigma, noise=noise, masked=True,
                          generator=sample_generators(4, 4))
    one = obj.per_sample(exact_where(False), x0, sigma=sigma, noise=noise, masked=True,
                         generator=sample_generators(4, 4))
    assert torch.equal(zero, torch.zeros(4)) and torch.allclose(one, torch.ones(4))


def test_mae_term_is_the_normalised_patch_reconstruction():
    """Closed forms: a denoiser returning 0 costs mean(target^2) = (P - 1) / P per dropped patch (the target has
    zero mean and unit unbiased variance, P = C p^2 = 8 values); one returning the normalised noisy patches costs 0."""
    x0, sigma, noise = data()

    def normalised(x, sigma, token_mask=None):
        p = x.reshape(4, 2, 4, 2, 4, 2)
        mean = p.mean(dim=(1, 3, 5), keepdim=True)
        var = p.var(dim=(1, 3, 5), keepdim=True)
        return ((p - mean) / (var + 1e-6).sqrt()).reshape(x.shape)

    for fn, extra in ((lambda x, sigma, token_mask=None: torch.zeros_like(x), 7 / 8), (normalised, 0.0)):
        losses = []
        for weight in (0.0, 0.1):
            obj = objective(mask_ratio=0.5, mae_weight=weight)
            losses.append(obj.per_sample(fn, x0, sigma=sigma, noise=noise, masked=True,
                                         generator=sample_generators(3, 4)))
        torch.testing.assert_close(losses[1] - losses[0], torch.full((4,), 0.1 * extra), rtol=1e-4, atol=1e-5)


def test_mae_term_is_measured_on_the_networks_own_output_for_eps_prediction():
    """With eps prediction D = x - sigma F: a network whose output F is the normalised noisy patches costs 0 in the
    MAE term at every noise level (the term compares F, not D = x - sigma F, which grows with sigma), and one
    returning F = 0 costs (P - 1) / P as for x0 prediction."""
    x0, sigma, noise = data()
    sigma = sigma * 50  # high levels, where D and F differ by far

    def normalised_eps(x, sigma, token_mask=None):
        p = x.reshape(4, 2, 4, 2, 4, 2)
        f = ((p - p.mean(dim=(1, 3, 5), keepdim=True)) / (p.var(dim=(1, 3, 5), keepdim=True) + 1e-6).sqrt())
        return x - append_dims(sigma, x.ndim) * f.reshape(x.shape)  # D = x - sigma F

    zero_eps = lambda x, sigma, token_mask=None: x  # F = 0
    for fn, extra in ((normalised_eps, 0.0), (zero_eps, 7 / 8)):
        losses = []
        for weight in (0.0, 0.1):
            obj = DiffusionObjective(SCHEDULE, ObjectiveConfig(mask_ratio=0.5, mae_weight=weight), prediction="eps",
                                     patch_size=2)
            losses.append(obj.per_sample(fn, x0, sigma=sigma, noise=noise, masked=True,
                                         generator=sample_generators(3, 4)))
        torch.testing.assert_close(losses[1] - losses[0], torch.full((4,), 0.1 * extra), rtol=1e-4, atol=1e-5)


def test_ratio_zero_is_the_plain_objective_and_validation_sees_every_token():
    x0, _, _ = data()
    losses, dens = [], []
    for cfg in (ObjectiveConfig(), ObjectiveConfig(mask_ratio=0.0)):
        den = Recorder()
        obj = DiffusionObjective(SCHEDULE, cfg, prediction="x0", patch_size=2)
        losses.append(obj(den, x0, generator=sample_generators(5, 4)))
        dens.append(den)
    assert torch.equal(losses[0], losses[1]) and dens[1].masks == [None]
    den = Recorder()
    obj = objective(mask_ratio=0.5)
    obj(den, x0, generator=sample_generators(5, 4))         # training: masked
    obj.per_sample(den, x0, generator=sample_generators(5, 4))  # validation (the trainer's call): not masked
    assert den.masks[0].shape == (4, 16) and den.masks[1] is None


def test_option_errors():
    with pytest.raises(ValueError, match="needs a patch-based network: model.kind=dit"):
        DiffusionObjective(SCHEDULE, ObjectiveConfig(mask_ratio=0.5), prediction="x0")
    with pytest.raises(ValueError, match="set mask_ratio > 0 too"):
        objective(mae_weight=0.1)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        objective(mask_ratio=1.0)
    with pytest.raises(ValueError, match="sides divisible by the patch size 2"):
        objective(mask_ratio=0.5).token_mask(torch.zeros(2, 1, 7, 7))
