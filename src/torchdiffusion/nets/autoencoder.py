"""A KL-regularised convolutional autoencoder in the style of latent diffusion (Rombach et al. 2022, sec. 3 and
app. G), and the patch discriminator of its adversarial term (Isola et al. 2017; Esser et al. 2021).

Encoder (f = 2^(L-1) for L = len(channel_mult) levels, C = channels)::

    conv_in -> [level l: num_res_blocks x ResBlock, Downsample (all but the last)] -> mid: ResBlock, Attention,
    ResBlock -> GroupNorm -> SiLU -> conv_out -> (mean, log-variance), each (N, latent_channels, H/f, W/f)

and the decoder mirrors it (num_res_blocks + 1 blocks per level, nearest-neighbour upsampling to the exact sizes).
The residual blocks and attention are the U-Net's (:mod:`.unet`), without a time embedding. The posterior is a
diagonal Gaussian q(z | x) = N(mean, diag(exp(logvar))) (:class:`DiagonalGaussian`), regularised towards N(0, I)
by a small KL weight, so that the latents stay close to a standard scale without losing detail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..utils import randn_like
from .unet import Attention, Downsample, ResBlock, Size, Upsample, _norm, _pair

LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the log-variance here (exp(20) covers any latent scale)
FACTORS = (1, 2, 4, 8)        # downsampling factors the encoder can have (f = 2^(levels - 1))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), mean and logvar (N, C, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        """The reparameterised draw mean + std * eps (Kingma & Welling 2014, eq. 10): differentiable in both."""
        return self.mean + self.std * randn_like(self.mean, generator=generator)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example (N,): 0.5 sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, app. B)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


@dataclass
class AutoencoderConfig:
    """All hyperparameters of :class:`KLAutoencoder` (and its discriminator). Defaults: 28x28 grey images,
    f = 4 (a 7 x 7 x 4 latent)."""

    image_size: Size = 28                   # input side (int) or (H, W); must divide by `factor`
    in_channels: int = 1                    # image channels
    latent_channels: int = 4                # C of the latent (N, C, H/f, W/f)
    factor: int = 4                         # downsampling factor f, one of FACTORS
    channels: int = 32                      # base width
    channel_mult: tuple = ()                # width multiplier per level (log2 f + 1 of them); () : 1, 2, 2, ...
    num_res_blocks: int = 1                 # residual blocks per encoder level (decoder: one more)
    mid_attention: bool = True              # self-attention in the middle blocks
    num_heads: int = 1                      # attention heads
    norm_groups: int = 32                   # GroupNorm groups (reduced to gcd with the width)
    dropout: float = 0.0                    # dropout inside residual blocks
    disc_layers: int = 0                    # patch discriminator: stride-2 layers (0: no discriminator)
    disc_channels: int = 64                 # discriminator base width

    def replace(self, **changes) -> "AutoencoderConfig":
        return replace(self, **changes)


def _levels(cfg: AutoencoderConfig) -> tuple:
    if cfg.factor not in FACTORS:
        raise ValueError(f"unknown autoencoder factor {cfg.factor}; allowed values: {', '.join(map(str, FACTORS))}")
    n = int(math.log2(cfg.factor)) + 1
    mult = tuple(cfg.channel_mult) or (1,) + (2,) * (n - 1)
    if len(mult) != n:
        raise ValueError(f"channel_mult {tuple(cfg.channel_mult)} has {len(mult)} levels but factor {cfg.factor} "
                         f"needs {n} (one per resolution, f = 2^(levels - 1))")
    return mult


class Encoder(nn.Module):
    """x (N, C_in, H, W) -> (mean, logvar), each (N, latent_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig, mult: tuple):
        super().__init__()
        res = lambda a, b: ResBlock(a, b, 0, cfg.dropout, groups=cfg.norm_groups, zero_init=False)  # noqa: E731
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(res(ch, cfg.channels * m))
                ch = cfg.channels * m
            if level != len(mult) - 1:
                self.down.append(Downsample(ch))
        self.mid = nn.ModuleList([res(ch, ch), Attention(ch, cfg.num_heads, cfg.norm_groups, zero_init=False)
                                  if cfg.mid_attention else nn.Identity(), res(ch, ch)])
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x)  # (N, C, H, W)
        for block in (*self.down, *self.mid):
            h = block(h) if isinstance(block, (Downsample, Attention, nn.Identity)) else block(h, None)
        return self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)  # 2 x (N, latent, H/f, W/f)


