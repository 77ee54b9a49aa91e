"""Sample-quality metrics on feature vectors (N, D): Frechet distance, Kernel Inception Distance, precision/recall,
FD extrapolated to infinitely many samples (FD-infinity), and bootstrap spreads.

:class:`FrechetReference` and :class:`KernelReference` hold what a fixed reference set costs once (its Gaussian
statistics and covariance square root; its kernel mean), so that many sets (the samples, their bootstrap resamples,
subsets of several sizes, several real floor draws) are compared with the same reference cheaply.
Also the sliced 2-Wasserstein distance between sample sets (any dimension), used on exact mixture problems.
All computations run in float64 torch ops on the CPU (so they follow torch's thread setting); inputs may be torch
tensors or numpy arrays, results are Python floats.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..utils import hash_seed

FD_INF_SIZES = 10        # subset sizes of FD-infinity, evenly spaced in 1/N
FD_INF_MIN_FRACTION = 0.25  # the smallest subset of FD-infinity, as a fraction of the set
FD_INF_REPEATS = 3       # random subsets per size (the full set is used once)
BOOTSTRAP = 200          # bootstrap resamples of a sample set
DIST_RTOL = 1e-9         # squared distances from the Gram matrix within this (relative) band are recomputed exactly
KNN_MARGIN = 8           # extra nearest-neighbour candidates re-ranked with exact distances
CHUNK = 1024             # rows per block of distance and kernel computations


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
    return FrechetReference(mean=mu_a, cov=cov_a).from_stats(mu_b, cov_b)


def _as_stat(x, ndim: int) -> torch.Tensor:
    t = x.detach().cpu().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    return t.reshape(-1) if ndim == 1 else (t.reshape(1, 1) if t.ndim < 2 else t)


class FrechetReference:
    """The Gaussian statistics of a fixed reference set and S_r^{1/2}, computed once; ``ref(feats)`` is the Frechet
    distance of a feature set (N, D) to it, ``ref.from_stats(mu, cov)`` that of given statistics, and
    ``ref.batch(mus (B, D), covs (B, D, D))`` that of B sets at once (one batched eigendecomposition)."""

    def __init__(self, feats=None, *, mean=None, cov=None):
        if feats is not None:
            mean, cov = gaussian_stats(feats)
        self.mean, self.cov = _as_stat(mean, 1), _as_stat(cov, 2)
        if self.cov.shape != (len(self.mean),) * 2:
            raise ValueError(f"mismatched statistics: mean {tuple(self.mean.shape)}, "
                             f"covariance {tuple(self.cov.shape)}")
        w, v = torch.linalg.eigh((self.cov + self.cov.T) / 2)
        self.sqrt_cov = (v * w.clamp(min=0).sqrt()) @ v.T            # S_r^{1/2}, (D, D)

    def batch(self, mus: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
        """FD (B,) of B Gaussians N(mus[b], covs[b]) to the reference."""
        if mus.shape[-1] != len(self.mean) or covs.shape[-2:] != self.cov.shape:
            raise ValueError(f"mismatched statistics: means {tuple(mus.shape)}, covariances {tuple(covs.shape)} "
                             f"against a reference of dimension {len(self.mean)}")
        m = self.sqrt_cov @ covs @ self.sqrt_cov                     # (B, D, D)
        tr_covmean = torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).clamp(min=0).sqrt().sum(-1)
        diff = mus - self.mean
        fd = (diff * diff).sum(-1) + self.cov.trace() + covs.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * tr_covmean
        return fd.clamp(min=0)

    def from_stats(self, mu, cov) -> float:
        """FD of N(mu, cov) to the reference."""
        mu, cov = _as_stat(mu, 1), _as_stat(cov, 2)
        if mu.shape != self.mean.shape or cov.shape != self.cov.shape:
            raise ValueError(f"mismatched statistics: means {tuple(self.mean.shape)}, {tuple(mu.shape)}; "
                             f"covariances {tuple(self.cov.shape)}, {tuple(cov.shape)}")
        return float(self.batch(mu[None], cov[None])[0])

    def __call__(self, feats) -> float:
        return self.from_stats(*gaussian_stats(feats))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D)."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def bootstrap_weights(n: int, resamples: int = BOOTSTRAP, *, generator=None) -> torch.Tensor:
    """(resamples, n) float64 counts: how often each of n items occurs in each resample drawn with replacement
    (Efron 1979); every row sums to n."""
    idx = torch.randint(0, n, (resamples, n), generator=generator)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(resamples, n,
                                                                                            dtype=torch.float64))


def weighted_stats(feats, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (B, D) and unbiased covariances (B, D, D) of the B resamples whose counts are the rows of w (B, N)."""
    f = _as64(feats)
    n = w.sum(1, keepdim=True)                                       # (B, 1)
    mus = w @ f / n                                                  # (B, D)
    second = torch.stack([(f * wb[:, None]).T @ f for wb in w]) / n[..., None]   # (B, D, D)
    covs = (second - mus[:, :, None] * mus[:, None, :]) * (n / (n - 1))[..., None]
    return mus, covs


