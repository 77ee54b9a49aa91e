"""Joint (x, y) Gaussian (data/joint.py): exact denoiser, Schur-complement conditionals, and both conditionals
by inpainting the known part with edit.impute (docs/conditioning.md)."""
import pytest
import torch

from torchdiffusion.data.joint import JointGaussian, random_joint_gaussian
from torchdiffusion.edit import impute
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.schedules import EDMSchedule

N_DRAWS = 3000
SAMPLER = "heun"  # 40 Heun steps sample these Gaussians to about 3 % in variance (DDPM at 40: 20 % under)
SIGMAS = get_sigmas(EDMSchedule(sigma_min=0.002, sigma_max=80.0), 40, "karras").double()


def test_denoiser_is_the_wiener_filter():
    """E[z0 | z] = mu + C (C + sigma^2 I)^-1 (z - mu), computed here by a linear solve instead of the
    eigenbasis, at three noise levels per sample."""
    j = random_joint_gaussian(2, 3, seed=1)
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    sigma = torch.tensor([0.01, 0.5, 3.0, 0.01, 0.5, 3.0], dtype=torch.float64)
    for i in range(6):
        a = j.cov + sigma[i] ** 2 * torch.eye(5, dtype=torch.float64)
        want = j.mean + j.cov @ torch.linalg.solve(a, z[i] - j.mean)
        torch.testing.assert_close(j(z[i:i + 1], sigma[i:i + 1])[0], want, rtol=1e-10, atol=1e-10)


def test_conditional_is_the_regression_of_joint_draws():
    """The Schur complement against Monte Carlo: least squares of the free part on the known part over
    200 000 joint draws gives the gain C_fk C_kk^-1 and the residual covariance C_ff - C_fk C_kk^-1 C_kf,
    within 5 standard errors (about 1/sqrt(n) relative at this n)."""
    j = random_joint_gaussian(2, 2, seed=0)
    z = j.sample(200_000, generator=torch.Generator().manual_seed(2))
    for given, (k, f) in {"x": (slice(0, 2), slice(2, 4)), "y": (slice(2, 4), slice(0, 2))}.items():
        design = torch.cat([torch.ones(len(z), 1, dtype=torch.float64), z[:, k]], 1)
        coef = torch.linalg.lstsq(design, z[:, f]).solution               # (3, 2)
        resid = z[:, f] - design @ coef
        mean, cov = j.conditional(z[:3], given)
        mc_tol = 5 * 3 / 200_000 ** 0.5 * 4  # 5 standard errors of a least-squares prediction at this n
        assert (design[:3] @ coef - mean).abs().max() <= mc_tol
        torch.testing.assert_close(torch.cov(resid.T), cov, rtol=5 / 200_000 ** 0.5 * 3, atol=0.01)


def _inpainted(j, given, value, **opts):
    out = impute(j, value, j.mask(given), SIGMAS, samples=N_DRAWS, seed=0, sampler=SAMPLER,
                 batch_size=N_DRAWS, **opts)[:, 0]                       # (S, D)
    return out, j.mask(given)[0] == 0


@pytest.mark.parametrize("given", ["x", "y"])
def test_inpainting_is_exact_when_the_parts_are_independent(given):
    """Block-diagonal C: the denoiser of the free part depends on the free part alone, so replacement
    inpainting samples its marginal exactly: mean within 4 standard errors, covariance within 15 % (the
    standard error of a variance at 3000 draws is 2.6 %), and the known part equals the given value bitwise."""
    cov = torch.block_diag(torch.tensor([[1.0, 0.6], [0.6, 0.8]]), torch.tensor([[0.5, -0.2], [-0.2, 0.3]]))
    j = JointGaussian(torch.tensor([0.5, -1.0, 2.0, 0.0]), cov.double(), 2)
    value = torch.tensor([[1.5, 0.3, -0.7, 0.9]], dtype=torch.float64)
    out, free = _inpainted(j, given, value)
    mean, c = j.conditional(value, given)
    assert torch.equal(out[:, ~free], value[:, ~free].expand(N_DRAWS, -1))
    se = (c.diagonal() / N_DRAWS).sqrt()
    assert ((out[:, free].mean(0) - mean[0]).abs() < 4 * se).all()
    torch.testing.assert_close(torch.cov(out[:, free].T), c, rtol=0.15, atol=0.02)


@pytest.mark.parametrize("given", ["x", "y"])
def test_replacement_is_not_the_exact_conditional_of_correlated_parts(given):
    """The measured limitation of replacement (docs/conditioning.md): with correlated parts the free part's
    mean misses the Schur-complement mean by more than 8 standard errors on some coordinate (the denoiser sees
    the known part through fresh noise, sigma n, not the value itself); the known part is still exact."""
    j = random_joint_gaussian(2, 2, seed=0)
    value = j.sample(1, generator=torch.Generator().manual_seed(1))
    out, free = _inpainted(j, given, value)
    mean, c = j.conditional(value, given)
    assert torch.equal(out[:, ~free], value[:, ~free].expand(N_DRAWS, -1))
    se = (c.diagonal() / N_DRAWS).sqrt()
    assert ((out[:, free].mean(0) - mean[0]).abs() > 8 * se).any()
