"""Frechet distance, KID, precision/recall, FD-infinity and the bootstrap against closed forms and independent
numpy/scipy computations."""
import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from torchdiffusion.evaluate.metrics import (FrechetReference, KernelReference, bootstrap_weights, cross_figures,
                                             fd_infinity, frechet_distance, frechet_distance_from_stats,
                                             gaussian_stats, kernel_inception_distance, knn_radii, precision_recall,
                                             weighted_stats, within_radii)


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


def _gaussian_laws(d=64, seed=0, shift=0.1):
    """Two Gaussian feature laws A = N(mu_a, S_a), B = N(0, S_b) and their exact Frechet distance."""
    rng = np.random.default_rng(seed)
    qa, qb = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(d, d)) / np.sqrt(d)
    sa, sb = qa @ qa.T + 0.5 * np.eye(d), qb @ qb.T + 0.5 * np.eye(d)
    mu_a = rng.normal(size=d) * shift
    exact = frechet_distance_from_stats(mu_a, sa, np.zeros(d), sb)
    return torch.from_numpy(mu_a), torch.from_numpy(np.linalg.cholesky(sa)), sb, exact


def test_frechet_reference_batches_agree_with_frechet_distance():
    fa, fb, fc = _feats(300, 8, 1), _feats(200, 8, 2), _feats(250, 8, 3)
    ref = FrechetReference(torch.from_numpy(fa))
    assert ref(fb) == pytest.approx(frechet_distance(fa, fb), rel=1e-10)
    mus, covs = zip(gaussian_stats(fb), gaussian_stats(fc))
    batch = ref.batch(torch.stack(mus), torch.stack(covs))
    assert batch.tolist() == pytest.approx([frechet_distance(fa, fb), frechet_distance(fa, fc)], rel=1e-10)
    with pytest.raises(ValueError, match="mismatched"):
        ref.from_stats(np.zeros(3), np.eye(3))


def test_bootstrap_weights_and_weighted_stats_match_explicit_resamples():
    f = torch.from_numpy(_feats(50, 4, 4))
    g = torch.Generator().manual_seed(3)
    w = bootstrap_weights(50, 6, generator=g)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (6, 50), generator=g)                  # the same draws, as index lists
    assert torch.equal(w.sum(1), torch.full((6,), 50.0, dtype=torch.float64))
    mus, covs = weighted_stats(f, w)
    for b in range(6):
        mu, cov = gaussian_stats(f[idx[b]])
        assert torch.allclose(mus[b], mu, rtol=1e-10, atol=1e-12) and torch.allclose(covs[b], cov, rtol=1e-10,
                                                                                    atol=1e-12)


def test_kernel_reference_is_the_full_unbiased_mmd_and_its_bootstrap_counts_pairs_of_positions():
    fa, fb = _feats(120, 8, 5), _feats(300, 8, 6)
    ref = KernelReference(torch.from_numpy(fb))
    assert ref(fa) == pytest.approx(_mmd_reference(fa, fb), rel=1e-10)
    ones = torch.ones(1, 120, dtype=torch.float64)
    assert float(ref.bootstrap(fa, ones)[0]) == pytest.approx(ref(fa), rel=1e-10)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 120, (120,), generator=g)
    w = torch.bincount(idx, minlength=120).double()[None]
    x = fa[idx.numpy()]                                               # the resample, duplicates included
    assert float(ref.bootstrap(fa, w)[0]) == pytest.approx(_mmd_reference(x, fb), rel=1e-9)


