"""The token transformer of a diffusion language model, and its autoregressive twin (docs/text.md, "The network").

    x (N, L) token ids -> E_tok[x] + E_pos[:L]  (learned), dropout              # (N, L, D)
    time_cond:  c = TimeEmbedding(1000 t)                                       # (N, D)
                depth x adaLN-Zero DiT block (Peebles & Xie 2023, sec. 3.2)     # (N, L, D)
                LN adaLN-modulated by c -> Linear(D, V_out)                     # (N, L, V_out)
    otherwise:  depth x pre-norm block (GPT-2 / ViT), causal mask if causal     # (N, L, D)
                LN -> Linear(D, V_out)                                          # (N, L, V_out)

Three modes share the network (K = ``vocab_size`` data tokens 0..K-1):

* absorbing diffusion (``mask_token=True``, MDLM, Sahoo et al. 2024): input ids 0..K, the mask id K; K + 1 logits,
  the mask's column last (SUBS overwrites it). Bidirectional attention.
* uniform diffusion (``mask_token=False``, D3PM's uniform process, Austin et al. 2021): ids 0..K-1, K logits.
* autoregressive (``causal=True``, GPT-2, Radford et al. 2019): position i attends positions j <= i; input ids
  0..K with a beginning-of-sequence id BOS = K, K logits. :func:`shift_for_next_token` makes the training pair:
  inputs [BOS, x_0 .. x_{L-2}], targets x, so the logits at position i are p(x_i | x_{<i}) and the L
  cross-entropies sum to -log p(x), the same L tokens the diffusion bounds cover.

With ``time_cond`` the time t in [0, 1] enters every block through adaLN-Zero: at initialisation every block is the
identity and the output ignores t. Without it t is accepted and ignored (MDLM's time-independent denoiser, which lets
its sampler reuse predictions). An untied head starts at zero (every position predicts the uniform distribution);
``tie_weights`` shares the head's weight with the token embedding (Press & Wolf 2017; GPT-2).

Compute: :func:`macs_per_sequence` / :func:`macs_per_token` count multiply-accumulates as DiT's Gflops do (one per
multiply-add; torch's FlopCounterMode counts two). Shapes: N batch, L length, D width, V_in / V_out vocabularies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn

from .dit import DiTBlock, FinalLayer, resolve_size
from .embeddings import TimeEmbedding, as_time_vector
from .transformer import Block, causal_mask

OWNER = "model.text_transformer"
TEXT_SIZES = {  # name -> (depth, width D, heads)
    "tiny": (2, 64, 2),       # tests and smoke runs
    "S": (6, 256, 4),         # trains on two CPU cores
    "M": (12, 768, 12),       # the depth, width and heads of GPT-2 small and of MDLM's small model
}
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as 1000 t, the range the image networks' time embedding sees
INIT_STD = 0.02      # normal std of the token and position embeddings and the time MLP (GPT-2, DiT)


@dataclass
class TextTransformerConfig:
    """All hyperparameters of :class:`TextTransformer`. `size` names a row of TEXT_SIZES; depth, width and heads,
    when set, override it."""

    vocab_size: int = 256                 # K data tokens 0..K-1: the tokeniser's vocab_size (256: bytes)
    mask_token: bool = True               # absorbing process: input id K is the mask, K + 1 logits (mask last)
    seq_len: int = 256                    # longest sequence L (rows of the learned position embedding)
    size: str = "S"                       # tiny, S or M (TEXT_SIZES): depth, width and heads
    depth: Optional[int] = None           # transformer blocks (None: the size's)
    width: Optional[int] = None           # token width D (None: the size's)
    heads: Optional[int] = None           # attention heads, dividing D (None: the size's)
    mlp_ratio: float = 4.0                # MLP hidden width = mlp_ratio * D
    dropout: float = 0.0                  # dropout on the embedded tokens (GPT-2's embedding dropout)
    time_cond: bool = False               # condition on t by adaLN-Zero (False: t ignored, MDLM's default)
    causal: bool = False                  # autoregressive: causal attention, input id K is BOS, K logits
    tie_weights: bool = False             # the head's weight is the token embedding's
    time_freq_dim: int = 256              # width of the sinusoidal time features (time_cond only)

    def replace(self, **changes) -> "TextTransformerConfig":
        return replace(self, **changes)


TEXT_PRESETS: dict[str, TextTransformerConfig] = {name: TextTransformerConfig(size=name) for name in TEXT_SIZES}


def resolve_text_size(cfg: TextTransformerConfig) -> tuple[int, int, int]:
    """(depth, width, heads) of a config: its fields, None taken from TEXT_SIZES[size]; checked."""
    depth, width, heads = resolve_size(TEXT_SIZES, cfg.size, OWNER, depth=cfg.depth, width=cfg.width,
                                       heads=cfg.heads)
    if depth < 1 or width < 1 or heads < 1:
        raise ValueError(f"{OWNER}.depth, width and heads must be >= 1, got {depth}, {width}, {heads}")
    if width % heads:
        divisors = [h for h in range(1, width + 1) if width % h == 0]
        raise ValueError(f"{OWNER}.width={width} is not divisible by heads={heads}: choose heads in {divisors}, "
                         f"or a width that is a multiple of {heads}")
    return depth, width, heads


def check_text_config(cfg: TextTransformerConfig) -> None:
    """Refuse the combinations the network cannot build, naming the field to change."""
    if cfg.vocab_size < 2 or cfg.seq_len < 1:
        raise ValueError(f"{OWNER}.vocab_size must be >= 2 and seq_len >= 1, got {cfg.vocab_size}, {cfg.seq_len}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"{OWNER}.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.causal and cfg.time_cond:
        raise ValueError(f"the autoregressive model ({OWNER}.causal=true) takes no time input: set "
                         f"{OWNER}.time_cond=false")
    if cfg.causal and cfg.mask_token:
        raise ValueError(f"the autoregressive model ({OWNER}.causal=true) has no mask token (its extra input id K "
                         f"is BOS): set {OWNER}.mask_token=false")


def vocab_sizes(cfg: TextTransformerConfig) -> tuple[int, int]:
    """(V_in, V_out): input ids and logits. Absorbing K + 1, K + 1; uniform K, K; autoregressive K + 1 (BOS), K."""
    k = cfg.vocab_size
    return (k + 1 if cfg.mask_token or cfg.causal else k), (k + 1 if cfg.mask_token else k)


def shift_for_next_token(x: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoregressive training pair of sequences x (N, L): inputs [BOS, x_0 .. x_{L-2}] (N, L) and targets x
    (N, L). With logits = model(inputs), logits[:, i] scores x_i given x_{<i} (position 0 given BOS alone), and
    sum_i CE(logits[:, i], x_i) = -log p(x) over all L tokens. `bos_id` is the model's ``bos_id`` (= K)."""
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be token ids of shape (N, L) with L >= 1, got {tuple(x.shape)}")
    if not isinstance(bos_id, int):
        raise ValueError(f"bos_id must be the autoregressive model's bos_id (= K), got {bos_id!r}: a network's bos_id "
                         f"is None unless it is built with {OWNER}.causal=true")
    bos = torch.full_like(x[:, :1], bos_id)  # (N, 1)
    return torch.cat([bos, x[:, :-1]], dim=1), x  # (N, L), (N, L)


