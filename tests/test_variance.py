"""Learned reverse variances (Nichol & Dhariwal 2021): eq. 15, the bound's terms with a learned variance, the hybrid
loss's stop-gradient, importance sampling of t, the ancestral sampler and the errors."""
import math

import pytest
import torch
from torch import nn

from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.evaluate.likelihood import vlb_terms
from torchdiffusion.nets.unet import UNet
from torchdiffusion.objectives import DiffusionObjective, ObjectiveConfig
from torchdiffusion.precond import ClampX0, Conditioned, Precond
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.sampling.core import sample_ddpm
from torchdiffusion.schedules import DiscreteSchedule, get_schedule
from torchdiffusion.variance import (UNIFORM_SHARE, ImportanceSampler, clipped_log_variances, normal_kl,
                                     schedule_log_variance, step_variance, vlb_term)


class ToyNet(nn.Module):
    """eps = a * x_in and variance channels b everywhere (v = (b + 1) / 2): one parameter for each head."""

    learn_sigma = True

    def __init__(self, v: float = 0.5, a: float = 0.3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(2 * v - 1.0))

    def forward(self, x, t, return_variance=False, **cond):
        mean = self.a * x
        return (mean, self.b * torch.ones_like(x)) if return_variance else mean


def toy_denoiser(v, schedule, learned=True):
    return Precond(ToyNet(v), schedule, "eps", learned_variance=learned)


def grid_x0(n, shape=(1, 3, 3), seed=0):
    """8-bit data in [-1, 1] with both edge levels present."""
    u = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed))
    u[0].flatten()[:2] = torch.tensor([0, 255])
    return u.double() / 127.5 - 1


def hand_kl(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) by the textbook formula."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def test_normal_kl_is_the_closed_form():
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.2, 2.0), (2.0, 3.0, 1.0, 0.1), (-0.7, 0.02, -0.69, 0.03)]:
        got = normal_kl(torch.tensor(m1), torch.tensor(s1**2), torch.tensor(m2), torch.tensor(s2**2))
        assert float(got) == pytest.approx(hand_kl(m1, s1, m2, s2), rel=1e-6, abs=1e-9)


def test_learned_variance_kl_term_is_the_closed_form_gaussian_kl():
    """vlb_term at a step t >= 1 with Sigma = exp(v log beta_t + (1 - v) log beta~_t) equals the Gaussian KL of the
    DDPM posterior against N(mu(x0_hat), Sigma), everything computed here by hand from the betas."""
    betas = [0.05, 0.1, 0.2, 0.3]
    sch = DiscreteSchedule(torch.tensor(betas, dtype=torch.float64))
    ab = [math.prod(1 - b for b in betas[: i + 1]) for i in range(4)]
    x0, xt, x0_hat = (torch.tensor(a, dtype=torch.float64) for a in ([[0.5, -0.25]], [[0.1, 0.9]], [[0.4, -0.5]]))
    for t, v in [(1, 0.0), (2, 0.3), (3, 1.0), (2, torch.tensor([[0.8, -0.2]], dtype=torch.float64))]:
        vv = v if torch.is_tensor(v) else torch.full_like(x0, v)
        lv = schedule_log_variance(sch, torch.tensor([t]), vv.double())
        got = float(vlb_term(sch, x0.double(), xt.double(), torch.tensor([t]), x0_hat.double(), lv))
        b, ab_t, ab_s = betas[t], ab[t], ab[t - 1]
        small = b * (1 - ab_s) / (1 - ab_t)
        c0, ct = b * math.sqrt(ab_s) / (1 - ab_t), (1 - ab_s) * math.sqrt(1 - b) / (1 - ab_t)
        want = 0.0
        for d in range(2):
            var = math.exp(float(vv[0, d]) * math.log(b) + (1 - float(vv[0, d])) * math.log(small))
            mq, mp = c0 * float(x0[0, d]) + ct * float(xt[0, d]), c0 * float(x0_hat[0, d]) + ct * float(xt[0, d])
            want += hand_kl(mq, math.sqrt(small), mp, math.sqrt(var))
        assert got == pytest.approx(want, rel=1e-9), (t, v)


def test_v_one_and_zero_are_beta_and_beta_tilde():
    sch = get_schedule("cosine", 50)
    t = torch.arange(50)
    ones = torch.ones(50, 1, dtype=torch.float64)
    log_large, log_small = clipped_log_variances(sch)
    assert torch.equal(schedule_log_variance(sch, t, ones)[:, 0], sch.betas.log())
    assert torch.equal(schedule_log_variance(sch, t, 0 * ones)[:, 0], log_small)
    assert torch.allclose(log_small[1:].exp(), sch.posterior_variance[1:], rtol=1e-12)
    # at consecutive levels, in VE coordinates: beta_t / alpha_bar_{t-1} and beta~_t / alpha_bar_{t-1}
    for i in (1, 10, 49):
        s, s_next = float(sch.sigmas[i]), float(sch.sigmas[i - 1])
        one = torch.ones((), dtype=torch.float64)
        ab_prev = float(sch.alpha_bar[i - 1])
        assert float(step_variance(s, s_next, one)) == pytest.approx(float(sch.betas[i]) / ab_prev, rel=1e-9)
        assert float(step_variance(s, s_next, 0 * one)) == pytest.approx(
            float(sch.posterior_variance[i]) / ab_prev, rel=1e-9)


