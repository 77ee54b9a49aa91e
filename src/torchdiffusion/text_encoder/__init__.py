"""Text conditioning: a frozen sentence encoder (all-MiniLM-L6-v2, an optional extra) and the captions of a data set
served as a denoiser's cross-attention context (docs/conditioning.md, "Text-conditioned generation").

Imports `data` and `utils` only; `transformers` is imported when an encoder is built.
"""
from .conditioning import (CaptionConfig, CaptionedDataset, caption_table, captioned_dataset, check_caption_config,
                           context_of, prompt_condition)
from .encoder import (DEFAULT_ENCODER, ENCODERS, SentenceEmbeddings, SentenceEncoder, TextEncoderMissing,
                      install_command, mean_pool, missing_parts, require_encoder, shared_encoder)

__all__ = ["CaptionConfig", "CaptionedDataset", "caption_table", "captioned_dataset", "check_caption_config",
           "context_of", "prompt_condition", "DEFAULT_ENCODER", "ENCODERS", "SentenceEmbeddings", "SentenceEncoder",
           "TextEncoderMissing", "install_command", "mean_pool", "missing_parts", "require_encoder",
           "shared_encoder"]
