"""Sample-quality metrics on feature vectors (N, D): Frechet distance, Kernel Inception Distance, precision/recall.

Also the sliced 2-Wasserstein distance between sample sets (any dimension), used on exact mixture problems.
All computations run in float64 torch ops on the CPU (so they follow torch's thread setting); inputs may be torch
tensors or numpy arrays, results are Python floats.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..utils import hash_seed

FD_EPS = 1e-6  # diagonal offset added to both covariances when sqrtm(S_a S_b) comes out singular (pytorch-fid)


def _as64(x) -> torch.Tensor:
    a = x.detach().cpu().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    if a.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {a.shape}")
    return a


def gaussian_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)) of features (N, D), as the standard FID tools compute them."""
    f = _as64(feats)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors, got {f.shape[0]}")
    c = f - f.mean(0)
    return f.mean(0), c.T @ c / (f.shape[0] - 1)


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet (2-Wasserstein) distance between N(mu_a, S_a) and N(mu_b, S_b) (Dowson & Landau 1982; Heusel et al.
    2017, FID): |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}).

    tr((S_a S_b)^{1/2}) is the sum of sqrt of the eigenvalues of S_a^{1/2} S_b S_a^{1/2} (symmetric PSD, so an
    eigendecomposition is stable where sqrtm of the non-symmetric S_a S_b is not); negative round-off eigenvalues
    are clipped to 0.
    """
    mu_a, mu_b = (torch.as_tensor(np.asarray(m, dtype=np.float64)).reshape(-1) for m in (mu_a, mu_b))
    cov_a, cov_b = (torch.as_tensor(np.asarray(c, dtype=np.float64)) for c in (cov_a, cov_b))
    cov_a, cov_b = (c.reshape(1, 1) if c.ndim < 2 else c for c in (cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (len(mu_a),) * 2:
        raise ValueError(f"mismatched statistics: means {mu_a.shape}, {mu_b.shape}; covariances {cov_a.shape}, "
                         f"{cov_b.shape}")
    w, v = torch.linalg.eigh((cov_a + cov_a.T) / 2)
    sa = (v * w.clamp(min=0).sqrt()) @ v.T                             # S_a^{1/2}, (D, D)
    m = sa @ cov_b @ sa
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    return float(max(float(diff @ diff + cov_a.trace() + cov_b.trace() - 2 * tr_covmean), 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D)."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """k(x, y) = (x.y / D + coef0)^degree, the KID kernel of Binkowski et al. 2018."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3) -> float:
    """Unbiased MMD^2 estimate (Gretton et al. 2012, eq. 3) with the cubic polynomial kernel."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
    return float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_inception_distance(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000,
                              generator=None) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y/D + 1)^3, averaged
    over `subsets` random subsets of min(subset_size, N_a, N_b) drawn without replacement from each set (as the
    standard implementations do). Returns (mean, std over subsets). When the subset size equals both set sizes
    each subset is the whole set, so one subset suffices and std is 0."""
    a, b = _as64(feats_a), _as64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(int(subset_size), len(a), len(b))
    if m < 2 or subsets < 1:
        raise ValueError(f"need subset_size >= 2 and subsets >= 1, got {m}, {subsets}")
    if m == len(a) == len(b):
        return mmd2_unbiased(a, b), 0.0
    g = generator if generator is not None else torch.Generator().manual_seed(hash_seed(0x6B1D))
    vals = []
    for _ in range(int(subsets)):
        ia = torch.randperm(len(a), generator=g)[:m]
        ib = torch.randperm(len(b), generator=g)[:m]
        vals.append(mmd2_unbiased(a[ia], b[ib]))
    vals = np.asarray(vals)
    return float(vals.mean()), float(vals.std())  # population std over subsets, as the reference implementations


def _pairwise_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")  # exact (no |x|^2 + |y|^2 - 2xy)


def knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k must lie in [1, {len(feats) - 1}] for {len(feats)} points, got {k}")
    d = _pairwise_dist(feats, feats)
    return d.sort(dim=1).values[:, k]  # column 0 is the point itself (distance 0)


def manifold_coverage(ref: torch.Tensor, query: torch.Tensor, k: int) -> float:
    """Fraction of `query` points inside the union of k-NN balls of `ref` (Kynkaanniemi et al. 2019, eq. 1-2)."""
    radii = knn_radii(ref, k)
    d = _pairwise_dist(query, ref)                        # (Nq, Nr)
    return float((d <= radii[None, :]).any(1).double().mean())


def precision_recall(real_feats, fake_feats, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = share of generated samples inside
    the real k-NN manifold, recall = share of real samples inside the generated one."""
    real, fake = _as64(real_feats), _as64(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    return manifold_coverage(real, fake, k), manifold_coverage(fake, real, k)


class SlicedW2:
    """Sliced 2-Wasserstein distance to a fixed reference set: sqrt(mean over random unit directions of W2^2
    between the sorted 1-D projections). The reference projections are sorted once, so comparing many sample
    sets against one data draw costs one projection and sort each."""

    def __init__(self, ref: torch.Tensor, n_dirs: int = 1000, seed: int = 0, generator=None):
        ref = ref.double().flatten(1)
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
        dirs = torch.randn(ref.shape[1], n_dirs, generator=g, dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (D, n_dirs)
        self.n = ref.shape[0]
        self.ref_sorted = (ref @ self.dirs).sort(0).values  # (n, n_dirs)

    def __call__(self, a: torch.Tensor) -> float:
        a = a.double().flatten(1)
        if a.shape[0] != self.n:
            raise ValueError(f"sliced W2 needs equal sample counts: got {a.shape[0]}, reference has {self.n}")
        return math.sqrt(((a @ self.dirs).sort(0).values - self.ref_sorted).pow(2).mean().item())


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_dirs: int = 1000, seed: int = 0) -> float:
    """sqrt(mean over random unit directions of W2^2 of the 1-D projections); equal sample counts."""
    return SlicedW2(b, n_dirs, seed)(a)
