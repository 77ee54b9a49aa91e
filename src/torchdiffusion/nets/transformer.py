"""Transformer parts shared by the DiT, the U-ViT and the U-Net's attention layers.

* :func:`attention`: softmax(q k^T / sqrt(d)) v with an optional boolean mask (True = may attend).
* :func:`causal_mask`: the (T, T) lower-triangular mask of an autoregressive model (query i sees keys j <= i).
* :class:`Attention` (self-attention over tokens, with an optional key mask), :class:`CrossAttention` (queries from
  the tokens, keys and values from a context sequence), :class:`Mlp`, and the pre-norm :class:`Block` (ViT style,
  with U-ViT's optional long-skip input and an optional cross-attention layer).
* :class:`NullContext`: the context sequence (N, L, C) and its padding mask (N, L) as every network takes them:
  a learned null vector is put in front, always visible. Attention then never meets an empty key set, a context
  whose every entry is masked gives exactly the network's output without context (the null vector alone), and
  every parameter of the cross-attention takes part in every step (data-parallel training needs that).
* :func:`patchify` / :func:`unpatchify`: images (N, C, H, W) <-> patch tokens (N, T, p * p * C).

Shapes: N batch, T tokens, D width, L context length, C context width, H heads, d = D / H.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, heads, L, d) (Vaswani et al. 2017, eq. 1); `mask` (bool, broadcast to
    (N, heads, L_q, L_k), True = may attend) removes keys.

    F.scaled_dot_product_attention, except for bf16 on CPU, where its flash kernel's backward is several times
    slower than two batched matmuls and a softmax at the short sequences of small networks."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, heads, L_q, L_k)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, mask)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """(T, T) bool, True on and below the diagonal: query i attends keys j <= i (Vaswani et al. 2017, sec. 3.2.3,
    the decoder's masking; Radford et al. 2019, GPT-2)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (N, T, D) -> (N, heads, T, d)


def _key_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask[:, None, None, :]  # (N, L) -> (N, 1, 1, L)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (N, T, D) -> (N, T, D); `key_mask` (N, T) bool hides keys, `attn_mask`
    (T, T) bool (True = query i may attend key j; :func:`causal_mask` for an autoregressive model) hides pairs."""

    def __init__(
        self,
        dim: int,                       # token width D
        num_heads: int,                 # heads; D must be divisible by it
        qkv_bias: bool = True,          # biases of the q, k, v projections (DiT: yes, U-ViT: no)
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # 3 x (N, heads, T, d)
        mask = _key_mask(key_mask)  # (N, 1, 1, T) or None
        if attn_mask is not None:
            mask = attn_mask if mask is None else mask & attn_mask  # (T, T) or (N, 1, T, T)
        out = attention(q, k, v, mask)  # (N, heads, T, d)
        return self.proj(out.transpose(1, 2).flatten(2))  # (N, T, D)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from tokens (N, T, D), keys and values from a context (N, L, C);
    `key_mask` (N, L) bool hides context entries (Vaswani et al. 2017, sec. 3.2.3; LDM's conditioning, Rombach
    et al. 2022, sec. 3.3)."""

    def __init__(
        self,
        dim: int,                       # token width D
        context_dim: int,               # context width C
        num_heads: int,                 # heads; D must be divisible by it
        qkv_bias: bool = True,          # biases of the q, k, v projections
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: Optional[torch.Tensor] = None):
        q = _heads(self.q(x), self.num_heads)  # (N, heads, T, d)
        k, v = (_heads(t, self.num_heads) for t in self.kv(context.to(x.dtype)).chunk(2, dim=-1))  # (N, heads, L, d)
        out = attention(q, k, v, _key_mask(key_mask))  # (N, heads, T, d)
        return self.proj(out.transpose(1, 2).flatten(2))  # (N, T, D)


class Mlp(nn.Module):
    """Linear(D, hidden) -> GELU -> Linear(hidden, D)."""

    def __init__(
        self,
        dim: int,                       # token width D
        hidden: int,                    # hidden width
        gelu: str = "tanh",             # GELU approximation: "tanh" (DiT) or "none" (exact; U-ViT)
    ):
        super().__init__()
        self.gelu = gelu
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class Block(nn.Module):
    """Pre-norm transformer block (ViT, Dosovitskiy et al. 2021): x + Attn(LN x) [+ CrossAttn(LN x, context)]
    + MLP(LN x). With `skip`, the block first merges a long skip as Linear([x, skip]) (U-ViT, Bao et al. 2023,
    sec. 3)."""

    def __init__(
        self,
        dim: int,                       # token width D
        num_heads: int,                 # attention heads
        mlp_ratio: float = 4.0,         # MLP hidden width = mlp_ratio * D
        qkv_bias: bool = True,          # biases of the attention projections
        context_dim: Optional[int] = None,  # width of a context to cross-attend to (None: no cross-attention)
        skip: bool = False,             # take a long skip input (U-ViT's deep half)
        gelu: str = "tanh",             # GELU approximation of the MLP: "tanh" or "none"
    ):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.cross = CrossAttention(dim, context_dim, num_heads, qkv_bias) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (N, T, D)
        x = x + self.attn(self.norm1(x), key_mask, attn_mask)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + self.mlp(self.norm2(x))  # (N, T, D)


class NullContext(nn.Module):
    """Checks a context (N, L, C) and its mask (N, L) and puts a learned null vector in front of it:
    -> (N, 1 + L, C), (N, 1 + L) with the null entry always visible; no context: the null vector alone, (N, 1, C)
    and mask None. `owner` names the config section for the error messages (e.g. "model.dit")."""

    def __init__(self, context_dim: int, owner: str):
        super().__init__()
        self.context_dim = context_dim
        self.owner = owner
        self.null = nn.Parameter(torch.zeros(context_dim))
        nn.init.normal_(self.null, std=0.02)

    def forward(self, n: int, context: Optional[torch.Tensor], context_mask: Optional[torch.Tensor]):
        null = self.null.expand(n, 1, -1)  # (N, 1, C)
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask given without a context")
            return null, None
        check_context(context, context_mask, n, self.context_dim, self.owner)
        ctx = torch.cat([null, context.to(null.dtype)], dim=1)  # (N, 1 + L, C)
        if context_mask is None:
            return ctx, None
        visible = torch.ones(n, 1, dtype=torch.bool, device=context_mask.device)
        return ctx, torch.cat([visible, context_mask], dim=1)  # (N, 1 + L)


def visible_mean(ctx: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean (N, C) of the visible entries of a context from NullContext, (N, 1 + L, C) with mask (N, 1 + L) or
    None. The null entry is always visible, so an all-masked or absent context gives the null vector itself: the
    unconditional path of a network that adds this vector to its embedding (the pooled text embedding of Imagen,
    Saharia et al. 2022, sec. 2.2) is exactly the one of an empty caption."""
    if mask is None:
        return ctx.mean(1)  # (N, C)
    w = mask.to(ctx.dtype)[..., None]  # (N, 1 + L, 1)
    return (ctx * w).sum(1) / w.sum(1)  # (N, C); w.sum >= 1 (the null entry)


def check_context(context, context_mask, n: int, context_dim: Optional[int], owner: str) -> None:
    """Refuse a context the network cannot take, saying what to change."""
    if context_dim is None:
        raise ValueError(f"a context was given but this network has no cross-attention: build it with "
                         f"{owner}.context_dim set to the context width")
    if context.ndim != 3 or context.shape[0] != n:
        raise ValueError(f"context must have shape (N={n}, L, C={context_dim}), got {tuple(context.shape)}")
    if context.shape[2] != context_dim:
        raise ValueError(f"the context has width {context.shape[2]} but the network was built with "
                         f"{owner}.context_dim={context_dim}: set {owner}.context_dim={context.shape[2]}, or project "
                         f"the context to width {context_dim}")
    if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]):
        raise ValueError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (True = use the "
                         f"entry), got {context_mask.dtype} {tuple(context_mask.shape)}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p)(W/p), p * p * C): patches in row-major order, features ordered (p_row, p_col, C)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, h * w, p * p * C) -> (N, C, h p, w p) for the patch grid (h, w)."""
    n, (h, w) = tokens.shape[0], grid
    x = tokens.reshape(n, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, h * p, w * p)


def check_patch_grid(image_size: tuple[int, int], patch_size: int, owner: str) -> tuple[int, int]:
    """The patch grid (H/p, W/p); a clear error, naming the fix, when p does not divide the image."""
    h, w = image_size
    if patch_size < 1 or h % patch_size or w % patch_size:
        divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        raise ValueError(f"{owner}.patch_size={patch_size} does not divide the image size {h}x{w}: choose a "
                         f"patch size in {divisors}, or resize the images (data.image_size) to a multiple of "
                         f"{patch_size} and set {owner}.image_size to match")
    return h // patch_size, w // patch_size