def test_exact_radii_and_coverage_from_one_gram_matrix_agree_with_brute_force():
    """knn_radii, within_radii and cross_figures against scipy's cdist, including duplicated points (distance 0)
    and query points exactly on a ball's boundary."""
    rng = np.random.default_rng(9)
    real = rng.normal(size=(700, 16)) * 3
    real[10:14] = real[3]                                             # duplicates: their radii are 0 for k < 4
    fake = np.concatenate([rng.normal(size=(300, 16)) * 3, real[:5]])
    k = 3
    brute_radii = np.sort(cdist(real, real), axis=1)[:, k]
    radii = knn_radii(torch.from_numpy(real), k)
    assert np.allclose(radii.numpy(), brute_radii, rtol=1e-12, atol=1e-12) and radii[10] == 0
    inside = (cdist(fake, real) <= brute_radii[None]).any(1)
    assert torch.equal(within_radii(torch.from_numpy(fake), torch.from_numpy(real), radii), torch.from_numpy(inside))
    p, r, kxy = cross_figures(fake, real, radii, k=k)
    assert (p, r) == precision_recall(real, fake, k=k) and p == pytest.approx(inside.mean())
    assert torch.allclose(kxy, KernelReference(torch.from_numpy(real)).kxy(fake), rtol=1e-12)
    # far from the origin the Gram matrix rounds squared distances by ~30: points exactly on a radius (inside)
    # or a hair beyond it (outside) are decided by exact differences
    centers = np.full((10, 16), 1e8) + 10.0 * np.arange(10)[:, None] * np.eye(16)[0]    # spaced 10 apart: radii 10
    on = np.concatenate([centers[j] + 10.0 * np.eye(16)[[i]] for j in range(4) for i in (1, 2)])
    out = np.concatenate([centers[j] + 10.0001 * np.eye(16)[[i]] for j in range(4, 8) for i in (1, 2)])
    radii = knn_radii(torch.from_numpy(centers), 1)
    assert radii.tolist() == [10.0] * 10
    got = within_radii(torch.from_numpy(np.concatenate([on, out])), torch.from_numpy(centers), radii)
    assert got.tolist() == [True] * 8 + [False] * 8


def test_fd_infinity_recovers_the_exact_fd_of_two_gaussian_laws_from_sets_of_several_sizes():
    """Chong & Forsyth 2020: FD_N is biased by about c/N; the intercept of FD_N against 1/N is the exact Frechet
    distance of the two laws (closed form), within its stated error, whatever the set size. Here (D = 64) the plain
    FD of the same sets is off by several times that error, and more for smaller sets."""
    mu_a, chol_a, sb, exact = _gaussian_laws()
    ref = FrechetReference(mean=np.zeros(len(mu_a)), cov=sb)        # the exact law B
    plain = {}
    for n in (1000, 2000, 4000):
        for seed in range(3):
            g = torch.Generator().manual_seed(100 * n + seed)
            x = torch.randn(n, len(mu_a), generator=g, dtype=torch.float64) @ chol_a.T + mu_a
            r = fd_infinity(x, ref, generator=g)
            assert abs(r["fd_inf"] - exact) <= 3 * r["fd_inf_err"], (n, seed, r["fd_inf"], exact, r["fd_inf_err"])
            assert r["sizes"][0] == n // 4 and r["sizes"][-1] == n and r["slope"] > 0
            plain.setdefault(n, []).append((ref(x) - exact) / r["fd_inf_err"])
    assert np.mean(plain[1000]) > 3 and np.mean(plain[1000]) > np.mean(plain[4000]) > 0


def test_fd_infinity_states_an_error_no_smaller_than_its_scatter():
    """Over 16 independent sets of 1000 from law A, the scatter of FD-infinity around the exact value is within its
    stated error (rms of (fd_inf - exact) / fd_inf_err below 1.1, std across the sets below 1.1 mean errors): the
    error includes the set's own noise, not only the fit's (the fit's standard error alone is 0.6 of it)."""
    mu_a, chol_a, sb, exact = _gaussian_laws()
    ref = FrechetReference(mean=np.zeros(len(mu_a)), cov=sb)
    vals, errs = [], []
    for seed in range(16):
        g = torch.Generator().manual_seed(7000 + seed)
        x = torch.randn(1000, len(mu_a), generator=g, dtype=torch.float64) @ chol_a.T + mu_a
        r = fd_infinity(x, ref, generator=g)
        vals.append(r["fd_inf"])
        errs.append(r["fd_inf_err"])
    vals, errs = np.array(vals), np.array(errs)
    assert np.sqrt(np.mean(((vals - exact) / errs) ** 2)) < 1.1 and vals.std(ddof=1) < 1.1 * errs.mean()
