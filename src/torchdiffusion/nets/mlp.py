"""Residual MLP denoiser for vector data (2-D toy distributions or any (N, D) data).

forward(x (N, D), t (N,), class_labels=None) -> (N, D). Time goes through a sinusoidal embedding and an MLP;
with `num_classes` set a class embedding with num_classes + 1 rows is added (row num_classes is the null
class; class_labels=None means the null class), exactly as in the U-Net.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import (TimeEmbedding, add_class_embedding, add_guidance_embedding, add_interval_embedding,
                         as_time_vector)


@dataclass
class MLPConfig:
    """Hyperparameters of :class:`MLPDenoiserNet`."""

    dim: int = 2                        # data dimension D
    hidden: int = 256                   # width of the residual stream
    num_blocks: int = 3                 # residual MLP blocks
    time_embed_dim: int = 128           # sinusoidal feature width (the embedding itself is `hidden` wide)
    num_classes: Optional[int] = None   # class-conditional when set; row num_classes is the null class
    dropout: float = 0.0                # dropout inside the blocks
    guidance_embed: bool = False        # take the guidance scale as an input (latent consistency students)
    interval_embed: bool = False        # take a second time input, the interval t - r (MeanFlow students)

    def replace(self, **changes) -> "MLPConfig":
        return replace(self, **changes)


class ResMLPBlock(nn.Module):
    """x + Linear(SiLU(Linear(LayerNorm(x)) + emb_proj)) ."""

    def __init__(
        self,
        hidden: int,                    # residual-stream width
        emb_dim: int,                   # width of the (time + class) embedding
        dropout: float = 0.0,           # dropout before the second linear layer
    ):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.fc1(F.silu(self.norm(x))) + self.emb(emb)  # (N, hidden)
        return x + self.fc2(self.dropout(F.silu(h)))  # (N, hidden)


class MLPDenoiserNet(nn.Module):
    """Residual MLP: x (N, D), t (N,) [, class_labels (N,)] -> (N, D)."""

    def __init__(
        self,
        dim: int = 2,                       # data dimension D
        hidden: int = 256,                  # residual-stream width
        num_blocks: int = 3,                # residual blocks
        time_embed_dim: int = 128,          # sinusoidal feature width
        num_classes: Optional[int] = None,  # number of classes (None: unconditional)
        dropout: float = 0.0,               # dropout in the blocks
        guidance_embed: bool = False,       # embed a guidance_scale input (LCM students)
        interval_embed: bool = False,       # embed an interval input t - r (MeanFlow students)
    ):
        super().__init__()
        self.config = MLPConfig(dim, hidden, num_blocks, time_embed_dim, num_classes, dropout, guidance_embed,
                                interval_embed)
        self.dim = dim
        self.num_classes = num_classes
        self.time_embed = TimeEmbedding(time_embed_dim, hidden)
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.guidance_embed = TimeEmbedding(time_embed_dim, hidden) if guidance_embed else None
        self.interval_embed = TimeEmbedding(time_embed_dim, hidden) if interval_embed else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([ResMLPBlock(hidden, hidden, dropout) for _ in range(num_blocks)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_config(cls, cfg: MLPConfig) -> "MLPDenoiserNet":
        return cls(**asdict(cfg))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                guidance_scale=None, interval=None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiserNet expects input of shape (N, {self.dim}), got {tuple(x.shape)}")
        emb = self.time_embed(as_time_vector(t, x.shape[0], x.device))  # (N, hidden)
        emb = add_class_embedding(emb, self.class_embed, class_labels, self.num_classes)  # (N, hidden)
        emb = add_guidance_embedding(emb, self.guidance_embed, guidance_scale)  # (N, hidden)
        emb = add_interval_embedding(emb, self.interval_embed, interval)  # (N, hidden)
        emb = F.silu(emb)
        h = self.inp(x)  # (N, hidden)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm_out(h)))  # (N, D)
