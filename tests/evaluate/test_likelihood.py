"""Likelihood estimators against exact Gaussian-mixture densities, and the VLB against the ODE for a trained model."""
import math

import pytest
import torch

from torchdiffusion.data.toy import GaussianMixture
from torchdiffusion.evaluate.likelihood import (discretized_gaussian_log_likelihood, normal_kl, ode_bits_per_dim,
                                                ode_log_likelihood, respaced_schedule, vlb_bits_per_dim)
from torchdiffusion.schedules import DiscreteSchedule

LINEAR = DiscreteSchedule.from_name("linear", 1000)


def _mixture():
    """Two anisotropic-by-mixing components in 3-D: dD/dx is not a multiple of I, so Hutchinson has variance."""
    gm = GaussianMixture(torch.tensor([[0.5, -0.3, 0.2], [-0.6, 0.4, -0.1]]), [0.3, 0.15])
    gm.schedule = LINEAR  # the ODE integrates from LINEAR.sigma_min to LINEAR.sigma_max
    return gm


def test_ode_exact_trace_matches_analytic_log_density():
    """Exact divergence: the only error is the solver's (rtol 1e-5): within 2e-3 nats per sample of log p_sigma_min."""
    gm = _mixture()
    g = torch.Generator().manual_seed(0)
    x = gm.sample(100, generator=g).double()
    r = ode_log_likelihood(gm, x, hutchinson="exact")
    exact = gm.log_prob(x, sigma=LINEAR.sigma_min)
    assert (r["logp"] - exact).abs().max() < 2e-3
    assert r["nfe"] > 10


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_ode_hutchinson_matches_analytic_log_density_within_its_error(probe):
    """Hutchinson is unbiased: the mean error over samples lies within 4 standard errors (of the per-sample errors)."""
    gm = _mixture()
    g = torch.Generator().manual_seed(1)
    x = gm.sample(200, generator=g).double()
    r = ode_log_likelihood(gm, x, hutchinson=probe, generator=g)
    err = r["logp"] - gm.log_prob(x, sigma=LINEAR.sigma_min)
    se = err.std() / math.sqrt(len(err))
    assert err.std() > 1e-3                       # the estimator really is noisy here
    assert abs(err.mean()) < 4 * se + 2e-3
    # more probes: smaller spread
    r4 = ode_log_likelihood(gm, x, hutchinson=probe, n_probes=4, generator=g)
    err4 = r4["logp"] - gm.log_prob(x, sigma=LINEAR.sigma_min)
    assert err4.std() < err.std()


def test_vlb_lies_above_the_exact_nll_and_tightens_as_T_grows():
    """E_data[VLB] >= E_data[-log p_data] (cross-entropy >= entropy); the gap shrinks from T=10 to 100 to 1000."""
    gm = _mixture()
    g = torch.Generator().manual_seed(2)
    x = gm.sample(1000, generator=g).double()
    nll = -gm.log_prob(x) / (3 * math.log(2))                           # exact bits/dim
    gaps = []
    for T in (10, 100, 1000):
        v = vlb_bits_per_dim(gm, x, T=T, schedule=LINEAR, decoder="gaussian", generator=g, batch_size=50_000)
        d = v["per_sample"] - nll
        gaps.append((float(d.mean()), float(d.std() / math.sqrt(len(d)))))
        assert v["T"] == T and len(v["terms_mean"]) == T + 1
    for mean, se in gaps:
        assert mean > -3 * se
    (g10, s10), (g100, s100), (g1000, _) = gaps
    assert g10 > g100 + 3 * s10
    assert g1000 < g100


