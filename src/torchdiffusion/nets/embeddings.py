"""Time embeddings shared by all networks.

A network receives time as a float tensor t of shape (N,) whose range depends on the schedule: a discrete
timestep index 0..999, 1000 * t for continuous schedules, or ln(sigma) / 4 for EDM. The sinusoidal
embedding below is defined for any real t.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) time values -> (N, dim), float32 (as in DDPM / ADM).

    Frequencies are geometric from 1 down to 1/max_period; the output is [cos(t f), sin(t f)], zero-padded
    by one column when `dim` is odd.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (N,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (N, dim)
    return emb


class TimeEmbedding(nn.Module):
    """t (N,) -> sinusoidal(t, freq_dim) -> Linear -> SiLU -> Linear -> (N, out_dim)."""

    def __init__(
        self,
        freq_dim: int,                  # width of the sinusoidal features
        out_dim: int,                   # width of the returned embedding
        max_period: float = 10000.0,    # longest period of the sinusoids
    ):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim, self.max_period)  # (N, freq_dim)
        return self.mlp(emb)  # (N, out_dim)


def as_time_vector(t, n: int, device) -> torch.Tensor:
    """Accept a python number, a 0-d tensor or an (N,) tensor; return float32 (N,) on `device`."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must have shape ({n},) to match the batch, got {tuple(t.shape)}")
    return t.to(torch.float32)


def add_class_embedding(emb: torch.Tensor, class_embed, class_labels, num_classes) -> torch.Tensor:
    """emb + class_embed(labels) for a class-conditional net (labels None: the null class, row num_classes);
    an unconditional net (class_embed None) refuses labels."""
    if class_embed is None:
        if class_labels is not None:
            raise ValueError("class_labels given but the net was built with num_classes=None")
        return emb
    if class_labels is None:
        class_labels = torch.full((emb.shape[0],), num_classes, dtype=torch.long, device=emb.device)
    return emb + class_embed(class_labels)
