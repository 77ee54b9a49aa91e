"""Embeddings shared by all networks: time, class labels (with the null class) and 2-D patch positions.

A network receives time as a float tensor t of shape (N,) whose range depends on the schedule: a discrete
timestep index 0..999, 1000 * t for continuous schedules, or ln(sigma) / 4 for EDM. The sinusoidal
embedding below is defined for any real t. The transformers (DiT, U-ViT) add a fixed 2-D sine-cosine embedding
of each patch's grid position (:func:`sincos_position_embedding_2d`).
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


GUIDANCE_EMBED_SCALE = 1000.0  # a guidance scale s is embedded like the timestep 1000 s (Luo et al. 2023, LCM)


def add_input_embedding(emb: torch.Tensor, embed, value, *, name: str, flag: str, missing: str,
                        scale: float = 1.0) -> torch.Tensor:
    """emb + embed(scale * value) for a net built with an extra scalar input per example (N,) embedded like time;
    a net without it (embed None) refuses a value, one with it needs it (`missing` says how to give it)."""
    if embed is None:
        if value is not None:
            raise ValueError(f"{name} given but the net was built with {flag}=False")
        return emb
    if value is None:
        raise ValueError(missing)
    return emb + embed(scale * as_time_vector(value, emb.shape[0], emb.device))


def add_guidance_embedding(emb: torch.Tensor, guidance_embed, guidance_scale) -> torch.Tensor:
    """emb + guidance_embed(GUIDANCE_EMBED_SCALE s) for a net that takes the guidance scale s (N,) as an input (a
    latent consistency student); a net without that input refuses it, and one with it needs it."""
    return add_input_embedding(emb, guidance_embed, guidance_scale, name="guidance_scale", flag="guidance_embed",
                               scale=GUIDANCE_EMBED_SCALE,
                               missing="this net takes the guidance scale as an input (guidance_embed=True): pass "
                                       "guidance_scale, e.g. sample with guidance 'embedded' and a guidance_scale")


def add_interval_embedding(emb: torch.Tensor, interval_embed, interval) -> torch.Tensor:
    """emb + interval_embed(d) for a net with a second time input, the interval d = t - r (N,) in the units of its
    time t (a MeanFlow student's average velocity u(z_t, r, t) is conditioned on (t, t - r); Geng et al. 2025,
    sec. 4.3); a net without that input refuses it, and one with it needs it."""
    return add_input_embedding(emb, interval_embed, interval, name="interval", flag="interval_embed",
                               missing="this net takes a second time input (interval_embed=True): pass interval "
                                       "(t - r), e.g. through a MeanFlow denoiser (torchdiffusion.fewstep.meanflow)")


def class_embedding(class_embed, class_labels, num_classes, n: int, device) -> torch.Tensor | None:
    """class_embed(labels) (N, D) for a class-conditional net (labels None: the null class, row num_classes);
    None for an unconditional net (class_embed None), which refuses labels."""
    if class_embed is None:
        if class_labels is not None:
            raise ValueError("class_labels given but the net was built with num_classes=None")
        return None
    if class_labels is None:
        class_labels = torch.full((n,), num_classes, dtype=torch.long, device=device)
    return class_embed(class_labels)


def add_class_embedding(emb: torch.Tensor, class_embed, class_labels, num_classes) -> torch.Tensor:
    """emb + class_embed(labels), see :func:`class_embedding`; emb itself for an unconditional net."""
    y = class_embedding(class_embed, class_labels, num_classes, emb.shape[0], emb.device)
    return emb if y is None else emb + y


def sincos_1d(pos: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[sin(pos w_k), cos(pos w_k)], w_k = max_period^(-2k/dim), k < dim/2 (Vaswani et al. 2017, sec. 3.5):
    (M,) positions -> (M, dim) float32."""
    omega = max_period ** (-torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()  # (M, dim)


def sincos_position_embedding_2d(dim: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """The fixed 2-D sine-cosine position embedding of DiT (Peebles & Xie 2023, sec. 3.2; from MAE, He et al.
    2022): for the patch in row r and column c of an (h, w) grid, [sincos_1d(c, dim/2), sincos_1d(r, dim/2)].
    Rows of the (h * w, dim) result are in row-major patch order (the order of ``conv(x).flatten(2)``). The inner
    product of two positions depends only on their offset: <e(r, c), e(r', c')> = sum_k cos(w_k (c - c')) +
    cos(w_k (r - r'))."""
    if dim % 4:
        raise ValueError(f"the 2-D sine-cosine position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (h * w,)
    cols = torch.arange(w, device=device).repeat(h)  # (h * w,)
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1)  # (h * w, dim)
