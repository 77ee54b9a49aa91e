"""Time-conditioned U-Net in the style of DDPM (Ho et al. 2020) and ADM (Dhariwal & Nichol 2021).

Layout (L = len(channel_mult) levels, C = channels):

    conv_in -> [level 0: num_res_blocks x (ResBlock [+ Attention]), Downsample] -> ... -> level L-1 (no Downsample)
            -> middle: ResBlock, Attention, ResBlock
            -> [level L-1: (num_res_blocks + 1) x (concat skip, ResBlock [+ Attention]), Upsample] -> ... -> level 0
            -> GroupNorm -> SiLU -> conv_out (zero-initialised)

Downsampling is a stride-2 3x3 convolution, so a side of n becomes ceil(n / 2) (28 -> 14 -> 7 -> 4); upsampling
is nearest-neighbour to the exact size of the matching skip (4 -> 7), so any image size works. The image size
is fixed at construction and checked in forward.

Conditioning: time t (N,) goes through a sinusoidal embedding and an MLP; with `num_classes` set, a class
embedding with num_classes + 1 rows is added to it, row `num_classes` being the null class used for
classifier-free guidance (class_labels=None means the null class for every sample). With `cond_channels` > 0
the net is image-conditioned (super-resolution, Saharia et al. 2021; cascades, Ho et al. 2021): forward takes
`low_res` (N, cond_channels, h, w), upsampled bilinearly to the image size and concatenated to the input
channels, and `low_res_sigma` (N,), the noise level of its conditioning augmentation, embedded like time (as
COND_SIGMA_SCALE * sigma) and added to the time embedding.

The network works in channels_last memory format and under torch.autocast(dtype=torch.bfloat16).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_choice
from .embeddings import TimeEmbedding, add_class_embedding, as_time_vector

Size = Union[int, Sequence[int]]
COND_SIGMA_SCALE = 1000.0  # the augmentation level sigma in [0, ~1] is embedded like a timestep in [0, 1000]


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {size}")
    return size


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that runs channels-last CPU input through the contiguous kernel and returns channels-last.

    PyTorch's channels-last GroupNorm on CPU is ~20x slower than the contiguous one in bf16 (and slower in
    fp32); two layout copies cost far less. Same parameters and state-dict keys as nn.GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.ndim == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, heads, L, d) (Vaswani et al. 2017, eq. 1).

    F.scaled_dot_product_attention, except for bf16 on CPU, where its flash kernel's backward is several times
    slower than two batched matmuls and a softmax at the short sequences of small U-Nets."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, heads, L, L)
        return scores.softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@dataclass
class UNetConfig:
    """All hyperparameters of :class:`UNet`. Defaults: a small MNIST (1x28x28) net that trains on a 2-core CPU."""

    image_size: Size = 28                     # input side (int) or (H, W); checked in forward
    in_channels: int = 1                      # 1 (grey) or 3 (RGB)
    out_channels: Optional[int] = None        # None: same as in_channels
    channels: int = 32                        # base width C
    channel_mult: tuple = (1, 2, 2)           # width multiplier per resolution level
    num_res_blocks: int = 1                   # residual blocks per level on the way down (up: one more)
    attn_resolutions: tuple = (7,)            # feature-map heights that get self-attention
    mid_attention: bool = True                # self-attention in the middle block
    num_heads: int = 4                        # attention heads (ignored when head_channels is set)
    head_channels: Optional[int] = None       # channels per head; heads = width // head_channels
    dropout: float = 0.0                      # dropout inside residual blocks
    scale_shift: bool = True                  # FiLM (ADM scale-shift norm) instead of adding the embedding
    num_classes: Optional[int] = None         # class-conditional when set; row num_classes is the null class
    time_embed_mult: int = 4                  # time-embedding width = time_embed_mult * channels
    norm_groups: int = 32                     # GroupNorm groups (reduced to gcd with the width)
    zero_init_residual: bool = True           # zero the last conv of each block and attention output (ADM)
    cond_channels: int = 0                    # channels of a low-res conditioning image (0: none), see forward

    def replace(self, **changes) -> "UNetConfig":
        return replace(self, **changes)


UNET_PRESETS: dict[str, UNetConfig] = {
    # 0.19M parameters, two levels: for tests
    "tiny": UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,),
                       num_heads=2, norm_groups=8),
    # fast MNIST net, attention only at 7x7 (the UNetConfig defaults)
    "mnist-small": UNetConfig(),
    # MNIST net with two residual blocks per level
    "mnist": UNetConfig(num_res_blocks=2),
    # wider MNIST net
    "mnist-wide": UNetConfig(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,)),
    # the DDPM CIFAR-10 net (Ho et al. 2020): 35.7M parameters
    "cifar-ddpm": UNetConfig(image_size=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), num_heads=1, dropout=0.1,
                             scale_shift=False),
}


# ------------------------------------------------------------------------------------------------ blocks
class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> (+ emb or FiLM) -> GroupNorm -> SiLU -> dropout -> conv3x3, plus skip."""

    def __init__(
        self,
        in_ch: int,                     # input channels
        out_ch: int,                    # output channels
        emb_dim: int,                   # width of the (time + class) embedding
        dropout: float = 0.0,           # dropout before the second conv
        scale_shift: bool = True,       # FiLM: norm(h) * (1 + scale) + shift
        groups: int = 32,               # GroupNorm groups
        zero_init: bool = True,         # zero the second conv so the block starts as the identity
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:
            _zero(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (N, in_ch, H, W); emb: (N, emb_dim), already passed through SiLU
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out_ch, H, W)
        e = self.emb(emb)[:, :, None, None]  # (N, out_ch or 2*out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(
        self,
        ch: int,                        # channels
        num_heads: int = 1,             # attention heads; ch must be divisible by it
        groups: int = 32,               # GroupNorm groups
        zero_init: bool = True,         # zero the output projection so the block starts as the identity
    ):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention width {ch} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(ch, groups)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        if zero_init:
            _zero(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C); a view for channels_last input
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, c // self.num_heads))  # (N, HW, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, heads, HW, d)
        out = attention(q, k, v)  # (N, heads, HW, d)
        out = self.proj(out.transpose(1, 2).flatten(2))  # (N, HW, C)
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # (N, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or average pooling): side n -> ceil(n / 2)."""

    def __init__(self, ch: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor = None) -> torch.Tensor:
        return self.op(x)  # (N, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a fixed size (the matching skip's), then an optional 3x3 conv."""

    def __init__(self, ch: int, size: tuple[int, int], use_conv: bool = True):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=self.size, mode="nearest"))  # (N, C, *size)