def macs_per_sequence(cfg: TextTransformerConfig, length: Optional[int] = None) -> int:
    """Multiply-accumulates of one forward pass over one sequence of `length` tokens (default seq_len), DiT's
    convention: every matmul, attention as its two dense (L, L) products (2 L^2 D per block, also when causal:
    what a dense kernel computes), embedding lookups, norms and activations free. Training costs about 3 times this.

        L [depth (4 D^2 + 2 D H + 2 L D) + D V_out]  + [F D + D^2 + 6 depth D^2 + 2 D^2 with time_cond]"""
    depth, d, _ = resolve_text_size(cfg)
    length = cfg.seq_len if length is None else length
    hidden, v_out = int(d * cfg.mlp_ratio), vocab_sizes(cfg)[1]
    per_token = depth * (4 * d * d + 2 * d * hidden + 2 * length * d) + d * v_out
    per_sequence = (cfg.time_freq_dim * d + d * d + 6 * depth * d * d + 2 * d * d) if cfg.time_cond else 0
    return length * per_token + per_sequence


def macs_per_token(cfg: TextTransformerConfig, length: Optional[int] = None) -> float:
    """:func:`macs_per_sequence` / length: the forward multiply-accumulates per token."""
    length = cfg.seq_len if length is None else length
    return macs_per_sequence(cfg, length) / length


