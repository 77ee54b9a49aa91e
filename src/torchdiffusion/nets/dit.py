"""DiT, the diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), with the
masked-patch training of MaskDiT (Zheng et al. 2023, "Fast Training of Diffusion Models with Masked Transformers").

    x (N, C, H, W) -> p x p patches, Linear -> + fixed 2-D sin-cos positions      # (N, T, D), T = HW / p^2
    c = TimeEmbedding(t) + ClassEmbedding(y)                                      # (N, D); y None: the null row
    -> depth x DiT block                                                          # (N, T, D)
    -> final layer: LN (adaLN-modulated by c), Linear(D, p^2 C_out)               # (N, T, p^2 C_out)
    -> unpatchify                                                                 # (N, C_out, H, W)

Conditioning (``conditioning``, the four block designs of sec. 3.2 and Fig. 3):

* ``adaln_zero``: (b1, g1, a1, b2, g2, a2) = Linear(SiLU(c)), zero-initialised, and
  x += a1 * Attn(LN(x) (1 + g1) + b1);  x += a2 * MLP(LN(x) (1 + g2) + b2).  Every block starts as the identity
  and, with the zero-initialised final layer, the network's output starts at 0.
* ``adaln``: the same without the gates a (LN scale and shift regressed from c).
* ``in_context``: the embeddings of t and y are two more tokens of a standard ViT block sequence (no position
  embedding), removed after the last block; the final layer is a plain LayerNorm and Linear.
* ``cross_attention``: standard ViT blocks with a cross-attention layer to the length-2 sequence [t, y].

A context sequence (N, L, C_ctx) with its padding mask (N, L) (``context_dim`` set) is projected to D, a learned
null entry in front (:class:`~.transformer.NullContext`); the adaLN blocks get a cross-attention layer between
self-attention and MLP (zero-initialised output under adaLN-Zero), ``in_context`` appends it to the tokens as
keys, ``cross_attention`` to [t, y].

MaskDiT: ``token_mask`` (N, T) bool (True = dropped, the same count in every row) removes those patch tokens
before the blocks, so the blocks see only the kept ones. With ``decoder_depth`` > 0 a light decoder follows
(adaLN LN + Linear to the decoder width, a learned mask token at every dropped position, fixed positions,
decoder_depth adaLN-Zero blocks); without one the dropped positions of the output are 0. Sampling passes no mask.
With ``learn_sigma`` the network has 2 C output channels as in the paper (the second C are Improved DDPM's
variance interpolation, ``return_variance=True``); the denoiser uses the first C.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_choice
from .embeddings import (TimeEmbedding, add_guidance_embedding, add_interval_embedding, as_time_vector, class_embedding,
                         sincos_position_embedding_2d)
from .transformer import Attention, Block, CrossAttention, Mlp, NullContext, check_patch_grid, unpatchify

Size = Union[int, Sequence[int]]
CONDITIONINGS = ("adaln_zero", "adaln", "in_context", "cross_attention")
DIT_SIZES = {  # name -> (depth, hidden size, heads): Table 1 of Peebles & Xie 2023
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCH_SIZES = (2, 4, 8)
EMBED_INITS = ("dit", "torch")  # model.dit.embed_init: the paper's N(0, 0.02) embeddings, or PyTorch's defaults
LN_EPS = 1e-6


@dataclass
class DiTConfig:
    """All hyperparameters of :class:`DiT`. `size` names a row of DiT's Table 1; depth, hidden_size and num_heads,
    when set, override it."""

    image_size: Size = 28                     # input side (int) or (H, W); patch_size must divide it
    in_channels: int = 1                      # image (or latent) channels C
    size: str = "S"                           # S, B, L or XL: depth, width and heads of DiT Table 1 (DIT_SIZES)
    patch_size: int = 2                       # side p of a patch; T = H W / p^2 tokens
    depth: Optional[int] = None               # transformer blocks (None: the size's)
    hidden_size: Optional[int] = None         # token width D (None: the size's)
    num_heads: Optional[int] = None           # attention heads (None: the size's)
    mlp_ratio: float = 4.0                    # MLP hidden width = mlp_ratio * D
    conditioning: str = "adaln_zero"          # adaln_zero, adaln, in_context or cross_attention
    num_classes: Optional[int] = None         # class-conditional when set; row num_classes is the null class
    guidance_embed: bool = False              # take the guidance scale as an input (latent consistency students)
    interval_embed: bool = False              # take a second time input, the interval t - r (MeanFlow students)
    learn_sigma: bool = False                 # 2 C output channels (the paper's learned variance); D uses the first C
    context_dim: Optional[int] = None         # width of a context sequence to attend to (None: no context)
    decoder_depth: int = 0                    # MaskDiT decoder blocks after the encoder (0: none)
    decoder_hidden_size: Optional[int] = None  # width of the MaskDiT decoder (None: D)
    time_freq_dim: int = 256                  # width of the sinusoidal time features
    embed_init: str = "dit"                   # dit: N(0, 0.02) time MLP and class table (the paper's); torch:
                                              # PyTorch's defaults, conditioning felt from the first steps (short
                                              # budgets learn the classes sooner: docs/backbones.md)

    def replace(self, **changes) -> "DiTConfig":
        return replace(self, **changes)


# the paper's networks on ImageNet 256x256 latents (32x32x4, 1000 classes, learned variance): DiT-S/2 ... DiT-XL/8
DIT_PRESETS: dict[str, DiTConfig] = {
    f"{size}/{p}": DiTConfig(image_size=32, in_channels=4, size=size, patch_size=p, num_classes=1000,
                             learn_sigma=True)
    for size in DIT_SIZES for p in DIT_PATCH_SIZES
}


def resolve_size(sizes: dict, size: str, owner: str, **fields) -> tuple:
    """The values of `fields` (name -> value or None), None taken from the registry row `sizes[size]`."""
    if size not in sizes:
        raise ValueError(f"unknown {owner}.size {size!r}; allowed values: {', '.join(map(repr, sizes))} (or set "
                         f"{', '.join(fields)} explicitly with one of those sizes)")
    return tuple(v if v is not None else default for v, default in zip(fields.values(), sizes[size]))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift, with per-sample (N, 1, D) scale and shift."""
    return torch.addcmul(shift, x, 1 + scale)


