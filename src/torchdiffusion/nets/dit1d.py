"""A 1-D patch transformer over sequences (N, C, L) (docs/timeseries.md): DiT (Peebles & Xie 2023) on one axis.
The window is cut into L / p patches of p steps, each linearly embedded to a token with the fixed 1-D sine-cosine
position embedding (:func:`~torchdiffusion.nets.embeddings.sincos_1d`), run through DiT's adaLN-Zero blocks and
final layer (:class:`~torchdiffusion.nets.dit.DiTBlock`, :class:`~torchdiffusion.nets.dit.FinalLayer`, with DiT's
size registry ``DIT_SIZES``) conditioned on the time embedding, and folded back to (N, C, L).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn

from .dit import DIT_SIZES, DiTBlock, FinalLayer, resolve_size
from .embeddings import TimeEmbedding, sincos_1d
from .unet1d import check_series_input


@dataclass
class DiT1DConfig:
    """All hyperparameters of :class:`DiT1D`. `size` names a row of DiT's Table 1 (DIT_SIZES); depth,
    hidden_size and num_heads, when set, override it."""

    length: int = 64                          # L: steps per window; patch_len must divide it
    in_channels: int = 1                      # channels C of the series
    patch_len: int = 4                        # steps p per token; L / p tokens
    size: str = "S"                           # S, B, L or XL (DIT_SIZES)
    depth: Optional[int] = None               # transformer blocks (None: the size's)
    hidden_size: Optional[int] = None         # token width D (None: the size's)
    num_heads: Optional[int] = None           # attention heads (None: the size's)
    mlp_ratio: float = 4.0                    # MLP hidden width = mlp_ratio * D
    time_freq_dim: int = 256                  # width of the sinusoidal time features

    def replace(self, **changes) -> "DiT1DConfig":
        return replace(self, **changes)


DIT1D_PRESETS: dict[str, DiT1DConfig] = {f"{s}/{p}": DiT1DConfig(size=s, patch_len=p)
                                         for s in DIT_SIZES for p in (2, 4, 8)}


class DiT1D(nn.Module):
    """F(x, t) -> (N, C, L) for x (N, C, L) and time t (N,)."""

    def __init__(
        self,
        length: int = 64,               # L: steps per window
        in_channels: int = 1,           # channels C
        patch_len: int = 4,             # steps per token
        size: str = "S",                # DiT size (DIT_SIZES)
        depth: Optional[int] = None,    # blocks (None: the size's)
        hidden_size: Optional[int] = None,  # token width (None: the size's)
        num_heads: Optional[int] = None,    # heads (None: the size's)
        mlp_ratio: float = 4.0,         # MLP hidden width = mlp_ratio * D
        time_freq_dim: int = 256,       # width of the sinusoidal time features
    ):
        super().__init__()
        if patch_len < 1 or length % patch_len:
            raise ValueError(f"dit1d.patch_len={patch_len} must divide dit1d.length={length}: pick a divisor of the "
                             "window length")
        depth, dim, heads = resolve_size(DIT_SIZES, size, "dit1d", depth=depth, hidden_size=hidden_size,
                                         num_heads=num_heads)
        self.length, self.in_channels, self.patch_len = length, in_channels, patch_len
        self.patch_embed = nn.Linear(in_channels * patch_len, dim)
        self.register_buffer("pos_embed", sincos_1d(torch.arange(length // patch_len), dim), persistent=False)
        self.time_embed = TimeEmbedding(time_freq_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio, dim) for _ in range(depth))
        self.final_layer = FinalLayer(dim, in_channels * patch_len, dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero biases, N(0, 0.02) time embedding, zero adaLN-Zero
        modulations and final layer (every block starts as the identity, the output at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final_layer.linear, self.final_layer.modulation]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: DiT1DConfig) -> "DiT1D":
        return cls(**asdict(cfg))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_series_input(x, class_labels, self.in_channels, self.length, "DiT1D", "the 1-D transformer")
        n, c, p = x.shape[0], self.in_channels, self.patch_len
        tokens = x.reshape(n, c, -1, p).permute(0, 2, 1, 3).flatten(2)  # (N, L/p, C p)
        h = self.patch_embed(tokens) + self.pos_embed  # (N, L/p, D)
        emb = self.time_embed(t.to(torch.float32).expand(n))  # (N, D)
        for block in self.blocks:
            h = block(h, emb)  # (N, L/p, D)
        out = self.final_layer(h, emb)  # (N, L/p, C p)
        return out.reshape(n, -1, c, p).permute(0, 2, 1, 3).reshape(n, c, self.length)  # (N, C, L)
