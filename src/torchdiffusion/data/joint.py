"""A joint Gaussian over concatenated (x, y) with its exact denoiser and exact conditionals (docs/conditioning.md).

For z = (x, y) ~ N(mu, C), C = U diag(l) U^T, the noised marginal is N(mu, C + sigma^2 I) and the optimal
denoiser is E[z0 | z] = mu + C (C + sigma^2 I)^-1 (z - mu) = mu + U diag(l / (l + sigma^2)) U^T (z - mu)
(Tweedie; the Wiener filter). The conditionals are Gaussian with the Schur complement:
y | x = a ~ N(mu_y + C_yx C_xx^-1 (a - mu_x), C_yy - C_yx C_xx^-1 C_xy), and x | y alike. One model of (x, y)
gives both p(y | x) and p(x | y) by inpainting the known part (:func:`torchdiffusion.edit.impute` with
:meth:`JointGaussian.mask`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..utils import check_choice, randn

PARTS = ("x", "y")  # which block is known when conditioning


class JointGaussian(nn.Module):
    """N(mean, cov) over z = (x, y) with x the first `x_dim` coordinates; calling it is the exact denoiser."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, x_dim: int):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.shape[0]
        if cov.shape != (d, d) or not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError(f"cov must be a symmetric ({d}, {d}) matrix, got shape {tuple(cov.shape)}")
        if not 0 < x_dim < d:
            raise ValueError(f"x_dim must split the {d} coordinates into two non-empty parts, got {x_dim}")
        evals, evecs = torch.linalg.eigh(cov)
        if evals.min() <= 0:
            raise ValueError(f"cov must be positive definite (smallest eigenvalue {float(evals.min()):.3g})")
        self.x_dim = x_dim
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        self.register_buffer("evals", evals)  # (D,)
        self.register_buffer("evecs", evecs)  # (D, D), columns are eigenvectors

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def sample(self, n: int, *, generator=None) -> torch.Tensor:
        """n draws of (x, y), float64 (n, D)."""
        z = randn((n, self.dim), generator=generator, dtype=torch.float64)
        return self.mean + (z * self.evals.sqrt()) @ self.evecs.T

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        """Exact denoiser E[z0 | z_sigma = z] = mu + U diag(l / (l + sigma^2)) U^T (z - mu), sigma (N,)."""
        s2 = sigma.to(torch.float64).reshape(-1, 1) ** 2                 # (N, 1)
        proj = (z.to(torch.float64) - self.mean) @ self.evecs            # (N, D) in the eigenbasis
        out = self.mean + (proj * self.evals / (self.evals + s2)) @ self.evecs.T
        return out.to(z.dtype)

    def _blocks(self, given: str):
        check_choice("given (the known part)", given, PARTS)
        k = torch.arange(self.dim) < self.x_dim
        known, free = (k, ~k) if given == "x" else (~k, k)
        return known, free

    def mask(self, given: str) -> torch.Tensor:
        """The inpainting mask (1, D): 1 on the known part ('x' or 'y'), 0 on the part to draw."""
        return self._blocks(given)[0].to(torch.float64)[None]

    def conditional(self, values: torch.Tensor, given: str):
        """Exact conditional of the free part given the known one (Schur complement): the means (N, d_free) for
        the known values taken from `values` (N, D) (the free entries are ignored) and the covariance
        (d_free, d_free), the same for every sample."""
        known, free = self._blocks(given)
        c = self.cov
        gain = torch.linalg.solve(c[known][:, known], c[known][:, free]).T  # C_fk C_kk^-1, (d_free, d_known)
        v = values.to(torch.float64)
        mean = self.mean[free] + (v[:, known] - self.mean[known]) @ gain.T
        cov = c[free][:, free] - gain @ c[known][:, free]
        return mean, cov


def random_joint_gaussian(x_dim: int = 2, y_dim: int = 2, *, seed: int = 0, scale: float = 1.0) -> JointGaussian:
    """A joint Gaussian with a random correlated covariance C = A A^T / D + 0.1 I (A standard normal) and a
    random mean, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    d = x_dim + y_dim
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = scale**2 * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
    return JointGaussian(torch.randn(d, generator=g, dtype=torch.float64) * scale, cov, x_dim)
