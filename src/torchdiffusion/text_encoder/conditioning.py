"""Text conditioning of an image denoiser: captions of a data set encoded once, served as the network's cross-attention
context, and prompts encoded the same way for sampling.

The context of a caption is the encoder's token vectors (L, 384) with their mask, preceded (``pooled_token``) by the
pooled sentence embedding as one more token, so every cross-attention layer sees the sentence as a whole beside its
words (the global-vector input of Imagen's text conditioning, Saharia et al. 2022, here as a token). The empty caption
has every entry masked: the network then attends to its learned null entry alone, which is exactly its unconditional
path (nets.transformer.NullContext), so caption dropout to the empty caption is the null-class training of
classifier-free guidance (Ho & Salimans 2021, Alg. 1) and guidance against the empty caption is CFG.
"""
from __future__ import annotations

from dataclasses import dataclass
from hashlib import sha256

import torch
from safetensors.torch import load_file, save

from ..data.cache import cache_dir, write_atomic
from ..data.captions import NULL_CAPTION, PHRASING_SETS, caption_set_of, make_captions
from ..utils import check_choice, rand
from .encoder import DEFAULT_ENCODER, ENCODERS, SentenceEmbeddings, SentenceEncoder, require_encoder, shared_encoder

TABLE_DIR = "text-embeddings"   # folder of the cached caption tables in the user cache
SHARED_ATTRIBUTES = ("labels", "num_classes", "classes", "name", "sample_shape")  # read from the image data set


@dataclass
class CaptionConfig:
    enabled: bool = False           # condition the denoiser on captions (needs model.unet.context_dim = encoder width)
    encoder: str = DEFAULT_ENCODER  # the frozen sentence encoder (a name in text_encoder.ENCODERS)
    max_tokens: int = 32            # tokens kept per caption ([CLS] and [SEP] included)
    pooled_token: bool = True       # put the pooled sentence embedding in front of the token vectors
    phrasings: str = "train"        # the phrasing set of the training captions (heldout: evaluation only)
    seed: int = 0                   # seed of each example's phrasing and named attributes


def check_caption_config(c: CaptionConfig, context_dim, dataset: str, autoencoder: str) -> None:
    """Refuse a caption configuration the run cannot use, saying what to set."""
    if not c.enabled:
        return
    spec = ENCODERS[check_choice("captions.encoder", c.encoder, ENCODERS)]
    check_choice("captions.phrasings", c.phrasings, PHRASING_SETS)
    if not 2 < c.max_tokens <= spec.max_tokens:
        raise ValueError(f"captions.max_tokens must be in 3..{spec.max_tokens}, got {c.max_tokens}")
    caption_set_of(dataset)
    if autoencoder:
        raise ValueError("captions are measured on pixel images: leave data.autoencoder empty for a captioned run")
    if context_dim != spec.dim:
        raise ValueError(f"captions.enabled needs a network that cross-attends to the {spec.dim}-wide {c.encoder} "
                         f"vectors: set model.unet.context_dim={spec.dim} and model.unet.cross_attn_resolutions "
                         f"(got context_dim={context_dim})")


