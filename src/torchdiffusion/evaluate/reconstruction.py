"""How well an autoencoder reconstructs: PSNR, SSIM and the Frechet distance of reconstructions, beside the
real-vs-real floor (docs/latent.md).

* **PSNR** per image, 10 log10(L^2 / MSE) with the images mapped to [0, 1] (L = 1), averaged over images.
* **SSIM** (Wang et al. 2004, eq. 13): local means, variances and covariance under an 11 x 11 Gaussian window of
  std 1.5 (valid positions only), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over positions, channels and images.
* **rFD**: the reconstructions of held-out test images scored by :func:`~.quality.evaluate_samples` against a fixed
  reference of *other* test images (``n_ref`` of them), with the floor of real training images of the same class
  counts, so that neither side sees the reference images themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..latent import LatentCodec
from .quality import REFERENCE_SEED, _order, evaluate_samples, split_dataset

SSIM_WINDOW = 11          # side of the Gaussian window (Wang et al. 2004)
SSIM_SIGMA = 1.5          # its standard deviation in pixels
SSIM_K1, SSIM_K2 = 0.01, 0.03
RECON_BATCH = 500         # images per encode/decode batch
RECON_N_REF = 5000        # test images in the reference; the reconstructed ones come from the rest


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1] (float64, clamped)."""
    return ((x.double() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) peak signal-to-noise ratio in dB of images a, b in [-1, 1] (N, C, H, W), on the [0, 1] scale; inf where
    they are equal."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr needs two image batches of one shape (N, C, H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    mse = (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()  # (size,)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(N,) structural similarity of images a, b in [-1, 1] (N, C, H, W), computed on the [0, 1] scale."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two image batches of one shape (N, C, H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim's {window} x {window} window needs images of at least that size, got "
                         f"{tuple(a.shape[-2:])}")
    x, y = _unit(a), _unit(b)
    n, c = x.shape[:2]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()  # (C, 1, k, k)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)


def held_out_test_indices(dataset: str, n: int, n_ref: int = RECON_N_REF) -> torch.Tensor:
    """n test-split indices outside the evaluation reference of ``n_ref`` images (the rest of the same fixed
    permutation)."""
    perm = _order(dataset, "test", REFERENCE_SEED)
    if not 1 <= n <= len(perm) - n_ref:
        raise ValueError(f"n must lie in 1..{len(perm) - n_ref} (the {dataset} test images outside the "
                         f"{n_ref}-image reference), got {n}")
    return perm[n_ref:n_ref + n]


@torch.no_grad()
def reconstruct(codec: LatentCodec, x: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
    """decode(encode(x)) in batches (the posterior mean, or a sample of it), clamped to [-1, 1]."""
    out = [codec.decode(codec.encode(b, sample=sample, generator=generator)).clamp(-1, 1)
           for b in x.split(RECON_BATCH)]
    return torch.cat(out)


def evaluate_reconstructions(codec: LatentCodec, dataset: str, *, n: int = 2000, n_ref: int = RECON_N_REF,
                             floor_draws: int = 5, seed: int = 0, bootstrap: int = 100) -> dict:
    """PSNR and SSIM (mean and std over images) and rFD with its floor of `n` held-out test images of `dataset`
    reconstructed through `codec` (posterior means)."""
    idx = held_out_test_indices(dataset, n, n_ref)
    x, labels = split_dataset(dataset, "test").batch(idx)
    if tuple(x.shape[1:]) != tuple(codec.image_shape):
        raise ValueError(f"the autoencoder takes images of shape {codec.image_shape}, {dataset} has "
                         f"{tuple(x.shape[1:])}")
    rec = reconstruct(codec, x)
    p, s = psnr(rec, x), ssim(rec, x)
    finite = p[torch.isfinite(p)]
    q = evaluate_samples(rec, dataset, labels=labels, n_ref=n_ref, floor_draws=floor_draws, seed=seed,
                         bootstrap=bootstrap, fd_inf=False)
    out = {"n": n, "n_ref": n_ref, "psnr": float(finite.mean()) if len(finite) else math.inf,
           "psnr_std": float(finite.std()) if len(finite) > 1 else 0.0, "ssim": float(s.mean()),
           "ssim_std": float(s.std()), "mse": float((rec - x).double().pow(2).mean())}
    out.update({k: q[k] for k in ("fd", "fd_std", "fd_floor", "fd_floor_std", "fd_ratio", "fd_ratio_std",
                                  "accuracy", "reference") if k in q})
    return out
