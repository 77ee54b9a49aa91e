"""2-D toy data sets and Gaussian mixtures with an exact denoiser.

A mixture sum_k w_k N(mu_k, s_k^2 I) noised to level sigma (x = x0 + sigma n) is again a mixture,
sum_k w_k N(mu_k, (s_k^2 + sigma^2) I), so its score, log-density and optimal denoiser E[x0 | x] are all in
closed form (Tweedie): E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)) with
responsibilities r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..utils import append_dims, check_choice, rand, randn

TOY_DATASETS = ("moons", "swissroll", "8gaussians", "checkerboard", "ring")


def _per_sample(sigma, n: int) -> torch.Tensor:
    """A float, a 0-d tensor, or n values (e.g. (n,) or (n, 1, 1, 1)) -> a (n,) tensor."""
    s = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    if s.ndim > 0 and s.numel() == n:
        return s.reshape(n)
    if s.numel() != 1:
        raise ValueError(f"sigma must be a scalar or have {n} values, got shape {tuple(s.shape)}")
    return s.reshape(()).expand(n)


class GaussianMixture(nn.Module):
    """Isotropic Gaussian mixture; calling it is the exact denoiser D(x, sigma) -> E[x0 | x]."""

    def __init__(self, means: torch.Tensor, stds, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, dim), got {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if (stds < 0).any() or (weights <= 0).any() or weights.shape != (K,):
            raise ValueError("stds must be >= 0 and weights > 0, one per component")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """Exact covariance of the mixture, (dim, dim)."""
        m = self.mean
        d = self.means - m
        eye = torch.eye(self.dim, dtype=torch.float64)
        return (self.weights[:, None, None] * (d[:, :, None] * d[:, None, :] + self.stds[:, None, None] ** 2 * eye)).sum(0)

    def sample(self, n: int, *, generator=None, sigma: float = 0.0, return_labels: bool = False):
        """n draws of x0 (sigma = 0) or of the noised marginal at level sigma, float32 (n, dim)."""
        u = rand((n,), generator=generator, dtype=torch.float64)
        k = torch.searchsorted(torch.cumsum(self.weights, 0), u).clamp(max=len(self.weights) - 1)
        z = randn((n, self.dim), generator=generator, dtype=torch.float64)
        std = torch.sqrt(self.stds[k] ** 2 + sigma**2)
        x = (self.means[k] + std[:, None] * z).float()
        return (x, k) if return_labels else x

    def _log_resp(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per-component log w_k N(x; mu_k, v_k I) with v_k = s_k^2 + sigma^2, shape (N, K), and v (N, K)."""
        x = x.to(torch.float64).flatten(1)
        var = self.stds[None, :] ** 2 + sigma.to(torch.float64)[:, None] ** 2       # (N, K)
        d2 = torch.cdist(x, self.means, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (N, K), exact
        logp = torch.log(self.weights)[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return logp, var

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Exact log-density of the marginal at level sigma, shape (N,)."""
        sigma = _per_sample(sigma, x.shape[0]).to(torch.float64)
        logp, _ = self._log_resp(x, sigma)
        return torch.logsumexp(logp, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, **_) -> torch.Tensor:
        """Exact denoiser E[x0 | x_sigma = x]; with class_labels (N,), the denoiser of that component alone."""
        sigma = _per_sample(sigma, x.shape[0])
        logp, var = self._log_resp(x, sigma)
        if class_labels is not None:
            mask = torch.full_like(logp, -math.inf)
            mask[torch.arange(len(logp)), class_labels.long()] = 0.0
            logp = logp + mask
        r = torch.softmax(logp, 1)                                                     # (N, K)
        xf = x.to(torch.float64).flatten(1)
        shrink = self.stds[None, :] ** 2 / var                                         # (N, K)
        # E[x0 | x] = sum_k r_k (mu_k + shrink_k (x - mu_k)) = r @ mu + (r * shrink).sum (x) - (r*shrink) @ mu
        rs = r * shrink
        out = r @ self.means + rs.sum(1, keepdim=True) * xf - rs @ self.means
        return out.view_as(x).to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
        sigma = _per_sample(sigma, x.shape[0]).to(torch.float64)
        xd = x.to(torch.float64)  # in float64: D(x) - x cancels at small sigma
        return ((self(xd, sigma) - xd) / append_dims(sigma, x.ndim) ** 2).to(x.dtype)


def gaussian(mean, std, dim: int | None = None) -> GaussianMixture:
    """N(mean, std^2 I) as a one-component mixture; `mean` a float (with `dim`) or a vector."""
    m = torch.as_tensor(mean, dtype=torch.float64)
    if m.ndim == 0:
        if dim is None:
            raise ValueError("give dim when mean is a scalar")
        m = m.expand(dim)
    return GaussianMixture(m[None].clone(), [std])


def ring_mixture(n_modes: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """n_modes equal-weight narrow Gaussians evenly placed on a circle (the '8 gaussians' benchmark)."""
    ang = torch.arange(n_modes, dtype=torch.float64) * 2 * math.pi / n_modes
    return GaussianMixture(radius * torch.stack([ang.cos(), ang.sin()], 1), [std])


def random_mixture(dim: int = 64, n_modes: int = 16, *, seed: int = 0, spread: float = 1.0,
                   std_range=(0.05, 0.3)) -> GaussianMixture:
    """A reproducible random mixture in `dim` dimensions: means ~ N(0, spread^2 I), stds uniform in
    `std_range`, weights uniform in [0.5, 1.5) before normalisation."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_modes, dim, generator=g, dtype=torch.float64) * spread
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(n_modes, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(n_modes, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def make_toy(name: str, n: int, *, generator=None, noise: float = 0.05) -> torch.Tensor:
    """n points of a 2-D toy set, float32 (n, 2), scaled to roughly unit variance per axis."""
    check_choice("toy dataset", name, TOY_DATASETS)
    if name in ("8gaussians", "ring"):
        return ring_mixture(8, radius=math.sqrt(2), std=noise if name == "ring" else 0.1).sample(n, generator=generator)
    u = rand((n,), generator=generator, dtype=torch.float64)
    z = randn((n, 2), generator=generator, dtype=torch.float64)
    if name == "moons":
        upper = u < 0.5
        a = rand((n,), generator=generator, dtype=torch.float64) * math.pi
        x = torch.where(upper, a.cos(), 1 - a.cos())
        y = torch.where(upper, a.sin(), 0.5 - a.sin())
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6 + noise * z
    elif name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * u)
        pts = torch.stack([t * t.cos(), t * t.sin()], 1) / 7.0 + noise * z
    else:  # checkerboard (FFJORD): 8 unit squares of a 4x4 board on [-2, 2]^2
        x1 = rand((n,), generator=generator, dtype=torch.float64) * 4 - 2
        v = rand((n,), generator=generator, dtype=torch.float64)
        x2 = v - 2.0 * (u < 0.5) + torch.floor(x1) % 2
        pts = torch.stack([x1, x2], 1)
    return pts.float()


class ToyDataset:
    """In-memory 2-D points, float32 (N, 2), with the same ``batch`` API as the image datasets."""

    def __init__(self, data: torch.Tensor, *, name: str = ""):
        data = torch.as_tensor(data, dtype=torch.float32)
        if data.ndim != 2:
            raise ValueError(f"toy data must have shape (N, dim), got {tuple(data.shape)}")
        self.data = data
        self.labels = None
        self.num_classes = 0
        self.name = name

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.data.shape[1:])

    def __repr__(self) -> str:
        return f"ToyDataset(name={self.name!r}, n={len(self)}, dim={self.data.shape[1]})"

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        """(float32 (B, dim), None). Flips are not defined for point data."""
        if flip:
            raise ValueError("flip=True is only meaningful for images, not for 2-D toy data")
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.data[idx].to(device), None