class Block(nn.Module):
    """A residual block followed by optional self-attention."""

    def __init__(self, res: ResBlock, attn: Optional[Attention] = None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# -------------------------------------------------------------------------------------------------- UNet
class UNet(nn.Module):
    """Time- (and optionally class-) conditioned U-Net: forward(x (N,C,H,W), t (N,), class_labels=None) -> (N,C,H,W)."""

    def __init__(
        self,
        image_size: Size = 28,                    # input side (int) or (H, W)
        in_channels: int = 1,                     # input channels
        out_channels: Optional[int] = None,       # output channels (None: in_channels)
        channels: int = 32,                       # base width
        channel_mult: Sequence[int] = (1, 2, 2),  # width multiplier per level
        num_res_blocks: int = 1,                  # residual blocks per level
        attn_resolutions: Sequence[int] = (7,),   # feature-map heights with self-attention
        mid_attention: bool = True,               # self-attention in the middle block
        num_heads: int = 4,                       # attention heads
        head_channels: Optional[int] = None,      # channels per head (overrides num_heads)
        dropout: float = 0.0,                     # dropout in residual blocks
        scale_shift: bool = True,                 # FiLM conditioning in residual blocks
        num_classes: Optional[int] = None,        # number of classes (None: unconditional)
        time_embed_mult: int = 4,                 # embedding width = time_embed_mult * channels
        norm_groups: int = 32,                    # GroupNorm groups
        zero_init_residual: bool = True,          # blocks start as the identity
        cond_channels: int = 0,                   # low-res conditioning image channels (0: none)
    ):
        super().__init__()
        self.config = UNetConfig(
            image_size=image_size, in_channels=in_channels, out_channels=out_channels, channels=channels,
            channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions), mid_attention=mid_attention, num_heads=num_heads,
            head_channels=head_channels, dropout=dropout, scale_shift=scale_shift, num_classes=num_classes,
            time_embed_mult=time_embed_mult, norm_groups=norm_groups, zero_init_residual=zero_init_residual,
            cond_channels=cond_channels,
        )
        if in_channels < 1 or channels < 1 or num_res_blocks < 0 or not channel_mult:
            raise ValueError("in_channels and channels must be >= 1, num_res_blocks >= 0, channel_mult non-empty")
        self.image_size = _pair(image_size)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes

        # spatial size per level: side n -> ceil(n / 2)
        sizes = [self.image_size]
        for _ in channel_mult[1:]:
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        self.level_sizes = tuple(sizes)
        heights = [s[0] for s in sizes]
        bad = [r for r in attn_resolutions if r not in heights]
        if bad:
            raise ValueError(
                f"attn_resolutions {tuple(bad)} match no level; with image_size {image_size} and "
                f"channel_mult {tuple(channel_mult)} the feature-map heights are {tuple(heights)}"
            )

        def heads(ch):
            return max(1, ch // head_channels) if head_channels else num_heads

        def attn(ch):
            return Attention(ch, heads(ch), norm_groups, zero_init_residual)

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout, scale_shift, norm_groups, zero_init_residual)

        emb_dim = time_embed_mult * channels
        self.time_embed = TimeEmbedding(channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.cond_channels = cond_channels
        self.cond_sigma_embed = TimeEmbedding(channels, emb_dim) if cond_channels else None

        self.conv_in = nn.Conv2d(in_channels + cond_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            use_attn = heights[level] in attn_resolutions
            for _ in range(num_res_blocks):
                self.down.append(Block(res(ch, mult * channels), attn(mult * channels) if use_attn else None))
                ch = mult * channels
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([Block(res(ch, ch), attn(ch) if mid_attention else None), Block(res(ch, ch))])

        self.up = nn.ModuleList()
        self.up_is_block = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            use_attn = heights[level] in attn_resolutions
            for _ in range(num_res_blocks + 1):
                self.up.append(Block(res(ch + skip_chs.pop(), mult * channels),
                                     attn(mult * channels) if use_attn else None))
                self.up_is_block.append(True)
                ch = mult * channels
            if level != 0:
                self.up.append(Upsample(ch, sizes[level - 1]))
                self.up_is_block.append(False)

        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, cfg: UNetConfig) -> "UNet":
        return cls(**asdict(cfg))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        check_choice("UNet preset", name, UNET_PRESETS)
        return cls.from_config(UNET_PRESETS[name].replace(**overrides))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(
                f"UNet expects input of shape (N, {self.in_channels}, {h}, {w}), got {tuple(x.shape)}; "
                f"build the net with image_size / in_channels matching the data"
            )

    def _add_low_res(self, x, emb, low_res, low_res_sigma):
        """Concatenate the upsampled conditioning image to x and add the embedding of its noise level."""
        if low_res is None or low_res.ndim != 4 or tuple(low_res.shape[:2]) != (x.shape[0], self.cond_channels):
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(f"this UNet needs low_res of shape ({x.shape[0]}, {self.cond_channels}, h, w), "
                             f"got {got}")
        up = F.interpolate(low_res.to(x.dtype), size=self.image_size, mode="bilinear", align_corners=False)
        sigma = as_time_vector(0.0 if low_res_sigma is None else low_res_sigma, x.shape[0], x.device)  # (N,)
        emb = emb + self.cond_sigma_embed(COND_SIGMA_SCALE * sigma)  # (N, E)
        return torch.cat([x, up], dim=1), emb  # (N, C_in + C_cond, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                low_res: Optional[torch.Tensor] = None, low_res_sigma=None) -> torch.Tensor:
        self._check_input(x)
        emb = self.time_embed(as_time_vector(t, x.shape[0], x.device))  # (N, E)
        emb = add_class_embedding(emb, self.class_embed, class_labels, self.num_classes)  # (N, E)
        if self.cond_channels:
            x, emb = self._add_low_res(x, emb, low_res, low_res_sigma)  # (N, C_in + C_cond, H, W)
        elif low_res is not None:
            raise ValueError("low_res given but the net was built with cond_channels=0")
        emb = F.silu(emb)  # every block starts its embedding projection with SiLU; do it once

        h = self.conv_in(x)  # (N, C, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)  # (N, C * mult[-1], H', W')
        for block, is_block in zip(self.up, self.up_is_block):
            if is_block:
                h = torch.cat([h, skips.pop()], dim=1)  # (N, C_h + C_skip, H', W')
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, H, W)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
