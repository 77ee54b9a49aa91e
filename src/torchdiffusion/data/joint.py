"""A joint Gaussian over concatenated (x, y) with its exact denoiser and exact conditionals (docs/conditioning.md).

For z = (x, y) ~ N(mu, C), C = U diag(l) U^T, the noised marginal is N(mu, C + sigma^2 I) and the optimal
denoiser is E[z0 | z] = mu + C (C + sigma^2 I)^-1 (z - mu) = mu + U diag(l / (l + sigma^2)) U^T (z - mu)
(Tweedie; the Wiener filter). The conditionals are Gaussian with the Schur complement:
y | x = a ~ N(mu_y + C_yx C_xx^-1 (a - mu_x), C_yy - C_yx C_xx^-1 C_xy), and x | y alike. One model of (x, y)
gives both p(y | x) and p(x | y) by inpainting the known part (:func:`torchdiffusion.edit.impute` with
:meth:`JointGaussian.mask`).

The image version packs (image, label) into one tensor: the label block y = scale (2 onehot - 1) as constant planes
y_k / sqrt(H W) after the image channels (:func:`pack_pair`, an isometry onto the constant-plane subspace, so iid
noise on the packed tensor is noise of the same sigma on both blocks); :class:`JointImageLabel` yields such pairs
and :func:`pair_mask` is the mask of one block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------ (image, label) pairs, packed
@dataclass
class JointConfig:
    """Task joint: one diffusion over z = (x, y), the image and its label as a scaled one-hot (docs/conditioning.md)."""
    classes: int = 10               # label block: one value per class, packed as that many constant image planes
    label_scale: float = 1.0        # y = label_scale * (2 onehot - 1): 1 puts each label value in the pixels' range
    readout: str = "scaled"         # scaled: the network sees each label value at the pixels' scale in every pixel
                                    # of its plane (edit.PlaneMean readout sqrt(H W)); planes: the packed planes as
                                    # they are, y_k / sqrt(H W) per pixel (checkpoints written before the option)
    label_weight: float = 1.0       # weight of the label block's squared error against the image's (simple loss)


READOUTS = ("scaled", "planes")


def check_joint_config(c: JointConfig, in_channels: int) -> None:
    if c.classes < 2 or not math.isfinite(c.label_scale) or c.label_scale <= 0:
        raise ValueError(f"joint.classes must be at least 2 and joint.label_scale a positive number, got "
                         f"{c.classes}, {c.label_scale}")
    check_choice("joint.readout", c.readout, READOUTS)
    if not math.isfinite(c.label_weight) or c.label_weight <= 0:
        raise ValueError(f"joint.label_weight must be a positive number, got {c.label_weight}")
    if in_channels <= c.classes:
        raise ValueError(f"a joint model's network takes the image channels plus joint.classes={c.classes} label "
                         f"planes: set model.unet.in_channels to image channels + {c.classes} (e.g. {1 + c.classes})")


def encode_labels(labels: torch.Tensor, classes: int, scale: float = 1.0) -> torch.Tensor:
    """Class indices (N,) -> the label block y = scale (2 onehot - 1), (N, classes)."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer class indices of shape (N,), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return scale * (2.0 * torch.nn.functional.one_hot(labels.long(), classes).float() - 1.0)


def label_probabilities(y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The inverse of :func:`encode_labels` on the mean: E[y] = scale (2 p - 1), so p = (E[y] / scale + 1) / 2."""
    return (y / scale + 1.0) / 2.0


def pack_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x (N, C, H, W), y (N, K)) -> z (N, C + K, H, W): label value k as the constant plane y_k / sqrt(H W).

    The map E: (x, y) -> z is an isometry onto the constant-plane subspace (|z|^2 = |x|^2 + |y|^2), so noising z
    with iid noise, z + sigma n, is noising the pair with the same sigma: unpack(z + sigma n) = (x + sigma n_x,
    y + sigma n_y), n_y = sum of each plane's noise / sqrt(H W) ~ N(0, I)."""
    if x.ndim != 4 or y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"pack_pair takes images (N, C, H, W) and labels (N, K) of the same N, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    h, w = x.shape[-2:]
    planes = (y / math.sqrt(h * w))[:, :, None, None].expand(*y.shape, h, w)  # (N, K, H, W)
    return torch.cat([x, planes.to(x.dtype)], 1)


def unpack_pair(z: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, C + K, H, W) -> (x (N, C, H, W), y (N, K)), y = E^T's label part (each plane's sum / sqrt(H W));
    unpack_pair(pack_pair(x, y)) = (x, y), and on any z it is the orthogonal projection's coordinates."""
    if z.ndim != 4 or z.shape[1] <= classes:
        raise ValueError(f"a packed pair has shape (N, C + {classes}, H, W) with C >= 1, got {tuple(z.shape)}")
    h, w = z.shape[-2:]
    return z[:, :-classes], z[:, -classes:].flatten(2).sum(2) / math.sqrt(h * w)


def pair_mask(channels: int, classes: int, given: str) -> torch.Tensor:
    """The inpainting mask (1, C + K, 1, 1) of a packed pair: 1 on the known block ('x' the C image channels, 'y'
    the K label planes), 0 on the block to draw."""
    check_choice("given (the known part)", given, PARTS)
    known = torch.arange(channels + classes) < channels
    return (known if given == "x" else ~known).float()[None, :, None, None]


class JointImageLabel:
    """An image data set whose batches are the packed pairs z = pack_pair(x, encode_labels(labels)), (B, C + K, H,
    W), with no class labels beside them: the model learns p(x, y) and conditions by inpainting."""

    def __init__(self, images, c: JointConfig):
        if getattr(images, "labels", None) is None:
            raise ValueError(f"a joint (image, label) model needs a labelled data set; {images!r} has no labels")
        self.images, self.config = images, c
        self.labels, self.num_classes = images.labels, c.classes
        self.name, self.classes = images.name, getattr(images, "classes", None)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def sample_shape(self) -> tuple:
        c, h, w = self.images.sample_shape
        return (c + self.config.classes, h, w)

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        x, y = self.images.batch(indices, generator=generator, flip=flip, device=device)[:2]
        return pack_pair(x, encode_labels(y, self.config.classes, self.config.label_scale).to(x.device)), None