@pytest.mark.parametrize("v, variance", [(0.0, "small"), (1.0, "large")])
@pytest.mark.parametrize("T", [None, 5])
def test_constant_v_gives_the_fixed_variance_bound(v, variance, T):
    """A learned variance with v the same everywhere gives the fixed-variance terms (all T + 1 of them), at the
    full grid and respaced."""
    sch = get_schedule("cosine", 20)
    x0 = grid_x0(6)
    learned = vlb_terms(toy_denoiser(v, sch), x0, T=T, generator=torch.Generator().manual_seed(3))
    fixed = vlb_terms(toy_denoiser(v, sch, learned=False), x0, T=T, variance=variance,
                      generator=torch.Generator().manual_seed(3))
    assert torch.allclose(learned, fixed, rtol=1e-9, atol=1e-12)
    other = vlb_terms(toy_denoiser(0.5, sch), x0, T=T, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(other, fixed, rtol=1e-3)  # v is used


def _grads(obj, denoiser, x0, part):
    """The gradients of one part of the learned objective ('vlb': L_t, 'simple': L_simple) on every step t."""
    sigma = obj.schedule.sigmas[torch.arange(len(x0)) % obj.schedule.T].float()  # (N,): every step, t = 0 too
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    denoiser.zero_grad()
    simple, term = obj.learned_terms(denoiser, x0, x, sigma, {})
    (term if part == "vlb" else simple).sum().backward()
    return denoiser.net


def test_hybrid_vlb_term_trains_only_the_variance():
    """Kind hybrid: L_vlb's gradient reaches the variance head and not the mean (stop-gradient); L_simple's the
    mean and not the variance. Kind vlb: L_vlb trains both."""
    sch = get_schedule("cosine", 10)
    x0 = grid_x0(10).float()
    d = toy_denoiser(0.3, sch)
    net = _grads(DiffusionObjective(sch, ObjectiveConfig(kind="hybrid")), d, x0, "vlb")
    assert (net.a.grad is None or net.a.grad == 0) and net.b.grad != 0 and torch.isfinite(net.b.grad)
    net = _grads(DiffusionObjective(sch, ObjectiveConfig(kind="hybrid")), d, x0, "simple")
    assert net.a.grad != 0 and (net.b.grad is None or net.b.grad == 0)
    net = _grads(DiffusionObjective(sch, ObjectiveConfig(kind="vlb")), d, x0, "vlb")
    assert net.a.grad != 0 and net.b.grad != 0


def test_hybrid_stop_gradient_on_a_unet():
    """The same on a learn_sigma U-Net: the VLB term's gradient on the output convolution is zero on the mean's
    output channel and non-zero on the variance's."""
    torch.manual_seed(0)
    sch = get_schedule("cosine", 10)
    net = UNet(image_size=8, channels=8, channel_mult=(1,), attn_resolutions=(), mid_attention=False, norm_groups=4,
               learn_sigma=True)
    nn.init.normal_(net.conv_out.weight, std=0.1)
    d = Precond(net, sch, "eps", learned_variance=True)
    _grads(DiffusionObjective(sch, ObjectiveConfig(kind="hybrid")), d, grid_x0(4, (1, 8, 8)).float(), "vlb")
    g = net.conv_out.weight.grad  # (2, C, 3, 3): row 0 the mean (eps), row 1 the variance
    assert torch.all(g[0] == 0) and g[1].abs().sum() > 0


def test_hybrid_loss_is_simple_plus_lambda_T_times_the_term_in_bits_per_dim():
    """per_sample of kind hybrid = the simple loss + lambda T L_t / (D ln 2), of kind vlb = T L_t / (D ln 2), L_t the
    bound's term of each sample's step with its learned variance (the same x_t)."""
    sch = get_schedule("cosine", 10)
    x0 = grid_x0(10).float()
    d = toy_denoiser(0.3, sch)
    sigma = sch.sigmas[torch.arange(10)].float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    simple = DiffusionObjective(sch).per_sample(d, x0, sigma=sigma, noise=noise)
    hybrid = DiffusionObjective(sch, ObjectiveConfig(kind="hybrid", vlb_weight=0.01)).per_sample(
        d, x0, sigma=sigma, noise=noise)
    vlb = DiffusionObjective(sch, ObjectiveConfig(kind="vlb")).per_sample(d, x0, sigma=sigma, noise=noise)
    t = torch.arange(10)
    ab = sch.alpha_bar[t].float()[:, None, None, None]
    with torch.no_grad():
        x0_hat, v = d.with_variance(x0 + sigma[:, None, None, None] * noise, sigma)
    term = vlb_term(sch, x0, (x0 + sigma[:, None, None, None] * noise) * ab.sqrt(), t, x0_hat,
                    schedule_log_variance(sch, t, v)) / (9 * math.log(2))
    assert torch.allclose(vlb, 10 * term, rtol=1e-5)
    assert torch.allclose(hybrid, simple + 0.01 * 10 * term, rtol=1e-5)


def test_importance_probabilities_follow_the_root_mean_square():
    s = ImportanceSampler(4, history=3)
    assert torch.equal(s.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))  # not warm: uniform
    for t, vals in enumerate([[1.0, 1.0, 1.0], [3.0, 4.0, 0.0], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0, 7.0, 2.0, 2.0]]):
        s.update(torch.full((len(vals),), t), torch.tensor(vals))
    assert torch.equal(s.values[3], torch.tensor([7.0, 2.0, 2.0], dtype=torch.float64))  # the last 3
    rms = torch.tensor([1.0, math.sqrt(25 / 3), 0.5, math.sqrt(57 / 3)], dtype=torch.float64)
    want = rms / rms.sum() * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / 4
    assert torch.allclose(s.probabilities(), want, rtol=1e-12)
    s.update(torch.tensor([2]), torch.tensor([9.0]))
    assert float(s.probabilities()[2]) > float(want[2])