def _layer_norm(dim: int, affine: bool) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=LN_EPS)


class DiTBlock(nn.Module):
    """The adaLN(-Zero) DiT block (sec. 3.2): LayerNorms without parameters, their scale and shift (and, gated, the
    residual gates) regressed from the conditioning c; an optional cross-attention to a context."""

    def __init__(
        self,
        dim: int,                       # token width D
        num_heads: int,                 # attention heads
        mlp_ratio: float,               # MLP hidden width = mlp_ratio * D
        cond_dim: int,                  # width of the conditioning vector c
        gated: bool = True,             # adaLN-Zero: gates a1, a2 on both residual branches
        context_dim: Optional[int] = None,  # width of a context to cross-attend to (None: no cross-attention)
    ):
        super().__init__()
        self.gated = gated
        self.norm1 = _layer_norm(dim, False)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.cross = CrossAttention(dim, context_dim, num_heads) if context_dim else None
        self.norm_cross = _layer_norm(dim, True) if context_dim else None
        self.norm2 = _layer_norm(dim, False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Linear(cond_dim, (6 if gated else 4) * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context=None, context_mask=None) -> torch.Tensor:
        # x: (N, T, D); c: (N, cond_dim)
        mods = self.modulation(F.silu(c))[:, None].chunk(6 if self.gated else 4, dim=-1)  # each (N, 1, D)
        if self.gated:
            shift1, scale1, gate1, shift2, scale2, gate2 = mods
        else:
            (shift1, scale1, shift2, scale2), gate1, gate2 = mods, 1.0, 1.0
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (N, T, D)


class FinalLayer(nn.Module):
    """LayerNorm (adaLN-modulated by c when cond_dim is set, else with its own affine) -> Linear(D, out)."""

    def __init__(self, dim: int, out: int, cond_dim: Optional[int]):
        super().__init__()
        self.norm = _layer_norm(dim, affine=cond_dim is None)
        self.linear = nn.Linear(dim, out)
        self.modulation = nn.Linear(cond_dim, 2 * dim) if cond_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (N, T, D)
        if self.modulation is not None:
            shift, scale = self.modulation(F.silu(c))[:, None].chunk(2, dim=-1)  # (N, 1, D) each
            h = modulate(h, shift, scale)
        return self.linear(h)  # (N, T, out)


class DiT(nn.Module):
    """Diffusion transformer: forward(x (N, C, H, W), t (N,), class_labels=None, context=None, context_mask=None,
    token_mask=None) -> (N, C, H, W)."""

    def __init__(
        self,
        image_size: Size = 28,                    # input side (int) or (H, W)
        in_channels: int = 1,                     # image (or latent) channels
        size: str = "S",                          # DiT Table 1 row: S, B, L, XL
        patch_size: int = 2,                      # patch side p
        depth: Optional[int] = None,              # blocks (None: the size's)
        hidden_size: Optional[int] = None,        # token width (None: the size's)
        num_heads: Optional[int] = None,          # attention heads (None: the size's)
        mlp_ratio: float = 4.0,                   # MLP width ratio
        conditioning: str = "adaln_zero",         # adaln_zero, adaln, in_context, cross_attention
        num_classes: Optional[int] = None,        # number of classes (None: unconditional)
        guidance_embed: bool = False,             # embed a guidance_scale input (LCM students)
        interval_embed: bool = False,             # embed an interval input t - r (MeanFlow students)
        learn_sigma: bool = False,                # 2 C output channels
        context_dim: Optional[int] = None,        # context width (None: no context)
        decoder_depth: int = 0,                   # MaskDiT decoder blocks
        decoder_hidden_size: Optional[int] = None,  # MaskDiT decoder width (None: hidden size)
        time_freq_dim: int = 256,                 # sinusoidal time feature width
        embed_init: str = "dit",                  # dit (N(0, 0.02) embeddings) or torch (PyTorch's defaults)
    ):
        super().__init__()
        self.config = DiTConfig(**{k: v for k, v in locals().items() if k in DiTConfig.__dataclass_fields__})
        check_choice("model.dit.conditioning", conditioning, CONDITIONINGS)
        check_choice("model.dit.embed_init", embed_init, EMBED_INITS)
        depth, dim, heads = resolve_size(DIT_SIZES, size, "model.dit", depth=depth, hidden_size=hidden_size,
                                         num_heads=num_heads)
        if depth < 1 or decoder_depth < 0:
            raise ValueError(f"model.dit.depth must be >= 1 and decoder_depth >= 0, got {depth}, {decoder_depth}")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.grid = check_patch_grid(self.image_size, patch_size, "model.dit")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.conditioning, self.hidden_size = conditioning, dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding_2d(dim, self.grid)[None], persistent=False)
        self.time_embed = TimeEmbedding(time_freq_dim, dim)
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes is not None else None
        self.guidance_embed = TimeEmbedding(time_freq_dim, dim) if guidance_embed else None
        self.interval_embed = TimeEmbedding(time_freq_dim, dim) if interval_embed else None
        self.context_in = NullContext(context_dim, "model.dit") if context_dim else None
        self.context_proj = nn.Linear(context_dim, dim) if context_dim else None
        self.blocks = nn.ModuleList(self._block(dim, heads, mlp_ratio, context_dim) for _ in range(depth))
        self._build_head(dim, heads, mlp_ratio, decoder_depth, decoder_hidden_size or dim)
        self._init_weights()

    def _block(self, dim: int, heads: int, mlp_ratio: float, context_dim) -> nn.Module:
        if self.conditioning in ("adaln_zero", "adaln"):
            return DiTBlock(dim, heads, mlp_ratio, dim, self.conditioning == "adaln_zero", dim if context_dim else None)
        return Block(dim, heads, mlp_ratio, context_dim=dim if self.conditioning == "cross_attention" else None)

    def _build_head(self, dim: int, heads: int, mlp_ratio: float, decoder_depth: int, dec: int) -> None:
        """The final layer, after MaskDiT's decoder when decoder_depth > 0."""
        out = self.patch_size**2 * self.out_channels
        self.decoder_depth = decoder_depth
        if decoder_depth:
            self.decoder_in = FinalLayer(dim, dec, dim)  # adaLN LN + Linear(D, D_dec)
            self.mask_token = nn.Parameter(torch.zeros(dec))
            self.register_buffer("decoder_pos_embed", sincos_position_embedding_2d(dec, self.grid)[None],
                                 persistent=False)
            self.decoder_blocks = nn.ModuleList(DiTBlock(dec, heads, mlp_ratio, dim) for _ in range(decoder_depth))
        adaln = self.conditioning in ("adaln_zero", "adaln") or decoder_depth > 0
        self.final_layer = FinalLayer(dec if decoder_depth else dim, out, dim if adaln else None)

    def _init_weights(self) -> None:
        """DiT's initialisation (its models.py): Xavier-uniform linears with zero biases, the patch embedding as a
        linear, N(0, 0.02) class and time embeddings; zero adaLN-Zero modulations, zero final layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zeroed = [self.final_layer.linear, self.final_layer.modulation]
        if self.conditioning == "adaln_zero":
            zeroed += [b.modulation for b in self.blocks] + [b.cross and b.cross.proj for b in self.blocks]
        if self.decoder_depth:
            nn.init.normal_(self.mask_token, std=0.02)
            zeroed += [self.decoder_in.linear, self.decoder_in.modulation] + [b.modulation for b in self.decoder_blocks]
        for m in zeroed:
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        if self.interval_embed is not None:  # like the time embedding; last, so the other draws stay as they were
            for lin in (self.interval_embed.mlp[0], self.interval_embed.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
        if self.config.embed_init == "torch":  # PyTorch's defaults: N(0, 1) class rows, Kaiming-uniform time MLP
            if self.class_embed is not None:
                self.class_embed.reset_parameters()
            for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
                lin.reset_parameters()

    @classmethod
    def from_config(cls, cfg: DiTConfig) -> "DiT":
        return cls(**asdict(cfg))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiT":
        check_choice("DiT preset", name, DIT_PRESETS)
        return cls.from_config(DIT_PRESETS[name].replace(**overrides))

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, return_variance: bool = False, guidance_scale=None,
                interval=None):
        n = x.shape[0]
        self._check_input(x)
        t_emb = self.time_embed(as_time_vector(t, n, x.device))  # (N, D)
        t_emb = add_guidance_embedding(t_emb, self.guidance_embed, guidance_scale)  # (N, D): w joins time
        t_emb = add_interval_embedding(t_emb, self.interval_embed, interval)  # (N, D): so does t - r
        y_emb = class_embedding(self.class_embed, class_labels, self.num_classes, n, x.device)  # (N, D) or None
        c = t_emb if y_emb is None else t_emb + y_emb  # (N, D)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        keep = self._kept_tokens(token_mask, n)  # (N, T') or None
        if keep is not None:
            tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))  # (N, T', D)
        ctx, ctx_mask = self._context(n, context, context_mask)  # (N, 1 + L, D) or None
        h = self._run_blocks(tokens, t_emb, y_emb, c, ctx, ctx_mask)  # (N, T', D)
        out = unpatchify(self._head(h, c, keep), self.patch_size, self.out_channels, self.grid)  # (N, C_out, H, W)
        mean, var = out[:, :self.in_channels], out[:, self.in_channels:]
        return (mean, var) if return_variance else mean

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"DiT expects input of shape (N, {self.in_channels}, {h}, {w}), got {tuple(x.shape)}; "
                             "build the net with image_size / in_channels matching the data")

    def _kept_tokens(self, token_mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
        """Indices (N, T') of the kept patch tokens, in increasing order, from MaskDiT's token_mask (N, T)."""
        if token_mask is None:
            return None
        t = self.grid[0] * self.grid[1]
        if token_mask.dtype != torch.bool or token_mask.shape != (n, t):
            raise ValueError(f"token_mask must be a bool tensor of shape ({n}, {t}) (True = drop that patch), got "
                             f"{token_mask.dtype} {tuple(token_mask.shape)}")
        kept = (~token_mask).sum(1)
        if kept.min() != kept.max() or int(kept.min()) == 0:
            raise ValueError("token_mask must keep the same number (>= 1) of tokens in every example")
        return (~token_mask).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :int(kept[0])]

    def _context(self, n: int, context, context_mask):
        """The projected context with its null entry, (N, 1 + L, D) and mask (N, 1 + L) or None; (None, None) for a
        network without context_dim (which refuses a context)."""
        if self.context_in is None:
            if context is not None or context_mask is not None:
                raise ValueError("a context was given but this network has no cross-attention: build it with "
                                 "model.dit.context_dim set to the context width")
            return None, None
        ctx, mask = self.context_in(n, context, context_mask)  # (N, 1 + L, C_ctx)
        return self.context_proj(ctx), mask  # (N, 1 + L, D)

    def _run_blocks(self, h, t_emb, y_emb, c, ctx, ctx_mask) -> torch.Tensor:
        """The blocks under the configured conditioning (see the module docstring)."""
        if self.conditioning in ("adaln_zero", "adaln"):
            for block in self.blocks:
                h = block(h, c, ctx, ctx_mask)  # (N, T', D)
            return h
        cond = torch.stack([t_emb] if y_emb is None else [t_emb, y_emb], dim=1)  # (N, 1 or 2, D)
        extra = cond if ctx is None else torch.cat([cond, ctx], dim=1)  # (N, E, D)
        mask = None
        if ctx_mask is not None:
            ones = torch.ones(h.shape[0], cond.shape[1], dtype=torch.bool, device=h.device)
            mask = torch.cat([ones, ctx_mask], dim=1)  # (N, E)
        if self.conditioning == "cross_attention":
            for block in self.blocks:
                h = block(h, context=extra, context_mask=mask)  # (N, T', D)
            return h
        seq = torch.cat([extra, h], dim=1)  # (N, E + T', D): in-context tokens in front
        if mask is not None:
            mask = torch.cat([mask, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)], dim=1)
        for block in self.blocks:
            seq = block(seq, key_mask=mask)
        return seq[:, extra.shape[1]:]  # (N, T', D)

    def _head(self, h: torch.Tensor, c: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """Final layer (after the MaskDiT decoder, if any) with dropped tokens restored: (N, T, p^2 C_out)."""
        if self.decoder_depth:
            d = self.decoder_in(h, c)  # (N, T', D_dec)
            d = _unmask(d, keep, self.mask_token, self.pos_embed.shape[1]) + self.decoder_pos_embed  # (N, T, D_dec)
            for block in self.decoder_blocks:
                d = block(d, c)
            return self.final_layer(d, c)  # (N, T, p^2 C_out)
        out = self.final_layer(h, c)  # (N, T', p^2 C_out)
        return out if keep is None else _unmask(out, keep, out.new_zeros(out.shape[-1]), self.pos_embed.shape[1])


def _unmask(h: torch.Tensor, keep: Optional[torch.Tensor], fill: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens (N, T', E) at their positions `keep` (N, T') of the full sequence (N, length, E), `fill` (E,) at the
    others. Without a mask `keep` is every position, so that `fill` (the mask token) is always part of the graph
    (data-parallel training needs every parameter in it)."""
    n, _, e = h.shape
    if keep is None:
        keep = torch.arange(length, device=h.device).expand(n, length)
    full = fill.to(h.dtype).expand(n, length, e)
    return full.scatter(1, keep[..., None].expand(-1, -1, e), h)  # (N, length, E)