def test_vlb_small_trained_model_is_not_below_the_ode_estimate():
    """A tiny MLP trained on 2-D Gaussian data: VLB >= ODE bits/dim within the paired error bars, and both lie above
    the data entropy (any normalised model density has cross-entropy >= entropy)."""
    from torchdiffusion.nets import MLPDenoiserNet
    from torchdiffusion.objectives import DiffusionObjective
    from torchdiffusion.precond import Precond

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    data = GaussianMixture(torch.tensor([[0.5, -0.3]]), [0.4])
    sch = DiscreteSchedule.from_name("linear", 100)
    net = MLPDenoiserNet(dim=2, hidden=64, num_blocks=2, time_embed_dim=32)
    den = Precond(net, sch, "eps")
    obj = DiffusionObjective(sch)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(400):
        loss = obj(den, data.sample(256, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    den.eval()
    x = data.sample(300, generator=g).double()
    v = vlb_bits_per_dim(den, x, decoder="gaussian", generator=g, batch_size=30_000)
    o = ode_bits_per_dim(den, x, dequantize_8bit=False, generator=g, rtol=1e-4)
    d = v["per_sample"] - o["per_sample"]
    assert d.mean() > -3 * d.std() / math.sqrt(len(d))
    entropy = float((-data.log_prob(x) / (2 * math.log(2))).mean())
    for r in (v, o):
        assert r["mean"] > entropy - 3 * r["stderr"]
        assert r["ci95"][0] < r["mean"] < r["ci95"][1]


def test_discretized_gaussian_sums_to_one_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in ((0.3, 0.05), (-0.99, 0.002), (0.999, 0.5), (0.0, 1e-4)):
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, std))
        assert torch.isfinite(logp).all()
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # an interior bin equals the CDF difference
    x, m, s = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.21], dtype=torch.float64), torch.tensor([0.03], dtype=torch.float64)
    n = torch.distributions.Normal(m, s)
    ref = torch.log(n.cdf(x + 1 / 255) - n.cdf(x - 1 / 255))
    assert torch.allclose(discretized_gaussian_log_likelihood(x, m, s), ref, atol=1e-12)


def test_respaced_schedule_keeps_the_noise_levels():
    sch, idx = respaced_schedule(LINEAR, 50)
    assert sch.T == 50 and idx[0] == 0 and idx[-1] == LINEAR.T - 1
    assert torch.allclose(sch.alpha_bar, LINEAR.alpha_bar[idx], rtol=1e-12)
    with pytest.raises(ValueError):
        respaced_schedule(LINEAR, 1)


def test_ode_bits_per_dim_dequantized_adds_the_8bit_jacobian():
    """With dequantization the result is -log2 p(x)/D + log2(127.5); a continuous density has no such term."""
    gm = _mixture()
    x = gm.sample(8, generator=torch.Generator().manual_seed(4)).double()
    a = ode_bits_per_dim(gm, x, hutchinson="exact", dequantize_8bit=False)
    ref = -gm.log_prob(x, sigma=LINEAR.sigma_min) / (3 * math.log(2))
    assert torch.allclose(a["per_sample"], ref, atol=1e-3)
    b = ode_bits_per_dim(gm, x, hutchinson="exact", generator=torch.Generator().manual_seed(5))
    assert abs(b["mean"] - a["mean"] - math.log2(127.5)) < 0.05     # dequantization noise of 1/255 moves little
    with pytest.raises(ValueError, match="allowed values"):
        ode_bits_per_dim(gm, x, hutchinson="bogus")


def test_normal_kl_matches_monte_carlo_and_its_limits():
    """KL(N(m1, v1) || N(m2, v2)) = E_{x ~ N(m1, v1)}[log N(x; m1, v1) - log N(x; m2, v2)], elementwise: the closed
    form against 200000 draws per element within 5 standard errors of the Monte Carlo mean (the log-ratio's
    sample std / sqrt(n)); zero for equal distributions, and not symmetric."""
    m1 = torch.tensor([0.0, 1.0, -2.0, 0.3, 0.0], dtype=torch.float64)
    v1 = torch.tensor([1.0, 0.25, 4.0, 1e-2, 2.0], dtype=torch.float64)
    m2 = torch.tensor([0.5, -1.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    v2 = torch.tensor([1.0, 1.0, 0.5, 1e-2, 0.1], dtype=torch.float64)
    kl = normal_kl(m1, v1, m2, v2)
    n = 200_000
    x = m1 + v1.sqrt() * torch.randn(n, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def logpdf(x, m, v):
        return -0.5 * ((x - m) ** 2 / v + torch.log(2 * math.pi * v))

    ratio = logpdf(x, m1, v1) - logpdf(x, m2, v2)                      # (n, 5)
    se = ratio.std(0) / math.sqrt(n)
    assert ((kl - ratio.mean(0)).abs() <= 5 * se).all(), (kl, ratio.mean(0), se)
    assert kl[0] == pytest.approx(0.125, rel=1e-12)                      # equal variances: (m1 - m2)^2 / (2 v)
    assert float(normal_kl(m1, v1, m1, v1).abs().max()) == 0.0
    assert not torch.allclose(normal_kl(m2, v2, m1, v1), kl)
    # broadcasting as vlb_terms uses it: a scalar variance against tensors of means
    ones = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m1, torch.tensor(0.5, dtype=torch.float64), m2, ones),
                               normal_kl(m1, 0.5 * ones, m2, ones), rtol=1e-12, atol=0)
