"""U-ViT (Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion Models").

Everything is a token: the time, the class and the image patches go through one sequence of pre-norm ViT blocks,
and long skip connections join the shallow and the deep half (sec. 3):

    tokens = [time, class, (context), patches] + learned positions        # (N, 1 + 1 + L + T, D)
    h_1 .. h_k = in-blocks (k = depth // 2);  h = mid-block(h_k)
    out-block i:  h = Block(Linear([h, h_{k+1-i}]))                        # the long skip, concatenate then linear
    -> LN -> Linear(D, p^2 C) on the patch tokens -> unpatchify -> optional 3x3 conv      # (N, C, H, W)

The time token is the sinusoidal embedding of t at width D (an MLP after it with ``mlp_time_embed``); the class
token is a row of an embedding with num_classes + 1 rows, the last the null class for classifier-free guidance. A
context sequence (N, L, C_ctx) is projected to D and joins the sequence as L more tokens (as U-ViT's text-to-image
model does) after a learned null entry; its padding mask hides the masked entries as keys, so an all-masked context
gives the output without one. ``depth`` counts all blocks (2k + 1, the "layers" of U-ViT's Table 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..utils import check_choice
from .dit import resolve_size
from .embeddings import as_time_vector, class_embedding, timestep_embedding
from .transformer import Block, NullContext, check_patch_grid, unpatchify

Size = Union[int, Sequence[int]]
UVIT_SIZES = {  # name -> (layers, hidden size, heads, MLP ratio): Table 1 of Bao et al. 2023
    "S": (13, 512, 8, 4.0),
    "S-deep": (17, 512, 8, 4.0),
    "M": (17, 768, 12, 4.0),
    "L": (21, 1024, 16, 4.0),
    "H": (29, 1152, 16, 4.0),
}
INIT_STD = 0.02  # truncated-normal std of U-ViT's linear weights and position embedding


@dataclass
class UViTConfig:
    """All hyperparameters of :class:`UViT`. `size` names a row of U-ViT's Table 1; depth, hidden_size, num_heads and
    mlp_ratio, when set, override it."""

    image_size: Size = 28                     # input side (int) or (H, W); patch_size must divide it
    in_channels: int = 1                      # image (or latent) channels C
    size: str = "S"                           # S, S-deep, M, L or H (UVIT_SIZES)
    patch_size: int = 2                       # side p of a patch
    depth: Optional[int] = None               # blocks in all, odd: in-blocks, a mid-block, out-blocks (None: size's)
    hidden_size: Optional[int] = None         # token width D (None: the size's)
    num_heads: Optional[int] = None           # attention heads (None: the size's)
    mlp_ratio: Optional[float] = None         # MLP hidden width / D (None: the size's)
    qkv_bias: bool = False                    # biases of the q, k, v projections (U-ViT: none)
    mlp_time_embed: bool = False              # an MLP after the sinusoidal time embedding
    num_classes: Optional[int] = None         # class-conditional when set; row num_classes is the null class
    context_dim: Optional[int] = None         # width of a context sequence joining the tokens (None: no context)
    final_conv: bool = True                   # the 3x3 convolution after unpatchify

    def replace(self, **changes) -> "UViTConfig":
        return replace(self, **changes)


# the configurations of U-ViT's Table 1 in the settings its parameter counts refer to: U-ViT-S/2 (Deep) on
# CIFAR-10, U-ViT-M/4 and L/4 on ImageNet 64x64, U-ViT-H/2 on ImageNet 256x256 latents (32x32x4, no final conv)
UVIT_PRESETS: dict[str, UViTConfig] = {
    "S": UViTConfig(image_size=32, in_channels=3, size="S", patch_size=2),
    "S-deep": UViTConfig(image_size=32, in_channels=3, size="S-deep", patch_size=2),
    "M": UViTConfig(image_size=64, in_channels=3, size="M", patch_size=4, num_classes=1000),
    "L": UViTConfig(image_size=64, in_channels=3, size="L", patch_size=4, num_classes=1000),
    "H": UViTConfig(image_size=32, in_channels=4, size="H", patch_size=2, num_classes=1000, final_conv=False),
}


class UViT(nn.Module):
    """U-ViT: forward(x (N, C, H, W), t (N,), class_labels=None, context=None, context_mask=None) -> (N, C, H, W)."""

    def __init__(
        self,
        image_size: Size = 28,                    # input side (int) or (H, W)
        in_channels: int = 1,                     # image (or latent) channels
        size: str = "S",                          # U-ViT Table 1 row: S, S-deep, M, L, H
        patch_size: int = 2,                      # patch side p
        depth: Optional[int] = None,              # blocks in all, odd (None: the size's)
        hidden_size: Optional[int] = None,        # token width (None: the size's)
        num_heads: Optional[int] = None,          # attention heads (None: the size's)
        mlp_ratio: Optional[float] = None,        # MLP width ratio (None: the size's)
        qkv_bias: bool = False,                   # q, k, v biases
        mlp_time_embed: bool = False,             # MLP after the time embedding
        num_classes: Optional[int] = None,        # number of classes (None: unconditional)
        context_dim: Optional[int] = None,        # context width (None: no context)
        final_conv: bool = True,                  # 3x3 conv after unpatchify
    ):
        super().__init__()
        self.config = UViTConfig(**{k: v for k, v in locals().items() if k in UViTConfig.__dataclass_fields__})
        depth, dim, heads, ratio = resolve_size(UVIT_SIZES, size, "model.uvit", depth=depth, hidden_size=hidden_size,
                                                num_heads=num_heads, mlp_ratio=mlp_ratio)
        if depth < 1 or depth % 2 == 0:
            raise ValueError(f"model.uvit.depth counts all blocks (in-blocks, one mid-block, as many out-blocks) and "
                             f"must be odd, got {depth}: use {depth + 1}")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.grid = check_patch_grid(self.image_size, patch_size, "model.uvit")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.hidden_size = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.time_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim)) \
            if mlp_time_embed else None
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes is not None else None
        self.extras = 1 + (num_classes is not None)  # time and class tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid[0] * self.grid[1], dim))
        self.context_in = NullContext(context_dim, "model.uvit") if context_dim else None
        self.context_proj = nn.Linear(context_dim, dim) if context_dim else None

        def block(skip):
            return Block(dim, heads, ratio, qkv_bias, skip=skip, gelu="none")

        self.in_blocks = nn.ModuleList(block(False) for _ in range(depth // 2))
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList(block(True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_size**2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if final_conv else None
        self._init_weights()

    def _init_weights(self) -> None:
        """U-ViT's initialisation (its libs/uvit.py): truncated N(0, 0.02) linear weights and positions, zero
        biases, LayerNorms at (1, 0)."""
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: UViTConfig) -> "UViT":
        return cls(**asdict(cfg))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UViT":
        check_choice("U-ViT preset", name, UVIT_PRESETS)
        return cls.from_config(UVIT_PRESETS[name].replace(**overrides))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"UViT expects input of shape (N, {self.in_channels}, {h}, {w}), got {tuple(x.shape)}; "
                             "build the net with image_size / in_channels matching the data")

    def _tokens(self, x, t, class_labels, context, context_mask):
        """The token sequence (N, S, D) and its key mask (N, S) or None; S = extras + (1 + L) + T."""
        n = x.shape[0]
        time = timestep_embedding(as_time_vector(t, n, x.device), self.hidden_size).to(x.dtype)  # (N, D)
        if self.time_mlp is not None:
            time = self.time_mlp(time)
        extras = [time[:, None]]
        y = class_embedding(self.class_embed, class_labels, self.num_classes, n, x.device)  # (N, D) or None
        if y is not None:
            extras.append(y[:, None])
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        seq = torch.cat(extras + [patches], dim=1) + self.pos_embed  # (N, extras + T, D)
        if self.context_in is None:
            if context is not None or context_mask is not None:
                raise ValueError("a context was given but this network takes none: build it with "
                                 "model.uvit.context_dim set to the context width")
            return seq, None
        ctx, ctx_mask = self.context_in(n, context, context_mask)  # (N, 1 + L, C_ctx)
        seq = torch.cat([seq[:, :self.extras], self.context_proj(ctx), seq[:, self.extras:]], dim=1)
        if ctx_mask is None:
            return seq, None
        ones = torch.ones(n, self.extras, dtype=torch.bool, device=x.device)
        rest = torch.ones(n, patches.shape[1], dtype=torch.bool, device=x.device)
        return seq, torch.cat([ones, ctx_mask, rest], dim=1)  # (N, S)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if token_mask is not None:
            raise ValueError("U-ViT takes no token_mask: masked-patch training (diffusion.objective.mask_ratio > 0) "
                             "is implemented for model.kind=dit")
        self._check_input(x)
        h, key_mask = self._tokens(x, t, class_labels, context, context_mask)  # (N, S, D)
        skips = []
        for block in self.in_blocks:
            h = block(h, key_mask=key_mask)
            skips.append(h)
        h = self.mid_block(h, key_mask=key_mask)
        for block in self.out_blocks:
            h = block(h, skips.pop(), key_mask=key_mask)  # the long skip from the matching in-block
        t_patches = self.grid[0] * self.grid[1]
        out = self.decoder_pred(self.norm(h)[:, -t_patches:])  # (N, T, p^2 C)
        out = unpatchify(out, self.patch_size, self.in_channels, self.grid)  # (N, C, H, W)
        return self.final_layer(out) if self.final_layer is not None else out
