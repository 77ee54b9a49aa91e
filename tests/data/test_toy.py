"""Gaussian mixtures (exact denoiser, score, log-density, sampling) and the 2-D toy sets."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from torchdiffusion.data import TOY_DATASETS, GaussianMixture, ToyDataset, gaussian, make_dataset, make_toy
from torchdiffusion.data.toy import random_mixture, ring_mixture


def _two_component():
    return GaussianMixture(torch.tensor([[-1.0, 0.5], [2.0, -0.3]]), [0.3, 0.8], [0.3, 0.7])


def _numpy_posterior_mean(means, stds, weights, x, sigma):
    """E[x0 | x] for sum_k w_k N(mu_k, s_k^2 I) observed through x = x0 + sigma n, computed independently."""
    out = np.zeros_like(x)
    for i, xi in enumerate(x):
        logw = np.array([math.log(w) + stats.multivariate_normal(m, (s**2 + sigma**2) * np.eye(len(m))).logpdf(xi)
                         for m, s, w in zip(means, stds, weights)])
        r = np.exp(logw - logsumexp(logw))
        post = [m + s**2 / (s**2 + sigma**2) * (xi - m) for m, s in zip(means, stds)]
        out[i] = sum(rk * pk for rk, pk in zip(r, post))
    return out


@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 7.0])
def test_single_gaussian_denoiser_closed_form(sigma):
    m, s = torch.tensor([0.7, -1.2, 3.0]), 0.4
    gm = gaussian(m, s)
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    expected = m.double() + s**2 / (s**2 + sigma**2) * (x - m.double())
    torch.testing.assert_close(gm(x, torch.tensor(sigma, dtype=torch.float64)), expected, rtol=1e-10, atol=1e-12)
    # log-density of the noised marginal N(m, (s^2 + sigma^2) I)
    ref = stats.multivariate_normal(m.numpy(), (s**2 + sigma**2) * np.eye(3)).logpdf(x.numpy())
    np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), ref, rtol=1e-10)


def test_scalar_mean_needs_dim():
    assert gaussian(0.5, 1.0, dim=4).means.shape == (1, 4)
    with pytest.raises(ValueError, match="dim"):
        gaussian(0.5, 1.0)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0])
def test_two_component_denoiser_matches_numpy(sigma):
    gm = _two_component()
    x = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    ref = _numpy_posterior_mean(gm.means.numpy(), gm.stds.numpy(), gm.weights.numpy(), x.numpy(), sigma)
    np.testing.assert_allclose(gm(x, sigma).numpy(), ref, rtol=1e-9, atol=1e-10)
    # float32 input gives float32 output, same values to float precision
    out32 = gm(x.float(), torch.full((40,), sigma))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_per_sample_sigma_shapes():
    gm = _two_component()
    x = torch.randn(5, 2, dtype=torch.float64)
    sig = torch.linspace(0.1, 2.0, 5, dtype=torch.float64)
    a = gm(x, sig)
    b = gm(x, sig.view(5, 1))
    c = torch.stack([gm(x[i:i + 1], float(sig[i]))[0] for i in range(5)])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="sigma"):
        gm(x, torch.ones(3))


def test_class_conditional_denoiser_is_one_component():
    gm = _two_component()
    x = torch.randn(10, 2, dtype=torch.float64)
    for k in range(2):
        single = GaussianMixture(gm.means[k:k + 1], gm.stds[k:k + 1])
        torch.testing.assert_close(gm(x, 0.7, class_labels=torch.full((10,), k)), single(x, 0.7))


@pytest.mark.parametrize("sigma", [0.1, 0.6, 3.0])
def test_score_is_gradient_of_log_prob(sigma):
    for gm in (_two_component(), random_mixture(dim=5, n_modes=4, seed=3)):
        x = (torch.randn(16, gm.dim, dtype=torch.float64) * 1.5).requires_grad_(True)
        (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), sigma), grad, rtol=1e-7, atol=1e-9)


def test_log_prob_normalised_in_2d():
    gm = _two_component()
    g = torch.linspace(-8, 8, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    area = (g[1] - g[0]) ** 2
    assert abs(float(gm.log_prob(pts, 0.2).exp().sum() * area) - 1.0) < 1e-4


def _check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, k: float = 5.0):
    """Sample mean and covariance within k standard errors (estimated from the sample itself)."""
    x = x.double()
    n = x.shape[0]
    d = x - x.mean(0)
    se_mean = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() <= k * se_mean).all(), (x.mean(0), mean)
    prods = d[:, :, None] * d[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert ((prods.mean(0) - cov).abs() <= k * se_cov + 1e-12).all(), (prods.mean(0), cov)


def test_sample_mean_and_covariance():
    gm = _two_component()
    x = gm.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (100_000, 2) and x.dtype == torch.float32
    _check_moments(x, gm.mean, gm.covariance())


def test_sample_component_frequencies():
    gm = GaussianMixture(torch.zeros(3, 1), [1.0], [0.2, 0.5, 0.3])
    n = 50_000
    _, k = gm.sample(n, generator=torch.Generator().manual_seed(2), return_labels=True)
    freq = torch.bincount(k, minlength=3).double() / n
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert ((freq - gm.weights).abs() <= 5 * se).all()


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_noised_sample_matches_marginal(sigma):
    gm = _two_component()
    x = gm.sample(100_000, generator=torch.Generator().manual_seed(1), sigma=sigma)
    _check_moments(x, gm.mean, gm.covariance() + sigma**2 * torch.eye(2, dtype=torch.float64))
    # one component: the noised sample is N(m, s^2 + sigma^2), which is what log_prob(., sigma) describes
    one = gaussian(torch.tensor([1.0, -2.0]), 0.3)
    y = one.sample(100_000, generator=torch.Generator().manual_seed(2), sigma=sigma).double()
    var = 0.3**2 + sigma**2
    _check_moments(y, one.mean, var * torch.eye(2, dtype=torch.float64))
    pts = torch.tensor([[1.0, -2.0], [2.0, 0.0]], dtype=torch.float64)
    ref = stats.multivariate_normal([1.0, -2.0], var * np.eye(2)).logpdf(pts.numpy())
    np.testing.assert_allclose(one.log_prob(pts, sigma).numpy(), ref, rtol=1e-10)


def test_sample_is_deterministic_with_generator():
    gm = ring_mixture()
    a = gm.sample(100, generator=torch.Generator().manual_seed(5))
    b = gm.sample(100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mixture_validation():
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture(torch.zeros(3), [1.0])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), [1.0], [1.0, -1.0])
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(2, 2), [1.0], [1.0, 1.0, 1.0])


def test_random_mixture_reproducible():
    a, b, c = random_mixture(8, 4, seed=1), random_mixture(8, 4, seed=1), random_mixture(8, 4, seed=2)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.means, c.means)
    assert a.means.shape == (4, 8) and abs(float(a.weights.sum()) - 1) < 1e-12


def test_ring_mixture_geometry():
    gm = ring_mixture(6, radius=2.0, std=0.1)
    torch.testing.assert_close(gm.means.norm(dim=1), torch.full((6,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(gm.mean, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_make_toy_shape_determinism_scale(name):
    x = make_toy(name, 20_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, make_toy(name, 20_000, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(x, make_toy(name, 20_000, generator=torch.Generator().manual_seed(1)))
    assert (x.mean(0).abs() < 0.5).all(), x.mean(0)
    std = x.std(0)
    assert ((std > 0.5) & (std < 2.0)).all(), std


def test_toy_shapes_of_the_sets():
    g = torch.Generator().manual_seed(0)
    cb = make_toy("checkerboard", 5000, generator=g).double()
    assert ((torch.floor(cb[:, 0]) + torch.floor(cb[:, 1])) % 2 == 0).all()
    assert cb.abs().max() <= 2.0
    ring = make_toy("8gaussians", 5000, generator=g).double()
    modes = ring_mixture(8, radius=math.sqrt(2)).means
    assert torch.cdist(ring, modes).min(1).values.max() < 0.6
    with pytest.raises(ValueError, match="moons"):
        make_toy("spiral", 10)


def test_toy_dataset_batch_api():
    ds = make_dataset("moons", subset=500, seed=3)
    assert isinstance(ds, ToyDataset) and len(ds) == 500 and ds.sample_shape == (2,)
    assert ds.labels is None and ds.num_classes == 0
    x, y = ds.batch([0, 5, 7])
    assert x.shape == (3, 2) and x.dtype == torch.float32 and y is None
    assert torch.equal(ds.data, make_dataset("moons", subset=500, seed=3).data)
    assert not torch.equal(ds.data, make_dataset("moons", "test", subset=500, seed=3).data)
    assert len(make_dataset("swissroll")) == 10_000
    with pytest.raises(ValueError, match="flip"):
        ds.batch([0], flip=True)


def test_score_float32_matches_float64_at_small_sigma():
    gm = _two_component()
    x = gm.sample(256, generator=torch.Generator().manual_seed(4), sigma=1e-3)
    s32 = gm.score(x, 1e-3)
    s64 = gm.score(x.double(), 1e-3)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-5, atol=1e-2)