class TextTransformer(nn.Module):
    """forward(x (N, L) LongTensor, t (N,) in [0, 1] or None) -> logits (N, L, V_out); L <= seq_len. See the module
    docstring for the three modes."""

    def __init__(
        self,
        vocab_size: int = 256,                # K data tokens
        mask_token: bool = True,              # absorbing process: mask id K, K + 1 logits
        seq_len: int = 256,                   # longest sequence
        size: str = "S",                      # TEXT_SIZES row: tiny, S, M
        depth: Optional[int] = None,          # blocks (None: the size's)
        width: Optional[int] = None,          # token width D (None: the size's)
        heads: Optional[int] = None,          # attention heads (None: the size's)
        mlp_ratio: float = 4.0,               # MLP width ratio
        dropout: float = 0.0,                 # embedding dropout
        time_cond: bool = False,              # adaLN-Zero time conditioning
        causal: bool = False,                 # autoregressive (causal attention, BOS = K)
        tie_weights: bool = False,            # head weight = token embedding
        time_freq_dim: int = 256,             # sinusoidal time feature width
    ):
        super().__init__()
        self.config = cfg = TextTransformerConfig(**{k: v for k, v in locals().items()
                                                     if k in TextTransformerConfig.__dataclass_fields__})
        check_text_config(cfg)
        depth, d, n_heads = resolve_text_size(cfg)
        self.vocab_in, self.vocab_out = vocab_sizes(cfg)
        self.mask_id = vocab_size if mask_token else None  # the absorbing process's mask id m = K
        self.bos_id = vocab_size if causal else None  # the autoregressive model's BOS id (shift_for_next_token)
        self.seq_len, self.width, self.time_cond, self.causal = seq_len, d, time_cond, causal
        self.token_embed = nn.Embedding(self.vocab_out, d)  # rows shared with a tied head
        self.bos_embed = nn.Parameter(torch.zeros(d)) if causal else None  # the extra input id K of the AR model
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, d))
        self.drop = nn.Dropout(dropout)
        self.time_embed = TimeEmbedding(time_freq_dim, d) if time_cond else None
        self.blocks = nn.ModuleList(
            DiTBlock(d, n_heads, mlp_ratio, d, gated=True) if time_cond else Block(d, n_heads, mlp_ratio)
            for _ in range(depth))
        self.final_layer = FinalLayer(d, self.vocab_out, d if time_cond else None)
        if tie_weights:
            self.final_layer.linear.weight = self.token_embed.weight  # (V_out, D), one parameter
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linears with zero biases (DiT); N(0, 0.02) embeddings and time MLP; zero adaLN-Zero
        modulations (every block the identity) and, untied, a zero head (uniform predictions at initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.token_embed.weight, self.pos_embed, self.bos_embed):
            if p is not None:
                nn.init.normal_(p, std=INIT_STD)
        zeroed = [self.final_layer.modulation] + [getattr(b, "modulation", None) for b in self.blocks]
        if self.time_embed is not None:
            for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
                nn.init.normal_(lin.weight, std=INIT_STD)
        for m in zeroed:
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        if not self.config.tie_weights:
            nn.init.zeros_(self.final_layer.linear.weight)

    @classmethod
    def from_config(cls, cfg: TextTransformerConfig) -> "TextTransformer":
        return cls(**asdict(cfg))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TextTransformer":
        if name not in TEXT_PRESETS:
            raise ValueError(f"unknown text transformer preset {name!r}; allowed values: {', '.join(TEXT_PRESETS)}")
        return cls.from_config(TEXT_PRESETS[name].replace(**overrides))

    def macs_per_token(self, length: Optional[int] = None) -> float:
        """Forward multiply-accumulates per token at `length` (default seq_len), see :func:`macs_per_sequence`."""
        return macs_per_token(self.config, length)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None, **cond) -> torch.Tensor:
        if cond:
            raise ValueError(f"the text transformer takes no conditioning inputs, got {sorted(cond)}")
        self._check_tokens(x)
        n, length = x.shape
        h = self.drop(self._embed(x) + self.pos_embed[:, :length])  # (N, L, D)
        if self.time_embed is not None:
            if t is None:
                raise ValueError(f"this network is time-conditioned ({OWNER}.time_cond=true): pass t (N,) in [0, 1]")
            c = self.time_embed(TIME_SCALE * as_time_vector(t, n, x.device))  # (N, D)
            for block in self.blocks:
                h = block(h, c)  # (N, L, D)
        else:
            c = None  # t, if given, is ignored
            mask = causal_mask(length, x.device) if self.causal else None  # (L, L) or None
            for block in self.blocks:
                h = block(h, attn_mask=mask)  # (N, L, D)
        return self.final_layer(h, c)  # (N, L, V_out)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """E_tok[x] (N, L, D); the autoregressive model's BOS id K takes its own vector."""
        if self.bos_embed is None:
            return self.token_embed(x)  # (N, L, D)
        is_bos = x == self.bos_id  # (N, L)
        tokens = self.token_embed(x.masked_fill(is_bos, 0))  # (N, L, D)
        return torch.where(is_bos[..., None], self.bos_embed.to(tokens.dtype), tokens)

    def _check_tokens(self, x: torch.Tensor) -> None:
        """Token ids (N, L) integers in 0..V_in-1 with L <= seq_len, or a ValueError naming the fix."""
        if not torch.is_tensor(x) or x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"the text transformer takes token ids, a LongTensor (N, L), got {got}")
        if x.shape[1] > self.seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds {OWNER}.seq_len={self.seq_len}: build the net "
                             f"with seq_len >= {x.shape[1]}, or cut the sequences to {self.seq_len} tokens")
        if x.numel() and x.device.type != "meta" and (int(x.min()) < 0 or int(x.max()) >= self.vocab_in):
            raise ValueError(f"token ids must lie in 0..{self.vocab_in - 1} ({self._ids_meaning()}), got ids in "
                             f"{int(x.min())}..{int(x.max())}")

    def _ids_meaning(self) -> str:
        k = self.config.vocab_size
        if self.mask_id is not None:
            return f"the data tokens 0..{k - 1} and the mask id {k}"
        if self.bos_id is not None:
            return f"the data tokens 0..{k - 1} and BOS = {k}; make the inputs with shift_for_next_token"
        return (f"the data tokens 0..{k - 1}; for the absorbing process's mask id {k} build the net with "
                f"{OWNER}.mask_token=true")
