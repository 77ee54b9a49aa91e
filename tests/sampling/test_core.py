"""First-order samplers (DDPM, DDIM, Euler) against closed forms on Gaussian data N(m, s^2 I).

For Gaussian data the exact denoiser is linear, D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m), so each
sampler is a linear map (plus Gaussian noise) and the law of its output is known in closed form. Monte Carlo
tolerances are K = 5 standard errors: se(mean) = sd / sqrt(n), se(sd) ~= sd / sqrt(2 (n - 1)), with n the
number of pooled scalar values; seeds are fixed so the tests are deterministic.
"""
import math

import pytest
import torch

from torchdiffusion.data.toy import GaussianMixture, gaussian
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.sampling.core import (ddim_step, ddpm_step, euler_step, expand_sigma, posterior_variance,
                                          sample_ddim, sample_ddpm, sample_euler, to_d)
from torchdiffusion.sampling.sigmas import OPTIMIZED_RAMPS, SPACINGS
from torchdiffusion.schedules import DISCRETE_SCHEDULES, get_schedule
from torchdiffusion.utils import randn, sample_generators

K = 5.0
M, S, DIM, N = 1.5, 1.0, 4, 20000   # data N(M, S^2 I) in DIM dims, N samples -> 80000 pooled values
NV = N * DIM
SE_MEAN = S / math.sqrt(NV)          # 0.0035: 2% of M (0.03) is 8.5 se
SE_SD = S / math.sqrt(2 * (NV - 1))  # 0.0025: 2% of S (0.02) is 8 se



@pytest.fixture(scope="module")
def linear():
    return get_schedule("linear", 1000)


def data():
    return gaussian(M, S, DIM)


def start(sigmas, n=N, seed=0, dtype=torch.float64):
    """x_T drawn from the exact noised marginal N(M, S^2 + sigma_max^2)."""
    return data().sample(n, sigma=float(sigmas[0]), generator=torch.Generator().manual_seed(seed)).to(dtype)


def ddpm_output_variance(sigmas, var0, variance):
    """Closed-form output variance of sample_ddpm on N(M, S^2): y' = c y + sqrt(v) z, Var' = c^2 Var + v."""
    V = var0
    s2 = S**2
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        shrink = s2 / (s2 + a * a)                      # D - m = shrink * y
        c = shrink + (b * b / (a * a)) * (1 - shrink)   # mean = D + (b^2/a^2)(x - D)
        if b == 0:
            v = 0.0
        elif variance == "small":
            v = b * b * (a * a - b * b) / (a * a)
        else:
            v = (a * a - b * b) * (1 + b * b) / (1 + a * a)
        V = c * c * V + v
    return V


def ddim_factor(sigmas):
    """DDIM (eta = 0) on N(M, S^2) is y' = y (S^2 + sigma sigma') / (S^2 + sigma^2); the product over steps."""
    P = 1.0
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        P *= (S**2 + a * b) / (S**2 + a * a)
    return P


# -------------------------------------------------------------------------------- the exact denoiser
def test_gaussian_denoiser_closed_form_and_tweedie():
    gm = data()
    x = torch.randn(7, DIM, dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0], dtype=torch.float64)
    s2 = (S**2 / (S**2 + sigma**2))[:, None]
    torch.testing.assert_close(gm(x, sigma), M + s2 * (x - M), rtol=1e-12, atol=1e-12)
    # Tweedie on a mixture: E[x0 | x] = x + sigma^2 grad log p_sigma(x), gradient by autograd
    mix = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, 2.0]]), [0.3, 0.5, 0.2], [0.2, 0.5, 0.3])
    xm = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(mix.log_prob(xm, sigma).sum(), xm)
    torch.testing.assert_close(mix(xm.detach(), sigma), xm.detach() + sigma[:, None] ** 2 * grad,
                               rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------ get_sigmas
@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "edm", "rf"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 10, 37])
def test_get_sigmas_shape_and_order(name, spacing, steps):
    sch = get_schedule(name, 1000) if name in DISCRETE_SCHEDULES else get_schedule(name)
    if spacing == "optimized" and steps == 1:  # a ramp needs two ends
        with pytest.raises(ValueError, match="at least 2 steps"):
            get_sigmas(sch, steps, spacing)
        steps = sorted(OPTIMIZED_RAMPS)[0]
    if spacing in ("leading", "trailing") and name not in DISCRETE_SCHEDULES:
        with pytest.raises(ValueError, match="discrete schedule"):
            get_sigmas(sch, steps, spacing)
        return
    s = get_sigmas(sch, steps, spacing)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32
    assert float(s[-1]) == 0.0
    assert (s[1:] < s[:-1]).all()
    assert float(s[0]) <= sch.sigma_max * (1 + 1e-6)
    assert float(s[-2]) >= sch.sigma_min * (1 - 1e-6)
    if spacing in ("uniform", "karras", "logsnr", "quadratic") and steps > 1:
        assert float(s[0]) == pytest.approx(sch.sigma_max, rel=1e-5)
        assert float(s[-2]) == pytest.approx(sch.sigma_min, rel=1e-5)


