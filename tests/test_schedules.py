"""Schedules: tables, closed forms, time <-> sigma maps, Monte Carlo checks of the forward process.

Monte Carlo tolerances are K standard errors: for n draws of a Gaussian with variance v,
se(mean) = sqrt(v / n) and se(var) = v * sqrt(2 / (n - 1)). With K = 5 a single comparison fails by
chance with probability ~6e-7; the seeds are fixed anyway, so the tests are deterministic.
"""
import math

import pytest
import torch
from scipy import integrate

from torchdiffusion.schedules import (DISCRETE_SCHEDULES, SCHEDULES, DiscreteSchedule, EDMSchedule,
                                      RectifiedFlowSchedule, VPSchedule, get_schedule, schedule_from_config)

K = 5.0  # standard errors allowed in Monte Carlo comparisons
TS = (1000, 50)
DISCRETE = [(name, T) for name in DISCRETE_SCHEDULES for T in TS]



@pytest.fixture(params=DISCRETE, ids=[f"{n}-{T}" for n, T in DISCRETE])
def disc(request):
    name, T = request.param
    return get_schedule(name, T)


# ------------------------------------------------------------------------------------ discrete tables
def test_tables_consistent(disc):
    b = disc.betas
    assert b.dtype == torch.float64 and b.shape == (disc.T,)
    assert ((b > 0) & (b <= 0.999)).all()
    ab = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(disc.alpha_bar, ab, rtol=1e-12, atol=0)
    torch.testing.assert_close(disc.sigmas, torch.sqrt((1 - ab) / ab), rtol=1e-12, atol=0)
    assert (disc.sigmas[1:] > disc.sigmas[:-1]).all()
    assert disc.sigma_min == pytest.approx(float(disc.sigmas[0]))
    assert disc.sigma_max == pytest.approx(float(disc.sigmas[-1]))


def test_log_snr(disc):
    ab = disc.alpha_bar
    lsnr = disc.log_snr(disc.sigmas)
    torch.testing.assert_close(lsnr, torch.log(ab / (1 - ab)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lsnr, -2 * torch.log(disc.sigmas), rtol=1e-12, atol=1e-12)
    assert (lsnr[1:] < lsnr[:-1]).all()  # SNR strictly decreasing in t
    idx = torch.arange(disc.T)
    torch.testing.assert_close(disc.snr(idx).log(), lsnr, rtol=1e-10, atol=1e-10)


def test_linear_endpoints():
    s = get_schedule("linear", 1000)
    assert float(s.betas[0]) == pytest.approx(1e-4, rel=1e-12)
    assert float(s.betas[-1]) == pytest.approx(0.02, rel=1e-12)
    d = s.betas[1:] - s.betas[:-1]
    torch.testing.assert_close(d, torch.full_like(d, (0.02 - 1e-4) / 999), rtol=1e-8, atol=1e-15)
    # other T: betas scaled by 1000 / T so the process is the same (Improved DDPM convention)
    s50 = get_schedule("linear", 50)
    assert float(s50.betas[0]) == pytest.approx(20 * 1e-4) and float(s50.betas[-1]) == pytest.approx(20 * 0.02)


@pytest.mark.parametrize("T", TS)
def test_cosine_closed_form(T):
    s = get_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
    expected = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=torch.float64)
    clipped = s.betas >= 0.999 - 1e-12
    assert clipped.any()                                    # the last beta is 1 before clipping
    first = int(clipped.nonzero()[0]) if clipped.any() else T
    assert first >= T - 2                                   # clipping only at the very end
    torch.testing.assert_close(s.alpha_bar[:first], expected[:first], rtol=1e-10, atol=1e-14)
    assert (s.betas <= 0.999).all()


@pytest.mark.parametrize("T", TS)
def test_sigmoid_closed_form(T):
    s = get_schedule("sigmoid", T)
    sg = lambda z: 1 / (1 + math.exp(-z))
    f = lambda t: (sg(3.0) - sg(t * 6.0 - 3.0)) / (sg(3.0) - sg(-3.0))  # RIN, start=-3, end=3, tau=1
    expected = torch.tensor([f((i + 1) / T) for i in range(T)], dtype=torch.float64)
    unclipped = s.betas < 0.999 - 1e-12
    n = int(unclipped.long().cumprod(0).sum())
    assert n >= T - 1
    torch.testing.assert_close(s.alpha_bar[:n], expected[:n], rtol=1e-9, atol=1e-14)
    assert (s.betas <= 0.999).all()


# -------------------------------------------------------------------------------- time <-> sigma maps
def test_discrete_roundtrip(disc):
    t_int = torch.arange(disc.T, dtype=torch.float64)
    torch.testing.assert_close(disc.sigma_to_t(disc.t_to_sigma(t_int)), t_int, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(disc.t_to_sigma(t_int), disc.sigmas, rtol=1e-12, atol=0)
    t_frac = torch.linspace(0, disc.T - 1, 777, dtype=torch.float64) + 0.123
    t_frac = t_frac.clamp(max=disc.T - 1)
    torch.testing.assert_close(disc.sigma_to_t(disc.t_to_sigma(t_frac)), t_frac, rtol=1e-12, atol=1e-9)
    s = torch.logspace(math.log10(disc.sigma_min), math.log10(disc.sigma_max), 501, dtype=torch.float64)
    torch.testing.assert_close(disc.t_to_sigma(disc.sigma_to_t(s)), s, rtol=1e-9, atol=0)
    # table sigmas map to exactly their index
    torch.testing.assert_close(disc.sigma_to_t(disc.sigmas), t_int, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "edm", "rf"])
