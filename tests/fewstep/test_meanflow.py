"""MeanFlow against closed forms. Gaussian data x0 ~ N(0, s^2 I) on the rectified-flow path z_t = (1 - t) x0 + t n
has marginals N(0, v_t I), v_t = (1 - t)^2 s^2 + t^2, and a linear probability-flow map z_r = sqrt(v_r / v_t) z_t,
so the average velocity u(z, r, t) = (z - z_r) / (t - r) and the instantaneous velocity v(z, t) = z v_t' / (2 v_t)
are known exactly."""
import math

import pytest
import torch
from torch import nn

from torchdiffusion.fewstep.meanflow import MeanFlowDenoiser, MeanFlowObjective, path_time
from torchdiffusion.nets import MLPDenoiserNet
from torchdiffusion.sampling.consistency import sample_meanflow
from torchdiffusion.schedules import RectifiedFlowSchedule, VPSchedule

S = 0.5  # data standard deviation


def var(t):
    return (1 - t) ** 2 * S**2 + t**2


def exact_u(z, r, t):
    ratio = torch.sqrt(var(r) / var(t))
    shape = (-1,) + (1,) * (z.ndim - 1)
    d = (t - r).view(shape)
    return torch.where(d.abs() > 0, z * (1 - ratio.view(shape)) / torch.where(d.abs() > 0, d, torch.ones_like(d)),
                       exact_v(z, t))


def exact_v(z, t):
    dvar = -2 * (1 - t) * S**2 + 2 * t
    return z * (dvar / (2 * var(t))).view((-1,) + (1,) * (z.ndim - 1))


class ExactNet(nn.Module):
    """The exact average velocity behind the network interface u = F(z, 1000 t, interval=1000 (t - r))."""

    def forward(self, z, tt, interval=None):
        t = tt.double() / RectifiedFlowSchedule.time_scale
        r = t - interval.double() / RectifiedFlowSchedule.time_scale
        return exact_u(z.double(), r, t)


def test_the_meanflow_identity_holds_for_the_exact_average_velocity():
    """u = v - (t - r) d/dt u (eq. 6), with d/dt u the JVP along (v, 0, 1): the target equals u itself."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, dtype=torch.float64, generator=g)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.95, 0.6], dtype=torch.float64)
    r = torch.tensor([0.1, 0.0, 0.45, 0.3, 0.5, 0.2], dtype=torch.float64)
    u, u_tgt = MeanFlowObjective.target(exact_u, z, r, t, exact_v(z, t))
    torch.testing.assert_close(u_tgt, u, rtol=1e-9, atol=1e-12)
    wrong_v = exact_v(z, t) * 1.1  # a wrong velocity gives a wrong target: the check can fail
    _, bad = MeanFlowObjective.target(exact_u, z, r, t, wrong_v)
    assert (bad - u).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_sampler_with_the_exact_average_velocity_is_the_exact_flow_map(steps):
    schedule = RectifiedFlowSchedule()
    den = MeanFlowDenoiser(ExactNet(), schedule)
    g = torch.Generator().manual_seed(1)
    sigma_max = schedule.sigma_max
    sigmas = torch.cat([torch.logspace(math.log10(sigma_max), -1, steps, dtype=torch.float64), torch.zeros(1)])
    x = sigma_max * torch.randn(64, 4, generator=g)
    out = sample_meanflow(den, x, sigmas)
    t = float(path_time(torch.tensor(sigma_max)))
    z_t = x.double() * (1 - t)
    expected = z_t * math.sqrt(S**2 / var(t))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_denoiser_at_sigma_next_zero_is_the_one_step_sample_and_r_equal_t_is_the_velocity_net():
    schedule = RectifiedFlowSchedule()
    den = MeanFlowDenoiser(ExactNet(), schedule)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2)) * 3.0
    sigma = torch.full((5,), 3.0)
    t = 0.75  # sigma 3 -> t = 3 / 4
    torch.testing.assert_close(den(x, sigma).double(), x.double() * (1 - t) * math.sqrt(S**2 / var(t)),
                               rtol=1e-5, atol=1e-6)
    u = den.average_velocity(x * (1 - t), sigma.new_full((5,), t), sigma.new_full((5,), t))
    torch.testing.assert_close(u.double(), exact_v(x.double() * (1 - t), torch.full((5,), t, dtype=torch.float64)),
                               rtol=1e-5, atol=1e-6)


def test_meanflow_needs_the_rf_path_and_a_net_with_a_second_time_input():
    with pytest.raises(ValueError, match="rectified-flow"):
        MeanFlowDenoiser(ExactNet(), VPSchedule())
    plain = MeanFlowDenoiser(MLPDenoiserNet(dim=3, hidden=16, num_blocks=1, time_embed_dim=8),
                             RectifiedFlowSchedule())
    with pytest.raises(ValueError, match="interval_embed=False"):
        plain(torch.randn(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="second time input"):
        MLPDenoiserNet(dim=3, hidden=16, num_blocks=1, time_embed_dim=8, interval_embed=True)(
            torch.randn(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="ratio"):
        MeanFlowObjective(ratio=1.5)


def test_meanflow_objective_trains_the_interval_input_and_weights_adaptively():
    torch.manual_seed(0)
    net = MLPDenoiserNet(dim=3, hidden=32, num_blocks=2, time_embed_dim=16, interval_embed=True)
    nn.init.normal_(net.out.weight, std=0.1)  # the output layer starts at zero: give the inputs a path to the loss
    den = MeanFlowDenoiser(net, RectifiedFlowSchedule())
    x0 = S * torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    obj = MeanFlowObjective(ratio=1.0, power=0.0)  # every example an interval, plain L2
    loss = obj(den, x0, generator=torch.Generator().manual_seed(4))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.interval_embed.parameters())
    r, t = obj.times(4000, generator=torch.Generator().manual_seed(5))
    assert bool((r <= t).all()) and 0.0 < float((r < t).float().mean()) <= 1.0
    r, t = MeanFlowObjective(ratio=0.25).times(4000, generator=torch.Generator().manual_seed(5))
    assert float((r < t).float().mean()) == pytest.approx(0.25, abs=0.03)
    # adaptive weight 1 / (||delta||^2 + c): the weighted per-example loss is below 1 and increases with the error
    per = MeanFlowObjective(power=1.0).per_sample(den, x0, generator=torch.Generator().manual_seed(4))
    assert bool((per < 1).all()) and bool((per >= 0).all())