def test_leading_trailing_match_ddim_definitions(linear):
    lead = get_sigmas(linear, 10, "leading")
    t_lead = torch.tensor([900, 800, 700, 600, 500, 400, 300, 200, 100, 0])   # diffusers 'leading'
    torch.testing.assert_close(lead[:-1], linear.sigmas[t_lead].float())
    trail = get_sigmas(linear, 10, "trailing")
    t_trail = torch.tensor([999, 899, 799, 699, 599, 499, 399, 299, 199, 99])  # diffusers 'trailing'
    torch.testing.assert_close(trail[:-1], linear.sigmas[t_trail].float())
    off = get_sigmas(linear, 10, "leading", offset=1)                          # steps_offset = 1 (SD)
    torch.testing.assert_close(off[:-1], linear.sigmas[t_lead + 1].float())
    full = get_sigmas(linear, 1000, "leading")                                 # all 1000 levels
    torch.testing.assert_close(full[:-1], linear.sigmas.flip(0).float())


def test_uniform_and_quadratic_spacing_in_time(linear):
    t = linear.sigma_to_t(get_sigmas(linear, 11, "uniform")[:-1].double())
    torch.testing.assert_close(t, torch.linspace(999, 0, 11, dtype=torch.float64), rtol=1e-6, atol=1e-3)
    tq = linear.sigma_to_t(get_sigmas(linear, 11, "quadratic")[:-1].double())
    torch.testing.assert_close(tq.sqrt(), torch.linspace(999**0.5, 0, 11, dtype=torch.float64), rtol=1e-6, atol=1e-3)
    ls = get_sigmas(linear, 11, "logsnr")[:-1].double().log()
    d = ls[1:] - ls[:-1]
    torch.testing.assert_close(d, d.mean().expand(10), rtol=1e-5, atol=1e-6)  # float32 sigmas: ~1e-7 in log


def test_explicit_sigmas_validated(linear):
    s = get_sigmas(linear, sigmas=[10.0, 1.0, 0.1])
    torch.testing.assert_close(s, torch.tensor([10.0, 1.0, 0.1, 0.0]))
    assert torch.equal(get_sigmas(linear, sigmas=[3.0, 0.0]), torch.tensor([3.0, 0.0]))
    for bad in ([1.0, 2.0], [1.0, 1.0, 0.0], [2.0, -1.0], []):
        with pytest.raises(ValueError):
            get_sigmas(linear, sigmas=bad)
    with pytest.raises(ValueError):
        get_sigmas(linear, 0)
    with pytest.raises(ValueError):
        get_sigmas(linear, 1001, "leading")
    with pytest.raises(ValueError) as e:
        get_sigmas(linear, 10, "cosine")
    assert "'karras'" in str(e.value)


# ---------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_1000_steps_matches_gaussian(linear, variance):
    sig = get_sigmas(linear, 1000, "leading")
    assert len(sig) == 1001
    x = start(sig, dtype=torch.float32)          # float32 halves the cost; statistics are computed in float64
    out = sample_ddpm(data(), x, sig, generator=torch.Generator().manual_seed(1), variance=variance).double()
    mean, sd = float(out.mean()), float(out.std())
    # closed-form law of the sampler's output, then the sample against it
    sd_pred = math.sqrt(ddpm_output_variance(sig.double(), S**2 + float(sig[0]) ** 2, variance))
    assert abs(sd_pred / S - 1) < 0.005                 # the discretization is fine at 1000 steps
    assert abs(mean - M) < K * SE_MEAN
    assert abs(sd - sd_pred) < K * SE_SD
    assert abs(mean - M) < 0.02 * M and abs(sd - S) < 0.02 * S