def test_continuous_roundtrip(name):
    s = get_schedule(name)
    lo, hi = s.t_range
    t = torch.linspace(lo, hi, 513, dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)).double(), t, rtol=1e-9, atol=1e-12)
    sig = torch.logspace(math.log10(s.sigma_min), math.log10(s.sigma_max), 513, dtype=torch.float64)
    torch.testing.assert_close(s.t_to_sigma(s.sigma_to_t(sig)), sig, rtol=1e-9, atol=0)
    # rel 1e-6, not 1e-9: VPSchedule derives sigma_min from float32 eps_t (relative error ~3e-8)
    assert float(s.t_to_sigma(torch.tensor(lo, dtype=torch.float64))) == pytest.approx(s.sigma_min, rel=1e-6)
    assert float(s.t_to_sigma(torch.tensor(hi, dtype=torch.float64))) == pytest.approx(s.sigma_max, rel=1e-6)


def test_vp_alpha_bar_formula():
    s = VPSchedule(beta_min=0.1, beta_max=20.0)
    beta = lambda u: 0.1 + u * (20.0 - 0.1)
    for t in (1e-3, 0.05, 0.3, 0.7, 1.0):
        integral, _ = integrate.quad(beta, 0, t)            # alpha_bar(t) = exp(-int_0^t beta(u) du)
        ab = math.exp(-integral)
        sigma = float(s.t_to_sigma(torch.tensor(t, dtype=torch.float64)))
        assert 1 / (1 + sigma**2) == pytest.approx(ab, rel=1e-10)
    # net time is 1000 t
    sig = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(s.net_time(sig), 1000 * s.sigma_to_t(sig))


def test_rf_and_edm_maps():
    rf = RectifiedFlowSchedule()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(rf.t_to_sigma(t), t / (1 - t))  # x_t/(1-t) = x0 + t/(1-t) n
    torch.testing.assert_close(rf.input_scale(rf.t_to_sigma(t)), 1 - t)
    edm = EDMSchedule()
    sig = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(edm.net_time(sig), sig.log() / 4)
    torch.testing.assert_close(edm.input_scale(sig), 1 / torch.sqrt(sig**2 + 0.25))


