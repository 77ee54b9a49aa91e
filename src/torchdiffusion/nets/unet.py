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

Options beyond DDPM's layout:

* ``block: convnext``: ConvNeXt blocks (Liu et al. 2022) instead of the two-convolution residual blocks: a 7x7
  depthwise convolution, LayerNorm over channels, FiLM by the embedding, an inverted-bottleneck MLP.
* ``attention: window``: the self-attention layers at attn_resolutions attend inside local windows of
  ``window_size`` (Swin, Liu et al. 2021), every second one with windows shifted by half a window
  (``shift_windows``); a window that covers the feature map is full attention. The middle block stays full.
* ``context_dim`` with ``cross_attn_resolutions``: blocks at those feature-map heights cross-attend to a context
  sequence ``context`` (N, L, context_dim) with padding mask ``context_mask`` (N, L) bool (LDM, Rombach et al.
  2022); a learned null entry in front is always visible, so an all-masked (or absent) context is the
  unconditional path. ``context_global`` also adds a linear map of the mean of the visible entries to the
  embedding (Imagen's pooled text vector, Saharia et al. 2022): every block then sees the caption as a whole, as
  it sees a class label; with no visible entry the mean is the null entry, so the unconditional path stays exact.
* ``dynamic_conv_kernels: K``: every block convolution mixes K kernels with softmax weights computed from the
  time (+ class) embedding (CondConv, Yang et al. 2019; Dynamic Convolution, Chen et al. 2020).

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
from .embeddings import (TimeEmbedding, add_class_embedding, add_guidance_embedding, add_interval_embedding,
                         as_time_vector)
from .transformer import CrossAttention, NullContext, attention, visible_mean

Size = Union[int, Sequence[int]]
COND_SIGMA_SCALE = 1000.0  # the augmentation level sigma in [0, ~1] is embedded like a timestep in [0, 1000]
BLOCKS = ("resnet", "convnext")
ATTENTIONS = ("full", "window")
CONVNEXT_KERNEL = 7  # side of the ConvNeXt depthwise convolution


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
    guidance_embed: bool = False              # take the guidance scale as an input (latent consistency students)
    interval_embed: bool = False              # take a second time input, the interval t - r (MeanFlow students)
    time_embed_mult: int = 4                  # time-embedding width = time_embed_mult * channels
    norm_groups: int = 32                     # GroupNorm groups (reduced to gcd with the width)
    zero_init_residual: bool = True           # zero the last conv of each block and attention output (ADM)
    cond_channels: int = 0                    # channels of a low-res conditioning image (0: none), see forward
    block: str = "resnet"                     # residual block: resnet (two 3x3 convs) or convnext (ConvNeXt)
    convnext_mult: int = 4                    # ConvNeXt MLP width = convnext_mult * block width
    attention: str = "full"                   # attention at attn_resolutions: full, or window (Swin-style)
    window_size: int = 8                      # side of an attention window (attention: window)
    shift_windows: bool = True                # every second window layer shifts its windows by window_size // 2
    context_dim: Optional[int] = None         # width of a context sequence to cross-attend to (None: none)
    cross_attn_resolutions: tuple = ()        # feature-map heights whose blocks cross-attend to the context
    context_global: bool = False              # also add a projection of the context's mean to the embedding
    dynamic_conv_kernels: int = 0             # K >= 1: block convolutions mix K kernels by the embedding (0: off)
    learn_sigma: bool = False                 # 2x output channels: Improved DDPM's variance (return_variance=True)
    fourier_features: tuple = ()              # exponents n: the input gains sin, cos(2^n pi x) channels (VDM: 7, 8)

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
class DynamicConv2d(nn.Module):
    """A convolution whose kernel depends on the embedding e: W(e) = sum_k pi_k(e) W_k and b(e) = sum_k pi_k(e) b_k
    with pi = softmax(Linear(e)) over K kernels (CondConv, Yang et al. 2019, with the softmax routing of Dynamic
    Convolution, Chen et al. 2020), e the time (+ class) embedding. One grouped convolution with
    a kernel per sample computes it; K = 1 is a plain convolution. The K kernels are stored stacked as one 4-D
    weight (K * out, in / groups, k, k), so the module converts to channels-last like a convolution."""

    def __init__(
        self,
        in_ch: int,                     # input channels
        out_ch: int,                    # output channels
        kernel_size: int,               # square kernel side
        num_kernels: int,               # K, the kernels mixed
        emb_dim: int,                   # width of the embedding that routes between them
        padding: int = 0,               # zero padding on each side
        groups: int = 1,                # convolution groups (in_ch: depthwise)
    ):
        super().__init__()
        if num_kernels < 1:
            raise ValueError(f"dynamic_conv_kernels must be >= 1 for a dynamic convolution, got {num_kernels}")
        self.padding, self.groups, self.num_kernels = padding, groups, num_kernels
        self.weight = nn.Parameter(torch.empty(num_kernels * out_ch, in_ch // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_ch))
        for k in range(num_kernels):  # each kernel initialised as nn.Conv2d initialises its own
            ref = nn.Conv2d(in_ch, out_ch, kernel_size, groups=groups, device=self.weight.device)
            with torch.no_grad():
                self.weight[k * out_ch:(k + 1) * out_ch].copy_(ref.weight)
                self.bias[k].copy_(ref.bias)
        self.router = nn.Linear(emb_dim, num_kernels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pi = self.router(emb).softmax(-1)  # (N, K)
        kernels = self.weight.unflatten(0, (self.num_kernels, -1))  # (K, out, in/g, k, k)
        weight = torch.einsum("nk,koihw->noihw", pi.to(kernels.dtype), kernels)  # (N, out, in/g, k, k)
        bias = pi.to(self.bias.dtype) @ self.bias  # (N, out)
        out = F.conv2d(x.reshape(1, n * c, h, w), weight.flatten(0, 1), bias.flatten(), padding=self.padding,
                       groups=n * self.groups)  # (1, N * out, H', W')
        return out.unflatten(1, (n, -1)).squeeze(0)  # (N, out, H', W')

    def zero_(self) -> "DynamicConv2d":
        """Zero every kernel and bias (the routing stays random), so the block starts as the identity."""
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()
        return self


def _conv(in_ch: int, out_ch: int, k: int, emb_dim: int, dynamic_kernels: int, groups: int = 1) -> nn.Module:
    """A k x k 'same' convolution: plain, or dynamic with `dynamic_kernels` kernels when that is >= 1."""
    if dynamic_kernels:
        return DynamicConv2d(in_ch, out_ch, k, dynamic_kernels, emb_dim, padding=k // 2, groups=groups)
    return nn.Conv2d(in_ch, out_ch, k, padding=k // 2, groups=groups)


def _apply_conv(conv: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return conv(x, emb) if isinstance(conv, DynamicConv2d) else conv(x)


def _zero_conv(conv: nn.Module) -> nn.Module:
    return conv.zero_() if isinstance(conv, DynamicConv2d) else _zero(conv)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> (+ emb or FiLM) -> GroupNorm -> SiLU -> dropout -> conv3x3, plus skip.
    With emb_dim = 0 the block has no conditioning (the autoencoder's blocks) and forward takes emb=None."""

    def __init__(
        self,
        in_ch: int,                     # input channels
        out_ch: int,                    # output channels
        emb_dim: int,                   # width of the (time + class) embedding (0: unconditioned)
        dropout: float = 0.0,           # dropout before the second conv
        scale_shift: bool = True,       # FiLM: norm(h) * (1 + scale) + shift
        groups: int = 32,               # GroupNorm groups
        zero_init: bool = True,         # zero the second conv so the block starts as the identity
        dynamic_kernels: int = 0,       # K >= 1: both convs are dynamic with K kernels (0: plain)
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(in_ch, groups)
        if not emb_dim and dynamic_kernels:
            raise ValueError("dynamic convolution needs an embedding to mix its kernels (emb_dim > 0)")
        self.conv1 = _conv(in_ch, out_ch, 3, emb_dim, dynamic_kernels)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch) if emb_dim else None
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv(out_ch, out_ch, 3, emb_dim, dynamic_kernels)
        if zero_init:
            _zero_conv(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (N, in_ch, H, W); emb: (N, emb_dim), already passed through SiLU
        h = _apply_conv(self.conv1, F.silu(self.norm1(x)), emb)  # (N, out_ch, H, W)
        if self.emb is None:
            h = self.norm2(h)
            return self.skip(x) + _apply_conv(self.conv2, self.dropout(F.silu(h)), emb)
        e = self.emb(emb)[:, :, None, None]  # (N, out_ch or 2*out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = _apply_conv(self.conv2, self.dropout(F.silu(h)), emb)
        return self.skip(x) + h


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022, "A ConvNet for the 2020s", Fig. 4) conditioned on the embedding: 7x7
    depthwise conv -> LayerNorm over channels -> FiLM (scale, shift from emb; or + emb) -> Linear(C_in, m C_out)
    -> GELU -> dropout -> Linear(m C_out, C_out), plus the (1x1 conv) skip. The last linear is zero-initialised
    (instead of ConvNeXt's small layer scale), so the block starts as the identity."""

    def __init__(
        self,
        in_ch: int,                     # input channels
        out_ch: int,                    # output channels
        emb_dim: int,                   # width of the (time + class) embedding
        dropout: float = 0.0,           # dropout inside the MLP
        scale_shift: bool = True,       # FiLM after the LayerNorm (else the embedding is added before it)
        mult: int = 4,                  # MLP width = mult * out_ch (the inverted bottleneck)
        zero_init: bool = True,         # zero the last linear
        dynamic_kernels: int = 0,       # K >= 1: the depthwise conv is dynamic with K kernels
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.dwconv = _conv(in_ch, in_ch, CONVNEXT_KERNEL, emb_dim, dynamic_kernels, groups=in_ch)
        self.norm = nn.LayerNorm(in_ch, eps=1e-6)
        self.emb = nn.Linear(emb_dim, 2 * in_ch if scale_shift else in_ch)
        self.pw1 = nn.Linear(in_ch, mult * out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.pw2 = nn.Linear(mult * out_ch, out_ch)
        if zero_init:
            _zero(self.pw2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = _apply_conv(self.dwconv, x, emb).permute(0, 2, 3, 1)  # (N, H, W, C_in); contiguous for channels_last
        e = self.emb(emb)[:, None, None, :]  # (N, 1, 1, C_in or 2 C_in)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=-1)
            h = torch.addcmul(shift, self.norm(h), 1 + scale)
        else:
            h = self.norm(h + e)
        h = self.pw2(self.dropout(F.gelu(self.pw1(h))))  # (N, H, W, C_out)
        return self.skip(x) + h.permute(0, 3, 1, 2)  # (N, C_out, H, W)


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

    def _attend(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Multi-head attention of token groups (B, L, C) -> (B, L, C), mask (B, 1, L, L) or None."""
        b, n_tok, c = tokens.shape
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, c // self.num_heads))  # (B, L, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, L, d)
        out = attention(q, k, v, mask) if mask is not None else attention(q, k, v)  # (B, heads, L, d)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, L, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C); a view for channels_last input
        out = self._attend(tokens)  # (N, HW, C)
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # (N, C, H, W)


class WindowAttention(Attention):
    """Self-attention inside non-overlapping windows (Swin Transformer, Liu et al. 2021, sec. 3.2): windows of
    min(window_size, H) x min(window_size, W), the map zero-padded at the bottom and right to a multiple of it.
    With `shift` the windows move by half a window (a cyclic roll, Swin Fig. 4) and a mask keeps attention
    inside each contiguous region of the image; padded positions are never attended to. A window that covers
    the map is full attention. Same parameters (and state-dict keys) as :class:`Attention`."""

    def __init__(
        self,
        ch: int,                        # channels
        num_heads: int = 1,             # attention heads
        groups: int = 32,               # GroupNorm groups
        zero_init: bool = True,         # zero the output projection
        window_size: int = 8,           # window side
        shift: bool = False,            # shift the windows by half a window
    ):
        super().__init__(ch, num_heads, groups, zero_init)
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size, self.shift = window_size, shift
        self._masks: dict = {}

    def _geometry(self, h: int, w: int) -> tuple:
        """(window h, window w, shift h, shift w, padded H, padded W) for an h x w map."""
        wh, ww = min(self.window_size, h), min(self.window_size, w)
        sh = wh // 2 if self.shift and wh < h else 0
        sw = ww // 2 if self.shift and ww < w else 0
        return wh, ww, sh, sw, h + (-h) % wh, w + (-w) % ww

    def _mask(self, h: int, w: int, device) -> Optional[torch.Tensor]:
        """(windows, L, L) bool: same region of the image and not padding (or itself); None if all True."""
        wh, ww, sh, sw, hp, wp = self._geometry(h, w)
        if not (sh or sw or hp > h or wp > w):
            return None
        key = (h, w, str(device))
        if key not in self._masks:
            rows = (torch.arange(hp, device=device) + sh) % hp  # original row of each rolled row
            cols = (torch.arange(wp, device=device) + sw) % wp
            region = 2 * (rows < sh)[:, None] + (cols < sw)[None, :]  # (Hp, Wp): contiguous image regions
            valid = (rows < h)[:, None] & (cols < w)[None, :]  # (Hp, Wp): not padding
            region = _windows(region[None, None].float(), wh, ww)[..., 0]  # (windows, L)
            valid = _windows(valid[None, None].float(), wh, ww)[..., 0] > 0
            eye = torch.eye(wh * ww, dtype=torch.bool, device=device)
            self._masks[key] = ((region[:, :, None] == region[:, None, :]) & valid[:, None, :]) | eye
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        wh, ww, sh, sw, hp, wp = self._geometry(h, w)
        t = F.pad(self.norm(x), (0, wp - w, 0, hp - h))  # (N, C, Hp, Wp)
        if sh or sw:
            t = torch.roll(t, (-sh, -sw), dims=(2, 3))
        mask = self._mask(h, w, x.device)  # (windows, L, L) or None
        if mask is not None:
            mask = mask.repeat(n, 1, 1)[:, None]  # (N * windows, 1, L, L)
        out = self._attend(_windows(t, wh, ww), mask)  # (N * windows, L, C)
        out = _unwindows(out, n, hp, wp, wh, ww)  # (N, C, Hp, Wp)
        if sh or sw:
            out = torch.roll(out, (sh, sw), dims=(2, 3))
        return x + out[:, :, :h, :w]


def _windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * windows, wh * ww, C), windows in row-major order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // wh, wh, w // ww, ww).permute(0, 2, 4, 3, 5, 1)  # (N, nh, nw, wh, ww, C)
    return x.reshape(n * (h // wh) * (w // ww), wh * ww, c)


def _unwindows(x: torch.Tensor, n: int, h: int, w: int, wh: int, ww: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: (N * windows, wh * ww, C) -> (N, C, H, W)."""
    x = x.reshape(n, h // wh, w // ww, wh, ww, -1).permute(0, 5, 1, 3, 2, 4)  # (N, C, nh, wh, nw, ww)
    return x.reshape(n, -1, h, w)


class SpatialCrossAttention(nn.Module):
    """Cross-attention from the H*W positions of a feature map to a context sequence, with a residual connection
    (LDM, Rombach et al. 2022, sec. 3.3): x + CrossAttn(GroupNorm(x) as tokens, context)."""

    def __init__(
        self,
        ch: int,                        # channels
        context_dim: int,               # context width
        num_heads: int = 1,             # attention heads
        groups: int = 32,               # GroupNorm groups
        zero_init: bool = True,         # zero the output projection so the block starts as the identity
    ):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.attn = CrossAttention(ch, context_dim, num_heads)
        if zero_init:
            _zero(self.attn.proj)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        out = self.attn(tokens, context, context_mask)  # (N, HW, C)
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # (N, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or average pooling): side n -> ceil(n / 2)."""

    def __init__(self, ch: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor = None, ctx=None) -> torch.Tensor:
        return self.op(x)  # (N, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a fixed size (the matching skip's), then an optional 3x3 conv."""

    def __init__(self, ch: int, size: tuple[int, int], use_conv: bool = True):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor = None, ctx=None) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=self.size, mode="nearest"))  # (N, C, *size)


class Block(nn.Module):
    """A residual (or ConvNeXt) block followed by optional self-attention and optional cross-attention."""

    def __init__(self, res: nn.Module, attn: Optional[nn.Module] = None, cross: Optional[SpatialCrossAttention] = None):
        super().__init__()
        self.res = res
        self.attn = attn
        self.cross = cross

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx=None) -> torch.Tensor:
        # ctx: (context (N, 1 + L, C), its mask (N, 1 + L) or None) for a block with cross-attention
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        return self.cross(x, *ctx) if self.cross is not None else x


# -------------------------------------------------------------------------------------------------- UNet
class UNet(nn.Module):
    """Time- (and optionally class-) conditioned U-Net: forward(x (N,C,H,W), t (N,), class_labels=None, low_res=None,
    low_res_sigma=None, context=None, context_mask=None) -> (N,C,H,W)."""

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
        guidance_embed: bool = False,             # embed a guidance_scale input (LCM students)
        interval_embed: bool = False,             # embed an interval input t - r (MeanFlow students)
        time_embed_mult: int = 4,                 # embedding width = time_embed_mult * channels
        norm_groups: int = 32,                    # GroupNorm groups
        zero_init_residual: bool = True,          # blocks start as the identity
        cond_channels: int = 0,                   # low-res conditioning image channels (0: none)
        block: str = "resnet",                    # resnet or convnext blocks
        convnext_mult: int = 4,                   # ConvNeXt MLP width ratio
        attention: str = "full",                  # full or window attention at attn_resolutions
        window_size: int = 8,                     # attention window side
        shift_windows: bool = True,               # shift every second window layer by half a window
        context_dim: Optional[int] = None,        # context width for cross-attention (None: none)
        cross_attn_resolutions: Sequence[int] = (),  # feature-map heights with cross-attention
        context_global: bool = False,             # add a projection of the context's visible mean to the embedding
        dynamic_conv_kernels: int = 0,            # K >= 1: dynamic block convolutions with K kernels
        learn_sigma: bool = False,                # also output the variance channels (Improved DDPM)
        fourier_features: Sequence[int] = (),     # exponents n of sin / cos(2^n pi x) input channels (VDM)
    ):
        super().__init__()
        self.config = UNetConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) and k != "image_size" else v
                                    for k, v in locals().items() if k in UNetConfig.__dataclass_fields__})
        self.image_size = _pair(image_size)
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)  # mean, then variance
        self.num_classes = num_classes
        sizes = [self.image_size]  # spatial size per level: side n -> ceil(n / 2)
        for _ in channel_mult[1:]:
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        self.level_sizes = tuple(sizes)
        _check_unet_config(self.config, [s[0] for s in sizes])

        self.emb_dim = emb_dim = time_embed_mult * channels
        self.time_embed = TimeEmbedding(channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.guidance_embed = TimeEmbedding(channels, emb_dim) if guidance_embed else None
        self.interval_embed = TimeEmbedding(channels, emb_dim) if interval_embed else None
        self.cond_channels = cond_channels
        self.cond_sigma_embed = TimeEmbedding(channels, emb_dim) if cond_channels else None
        self.context_in = NullContext(context_dim, "model.unet") if context_dim else None
        self.context_global = nn.Linear(context_dim, emb_dim) if context_global else None
        self.fourier_features = tuple(int(n) for n in fourier_features)
        features = in_channels * (1 + 2 * len(self.fourier_features))  # x, then sin and cos per exponent
        self.conv_in = nn.Conv2d(features + cond_channels, channels, 3, padding=1)
        self._window_layers = 0
        self._build_levels()
        self.norm_out = _norm(self._out_ch, norm_groups)
        self.conv_out = _zero(nn.Conv2d(self._out_ch, self.out_channels, 3, padding=1))

    def _build_levels(self) -> None:
        """The down path, the middle and the up path (see the module docstring)."""
        c = self.config
        heights = [s[0] for s in self.level_sizes]
        self.down = nn.ModuleList()
        skip_chs = [c.channels]
        ch = c.channels
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(self._block(ch, mult * c.channels, heights[level]))
                ch = mult * c.channels
                skip_chs.append(ch)
            if level != len(c.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)
        bottom = heights[-1] in c.cross_attn_resolutions
        self.mid = nn.ModuleList([Block(self._res(ch, ch), self._attn(ch, None) if c.mid_attention else None,
                                        self._cross(ch) if bottom else None), Block(self._res(ch, ch))])
        self.up = nn.ModuleList()
        self.up_is_block = []
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(self._block(ch + skip_chs.pop(), mult * c.channels, heights[level]))
                self.up_is_block.append(True)
                ch = mult * c.channels
            if level != 0:
                self.up.append(Upsample(ch, self.level_sizes[level - 1]))
                self.up_is_block.append(False)
        self._out_ch = ch

    def _heads(self, ch: int) -> int:
        c = self.config
        return max(1, ch // c.head_channels) if c.head_channels else c.num_heads

    def _res(self, cin: int, cout: int) -> nn.Module:
        c = self.config
        if c.block == "convnext":
            return ConvNeXtBlock(cin, cout, self.emb_dim, c.dropout, c.scale_shift, c.convnext_mult,
                                 c.zero_init_residual, c.dynamic_conv_kernels)
        return ResBlock(cin, cout, self.emb_dim, c.dropout, c.scale_shift, c.norm_groups, c.zero_init_residual,
                        c.dynamic_conv_kernels)

    def _attn(self, ch: int, height: Optional[int]) -> nn.Module:
        """Self-attention: windowed at a level (height) when attention is 'window', else (and in the middle) full;
        consecutive window layers alternate unshifted and shifted windows."""
        c = self.config
        if c.attention == "window" and height is not None:
            shift = c.shift_windows and self._window_layers % 2 == 1
            self._window_layers += 1
            return WindowAttention(ch, self._heads(ch), c.norm_groups, c.zero_init_residual, c.window_size, shift)
        return Attention(ch, self._heads(ch), c.norm_groups, c.zero_init_residual)

    def _cross(self, ch: int) -> SpatialCrossAttention:
        c = self.config
        return SpatialCrossAttention(ch, c.context_dim, self._heads(ch), c.norm_groups, c.zero_init_residual)

    def _block(self, cin: int, cout: int, height: int) -> Block:
        c = self.config
        return Block(self._res(cin, cout), self._attn(cout, height) if height in c.attn_resolutions else None,
                     self._cross(cout) if height in c.cross_attn_resolutions else None)

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

    def _context(self, n: int, context, context_mask):
        """(context with its null entry (N, 1 + L, C), mask (N, 1 + L) or None) for the cross-attention blocks."""
        if self.context_in is None:
            if context is not None or context_mask is not None:
                raise ValueError("a context was given but this UNet has no cross-attention: build it with "
                                 "model.unet.context_dim set to the context width and cross_attn_resolutions")
            return None
        return self.context_in(n, context, context_mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                low_res: Optional[torch.Tensor] = None, low_res_sigma=None, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, guidance_scale=None, interval=None,
                return_variance: bool = False):
        """(N, C_out, H, W); with learn_sigma the first half of the channels (the mean), or with
        return_variance=True (mean, variance channels) (Nichol & Dhariwal 2021)."""
        self._check_input(x)
        emb = self.time_embed(as_time_vector(t, x.shape[0], x.device))  # (N, E)
        emb = add_class_embedding(emb, self.class_embed, class_labels, self.num_classes)  # (N, E)
        emb = add_guidance_embedding(emb, self.guidance_embed, guidance_scale)  # (N, E)
        emb = add_interval_embedding(emb, self.interval_embed, interval)  # (N, E)
        if self.fourier_features:
            x = fourier_features(x, self.fourier_features)  # (N, C_in (1 + 2 F), H, W)
        if self.cond_channels:
            x, emb = self._add_low_res(x, emb, low_res, low_res_sigma)  # (N, C_in + C_cond, H, W)
        elif low_res is not None:
            raise ValueError("low_res given but the net was built with cond_channels=0")
        ctx = self._context(x.shape[0], context, context_mask)
        if self.context_global is not None:
            emb = emb + self.context_global(visible_mean(*ctx))  # (N, E); the null vector's for no caption
        emb = F.silu(emb)  # every block starts its embedding projection with SiLU; do it once

        h = self.conv_in(x)  # (N, C, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb, ctx)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, ctx)  # (N, C * mult[-1], H', W')
        for block, is_block in zip(self.up, self.up_is_block):
            if is_block:
                h = torch.cat([h, skips.pop()], dim=1)  # (N, C_h + C_skip, H', W')
            h = block(h, emb, ctx)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, H, W)
        if not self.learn_sigma:
            return out
        mean, var = out.chunk(2, dim=1)  # (N, C_out / 2, H, W) each
        return (mean, var) if return_variance else mean


def fourier_features(x: torch.Tensor, exponents: Sequence[int]) -> torch.Tensor:
    """x (N, C, H, W) with sin(2^n pi x) and cos(2^n pi x) of every channel appended for each exponent n
    (Kingma et al. 2021, "Variational diffusion models", appendix: the fine detail of 8-bit data).
    Returns (N, C (1 + 2F), H, W)."""
    freq = torch.tensor([2.0**n * math.pi for n in exponents], dtype=x.dtype, device=x.device)  # (F,)
    arg = (x[:, None] * freq.view(1, -1, 1, 1, 1)).flatten(1, 2)  # (N, F C, H, W)
    return torch.cat([x, arg.sin(), arg.cos()], dim=1)


def _check_unet_config(c: UNetConfig, heights: list) -> None:
    """Refuse option values and combinations the U-Net cannot build, naming the allowed ones."""
    if c.in_channels < 1 or c.channels < 1 or c.num_res_blocks < 0 or not c.channel_mult:
        raise ValueError("in_channels and channels must be >= 1, num_res_blocks >= 0, channel_mult non-empty")
    check_choice("model.unet.block", c.block, BLOCKS)
    check_choice("model.unet.attention", c.attention, ATTENTIONS)
    if c.dynamic_conv_kernels < 0 or c.window_size < 1 or c.convnext_mult < 1:
        raise ValueError(f"dynamic_conv_kernels must be >= 0, window_size and convnext_mult >= 1, got "
                         f"{c.dynamic_conv_kernels}, {c.window_size}, {c.convnext_mult}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in c.fourier_features):
        raise ValueError(f"model.unet.fourier_features are exponents n >= 0 of sin / cos(2^n pi x) (VDM: [7, 8]), "
                         f"got {tuple(c.fourier_features)}")
    for name in ("attn_resolutions", "cross_attn_resolutions"):
        bad = [r for r in getattr(c, name) if r not in heights]
        if bad:
            raise ValueError(f"{name} {tuple(bad)} match no level; with image_size {c.image_size} and "
                             f"channel_mult {tuple(c.channel_mult)} the feature-map heights are {tuple(heights)}")
    if bool(c.context_dim) != bool(c.cross_attn_resolutions):
        raise ValueError("cross-attention needs both model.unet.context_dim (the context width) and "
                         f"model.unet.cross_attn_resolutions (feature-map heights among {tuple(heights)}); got "
                         f"context_dim={c.context_dim}, cross_attn_resolutions={tuple(c.cross_attn_resolutions)}")
    if c.context_global and not c.context_dim:
        raise ValueError("model.unet.context_global adds the context's mean to the embedding: it needs "
                         "model.unet.context_dim (the context width) and cross_attn_resolutions")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