def context_of(emb: SentenceEmbeddings, pooled_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (N, L', C), mask (N, L') bool) of encoded captions; with pooled_token the pooled embedding is the
    first entry, masked for the empty caption like its (absent) tokens."""
    if not pooled_token:
        return emb.tokens, emb.mask
    has_text = emb.mask.any(1, keepdim=True)  # (N, 1)
    return torch.cat([emb.pooled[:, None], emb.tokens], 1), torch.cat([has_text, emb.mask], 1)


def prompt_condition(encoder: SentenceEncoder, prompts, pooled_token: bool = True) -> dict:
    """{'context': (N, L, C), 'context_mask': (N, L)} of the prompts (a list of strings; '' : unconditional)."""
    context, mask = context_of(encoder.encode(list(prompts)), pooled_token)
    return {"context": context, "context_mask": mask}


def _table_key(captions: list[str], encoder: SentenceEncoder, pooled_token: bool) -> str:
    """16 hex digits naming the table of these captions by this encoder (its weights' SHA-256 included)."""
    h = sha256(repr((encoder.identity(), pooled_token)).encode())
    for c in captions:
        h.update(c.encode() + b"\0")
    return h.hexdigest()[:16]


def caption_table(captions: list[str], encoder: SentenceEncoder, pooled_token: bool, *, cache: bool = True):
    """(context (U, L, C), mask (U, L)) of the distinct captions (sorted, ''-first), encoded once and kept in the
    user cache under text-embeddings/ keyed by the captions and the encoder's weights."""
    path = cache_dir() / TABLE_DIR / f"{encoder.name}-{_table_key(captions, encoder, pooled_token)}.safetensors"
    if cache and path.is_file():
        t = load_file(str(path))
        return t["context"], t["mask"]
    context, mask = context_of(encoder.encode(captions), pooled_token)
    if cache:
        write_atomic(path, lambda f: f.write(save({"context": context.contiguous(), "mask": mask.contiguous()})))
    return context, mask


class CaptionedDataset:
    """An image data set whose batches carry each example's caption as a context: ``batch(indices, generator=,
    flip=, device=)`` -> (images, labels, {'context': (B, L, C), 'context_mask': (B, L)}); with `drop_prob`, each
    example's caption is replaced by the empty caption with that probability, drawn from its generator."""

    def __init__(self, images, captions: list[str], context: torch.Tensor, mask: torch.Tensor, distinct: list[str],
                 *, drop_prob: float = 0.0, encoder: dict | None = None, phrasings: str = "train"):
        index = {c: i for i, c in enumerate(distinct)}
        self.images, self.captions = images, captions
        self.ids = torch.tensor([index[c] for c in captions], dtype=torch.int64)  # (N,)
        self.context, self.mask = context, mask  # (U, L, C), (U, L)
        self.null_id = index[NULL_CAPTION]
        self.drop_prob = float(drop_prob)
        self.meta = {"captions": {"encoder": encoder or {}, "phrasings": phrasings, "distinct": len(distinct)}}

    def __len__(self) -> int:
        return len(self.images)

    def __getattr__(self, name):
        if name not in SHARED_ATTRIBUTES:  # e.g. subset(), which would drop the captions
            raise AttributeError(f"CaptionedDataset has no attribute {name!r}")
        return getattr(self.images, name)

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        x, y = self.images.batch(indices, generator=generator, flip=flip, device=device)[:2]
        ids = self.ids[torch.as_tensor(indices, dtype=torch.int64)]  # (B,)
        if self.drop_prob > 0:
            drop = rand(ids.shape, generator=generator) < self.drop_prob  # (B,)
            ids = torch.where(drop, torch.full_like(ids, self.null_id), ids)
        return x, y, {"context": self.context[ids].to(device), "context_mask": self.mask[ids].to(device)}


def captioned_dataset(images, dataset: str, c: CaptionConfig, *, drop_prob: float = 0.0, encoder=None,
                      cache: bool = True) -> CaptionedDataset:
    """The captions of an MNIST / Fashion-MNIST data set (data.captions.make_captions), encoded by `encoder` (a
    SentenceEncoder; when None, the shared one `c` names)."""
    require_encoder(c.encoder)
    encoder = encoder or shared_encoder(c.encoder, c.max_tokens)
    captions = make_captions(images.images, images.labels, caption_set_of(dataset), c.phrasings, seed=c.seed)
    distinct = sorted(set(captions) | {NULL_CAPTION})
    context, mask = caption_table(distinct, encoder, c.pooled_token, cache=cache)
    return CaptionedDataset(images, captions, context, mask, distinct, drop_prob=drop_prob,
                            encoder=encoder.identity(), phrasings=c.phrasings)