def fd_bootstrap(feats, reference: FrechetReference, resamples: int = BOOTSTRAP, *,
                 generator=None) -> torch.Tensor:
    """FD (resamples,) of bootstrap resamples of `feats` (N, D) to the reference: their std is the spread of the
    set's FD over sample sets of the same size."""
    return reference.batch(*weighted_stats(feats, bootstrap_weights(len(_as64(feats)), resamples,
                                                                     generator=generator)))


def fd_infinity(feats, reference: FrechetReference, *, sizes=None, repeats: int = FD_INF_REPEATS,
                generator=None, fd_std: float | None = None) -> dict:
    """FD extrapolated to infinitely many samples (Chong & Forsyth 2020, sec. 3): FD_N of random subsets of N
    samples (drawn without replacement) is, to first order, linear in 1/N, FD_N = FD_inf + c / N; fit it by least
    squares over `sizes` (default: FD_INF_SIZES sizes evenly spaced in 1/N from N = n FD_INF_MIN_FRACTION to n),
    `repeats` subsets per size (the full set once), and read the intercept at 1/N = 0.

    Returns fd_inf, slope (c), sizes, fd_n (mean FD per size), fit_se (standard error of the intercept from the
    fit's residuals) and fd_inf_err = sqrt(fit_se^2 + fd_std^2): the extrapolation inherits the sample set's own
    noise, whose spread fd_std is the bootstrap std of FD at the full size (computed when not given).
    """
    f = _as64(feats)
    n = len(f)
    if sizes is None:
        lo = max(2, int(n * FD_INF_MIN_FRACTION))
        inv = np.linspace(1.0 / n, 1.0 / lo, FD_INF_SIZES)
        sizes = sorted({int(round(1.0 / v)) for v in inv})
    sizes = [int(m) for m in sizes]
    if len(sizes) < 2 or min(sizes) < 2 or max(sizes) > n:
        raise ValueError(f"FD-infinity needs at least two subset sizes in [2, {n}], got {sizes}")
    xs, ys, per_size = [], [], []
    for m in sizes:
        vals = [reference(f[torch.randperm(n, generator=generator)[:m]] if m < n else f)
                for _ in range(1 if m == n else int(repeats))]
        xs += [1.0 / m] * len(vals)
        ys += vals
        per_size.append(float(np.mean(vals)))
    a = np.stack([np.ones(len(xs)), np.asarray(xs)], 1)              # (P, 2): intercept, 1/N
    coef, *_ = np.linalg.lstsq(a, np.asarray(ys), rcond=None)
    resid = np.asarray(ys) - a @ coef
    dof = max(len(ys) - 2, 1)
    cov = np.linalg.inv(a.T @ a) * float(resid @ resid) / dof
    fit_se = float(np.sqrt(cov[0, 0]))
    if fd_std is None:
        fd_std = float(fd_bootstrap(f, reference, generator=generator).std())
    return {"fd_inf": float(coef[0]), "slope": float(coef[1]), "sizes": sizes, "fd_n": per_size,
            "fit_se": fit_se, "fd_inf_err": float(np.hypot(fit_se, fd_std))}


