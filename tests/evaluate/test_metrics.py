"""Frechet distance, KID and precision/recall against closed forms and independent numpy/scipy computations."""
import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from torchdiffusion.evaluate.metrics import (frechet_distance, frechet_distance_from_stats, gaussian_stats,
                                             kernel_inception_distance, precision_recall)


def _feats(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a.T + rng.normal(size=d)


def test_fd_of_a_set_with_itself_is_zero():
    f = _feats()
    assert abs(frechet_distance(f, f)) < 1e-8


def test_fd_of_a_shifted_copy_is_the_squared_shift():
    """Same covariance: FD = |mu_a - mu_b|^2 exactly."""
    f = _feats()
    shift = np.linspace(-1, 2, f.shape[1])
    assert frechet_distance(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-8, abs=1e-8)


def test_fd_closed_form_for_diagonal_gaussians():
    """Commuting covariances: FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu = np.array([1.0, -2.0, 0.5])
    expected = mu @ mu + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_stats(mu, np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_agrees_with_scipy_sqrtm():
    """The pytorch-fid formula with scipy.linalg.sqrtm of S_a S_b, on random features (D=16 and D > N)."""
    for n, d in ((500, 16), (40, 64)):
        fa, fb = _feats(n, d, 1), _feats(n, d, 2) * 1.3
        mu_a, mu_b = fa.mean(0), fb.mean(0)
        sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        covmean = scipy.linalg.sqrtm(sa @ sb).real
        ref = ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)
        assert frechet_distance(torch.from_numpy(fa).float(), fb) == pytest.approx(ref, rel=1e-4, abs=1e-4)


def _mmd_reference(x, y):
    """Unbiased MMD^2 with k = (x.y/D + 1)^3 written out with explicit off-diagonal masks."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    off_m, off_n = ~np.eye(m, dtype=bool), ~np.eye(n, dtype=bool)
    return kxx[off_m].mean() + kyy[off_n].mean() - 2 * k(x, y).mean()


def test_kid_agrees_with_numpy_reference():
    fa, fb = _feats(300, 8, 3), _feats(300, 8, 4)
    mean, std = kernel_inception_distance(fa, fb, subset_size=300)  # whole sets: one exact estimate
    assert mean == pytest.approx(_mmd_reference(fa, fb), rel=1e-10) and std == 0.0
    # random subsets: replay the same index draws
    g = torch.Generator().manual_seed(5)
    mean, std = kernel_inception_distance(fa, fb, subsets=7, subset_size=100, generator=g)
    g = torch.Generator().manual_seed(5)
    vals = []
    for _ in range(7):
        ia, ib = torch.randperm(300, generator=g)[:100].numpy(), torch.randperm(300, generator=g)[:100].numpy()
        vals.append(_mmd_reference(fa[ia], fb[ib]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-10) and std == pytest.approx(np.std(vals), rel=1e-10)


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_different():
    """Same distribution: the mean over subsets lies within 4 standard errors of 0; a shifted one is far above."""
    rng = np.random.default_rng(7)
    fa, fb = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    mean, std = kernel_inception_distance(fa, fb, subsets=50, subset_size=200)
    assert abs(mean) < 4 * std / np.sqrt(50) + 1e-12
    mean_shift, std_shift = kernel_inception_distance(fa, fb + 1.0, subsets=20, subset_size=200)
    assert mean_shift > 5 * std_shift


def test_precision_recall_self_is_one_and_disjoint_is_zero():
    f = _feats(300, 8, 6)
    assert precision_recall(f, f, k=3) == (1.0, 1.0)
    far = f + 1000.0
    assert precision_recall(f, far, k=3) == (0.0, 0.0)


def test_precision_recall_agrees_with_brute_force():
    """Kynkaanniemi et al. 2019 eq. (1)-(2) with scipy's cdist; the fake set covers half the real modes."""
    rng = np.random.default_rng(8)
    real = rng.normal(size=(200, 4))
    fake = np.concatenate([rng.normal(size=(100, 4)) * 0.5, rng.normal(size=(50, 4)) + 6])
    k = 3

    def inside(ref, q):
        radii = np.sort(cdist(ref, ref), axis=1)[:, k]
        return (cdist(q, ref) <= radii[None]).any(1).mean()

    p, r = precision_recall(real, fake, k=k)
    assert p == pytest.approx(inside(real, fake)) and r == pytest.approx(inside(fake, real))
    assert 0.5 < p < 0.8 and r < 0.9


def test_metric_input_validation():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="k must"):
        precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
    mu, cov = gaussian_stats(np.eye(3))
    assert mu.shape == (3,) and cov.shape == (3, 3)