class Decoder(nn.Module):
    """z (N, latent_channels, h, w) -> x (N, C_in, H, W)."""

    def __init__(self, cfg: AutoencoderConfig, mult: tuple, sizes: list):
        super().__init__()
        res = lambda a, b: ResBlock(a, b, 0, cfg.dropout, groups=cfg.norm_groups, zero_init=False)  # noqa: E731
        ch = cfg.channels * mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = nn.ModuleList([res(ch, ch), Attention(ch, cfg.num_heads, cfg.norm_groups, zero_init=False)
                                  if cfg.mid_attention else nn.Identity(), res(ch, ch)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(res(ch, cfg.channels * mult[level]))
                ch = cfg.channels * mult[level]
            if level != 0:
                self.up.append(Upsample(ch, sizes[level - 1]))
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in (*self.mid, *self.up):
            h = block(h) if isinstance(block, (Upsample, Attention, nn.Identity)) else block(h, None)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C_in, H, W)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the output convolution (the adaptive adversarial weight compares gradients there)."""
        return self.conv_out.weight


class KLAutoencoder(nn.Module):
    """encode(x) -> DiagonalGaussian over z (N, latent_channels, H/f, W/f); decode(z) -> x."""

    def __init__(self, cfg: AutoencoderConfig | None = None, **fields):
        super().__init__()
        cfg = cfg or AutoencoderConfig(**fields)
        self.config = cfg
        mult = _levels(cfg)
        self.image_size = _pair(cfg.image_size)
        h, w = self.image_size
        if h % cfg.factor or w % cfg.factor:
            raise ValueError(f"image size {h}x{w} does not divide by the autoencoder's factor {cfg.factor}: choose "
                             f"a factor in {', '.join(str(f) for f in FACTORS if h % f == 0 and w % f == 0)} or resize "
                             "the images (data.image_size)")
        sizes = [(h // 2**i, w // 2**i) for i in range(len(mult))]
        self.latent_shape = (cfg.latent_channels, *sizes[-1])
        self.encoder = Encoder(cfg, mult)
        self.decoder = Decoder(cfg, mult, sizes)

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> "KLAutoencoder":
        return cls(cfg)

    def _check(self, x: torch.Tensor) -> None:
        want = (self.config.in_channels, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"the autoencoder takes images of shape (N, {', '.join(map(str, want))}), got "
                             f"{tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x)
        return DiagonalGaussian(*self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"the decoder takes latents of shape (N, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator=None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix; as taming-transformers' NLayerDiscriminator): stride-2 4x4
    convolutions with LeakyReLU(0.2), one stride-1 layer, and a 1-channel map of per-patch logits. GroupNorm
    stands where the original has BatchNorm, so that an example's logits do not depend on its batch."""

    def __init__(
        self,
        in_channels: int = 1,           # image channels
        channels: int = 64,             # width of the first layer (doubled per layer, at most 8x)
        layers: int = 2,                # stride-2 layers
        groups: int = 32,               # GroupNorm groups
    ):
        super().__init__()
        mods = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, out, 4, 2 if i < layers else 1, 1), _norm(out, groups), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, 1, h', w') patch logits


class AutoencoderNet(nn.Module):
    """What the 'autoencoder' task trains: the autoencoder, the likelihood's learned log-scale and, when configured,
    the discriminator. One forward computes everything the objective needs, so data-parallel training sees a
    single forward."""

    def __init__(self, cfg: AutoencoderConfig | None = None, **fields):
        super().__init__()
        cfg = cfg or AutoencoderConfig(**fields)
        self.config = cfg
        self.autoencoder = KLAutoencoder(cfg)
        self.discriminator: Optional[PatchDiscriminator] = (
            PatchDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers, cfg.norm_groups)
            if cfg.disc_layers > 0 else None)
        self.logvar = nn.Parameter(torch.zeros(()))  # learned log-scale of the Laplace likelihood (LDM's logvar)

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> "AutoencoderNet":
        return cls(cfg)

    def forward(self, x: torch.Tensor, generator=None) -> dict:
        """{recon, posterior} and, with a discriminator, logits of the real images, of the detached
        reconstructions (the discriminator's loss) and of the reconstructions through a frozen copy of the
        discriminator's weights (the generator's loss: its gradient reaches the autoencoder only)."""
        recon, posterior = self.autoencoder(x, generator)
        out = {"recon": recon, "posterior": posterior}
        d = self.discriminator
        if d is not None:
            frozen = {k: v.detach() for k, v in d.named_parameters()}
            out.update(logits_real=d(x), logits_fake=d(recon.detach()),
                       logits_gen=functional_call(d, frozen, (recon,)))
        return out


__all__ = ["AutoencoderConfig", "KLAutoencoder", "AutoencoderNet", "PatchDiscriminator", "DiagonalGaussian"]