# --------------------------------------------------------------------- forward process, Monte Carlo
@pytest.mark.parametrize("name,T", DISCRETE, ids=[f"{n}-{T}" for n, T in DISCRETE])
def test_q_sample_matches_chained_q_step(name, T):
    s = get_schedule(name, T)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([1.5, -0.7, 0.0, 3.0], dtype=torch.float64)
    checks = sorted({0, 1, T // 10, T // 2, T - 1})
    x = x0.expand(n, 4).clone()
    seen = 0
    for i in range(T):
        x = s.q_step(x, torch.tensor([i]), torch.randn(n, 4, generator=g, dtype=torch.float64))
        if i in checks:
            seen += 1
            ab = float(s.alpha_bar[i])
            mean, var = math.sqrt(ab) * x0, 1 - ab
            se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
            assert (x.mean(0) - mean).abs().max() < K * se_mean, (i, x.mean(0), mean)
            assert (x.var(0) - var).abs().max() < K * se_var, (i, x.var(0), var)
            # q_sample with fresh noise draws from the same closed form
            xs = s.q_sample(x0.expand(n, 4), torch.full((n,), i), torch.randn(n, 4, generator=g, dtype=torch.float64))
            assert (xs.mean(0) - mean).abs().max() < K * se_mean
            assert (xs.var(0) - var).abs().max() < K * se_var
    assert seen == len(checks)


def test_q_sample_exact_form(disc):
    x0 = torch.randn(disc.T, 3, dtype=torch.float64)
    eps = torch.randn(disc.T, 3, dtype=torch.float64)
    t = torch.arange(disc.T)
    ab = disc.alpha_bar[:, None]
    torch.testing.assert_close(disc.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_posterior_is_gaussian_bayes_update(disc):
    """q(x_{t-1} | x_t, x0) from the joint Gaussian: prior x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}),
    likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t); precisions add, means are precision-weighted."""
    T = disc.T
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(T, 5, generator=g, dtype=torch.float64)
    xt = torch.randn(T, 5, generator=g, dtype=torch.float64) * 3
    t = torch.arange(T)
    mean, var = disc.posterior(x0, xt, t)
    beta = disc.betas
    alpha = 1 - beta
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(alpha, 0)[:-1]])
    # t >= 1 (index): a proper prior
    prec = 1 / (1 - ab_prev[1:]) + alpha[1:] / beta[1:]
    v = 1 / prec
    m = v[:, None] * (ab_prev[1:, None].sqrt() * x0[1:] / (1 - ab_prev[1:, None])
                      + alpha[1:, None].sqrt() * xt[1:] / beta[1:, None])
    torch.testing.assert_close(var[1:, 0], v, rtol=1e-9, atol=0)
    torch.testing.assert_close(mean[1:], m, rtol=1e-9, atol=1e-12)
    # index 0 (DDPM t = 1): x_0 is known, the posterior is a point mass at x0
    assert float(var[0, 0]) == 0.0
    torch.testing.assert_close(mean[0], x0[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ sample_sigmas
def test_discrete_sample_sigmas_uniform_over_indices():
    s = get_schedule("cosine", 50)
    n = 100000
    sig = s.sample_sigmas(n, generator=torch.Generator().manual_seed(2))
    assert sig.shape == (n,) and sig.dtype == torch.float32
    table = s.sigmas.float()
    idx = (sig[:, None] == table[None]).float().argmax(1)
    assert torch.isin(sig, table).all()                      # only table values
    counts = torch.bincount(idx, minlength=50).double()
    p = 1 / 50
    sd = math.sqrt(n * p * (1 - p))                          # binomial count sd per index
    assert (counts - n * p).abs().max() < K * sd, counts
    # T = 1000: index mean/variance of a discrete uniform, (T-1)/2 and (T^2-1)/12
    s = get_schedule("linear", 1000)
    sig = s.sample_sigmas(n, generator=torch.Generator().manual_seed(3))
    t = s.sigma_to_t(sig.double()).round()
    var = (1000**2 - 1) / 12
    assert abs(float(t.mean()) - 499.5) < K * math.sqrt(var / n)
    assert int(t.min()) >= 0 and int(t.max()) <= 999


def test_edm_sample_sigmas_lognormal():
    s = EDMSchedule(p_mean=-1.2, p_std=1.2)
    n = 100000
    ls = s.sample_sigmas(n, generator=torch.Generator().manual_seed(4)).double().log()
    assert abs(float(ls.mean()) + 1.2) < K * 1.2 / math.sqrt(n)
    assert abs(float(ls.var()) - 1.44) < K * 1.44 * math.sqrt(2 / (n - 1))


def test_vp_rf_sample_sigmas():
    n = 100000
    vp = VPSchedule()
    sig = vp.sample_sigmas(n, generator=torch.Generator().manual_seed(5)).double()
    assert (sig >= vp.sigma_min * (1 - 1e-6)).all() and (sig <= vp.sigma_max * (1 + 1e-6)).all()
    t = vp.sigma_to_t(sig)                                    # uniform on [eps_t, 1]
    w = 1 - vp.eps_t
    assert abs(float(t.mean()) - (1 + vp.eps_t) / 2) < K * w / math.sqrt(12 * n)
    rf = RectifiedFlowSchedule(logit_mean=0.0, logit_std=1.0)
    sig = rf.sample_sigmas(n, generator=torch.Generator().manual_seed(6)).double()
    logit = torch.log(sig)                                    # logit(t) = log(t / (1 - t)) = log sigma
    assert abs(float(logit.mean())) < K / math.sqrt(n)
    assert abs(float(logit.var()) - 1) < K * math.sqrt(2 / (n - 1)) + 1e-3  # tiny clamp at t_min/t_max
    rfu = RectifiedFlowSchedule(logit_std=0.0)
    t = rfu.sigma_to_t(rfu.sample_sigmas(n, generator=torch.Generator().manual_seed(7)).double())
    assert abs(float(t.mean()) - 0.5) < K / math.sqrt(12 * n)


# ---------------------------------------------------------------------------------------- validation
def test_unknown_schedule_names_allowed_values():
    with pytest.raises(ValueError) as e:
        get_schedule("quadratic")
    for name in SCHEDULES:
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError) as e:
        DiscreteSchedule.from_name("vp")
    for name in DISCRETE_SCHEDULES:
        assert repr(name) in str(e.value)


@pytest.mark.parametrize("T", [1, 0, -5])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T must be at least 2"):
        get_schedule("linear", T)


@pytest.mark.parametrize("betas", [[0.1, 0.0, 0.2], [0.1, 1.0], [0.5, -0.1], [0.1], [[0.1, 0.2]]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule(torch.tensor(betas, dtype=torch.float64))


def test_bad_continuous_arguments():
    with pytest.raises(ValueError):
        VPSchedule(beta_min=20.0, beta_max=0.1)
    with pytest.raises(ValueError):
        EDMSchedule(sigma_min=0.0)
    with pytest.raises(ValueError):
        RectifiedFlowSchedule(t_max=1.0)
    with pytest.raises(ValueError, match="takes no option"):
        get_schedule("linear", 1000, beta_min=0.1)


@pytest.mark.parametrize("name", SCHEDULES)
def test_config_roundtrip(name):
    s = get_schedule(name, 50) if name in DISCRETE_SCHEDULES else get_schedule(name)
    s2 = schedule_from_config(s.config())
    assert s2.config() == s.config()
    assert s2.sigma_max == pytest.approx(s.sigma_max)
