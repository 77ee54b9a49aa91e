"""One contract test class that every registered sampler passes."""
import math

import pytest
import torch

from torchdiffusion.data.toy import gaussian, ring_mixture
from torchdiffusion.sampling import SAMPLERS, get_sigmas
from torchdiffusion.utils import sample_generators

# per-sampler options for the tests (cheap tolerances for the reference solve)
OPTS = {"ode_reference": {"rtol": 1e-6, "atol": 1e-6, "method": "RK45"},
        "dpm_solver_adaptive": {"rtol": 1e-3, "atol": 1e-4}}  # the paper defaults (0.05, 0.0078) are for pixels
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "euler_maruyama", "pc"}


def gaussian_consistency(m, s):
    """The exact consistency function of N(m, s^2) data with boundary at sigma = 0: the PF-ODE keeps
    (x - m) / sqrt(s^2 + sigma^2) constant, so f(x, sigma) = m + (x - m) s / sqrt(s^2 + sigma^2)."""
    return lambda x, sigma: m + (x - m) * s / (s**2 + sigma.to(x.dtype)[:, None] ** 2).sqrt()


def levels(n=12, smax=20.0, smin=0.01):
    return get_sigmas(None, sigmas=torch.linspace(math.log(smax), math.log(smin), n).exp())


def run(name, den, x, sigmas, **kw):
    if name == "meanflow":  # an ordinary denoiser ignores the level it is told it jumps to: the sampler is DDIM then
        den = (lambda d: lambda x, sigma, sigma_next: d(x, sigma))(den)
    return SAMPLERS[name](den, x, sigmas, **OPTS.get(name, {}), **kw)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
class TestSamplerContract:
    mix = ring_mixture(4, 1.0, 0.2)

    def test_shape_dtype(self, name):
        g = gaussian(0.0, 0.5, dim=6)
        x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0)) * 20
        out = run(name, g, x, levels(6), generator=torch.Generator().manual_seed(1))
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()

    def test_determinism(self, name):
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 20
        a = run(name, self.mix, x.clone(), levels(), generator=torch.Generator().manual_seed(3))
        b = run(name, self.mix, x.clone(), levels(), generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)

    def test_batch_size_independence(self, name):
        # float64 throughout: equal up to the rounding of batched matmuls; the reference solve controls its error
        # over the whole batch, so its steps (not its accuracy, rtol 1e-6) depend on the batch (measured 2.5e-7)
        tol = 1e-5 if name == "ode_reference" else 1e-10
        x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
        full = run(name, self.mix, x.clone(), levels(), generator=sample_generators(7, 5))
        for i in (0, 3):
            one = run(name, self.mix, x[i:i + 1].clone(), levels(), generator=sample_generators(7, 1, offset=i))
            torch.testing.assert_close(one[0], full[i], atol=tol, rtol=tol)

    def test_callback_once_per_step(self, name):
        seen = []
        sig = levels(7)
        run(name, self.mix, torch.randn(4, 2) * 20, sig, generator=torch.Generator().manual_seed(0),
            callback=seen.append)
        assert [d["i"] for d in seen] == list(range(len(sig) - 1))
        assert all(set(d) == {"i", "x", "sigma", "sigma_next", "denoised"} for d in seen)
        assert all(float(d["sigma"]) == float(sig[d["i"]]) for d in seen)

    def test_gaussian_std(self, name):
        std = 0.5
        g = gaussian(0.3, std, dim=4)
        n = 100 if name == "ode_reference" else 1000
        x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
        steps = 100 if name in STOCHASTIC else 40  # ancestral samplers need more steps for the right variance
        steps = 3 if name in ("ode_reference", "dpm_solver_adaptive") else steps
        den = gaussian_consistency(0.3, std) if name == "consistency" else g  # exact only with a consistency function
        out = run(name, den, x, get_sigmas(None, sigmas=torch.linspace(math.log(20), math.log(0.005), steps).exp()),
                  generator=torch.Generator().manual_seed(1))
        assert abs(out.mean().item() - 0.3) < 0.05
        assert abs(out.std(0).mean().item() / std - 1) < 0.06


def test_sigmas_not_ending_in_zero_stop_at_last_level():
    g = gaussian(0.0, 0.5, dim=2)
    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    sig = torch.tensor([10.0, 3.0, 1.0])
    for name in ("heun", "dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver_3"):
        out = SAMPLERS[name](g, x, sig)
        assert 0.9 < out.std().item() < 1.4  # near the marginal at sigma = 1 (std 1.12), not the data (0.5)


@pytest.mark.parametrize("name,opts", [("dpm_solver_adaptive", {"order": 4}), ("unipc", {"variant": "bh3"}),
                                       ("pc", {"snr": -1.0}), ("dpmpp_2m", {"final": "nope"}),
                                       ("dpmpp_2m", {"thresholding": 1.5}), ("heun", {"s_churn": -1.0}),
                                       ("dpm_solver_adaptive", {"order": 1})])
def test_bad_options_raise(name, opts):
    with pytest.raises(ValueError):
        SAMPLERS[name](gaussian(0.0, 1.0, dim=2), torch.randn(2, 2), levels(3), **opts)
