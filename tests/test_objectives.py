"""Objectives: the loss is measured in the network's own output space, with the stated weightings."""
import math

import pytest
import torch
from torch import nn

from torchdiffusion.data.toy import gaussian
from torchdiffusion.nets import MLPConfig, MLPDenoiserNet
from torchdiffusion.objectives import DiffusionObjective
from torchdiffusion.precond import Precond
from torchdiffusion.schedules import get_schedule


class ReturnTarget(nn.Module):
    """A 'network' that returns a fixed tensor (the true target plus an offset)."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, x, t, **cond):
        return self.out


def targets(prediction, x0, noise, sigma):
    """Independent textbook formulas for what each parameterization predicts (VP coordinates)."""
    s = sigma[:, None]
    alpha, sig_vp = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    return {
        "eps": noise,
        "x0": x0,
        "v": alpha * noise - sig_vp * x0,                # Salimans & Ho 2022
        "velocity": noise - x0,                          # rectified flow u = n - x0
    }[prediction]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "velocity"])
def test_l2_loss_is_squared_error_in_output_space(prediction):
    g = torch.Generator().manual_seed(0)
    sched = get_schedule("linear")
    x0, noise = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    sigma = sched.sample_sigmas(64, generator=g).double()
    net = ReturnTarget()
    den = Precond(net, sched, prediction)
    obj = DiffusionObjective(sched)
    offset = 0.1 * torch.randn(64, 5, generator=g, dtype=torch.float64)
    net.out = targets(prediction, x0, noise, sigma) + offset
    per = obj.per_sample(den, x0.float(), sigma=sigma.float(), noise=noise.float())
    expected = (offset**2).mean(1).float()
    torch.testing.assert_close(per, expected, rtol=2e-3, atol=1e-5)


def test_l1_and_huber():
    sched = get_schedule("linear")
    x0, noise = torch.zeros(8, 3), torch.randn(8, 3)
    sigma = torch.full((8,), 1.0)
    net = ReturnTarget()
    den = Precond(net, sched, "x0")
    net.out = torch.full((8, 3), 0.3)
    assert torch.allclose(DiffusionObjective(sched, loss="l1").per_sample(den, x0, sigma=sigma, noise=noise),
                          torch.full((8,), 0.3))
    # Huber below delta is 0.5 e^2, above it delta (|e| - 0.5 delta)
    assert torch.allclose(DiffusionObjective(sched, loss="huber", huber_delta=1.0).per_sample(
        den, x0, sigma=sigma, noise=noise), torch.full((8,), 0.5 * 0.09))
    net.out = torch.full((8, 3), 3.0)
    assert torch.allclose(DiffusionObjective(sched, loss="huber", huber_delta=1.0).per_sample(
        den, x0, sigma=sigma, noise=noise), torch.full((8,), 2.5))


@pytest.mark.parametrize("prediction,expected", [
    ("eps", lambda snr, g: torch.clamp(snr, max=g) / snr),          # Hang et al. 2023, eq. for eps
    ("v", lambda snr, g: torch.clamp(snr, max=g) / (snr + 1)),      # ... for v
    ("x0", lambda snr, g: torch.clamp(snr, max=g)),                 # ... for x0
])
def test_min_snr_weights(prediction, expected):
    sched = get_schedule("cosine")
    den = Precond(ReturnTarget(), sched, prediction)
    obj = DiffusionObjective(sched, weighting="min_snr", min_snr_gamma=5.0)
    sigma = torch.logspace(-2, 2, 50)
    w = obj.weight(sigma, den.out_scale(sigma))
    torch.testing.assert_close(w, expected(1 / sigma**2, 5.0), rtol=1e-5, atol=1e-7)


def test_vlb_weight_matches_ddpm_lambda():
    """DDPM's L_{t-1} = beta_t^2 / (2 beta~_t alpha_t (1 - alpha_bar_t)) ||eps - eps_hat||^2 (eq. 12), summed over T."""
    sched = get_schedule("linear", T=1000)
    den = Precond(ReturnTarget(), sched, "eps")
    obj = DiffusionObjective(sched, weighting="vlb")
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    sigma = sched.sigmas[t].float()
    w = obj.weight(sigma, den.out_scale(sigma)).double()
    b, bt, a, ab = sched.betas[t], sched.posterior_variance[t], sched.alphas[t], sched.alpha_bar[t]
    lam = b**2 / (2 * bt * a * (1 - ab)) * sched.T
    torch.testing.assert_close(w, lam, rtol=1e-4, atol=0)


def test_loss_of_exact_denoiser_matches_posterior_variance():
    """For N(m, s^2) data, E||D*(x) - x0||^2 per dim = s^2 sigma^2 / (s^2 + sigma^2) (Monte Carlo, 6 s.e.)."""
    m, s, n = 0.3, 0.7, 200_000
    den = gaussian(m, s, dim=1)
    sched = get_schedule("linear")
    obj = DiffusionObjective(sched, prediction="x0")  # the exact denoiser is a plain x0 function
    g = torch.Generator().manual_seed(1)
    for sig in (0.1, 0.7, 3.0):
        x0 = den.sample(n, generator=g)
        per = obj.per_sample(den, x0, sigma=torch.full((n,), sig), noise=torch.randn(n, 1, generator=g))
        exact = s**2 * sig**2 / (s**2 + sig**2)
        se = per.std().item() / math.sqrt(n)
        assert abs(per.mean().item() - exact) < 6 * se, (sig, per.mean().item(), exact)


def test_bad_options():
    sched = get_schedule("linear")
    with pytest.raises(ValueError, match="'l2', 'l1', 'huber'"):
        DiffusionObjective(sched, loss="l3")
    with pytest.raises(ValueError, match="'uniform', 'min_snr', 'vlb'"):
        DiffusionObjective(sched, weighting="snr")
    with pytest.raises(ValueError, match="vlb"):
        DiffusionObjective(get_schedule("edm"), weighting="vlb")


@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_wrapped_denoiser_gives_exactly_the_loss_of_the_bare_one(prediction):
    """Transforms forward the prediction type, so a Conditioned / ClampX0 / CountCalls wrapper around a Precond
    trains in the same output space as the bare Precond; the loss is bit-identical (an x0 loss would differ)."""
    from torchdiffusion.precond import ClampX0, Conditioned, CountCalls

    sched = get_schedule("edm") if prediction == "edm" else get_schedule("cosine")
    net = MLPDenoiserNet.from_config(MLPConfig(dim=2, hidden=16, num_blocks=1))
    torch.nn.init.normal_(net.out.weight, std=0.3)  # a non-zero output, so the spaces differ
    bare = Precond(net, sched, prediction)
    x0 = torch.randn(64, 2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    obj = DiffusionObjective(sched)
    ref = obj(bare, x0, generator=g())
    for wrapped in (Conditioned(bare), CountCalls(Conditioned(bare)), ClampX0(bare, -100.0, 100.0)):
        assert torch.equal(obj(wrapped, x0, generator=g()), ref)
    x0_loss = DiffusionObjective(sched, prediction="x0").per_sample(lambda x, s: bare(x, s), x0, generator=g())
    assert not torch.allclose(x0_loss.mean(), ref)
    with pytest.raises(ValueError, match="wraps a"):
        DiffusionObjective(sched, prediction="x0")(Conditioned(bare), x0)
    with pytest.raises(ValueError, match="declares no prediction"):
        obj(lambda x, s: x, x0)
