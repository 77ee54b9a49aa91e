"""A 1-D U-Net over sequences (N, C, L) (docs/timeseries.md): the 2-D U-Net's design (Ho et al. 2020; Dhariwal &
Nichol 2021) on one axis. Residual blocks with FiLM from the library's sinusoidal time embedding
(:class:`~torchdiffusion.nets.embeddings.TimeEmbedding`), GroupNorm and zero-initialised output convolutions as in
:mod:`~torchdiffusion.nets.unet` (whose `_norm` and `_zero` it uses), stride-2 down- and nearest up-sampling, and
optional multi-head self-attention (the transformers' :class:`~torchdiffusion.nets.transformer.Attention`) at the
lowest resolutions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimeEmbedding
from .transformer import Attention
from .unet import _norm, _zero


def check_series_input(x: torch.Tensor, class_labels, in_channels: int, length: int, name: str, what: str) -> None:
    """The 1-D networks' input check: windows (N, in_channels, length) and no class labels (they are
    unconditional)."""
    if x.ndim != 3 or x.shape[1:] != (in_channels, length):
        raise ValueError(f"{name} expects (N, {in_channels}, {length}), got {tuple(x.shape)}")
    if class_labels is not None:
        raise ValueError(f"class_labels given but {what} is unconditional")


@dataclass
class UNet1DConfig:
    """All hyperparameters of :class:`UNet1D`."""

    length: int = 64                          # L: steps per window; divisible by 2^(len(channel_mult) - 1)
    in_channels: int = 1                      # channels C of the series
    channels: int = 32                        # width of the first level
    channel_mult: tuple = (1, 2, 2)           # width multiplier per level (each level after the first halves L)
    num_res_blocks: int = 2                   # residual blocks per level
    attn_levels: tuple = (2,)                 # levels (0 = full length) with self-attention after each block
    num_heads: int = 4                        # attention heads
    dropout: float = 0.0                      # dropout inside the residual blocks
    norm_groups: int = 8                      # GroupNorm groups
    time_freq_dim: int = 128                  # width of the sinusoidal time features

    def replace(self, **changes) -> "UNet1DConfig":
        return replace(self, **changes)


UNET1D_PRESETS: dict[str, UNet1DConfig] = {  # the size registry
    "tiny": UNet1DConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(), norm_groups=4),
    "S": UNet1DConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(2,)),
    "M": UNet1DConfig(channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(2, 3)),
}


class ResBlock1D(nn.Module):
    """GroupNorm -> SiLU -> conv3 -> FiLM(emb) -> GroupNorm -> SiLU -> dropout -> conv3 (zero-initialised), plus a
    1x1 skip: the 2-D U-Net's residual block on one axis."""

    def __init__(
        self,
        in_ch: int,                     # input channels
        out_ch: int,                    # output channels
        emb_dim: int,                   # width of the time embedding
        dropout: float = 0.0,           # dropout before the second conv
        groups: int = 8,                # GroupNorm groups
    ):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero(nn.Conv1d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (N, in_ch, L); emb: (N, emb_dim), already through SiLU
        h = self.conv1(F.silu(self.norm1(x)))  # (N, out_ch, L)
        scale, shift = self.emb(emb)[:, :, None].chunk(2, dim=1)  # (N, out_ch, 1) each
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))  # (N, out_ch, L)


class SelfAttention1D(nn.Module):
    """GroupNorm -> multi-head self-attention over the L steps -> residual (output projection zero-initialised)."""

    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.attn = Attention(ch, num_heads)
        _zero(self.attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(x).transpose(1, 2)  # (N, L, ch)
        return x + self.attn(tokens).transpose(1, 2)  # (N, ch, L)


class UNet1D(nn.Module):
    """F(x, t) -> (N, C, L) for x (N, C, L) and time t (N,)."""

    def __init__(
        self,
        length: int = 64,               # L: steps per window
        in_channels: int = 1,           # channels C
        channels: int = 32,             # width of the first level
        channel_mult: tuple = (1, 2, 2),  # width multiplier per level
        num_res_blocks: int = 2,        # residual blocks per level
        attn_levels: tuple = (2,),      # levels with self-attention
        num_heads: int = 4,             # attention heads
        dropout: float = 0.0,           # dropout inside the residual blocks
        norm_groups: int = 8,           # GroupNorm groups
        time_freq_dim: int = 128,       # width of the sinusoidal time features
    ):
        super().__init__()
        levels = len(channel_mult)
        if length % 2 ** (levels - 1):
            raise ValueError(f"unet1d.length={length} must be divisible by 2^{levels - 1} (one halving per level "
                             f"after the first of channel_mult={tuple(channel_mult)}): change length or channel_mult")
        bad = [a for a in attn_levels if not 0 <= a < levels]
        if bad:
            raise ValueError(f"unet1d.attn_levels {bad} are not levels 0..{levels - 1} of channel_mult")
        self.length, self.in_channels = length, in_channels
        emb_dim = 4 * channels
        self.time_embed = TimeEmbedding(time_freq_dim, emb_dim)
        self.conv_in = nn.Conv1d(in_channels, channels, 3, padding=1)
        block = lambda cin, cout, lvl: nn.ModuleList(  # noqa: E731
            [ResBlock1D(cin, cout, emb_dim, dropout, norm_groups)]
            + ([SelfAttention1D(cout, num_heads, norm_groups)] if lvl in attn_levels else []))
        self.down, self.up, skips, ch = nn.ModuleList(), nn.ModuleList(), [channels], channels
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, channels * mult, lvl))
                ch = channels * mult
                skips.append(ch)
            if lvl < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv1d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.mid = nn.ModuleList([block(ch, ch, levels - 1), block(ch, ch, -1)])
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), channels * mult, lvl))
                ch = channels * mult
            if lvl > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv1d(ch, ch, 3, padding=1)]))
        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = _zero(nn.Conv1d(ch, in_channels, 3, padding=1))

    @classmethod
    def from_config(cls, cfg: UNet1DConfig) -> "UNet1D":
        return cls(**asdict(cfg))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_series_input(x, class_labels, self.in_channels, self.length, "UNet1D", "the 1-D U-Net")
        emb = F.silu(self.time_embed(t.to(torch.float32).expand(x.shape[0])))  # (N, emb_dim)
        h = self.conv_in(x)  # (N, channels, L)
        hs = [h]
        for layers in self.down:
            h = _run(layers, h, emb)
            hs.append(h)
        for layers in self.mid:
            h = _run(layers, h, emb)
        for layers in self.up:
            h = _run(layers, torch.cat([h, hs.pop()], dim=1) if isinstance(layers[0], ResBlock1D) else h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C, L)


def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """One entry of a U-Net path: a residual block (given emb) then its attention, or a resampling."""
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock1D) else layer(h)
    return h