def test_ddpm_equals_vp_posterior_iteration():
    """sample_ddpm on all T levels is DDPM's Algorithm 2: iterate q(x_{t-1} | x_t, x0 = D) in VP coordinates."""
    sch = get_schedule("cosine", 1000)
    den = GaussianMixture(torch.tensor([[-1.0, 0.5, 0.0], [1.0, -0.5, 2.0]]), [0.3, 0.6])
    sig = torch.cat([sch.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])   # all T levels, float64
    n = 64
    x_ve = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    out = sample_ddpm(den, x_ve.clone(), sig, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    T = sch.T
    x_vp = sch.alpha_bar[-1].sqrt() * x_ve
    for t in range(T - 1, -1, -1):
        ab = sch.alpha_bar[t]
        D = den(x_vp / ab.sqrt(), expand_sigma(sch.sigmas[t], x_vp))
        mean, var = sch.posterior(D, x_vp, torch.full((n,), t))
        if t > 0:
            x_vp = mean + var.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
        else:
            x_vp = mean                                   # alpha_bar_prev = 1: x_0 itself
    torch.testing.assert_close(out, x_vp, rtol=1e-6, atol=1e-6)


def test_ddpm_per_sample_generators_batch_independent(linear):
    sig = get_sigmas(linear, 20, "trailing")
    den = data()
    gens = sample_generators(11, 3)
    x = randn((3, DIM), generator=gens, dtype=torch.float64) * sig[0]
    out = sample_ddpm(den, x, sig, generator=gens)
    for i in range(3):
        g1 = sample_generators(11, 1, offset=i)
        xi = randn((1, DIM), generator=g1, dtype=torch.float64) * sig[0]
        oi = sample_ddpm(den, xi, sig, generator=g1)
        torch.testing.assert_close(oi[0], out[i], rtol=1e-12, atol=1e-12)
    # and it is random: another seed gives another output
    gens2 = sample_generators(12, 3)
    assert not torch.allclose(sample_ddpm(den, x, sig, generator=gens2), out)


def test_ddpm_bad_variance(linear):
    with pytest.raises(ValueError, match="'small'"):
        sample_ddpm(data(), torch.zeros(2, DIM), get_sigmas(linear, 3), variance="fixed")


# ---------------------------------------------------------------------------------------- DDIM
def test_ddim_eta0_deterministic_and_linear(linear):
    sig = get_sigmas(linear, 50, "uniform")
    x = start(sig, n=4000)
    a = sample_ddim(data(), x.clone(), sig)
    b = sample_ddim(data(), x.clone(), sig)
    assert torch.equal(a, b)                       # no generator needed, same input -> same output
    P = ddim_factor(sig.double())
    torch.testing.assert_close(a - M, P * (x - M), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("steps,bias", [(50, 0.0366), (100, 0.0183)])
def test_ddim_uniform_bias_closed_form(linear, steps, bias):
    """DDIM's first-order error on unit-variance data: the output std is P sqrt(S^2 + sigma_max^2) < S."""
    sig = get_sigmas(linear, steps, "uniform")
    x = start(sig)
    out = sample_ddim(data(), x, sig)
    sd_pred = ddim_factor(sig.double()) * math.sqrt(S**2 + float(sig[0]) ** 2)
    assert 1 - sd_pred / S == pytest.approx(bias, abs=5e-4)   # 3.7% at 50 steps, 1.8% at 100
    # the sampler is exactly this linear map, so its sample std is P times the input's, to float precision
    assert float((out - M).std()) == pytest.approx(ddim_factor(sig.double()) * float((x - M).std()), rel=1e-4)
    assert abs(float(out.mean()) - M) < K * SE_MEAN
    assert abs(float(out.std()) - sd_pred) < K * SE_SD
    if steps == 100:
        # matches the data within 2%: mean directly (8.5 se), sd via the closed form (1.83% bias) + sampling
        assert abs(float(out.mean()) - M) < 0.02 * M
        assert sd_pred > 0.98 * S


def test_ddim_eta1_equals_ddpm_step():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, DIM, generator=g, dtype=torch.float64) * 5
    D = torch.randn(16, DIM, generator=g, dtype=torch.float64)
    z = torch.randn(16, DIM, generator=g, dtype=torch.float64)
    for a, b in [(5.0, 4.0), (80.0, 0.3), (0.05, 0.01)]:
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        torch.testing.assert_close(ddim_step(x, D, a, b, z, eta=1.0), ddpm_step(x, D, a, b, z, "small"),
                                   rtol=1e-12, atol=1e-12)
        # eta = 0: the noise is ignored, and the step is Euler on the PF-ODE in VE coordinates
        torch.testing.assert_close(ddim_step(x, D, a, b, None, eta=0.0), euler_step(x, D, a, b),
                                   rtol=1e-12, atol=1e-12)
    zero = torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(ddim_step(x, D, torch.tensor(2.0), zero, z, eta=1.0), D)
    torch.testing.assert_close(ddpm_step(x, D, torch.tensor(2.0), zero, z), D)


@pytest.mark.parametrize("name", DISCRETE_SCHEDULES)
def test_ve_variances_equal_vp_tables(name):
    """Two implementations: VE posterior variance s^2 (t^2 - s^2) / t^2 is DDPM's beta-tilde / alpha_bar_{t-1};
    the 'large' variance is beta_t / alpha_bar_{t-1}."""
    sch = get_schedule(name, 1000)
    st, sp = sch.sigmas[1:], sch.sigmas[:-1]
    torch.testing.assert_close(posterior_variance(st, sp), sch.posterior_variance[1:] / sch.alpha_bar[:-1],
                               rtol=1e-8, atol=0)
    D = torch.zeros(999, 1, dtype=torch.float64)
    z = torch.ones(999, 1, dtype=torch.float64)
    # with x = D and unit noise, ddpm_step returns the standard deviation it adds
    large = torch.stack([ddpm_step(D[i], D[i], st[i], sp[i], z[i], "large") for i in range(0, 999, 37)]).flatten()
    torch.testing.assert_close(large**2, (sch.betas[1:] / sch.alpha_bar[:-1])[::37], rtol=1e-8, atol=0)


def test_ddim_eta1_sampler_equals_ddpm_sampler(linear):
    sig = get_sigmas(linear, 25, "trailing").double()   # float64 levels: the two formulas agree to rounding
    x = start(sig, n=200)
    a = sample_ddim(data(), x.clone(), sig, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(data(), x.clone(), sig, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        sample_ddim(data(), x, sig, eta=-0.5)


# ---------------------------------------------------------------------------------------- Euler
def test_euler_sampler_equals_ddim_eta0(linear):
    sig = get_sigmas(linear, 30, "karras")
    x = start(sig, n=200)
    torch.testing.assert_close(sample_euler(data(), x.clone(), sig), sample_ddim(data(), x.clone(), sig),
                               rtol=1e-9, atol=1e-9)
    y = torch.tensor([[3.0]])
    torch.testing.assert_close(to_d(y, torch.tensor(2.0), torch.tensor([[1.0]])), torch.tensor([[1.0]]))


def test_callback_reports_every_step(linear):
    sig = get_sigmas(linear, 5, "uniform")
    seen = []
    sample_ddim(data(), start(sig, n=3), sig, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert all(float(d["sigma"]) > float(d["sigma_next"]) for d in seen)


@pytest.mark.parametrize("field,value", [("guidance_scale", float("nan")), ("guidance_scale", float("inf")),
                                         ("guidance_sigma_min", float("nan")), ("sr_aug_sigma", float("-inf"))])
def test_generate_refuses_nonfinite_numbers_from_python(field, value):
    """The Python front door refuses what the CLI refuses: a NaN guidance scale would otherwise draw NaN images."""
    from torchdiffusion.guidance import guide
    from torchdiffusion.sampling import generate
    den = data()  # the exact denoiser
    with pytest.raises(ValueError, match=f"sample.{field} must be a finite number"):
        generate(den, (DIM,), n=2, steps=2, **{field: value})
    with pytest.raises(ValueError, match="guidance scale must be a finite number"):
        guide(den, "cfg", float("nan"))
