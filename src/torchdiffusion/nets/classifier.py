"""Noise-conditional classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The U-Net's encoder half and middle block (the same ResBlock / Attention / Downsample modules, time-conditioned
through the same TimeEmbedding), followed by a pooling head and a linear layer to class logits:

    conv_in -> [level l: num_res_blocks x (ResBlock [+ Attention]), Downsample] -> middle: ResBlock, Attention,
    ResBlock -> GroupNorm -> SiLU -> pool -> Linear -> logits (N, num_classes)

``pool`` is ``mean`` (global average over positions) or ``attention`` (ADM's attention pooling: one query, the
mean token plus a learned position embedding, attends over all positions; Radford et al. 2021, CLIP).
forward(x (N, C, H, W), t (N,)) takes the schedule's network input and time, exactly as the U-Net does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_choice
from .embeddings import TimeEmbedding, as_time_vector
from .unet import Attention, Block, Downsample, ResBlock, Size, _norm, _pair

POOLS = ("mean", "attention")


@dataclass
class ClassifierConfig:
    """All hyperparameters of :class:`NoisyClassifier`; defaults: a small MNIST (1x28x28, 10 classes) net."""

    image_size: Size = 28                     # input side (int) or (H, W)
    in_channels: int = 1                      # image channels
    num_classes: int = 10                     # classes (logits per example)
    channels: int = 32                        # base width C
    channel_mult: tuple = (1, 2, 2)           # width multiplier per resolution level
    num_res_blocks: int = 1                   # residual blocks per level
    attn_resolutions: tuple = (7,)            # feature-map heights that get self-attention
    num_heads: int = 4                        # attention heads
    dropout: float = 0.0                      # dropout inside residual blocks
    scale_shift: bool = True                  # FiLM time conditioning in residual blocks
    time_embed_mult: int = 4                  # time-embedding width = time_embed_mult * channels
    norm_groups: int = 32                     # GroupNorm groups (reduced to gcd with the width)
    pool: str = "attention"                   # pooling head: attention or mean

    def replace(self, **changes) -> "ClassifierConfig":
        return replace(self, **changes)


class AttentionPool(nn.Module):
    """Attention pooling (ADM / CLIP): the mean token queries all H*W tokens; (N, C, H, W) -> (N, C)."""

    def __init__(self, ch: int, positions: int, num_heads: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"pooling width {ch} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.pos = nn.Parameter(torch.randn(positions + 1, ch) / ch**0.5)  # (HW + 1, C)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + self.pos  # (N, HW + 1, C)
        n, length, c = tokens.shape
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, c // self.num_heads))  # (N, L, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, heads, L, d)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (N, heads, 1, d)
        return self.proj(out.transpose(1, 2).flatten(1))  # (N, C)


class NoisyClassifier(nn.Module):
    """Time-conditioned image classifier: forward(x (N, C, H, W), t (N,)) -> logits (N, num_classes)."""

    def __init__(
        self,
        image_size: Size = 28,                    # input side (int) or (H, W)
        in_channels: int = 1,                     # image channels
        num_classes: int = 10,                    # classes
        channels: int = 32,                       # base width
        channel_mult: tuple = (1, 2, 2),          # width multiplier per level
        num_res_blocks: int = 1,                  # residual blocks per level
        attn_resolutions: tuple = (7,),           # feature-map heights with self-attention
        num_heads: int = 4,                       # attention heads
        dropout: float = 0.0,                     # dropout in residual blocks
        scale_shift: bool = True,                 # FiLM conditioning in residual blocks
        time_embed_mult: int = 4,                 # embedding width = time_embed_mult * channels
        norm_groups: int = 32,                    # GroupNorm groups
        pool: str = "attention",                  # attention or mean pooling
    ):
        super().__init__()
        check_choice("pool", pool, POOLS)
        if num_classes < 2 or in_channels < 1 or channels < 1 or num_res_blocks < 0 or not channel_mult:
            raise ValueError("need num_classes >= 2, in_channels and channels >= 1, num_res_blocks >= 0, "
                             "channel_mult non-empty")
        self.config = ClassifierConfig(image_size, in_channels, num_classes, channels, tuple(channel_mult),
                                       num_res_blocks, tuple(attn_resolutions), num_heads, dropout, scale_shift,
                                       time_embed_mult, norm_groups, pool)
        self.image_size = _pair(image_size)
        self.in_channels = in_channels
        self.num_classes = num_classes
        sizes = [self.image_size]
        for _ in channel_mult[1:]:
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        heights = [s[0] for s in sizes]
        bad = [r for r in attn_resolutions if r not in heights]
        if bad:
            raise ValueError(f"attn_resolutions {tuple(bad)} match no level; the feature-map heights are "
                             f"{tuple(heights)}")
        emb_dim = time_embed_mult * channels

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout, scale_shift, norm_groups)

        def attn(ch):
            return Attention(ch, num_heads, norm_groups)

        self.time_embed = TimeEmbedding(channels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Block(res(ch, mult * channels), attn(mult * channels)
                                       if heights[level] in attn_resolutions else None))
                ch = mult * channels
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
        self.mid = nn.ModuleList([Block(res(ch, ch), attn(ch)), Block(res(ch, ch))])
        self.norm_out = _norm(ch, norm_groups)
        h, w = sizes[-1]
        self.pool = AttentionPool(ch, h * w, num_heads) if pool == "attention" else None
        self.head = nn.Linear(ch, num_classes)

    @classmethod
    def from_config(cls, cfg: ClassifierConfig) -> "NoisyClassifier":
        return cls(**asdict(cfg))

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, C_last) before the linear head."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"NoisyClassifier expects input of shape (N, {self.in_channels}, {h}, {w}), "
                             f"got {tuple(x.shape)}")
        emb = F.silu(self.time_embed(as_time_vector(t, x.shape[0], x.device)))  # (N, E)
        h = self.conv_in(x)  # (N, C, H, W)
        for block in (*self.down, *self.mid):
            h = block(h, emb)  # (N, C_l, H_l, W_l)
        h = F.silu(self.norm_out(h))  # (N, C_last, H', W')
        return self.pool(h) if self.pool is not None else h.mean((2, 3))  # (N, C_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, t))  # (N, num_classes)