def test_importance_sampling_is_unbiased():
    """With fixed term values L_t, the importance-weighted estimate L_t / p_t and the uniform one T L_t have the
    same mean, sum_t L_t, within standard errors; the importance-weighted one with a smaller spread."""
    T, n = 8, 20000
    L = torch.tensor([5.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 0.05], dtype=torch.float64)
    s = ImportanceSampler(T)
    for _ in range(s.history):
        s.update(torch.arange(T), L)
    g = torch.Generator().manual_seed(0)
    t, w = s.sample(n, generator=g)
    est = T * L[t] * w.double()
    u = torch.randint(0, T, (n,), generator=g)
    uni = T * L[u]
    se = math.sqrt(est.var() / n + uni.var() / n)
    assert abs(float(est.mean() - uni.mean())) < 4 * se
    assert abs(float(est.mean()) - float(L.sum())) < 4 * math.sqrt(est.var() / n)
    assert est.std() < uni.std() / 2
    freq = torch.bincount(t, minlength=T).double() / n  # the draws follow p
    assert torch.allclose(freq, s.probabilities(), atol=4 * math.sqrt(0.25 / n))


def test_importance_state_round_trips_and_is_checked():
    s = ImportanceSampler(5)
    s.update(torch.tensor([0, 1, 1, 4]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    r = ImportanceSampler(5)
    r.load_state_dict(s.state_dict())
    assert torch.equal(r.values, s.values) and torch.equal(r.counts, s.counts)
    with pytest.raises(ValueError, match="does not fit"):
        ImportanceSampler(6).load_state_dict(s.state_dict())


@pytest.mark.parametrize("v, variance", [(0.0, "small"), (1.0, "large")])
def test_ancestral_sampler_with_learned_variance(v, variance):
    """A learned-variance denoiser whose v reproduces beta~ (beta) samples as the fixed beta~ (beta) sampler for
    the same generator, on a respaced grid, through the sampling transforms."""
    sch = get_schedule("linear", 100)
    sigmas = get_sigmas(sch, 7)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    learned = ClampX0(Conditioned(toy_denoiser(v, sch)))
    assert learned.learns_variance
    a = sample_ddpm(learned, x, sigmas, generator=torch.Generator().manual_seed(2))
    b = sample_ddpm(ClampX0(toy_denoiser(v, sch, learned=False)), x, sigmas, variance=variance,
                    generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    c = sample_ddpm(ClampX0(toy_denoiser(0.5, sch)), x, sigmas, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c, atol=1e-3)


def test_bad_values_are_refused():
    sch = get_schedule("cosine", 10)
    with pytest.raises(ValueError, match="allowed values: 'simple', 'hybrid', 'vlb'"):
        DiffusionObjective(sch, ObjectiveConfig(kind="kl"))
    with pytest.raises(ValueError, match="discrete schedule"):
        DiffusionObjective(get_schedule("edm"), ObjectiveConfig(kind="hybrid"))
    with pytest.raises(ValueError, match="vlb_weight"):
        DiffusionObjective(sch, ObjectiveConfig(kind="hybrid", vlb_weight=-1.0))
    with pytest.raises(ValueError, match="learn_sigma"):
        Precond(UNet(image_size=8, channels=8, channel_mult=(1,), attn_resolutions=(), norm_groups=4), sch,
                learned_variance=True)
    with pytest.raises(ValueError, match="no learned variance"):
        toy_denoiser(0.5, sch, learned=False).with_variance(torch.zeros(1, 1, 3, 3), torch.ones(1))
    obj = DiffusionObjective(sch, ObjectiveConfig(kind="hybrid"))
    with pytest.raises(ValueError, match="learn_sigma=true"):
        obj(toy_denoiser(0.5, sch, learned=False), grid_x0(2).float())
    with pytest.raises(ConfigError, match="learn_sigma=true"):
        load_config("tiny", ["diffusion.objective.kind=hybrid"])
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        load_config("mnist-hybrid", ["diffusion.schedule=edm"])
    with pytest.raises(ConfigError, match="allowed values"):
        load_config("mnist-hybrid", ["diffusion.objective.kind=hybird"])
