"""Variational diffusion models (Kingma et al. 2021; torchdiffusion.vdm, docs/likelihood.md): the learned schedule,
the continuous- and discrete-time ELBO against closed forms on Gaussian data with its exact denoiser, the
variance-minimising gradient, the objective through the trainer with an exact resume, and the refusals."""
import math

import pytest
import torch
from torch import nn

from torchdiffusion.build import build_objective, load_denoiser
from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.evaluate.likelihood import vlb_bits_per_dim
from torchdiffusion.nets.unet import UNet, fourier_features
from torchdiffusion.objectives import DiffusionObjective, ObjectiveConfig
from torchdiffusion.precond import denoiser_from_eps
from torchdiffusion.sampling import generate, get_sigmas
from torchdiffusion.schedules import VPSchedule, get_schedule
from torchdiffusion.training import Trainer
from torchdiffusion.utils import LOG2
from torchdiffusion.vdm import (LearnedGamma, LearnedSchedule, VDMConfig, VDMLoss, attach_learned_gamma,
                                check_vdm_config, draw_times, elbo_terms, prior_kl, reconstruction_loss)

K = 5  # standard errors allowed in Monte Carlo comparisons
MU, S = 0.3, 0.5  # the Gaussian data N(MU, S^2 I)


def gamma_net(seed=0, gamma0=-13.3, gamma1=5.0, hidden=64, scale=1.0):
    """A float64 LearnedGamma with random interior weights (raw weights times `scale`)."""
    torch.manual_seed(seed)
    g = LearnedGamma(gamma0, gamma1, hidden).double()
    with torch.no_grad():
        for p in (g.w1, g.b1, g.w2, g.b2, g.w3):
            p.copy_(torch.randn_like(p) * scale)
    return g


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(mu, s^2 I) data, E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu), with a learned
    schedule; `c` scales the shrinkage (1: exact) so the network has a trainable parameter."""

    def __init__(self, gamma, mu=MU, s=S):
        super().__init__()
        self.schedule = LearnedSchedule(gamma, VPSchedule())
        self.gamma = gamma
        self.mu = nn.Parameter(torch.tensor(float(mu), dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.s2 = s * s

    def forward(self, x, sigma, **cond):
        k = (self.s2 / (self.s2 + sigma.double() ** 2)).view(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.c * k * (x - self.mu)


def diffusion_closed(x, g0, g1, mu=MU, s=S):
    """1/2 int_{g0}^{g1} e^{-g} E||x - D(x + sigma eps)||^2 dg per dimension, summed, for the exact Gaussian
    denoiser: with u = e^g, E err = u^2 (x - mu)^2 / (s^2 + u)^2 + s^4 u / (s^2 + u)^2, integrated in u."""
    s2, u0, u1 = s * s, math.exp(g0), math.exp(g1)
    d = (x.double() - mu) ** 2
    per = 0.5 * (d * (1 / (s2 + u0) - 1 / (s2 + u1)) + math.log(u1 / (s2 + u1)) - math.log(u0 / (s2 + u0))
                 + s2 / (s2 + u1) - s2 / (s2 + u0))
    return per.flatten(1).sum(1)


def expected_err(x, gamma, mu=MU, s=S):
    """E_eps ||x - D(x + sigma eps)||^2 (N,) at sigma^2 = e^gamma (N,) for the exact Gaussian denoiser."""
    s2, u = s * s, gamma.double().exp()[:, None]
    k = s2 / (s2 + u)
    return ((1 - k) ** 2 * (x.flatten(1).double() - mu) ** 2 + k**2 * u).sum(1)


def within(mc, exact, k=K):
    mc = mc.detach()
    mean, se = float(mc.mean()), float(mc.std() / math.sqrt(len(mc)))
    assert abs(mean - exact) <= k * se + 1e-9, (mean, exact, se)
    return mean, se


# ------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("scale", [0.0, 1.0, 10.0, -10.0, 30.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_gamma_is_monotone_hits_its_endpoints_and_has_the_right_derivative(seed, scale):
    g = gamma_net(seed, gamma0=-7.0, gamma1=3.5, scale=scale)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64, requires_grad=True)
    gamma, dgamma = g.gamma_and_derivative(t)
    assert torch.allclose(gamma[[0, -1]], torch.tensor([-7.0, 3.5], dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert (gamma[1:] - gamma[:-1] >= 0).all() and (dgamma > 0).all()
    (auto,) = torch.autograd.grad(gamma.sum(), t)
    assert torch.allclose(dgamma, auto, rtol=1e-8, atol=1e-10)
    if scale == 0.0:  # the integral of the derivative is the span
        assert abs(float(torch.trapezoid(dgamma.detach(), t.detach())) - 10.5) < 1e-4


def test_learned_schedule_is_the_schedule_samplers_see():
    g = gamma_net(3, gamma0=-9.0, gamma1=4.0)
    sch = LearnedSchedule(g, VPSchedule())
    assert sch.sigma_min == pytest.approx(math.exp(-4.5), rel=1e-12)
    assert sch.sigma_max == pytest.approx(math.exp(2.0), rel=1e-12)
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    assert torch.allclose(sch.sigma_to_t(sch.t_to_sigma(t)), t, atol=1e-9)
    sig = get_sigmas(sch, 8, "uniform").double()
    assert sig[0] == pytest.approx(sch.sigma_max, rel=1e-6) and sig[-2] == pytest.approx(sch.sigma_min, rel=1e-6)
    assert torch.allclose(sig[:-1], sch.t_to_sigma(torch.linspace(1, 0, 8, dtype=torch.float64)), rtol=1e-6)
    s = torch.tensor([0.3, 2.0])
    assert torch.equal(sch.net_time(s), VPSchedule().net_time(s))  # the network's view of sigma is the base's


def test_the_schedule_is_attached_once_and_found_through_wrappers():
    """One schedule per network: a data-parallel (.module) or compiled (._orig_mod) view finds the same one."""
    net = nn.Linear(2, 2)
    g = attach_learned_gamma(net, VDMConfig(hidden=4))

    class Wrapper(nn.Module):  # as DistributedDataParallel (.module) and torch.compile's module (._orig_mod)
        def __init__(self, name, inner):
            super().__init__()
            self.add_module(name, inner)

    assert attach_learned_gamma(net, VDMConfig()) is g and net.vdm_gamma is g
    assert attach_learned_gamma(Wrapper("_orig_mod", Wrapper("module", net)), VDMConfig()) is g
    assert [k for k, _ in net.named_parameters()].count("vdm_gamma.gamma0") == 1


def test_the_schedule_keeps_full_precision_under_autocast():
    g = LearnedGamma(hidden=64)
    t = torch.rand(16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = g.gamma_and_derivative(t)
    for a, b in zip(low, g.gamma_and_derivative(t)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_times_are_low_discrepancy_or_antithetic():
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    t = draw_times(8, "low_discrepancy", generator=gens).sort().values
    assert torch.allclose(t[1:] - t[:-1], torch.full((7,), 1 / 8, dtype=torch.float64), atol=1e-12)
    a = draw_times(8, "antithetic", generator=gens)
    assert torch.allclose(a[0::2] + a[1::2], torch.ones(4, dtype=torch.float64))
    u = draw_times(8, "uniform", generator=gens)
    assert len(set(u.tolist())) == 8 and ((u >= 0) & (u < 1)).all()


def test_fourier_features_are_sines_and_cosines_of_the_input_and_reach_the_unet():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = fourier_features(x, (7, 8))
    assert f.shape == (2, 15, 4, 4) and torch.equal(f[:, :3], x)
    for i, n in enumerate((7, 8)):
        assert torch.allclose(f[:, 3 + 3 * i:6 + 3 * i], torch.sin(2.0**n * math.pi * x), atol=1e-4)
        assert torch.allclose(f[:, 9 + 3 * i:12 + 3 * i], torch.cos(2.0**n * math.pi * x), atol=1e-4)
    net = UNet(image_size=8, in_channels=1, channels=8, channel_mult=(1,), attn_resolutions=(), norm_groups=4,
               mid_attention=False, fourier_features=(7, 8))
    seen = []
    net.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert net(x, torch.zeros(2)).shape == x.shape and net.conv_in.in_channels == 5
    assert torch.equal(seen[0], fourier_features(x, (7, 8)))  # the first convolution sees x and its features
    with pytest.raises(ValueError, match="exponents"):
        UNet(image_size=8, channels=8, channel_mult=(1,), attn_resolutions=(), fourier_features=(-1,))


# ------------------------------------------------------------------------------------------- the ELBO
def test_prior_and_reconstruction_terms_are_their_closed_forms():
    x = torch.linspace(-1, 1, 256, dtype=torch.float64).view(4, 64)  # the 8-bit levels
    g1 = torch.tensor(2.5, dtype=torch.float64)
    a2, v = 1 / (1 + math.exp(2.5)), 1 / (1 + math.exp(-2.5))  # q(z_1 | x) = N(alpha x, v) against N(0, 1)
    kl = 0.5 * (math.log(1 / v) + v + a2 * x**2 - 1)
    assert torch.allclose(prior_kl(x, g1), kl.sum(1), rtol=1e-12)
    g0 = torch.tensor(-8.0, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = x + math.exp(-4.0) * eps  # z_0 / alpha_0; p(v_k | z) proportional to N(z; v_k, sigma_0^2)
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = torch.distributions.Normal(levels, math.exp(-4.0)).log_prob(z[..., None])  # (4, 64, 256)
    k = torch.arange(256).view(4, 64, 1)
    want = -(lp.gather(-1, k)[..., 0] - lp.logsumexp(-1)).sum(1)
    assert torch.allclose(reconstruction_loss(x, g0, noise=eps), want, rtol=1e-9)
    assert float(reconstruction_loss(x, torch.tensor(-30.0), noise=eps.float()).max()) < 1e-6  # sure decoder
    wide = reconstruction_loss(x, torch.tensor(40.0, dtype=torch.float64), noise=eps)  # sigma_0 >> 2: uniform
    assert torch.allclose(wide, torch.full((4,), 64 * math.log(256), dtype=torch.float64), rtol=1e-6)
    gauss = reconstruction_loss(x, g0, "gaussian", noise=eps)
    assert torch.allclose(gauss, (0.5 * eps**2 - 4.0 + 0.5 * math.log(2 * math.pi)).sum(1), rtol=1e-12)


def test_continuous_elbo_terms_of_gaussian_data_match_their_closed_forms():
    """Fixed x, Monte Carlo over t and eps: the diffusion loss of the exact denoiser is 1/2 int e^{-g} E err dg
    (closed form), the reconstruction of the Gaussian decoder 1/2 log(2 pi e sigma_0^2) per dimension."""
    den = GaussianDenoiser(gamma_net(4))
    m = 20000
    for x in (-1.0, 0.3, 1.2):
        x0 = torch.full((m, 4), x, dtype=torch.float64)
        terms = elbo_terms(den, x0, t_sampling="uniform", decoder="gaussian",
                           generator=torch.Generator().manual_seed(int(10 * x) + 100))
        within(terms["diffusion"], float(diffusion_closed(x0[:1], -13.3, 5.0)))
        within(terms["reconstruction"], 4 * (0.5 * math.log(2 * math.pi * math.exp(-13.3)) + 0.5))


def test_continuous_elbo_of_gaussian_data_is_its_negative_log_likelihood():
    """x drawn from N(MU, S^2 I): the mean ELBO (Monte Carlo over x, t, eps) equals the data's entropy, the exact
    expected -log p, within its standard error; the closed-form gap of the end terms is below 2e-3 nats/dim."""
    den = GaussianDenoiser(gamma_net(5))
    g = torch.Generator().manual_seed(6)
    x0 = MU + S * torch.randn(40000, 4, generator=g, dtype=torch.float64)
    terms = elbo_terms(den, x0, decoder="gaussian", generator=g)
    entropy = 4 * (0.5 * math.log(2 * math.pi * S**2) + 0.5)
    u0 = math.exp(-13.3)
    ex = float(diffusion_closed(torch.full((1, 4), MU + S), -13.3, 5.0))  # E (x - mu)^2 = s^2: x = mu + s
    closed = ex + 4 * (0.5 * math.log(2 * math.pi * u0) + 0.5) + 4 * 0.5 * (
        torch.sigmoid(torch.tensor(5.0)).item() + torch.sigmoid(torch.tensor(-5.0)).item() * (MU**2 + S**2) - 1
        - math.log(torch.sigmoid(torch.tensor(5.0)).item()))
    assert 0 <= (closed - entropy) / 4 < 2e-3
    within(sum(terms.values()), entropy, k=K)
    within(sum(terms.values()), closed, k=K)


def test_continuous_diffusion_loss_does_not_depend_on_the_schedule_between_its_endpoints():
    """Two schedules with the same endpoints and different interiors give the same diffusion loss (VDM eq. 20);
    moving an endpoint changes it (the comparison can fail)."""
    x0 = torch.full((40000, 4), 1.2, dtype=torch.float64)
    means = []
    for seed, scale in ((7, 1.0), (8, 6.0), (9, -6.0)):
        terms = elbo_terms(GaussianDenoiser(gamma_net(seed, scale=scale)), x0, decoder="gaussian",
                           generator=torch.Generator().manual_seed(seed))
        means.append(within(terms["diffusion"], float(diffusion_closed(x0[:1], -13.3, 5.0))))
    (m0, s0), (m1, s1) = means[0], means[1]
    assert abs(m0 - m1) <= K * math.hypot(s0, s1)
    other = elbo_terms(GaussianDenoiser(gamma_net(7, gamma0=-10.0)), x0, decoder="gaussian",
                       generator=torch.Generator().manual_seed(7))["diffusion"].detach()
    assert abs(float(other.mean()) - m0) > 10 * math.hypot(s0, float(other.std()) / 200)


def test_discrete_time_loss_tends_to_the_continuous_one():
    """L_T = sum_i 1/2 (SNR(s_i) - SNR(t_i)) E err(t_i) (exact for the Gaussian denoiser) decreases to L_inf as T
    grows, at first order in 1 / T (VDM eq. 13 -> 17); the code's Monte Carlo estimate matches the sum."""
    gnet = gamma_net(10, scale=2.0)
    den = GaussianDenoiser(gnet)
    x1 = torch.full((1, 4), -1.0, dtype=torch.float64)
    cont = float(diffusion_closed(x1, -13.3, 5.0))
    gaps = []
    steps = (2, 10, 100, 1000, 10000)
    for T in steps:
        with torch.no_grad():
            t = torch.arange(1, T + 1, dtype=torch.float64) / T
            g_t, g_s = gnet(t), gnet(t - 1 / T)
            exact = float((0.5 * (torch.exp(-g_s) - torch.exp(-g_t)) * expected_err(x1.expand(T, 4), g_t)).sum())
        gaps.append(exact - cont)
        if T in (10, 1000):
            mc = elbo_terms(den, x1.expand(20000, 4), T=T, decoder="gaussian",
                            generator=torch.Generator().manual_seed(T))["diffusion"]
            within(mc, exact)
    assert all(a > b > 0 for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-3 * cont
    assert 1000 * gaps[-2] == pytest.approx(10000 * gaps[-1], rel=0.02)  # first order in 1 / T


def test_variance_minimising_gradient():
    """Interior schedule parameters get the gradient of mean(L_diff^2); the endpoints and the network that of the
    ELBO (VDM sec. 5.2). Same t and eps in all three passes."""
    x0 = MU + S * torch.randn(64, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    t = torch.rand(64, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    eps = torch.randn(64, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    n_bits = 4 * LOG2

    def grads(mode):
        den = GaussianDenoiser(gamma_net(14, scale=2.0), mu=0.1)
        den.c.data.fill_(0.8)
        terms = elbo_terms(den, x0, t=t, noise=eps, decoder="gaussian", variance_minimising=mode == "vm",
                           generator=torch.Generator().manual_seed(15))
        loss = (terms["diffusion"] / n_bits).pow(2).mean() if mode == "squared" else (
            sum(terms.values()) / n_bits).mean()
        loss.backward()
        return {k: p.grad.clone() for k, p in den.named_parameters()}

    vm, plain, squared = grads("vm"), grads("plain"), grads("squared")
    for k in ("gamma.gamma0", "gamma.gamma1", "mu", "c"):
        assert torch.allclose(vm[k], plain[k], rtol=1e-10, atol=1e-14), k
    for k in ("gamma.w1", "gamma.b1", "gamma.w2", "gamma.b2", "gamma.w3"):
        assert torch.allclose(vm[k], squared[k], rtol=1e-8, atol=1e-14), k
        assert not torch.allclose(vm[k], plain[k], rtol=1e-2), k


# ------------------------------------------------------------------------------------ through the trainer
def tiny(out, *over):
    return load_config("tiny", [f"out_dir={out}", "train.ckpt_every=0", "train.batch_size=16", "data.image_size=16",
                                "model.unet.image_size=16", "diffusion.schedule=vp", "diffusion.objective.kind=vdm",
                                "diffusion.objective.vdm.hidden=16", *over])


def test_vdm_run_trains_its_schedule_checkpoints_resumes_samples_and_reports_its_elbo(tmp_path, mnist_path):
    tr = Trainer(tiny(tmp_path, "train.steps=4"), progress=False)
    start = {k: v.clone() for k, v in tr.net.vdm_gamma.state_dict().items()}
    tr.fit()
    trained = tr.net.vdm_gamma.state_dict()
    assert all(not torch.equal(start[k], trained[k]) for k in ("gamma0", "gamma1", "w2", "w3"))  # one optimizer
    assert set(tr.objective.last_terms) == {"vdm_diffusion", "vdm_prior", "vdm_reconstruction"}
    path = tmp_path / "tiny" / "checkpoints" / "last.safetensors"
    _, groups = load_checkpoint(path)
    assert torch.equal(groups["model"]["vdm_gamma.gamma1"], trained["gamma1"])
    resumed = Trainer(tiny(tmp_path, "train.steps=4"), progress=False)  # continues the run from its checkpoint
    assert resumed.step == 4
    for group, net in (("model", resumed.net), ("ema", resumed.ema.model)):
        for k, v in net.vdm_gamma.state_dict().items():
            assert torch.equal(v, groups[group][f"vdm_gamma.{k}"]), (group, k)
    den, cfg, _ = load_denoiser(path)
    assert isinstance(den.schedule, LearnedSchedule)
    assert den.schedule.sigma_max == pytest.approx(math.exp(float(groups["ema"]["vdm_gamma.gamma1"]) / 2), rel=1e-6)
    for sampler in ("ddim", "ddpm", "heun"):
        x = generate(den, (1, 16, 16), sampler=sampler, steps=3, n=2, class_label=None)
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    x0 = tr.data.batch(torch.arange(8))[0]
    r = vlb_bits_per_dim(den, x0, generator=torch.Generator().manual_seed(0))
    assert r["terms_mean"].shape == (3,) and r["mean"] == pytest.approx(float(r["terms_mean"].sum()), rel=1e-9)
    loss = VDMLoss(cfg.diffusion.objective.vdm)
    with torch.no_grad():
        again = loss.per_sample(den, x0, t=torch.full((8,), 0.5), noise=torch.zeros_like(x0))
    assert torch.isfinite(again).all() and float(again.min()) > 0




def test_an_interrupted_vdm_run_resumes_bit_for_bit(interrupt_at, tmp_path, mnist_path):
    """Schedule weights, their Adam state and EMA included: stopped at step 3 and resumed equals uninterrupted."""
    Trainer(tiny(tmp_path / "a", "train.steps=5"), progress=False).fit()
    tr = Trainer(tiny(tmp_path / "b", "train.steps=5"), progress=False)
    tr.hooks.append(interrupt_at(3))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    Trainer(tiny(tmp_path / "b", "train.steps=5"), progress=False).fit()
    (ma, ga), (mb, gb) = (load_checkpoint(tmp_path / r / "tiny" / "checkpoints" / "last.safetensors") for r in "ab")
    assert ma["step"] == mb["step"] == 5 and any(k.startswith("vdm_gamma.") for k in ga["model"])
    for group in ("model", "ema", "optim"):
        assert ga[group].keys() == gb[group].keys()
        for k in ga[group]:
            assert torch.equal(ga[group][k], gb[group][k]), (group, k)


# ------------------------------------------------------------------------------------------- refusals
def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="gamma0 < gamma1"):
        LearnedGamma(5.0, 5.0)
    with pytest.raises(ValueError, match="gamma0 < gamma1"):
        check_vdm_config(VDMConfig(gamma0=2.0, gamma1=-1.0))
    with pytest.raises(ValueError, match="T must be an integer >= 0"):
        check_vdm_config(VDMConfig(T=-1))
    with pytest.raises(ValueError, match="low_discrepancy"):
        check_vdm_config(VDMConfig(t_sampling="sobol"))
    with pytest.raises(ValueError, match="gaussian"):
        check_vdm_config(VDMConfig(decoder="logistic"))
    with pytest.raises(ConfigError, match="gamma0 < gamma1"):
        tiny(tmp_path, "diffusion.objective.vdm.gamma0=6")
    with pytest.raises(ConfigError, match="continuous one"):
        tiny(tmp_path, "diffusion.schedule=cosine")
    with pytest.raises(ConfigError, match="learn_sigma"):
        tiny(tmp_path, "model.unet.learn_sigma=true")
    with pytest.raises(ValueError, match="loss=l2"):
        build_objective(tiny(tmp_path, "diffusion.objective.loss=l1"))
    vp = get_schedule("vp")
    with pytest.raises(ValueError, match="continuous schedule"):
        DiffusionObjective(get_schedule("cosine", 10), ObjectiveConfig(kind="vdm"))
    plain = denoiser_from_eps(lambda x, t: torch.zeros_like(x), vp)
    with pytest.raises(ValueError, match="no learned noise schedule"):
        DiffusionObjective(vp, ObjectiveConfig(kind="vdm"))(plain, torch.zeros(2, 1, 4, 4))
    den = GaussianDenoiser(gamma_net(0))
    with pytest.raises(ValueError, match="8-bit data"):
        elbo_terms(den, torch.full((2, 4), 0.123, dtype=torch.float64))
    with pytest.raises(ValueError, match="8-bit data"):
        elbo_terms(den, torch.full((2, 4), 3.0, dtype=torch.float64))