def _poly_of_gram(gram: torch.Tensor, dim: int, degree: int, coef0: float) -> torch.Tensor:
    """(gram / dim + coef0)^degree by repeated products (several times faster than pow)."""
    base = gram.mul(1.0 / dim).add_(coef0)
    out = base.clone() if degree < 2 else base * base
    for _ in range(int(degree) - 2):
        out.mul_(base)
    return out


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """k(x, y) = (x.y / D + coef0)^degree, the KID kernel of Binkowski et al. 2018."""
    return _poly_of_gram(x @ y.T, x.shape[1], degree, coef0)


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


class KernelReference:
    """KID against a fixed reference set Y (m, D): the unbiased MMD^2 (Gretton et al. 2012, eq. 3) with the KID
    kernel between all n samples and all m reference points (the full U-statistic; no subsets), with the reference
    term mean_{i != j} k(y_i, y_j) computed once. ``ref(x)`` -> KID; ``ref.bootstrap(x, w)`` -> the KIDs of the
    bootstrap resamples with counts w (B, n), from the same kernel matrices."""

    def __init__(self, ref_feats, degree: int = 3):
        self.ref, self.degree = _as64(ref_feats), int(degree)
        m = len(self.ref)
        if m < 2:
            raise ValueError(f"a KID reference needs at least 2 feature vectors, got {m}")
        total = sum(float(polynomial_kernel(c, self.ref, degree).sum()) for c in self.ref.split(CHUNK))
        diag = float(((self.ref * self.ref).sum(1) / self.ref.shape[1] + 1).pow(degree).sum())
        self.kyy = (total - diag) / (m * (m - 1))

    def kxy(self, x) -> torch.Tensor:
        """(n,) mean kernel value of each sample with the reference points."""
        x = _as64(x)
        return torch.cat([polynomial_kernel(c, self.ref, self.degree).mean(1) for c in x.split(CHUNK)])

    def _terms(self, x, kxy) -> tuple[torch.Tensor, torch.Tensor]:
        x = _as64(x)
        if x.shape[1] != self.ref.shape[1] or len(x) < 2:
            raise ValueError(f"need at least 2 feature vectors of dimension {self.ref.shape[1]}, got {tuple(x.shape)}")
        return polynomial_kernel(x, x, self.degree), self.kxy(x) if kxy is None else kxy

    def __call__(self, x, kxy: torch.Tensor | None = None) -> float:
        """KID of x (n, D); `kxy`: its :meth:`kxy`, when already computed (e.g. by :func:`cross_figures`)."""
        kxx, kxy = self._terms(x, kxy)
        n = len(kxx)
        return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + self.kyy - 2 * kxy.mean())

    def bootstrap(self, x, w: torch.Tensor, kxy: torch.Tensor | None = None) -> torch.Tensor:
        """KID (B,) of the resamples with counts w (B, n): pairs of distinct positions in the resample."""
        kxx, kxy = self._terms(x, kxy)
        n = w.sum(1)                                                  # (B,)
        pairs = ((w @ kxx) * w).sum(1) - w @ kxx.diagonal()
        return pairs / (n * (n - 1)) + self.kyy - 2 * (w @ kxy) / n


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


def knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded), exact: the
    k + 1 + KNN_MARGIN nearest candidates by the Gram-matrix distances (|y|^2 - 2 x.y ranks a row like |x - y|^2)
    are re-ranked with exact differences."""
    feats = _as64(feats)
    n = len(feats)
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, {n - 1}] for {n} points, got {k}")
    norms = _sq_norms(feats)
    out = []
    for rows in feats.split(CHUNK):                                   # (c, D)
        rank = torch.addmm(norms[None, :], rows, feats.T, alpha=-2)  # (c, n): |x - y|^2 - |x|^2
        cand = rank.topk(min(k + 1 + KNN_MARGIN, n), dim=1, largest=False).indices     # (c, k + 1 + margin)
        exact = (rows[:, None, :] - feats[cand]).norm(dim=-1)        # (c, k + 1 + margin)
        out.append(exact.sort(dim=1).values[:, k])                   # column 0: the point itself (distance 0)
    return torch.cat(out)


def _inside_any(a: torch.Tensor, b: torch.Tensor, b_radii: torch.Tensor, gram: torch.Tensor, *,
                transposed: bool = False) -> torch.Tensor:
    """(Na,) bool: whether each row of `a` lies in some ball B(b_j, b_radii_j), given gram = a b^T (Na, Nb) (or
    b a^T with `transposed`): |a - b_j|^2 <= r_j^2  <=>  2 a.b_j - (|b_j|^2 - r_j^2) >= |a|^2, so the row maximum of
    the left side decides. Rows where rounding (DIST_RTOL of the squared norms) could change the answer are
    decided again with exact differences."""
    na, nb = _sq_norms(a), _sq_norms(b)
    shift = nb - b_radii ** 2                                         # (Nb,)
    best = (gram.mul(2).sub_(shift[:, None]).amax(0) if transposed
            else gram.mul(2).sub_(shift[None, :]).amax(1))            # (Na,)
    band = DIST_RTOL * (na + nb.max())
    sure = best >= na + band
    for i in torch.nonzero((best >= na - band) & ~sure).flatten().tolist():   # rare: a radius within rounding
        cols = torch.nonzero(2 * (b @ a[i]) - shift >= na[i] - band[i]).flatten()
        sure[i] = bool(((a[i] - b[cols]).norm(dim=1) <= b_radii[cols]).any())
    return sure


def within_radii(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(Nq,) bool: whether each query point lies in the union of the balls B(ref_j, radii_j), decided exactly."""
    query, ref, radii = _as64(query), _as64(ref), torch.as_tensor(radii, dtype=torch.float64)
    return torch.cat([_inside_any(rows, ref, radii, rows @ ref.T) for rows in query.split(CHUNK)])


def cross_figures(fake_feats, real_feats, real_radii: torch.Tensor, *, k: int = 3,
                  degree: int = 3) -> tuple[float, float, torch.Tensor]:
    """(precision, recall, kxy) of a fake set against a real one from one pass over their Gram matrix: improved
    precision and recall (as :func:`precision_recall`, with the real set's knn_radii given) and kxy (n,), each fake
    point's mean KID kernel value with the real points (for :meth:`KernelReference.__call__`)."""
    fake, real = _as64(fake_feats), _as64(real_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    fake_radii = knn_radii(fake, k)
    precise, covered, kxy = [], torch.zeros(len(real), dtype=torch.bool), []
    for rows, radii in zip(fake.split(CHUNK), fake_radii.split(CHUNK)):
        gram = rows @ real.T                                          # (c, Nr)
        precise.append(_inside_any(rows, real, real_radii, gram))
        covered |= _inside_any(real, rows, radii, gram, transposed=True)
        kxy.append(_poly_of_gram(gram, real.shape[1], degree, 1.0).mean(1))
    return float(torch.cat(precise).double().mean()), float(covered.double().mean()), torch.cat(kxy)


def manifold_coverage(ref: torch.Tensor, query: torch.Tensor, k: int, *, ref_radii=None) -> float:
    """Fraction of `query` points inside the union of k-NN balls of `ref` (Kynkaanniemi et al. 2019, eq. 1-2);
    `ref_radii` (the ref's knn_radii) may be given when the same reference is used many times."""
    radii = knn_radii(ref, k) if ref_radii is None else ref_radii
    return float(within_radii(query, ref, radii).double().mean())


def precision_recall(real_feats, fake_feats, *, k: int = 3, real_radii=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = share of generated samples inside
    the real k-NN manifold, recall = share of real samples inside the generated one. `real_radii`: the real set's
    knn_radii, when computed once for a fixed reference."""
    real, fake = _as64(real_feats), _as64(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    return (manifold_coverage(real, fake, k, ref_radii=real_radii), manifold_coverage(fake, real, k))


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
