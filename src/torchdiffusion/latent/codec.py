"""Images <-> the latents a latent diffusion model works on (Rombach et al. 2022, sec. 3-4).

:class:`LatentCodec` scales the autoencoder's latents by a factor computed from data, 1 / std of the posterior
samples of training images (Stable Diffusion's 0.18215 is this number for its autoencoder), so that the diffusion
model sees latents of unit variance and the usual schedules apply. :class:`LatentDataset` encodes a data set once
(the posterior means and log-variances, cached on disk under the autoencoder's hash) and draws a fresh posterior
sample z = (mean + std eps) * scale for every example of every batch, from the trainer's per-example generators.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import cache_dir
from ..nets.autoencoder import KLAutoencoder
from ..utils import file_sha256, randn

ENCODE_BATCH = 500         # images per encoder batch
SCALE_EXAMPLES = 2048      # training images whose posterior samples set the latent scale
SCALE_SEED = 0x5CA1E       # generator seed of those samples


class LatentCodec(nn.Module):
    """encode(x) = scale * z with z ~ q(z | x) (or its mean), decode(z) = decoder(z / scale)."""

    def __init__(self, autoencoder: KLAutoencoder, scale: float, sha256: str = ""):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"the latent scale must be positive, got {scale}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(scale)
        self.sha256 = sha256  # of the autoencoder checkpoint it came from ('' when built in memory)

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.autoencoder.latent_shape)

    @property
    def image_shape(self) -> tuple:
        return (self.autoencoder.config.in_channels, *self.autoencoder.image_size)

    @property
    def factor(self) -> int:
        return self.autoencoder.config.factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator=None) -> torch.Tensor:
        post = self.autoencoder.encode(x.float())
        return self.scale * (post.sample(generator) if sample else post.mode())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z.float() / self.scale)


@torch.no_grad()
def latent_scale(autoencoder: KLAutoencoder, images: torch.Tensor) -> float:
    """1 / std of posterior samples of `images` (all entries together), with a fixed generator."""
    g = torch.Generator().manual_seed(SCALE_SEED)
    zs = [autoencoder.encode(b.float()).sample(g) for b in images.split(ENCODE_BATCH)]
    return float(1.0 / torch.cat(zs).double().std())


def mask_to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (..., H, W) of known pixels (1) -> the latent grid (..., H/f, W/f): a latent cell counts as
    known only when every pixel of its f x f patch is known (a min-pool)."""
    m = mask.float()
    lead = m.shape[:-2]
    out = -F.max_pool2d(-m.reshape(-1, 1, *m.shape[-2:]), factor)  # (B, 1, H/f, W/f)
    return out.reshape(*lead, *out.shape[-2:])


class LatentDataset:
    """The latents of an image data set, for training: the same interface as the image data sets (``batch``,
    ``labels``, ``num_classes``, ``sample_shape``, ``len``) with a fresh posterior draw per example and batch."""

    def __init__(self, codec: LatentCodec, images, *, key: str = "", progress: bool = True):
        self.codec = codec
        self.images = images
        self.labels = getattr(images, "labels", None)
        self.num_classes = getattr(images, "num_classes", 0)
        self.name = f"latents({getattr(images, 'name', 'data')})"
        self.mean, self.logvar = self._moments(key, progress)  # (N, C, h, w) each, float32

    @property
    def meta(self) -> dict:
        """What a checkpoint records of its data: the autoencoder it was trained on."""
        return {"autoencoder_sha256": self.codec.sha256, "latent_scale": self.codec.scale,
                "image_shape": list(self.codec.image_shape)}

    def _moments(self, key: str, progress: bool):
        path = cache_dir() / "latents" / f"{self.codec.sha256[:16] or 'memory'}-{key}.safetensors" if key else None
        if path is not None and path.is_file():
            t = load_file(str(path))
            if t["mean"].shape[0] == len(self.images):
                return t["mean"], t["logvar"]
        means, logvars = [], []
        for start in tqdm(range(0, len(self.images), ENCODE_BATCH), desc="encoding latents", unit="batch",
                          disable=not progress):
            x, _ = self.images.batch(torch.arange(start, min(start + ENCODE_BATCH, len(self.images))))
            with torch.no_grad():
                post = self.codec.autoencoder.encode(x)
            means.append(post.mean)
            logvars.append(post.logvar)
        mean, logvar = torch.cat(means).contiguous(), torch.cat(logvars).contiguous()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"mean": mean, "logvar": logvar}, str(tmp))
            tmp.replace(path)
        return mean, logvar

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.mean.shape[1:])

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        """(scaled posterior samples (B, C, h, w), labels or None); `flip` is refused (flip the images before
        encoding instead: a latent flipped is not the latent of the flipped image)."""
        if flip:
            raise ValueError("data.flip does not apply to latents; train the autoencoder on flipped images instead")
        idx = torch.as_tensor(indices, dtype=torch.int64)
        mean, std = self.mean[idx], torch.exp(0.5 * self.logvar[idx])
        z = (mean + std * randn(mean.shape, generator=generator)) * self.codec.scale
        y = None if self.labels is None else self.labels[idx].to(device)
        return z.to(device), y


def cache_key(dataset: str, split: str, image_size, subset) -> str:
    """The part of a latent cache file's name that says which images were encoded."""
    name = Path(str(dataset)).name.replace(".", "_")
    return f"{name}-{split}-{image_size or 'native'}-{subset or 'all'}"
