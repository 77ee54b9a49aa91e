"""Raw networks F(x_in, t, **cond) -> output, to be wrapped by :mod:`torchdiffusion.precond`.

``NETS`` is the registry: a kind names a network class (with ``from_config``) and its config dataclass; the
run configuration's ``model.<kind>`` section holds that config. ``PRESETS`` holds the named configs of each family
(the size registries: DiT's S, B, L, XL x patch 2, 4, 8; U-ViT's S, S-deep, M, L, H; the U-Net presets; the text
transformer's tiny, S, M).
Denoising networks return a tensor shaped like x_in; the noisy classifier returns class logits; the autoencoder (with
its optional discriminator) what the autoencoder's objective needs; the text transformer maps token ids (N, L) and t to
logits (N, L, V) (the discrete diffusion contract, docs/text.md).

    build_net("unet", preset="mnist")            # a preset from UNET_PRESETS
    build_net("unet", channels=64, image_size=32, in_channels=3, attn_resolutions=(8,))
    build_net("unet", block="convnext", attention="window", window_size=7)
    build_net("dit", preset="XL/2")              # DiT-XL/2 on 32x32x4 latents, 1000 classes (675M parameters)
    build_net("dit", size="S", patch_size=4, num_classes=10)      # DiT-S/4 on 28x28 MNIST
    build_net("uvit", size="S", patch_size=4, num_classes=10)
    build_net("mlp", dim=2, hidden=256)
    build_net("text_transformer", size="S", vocab_size=65)           # MDLM's absorbing denoiser, 65 characters
    build_net("text_transformer", size="S", causal=True, mask_token=False)   # its autoregressive twin
    build_net("unet1d", preset="S", length=64, in_channels=1)      # a 1-D U-Net over series windows (N, C, L)
    build_net("dit1d", size="S", patch_len=4, length=64)           # a 1-D patch transformer (adaLN-Zero blocks)
"""
from __future__ import annotations

from torch import nn

from ..utils import check_choice
from .autoencoder import AutoencoderConfig, AutoencoderNet, KLAutoencoder
from .classifier import ClassifierConfig, NoisyClassifier
from .dit import DIT_PRESETS, DIT_SIZES, DiT, DiTConfig
from .dit1d import DIT1D_PRESETS, DiT1D, DiT1DConfig
from .embeddings import TimeEmbedding, sincos_position_embedding_2d, timestep_embedding
from .mlp import MLPConfig, MLPDenoiserNet, ResMLPBlock
from .text import (TEXT_PRESETS, TEXT_SIZES, TextTransformer, TextTransformerConfig, macs_per_sequence, macs_per_token,
                   shift_for_next_token)
from .unet import UNET_PRESETS, UNet, UNetConfig, count_parameters
from .unet1d import UNET1D_PRESETS, UNet1D, UNet1DConfig
from .uvit import UVIT_PRESETS, UVIT_SIZES, UViT, UViTConfig

NETS = {  # kind -> (network class, its config dataclass)
    "unet": (UNet, UNetConfig),
    "dit": (DiT, DiTConfig),
    "uvit": (UViT, UViTConfig),
    "mlp": (MLPDenoiserNet, MLPConfig),
    "noisy_classifier": (NoisyClassifier, ClassifierConfig),
    "autoencoder": (AutoencoderNet, AutoencoderConfig),
    "text_transformer": (TextTransformer, TextTransformerConfig),
    "unet1d": (UNet1D, UNet1DConfig),
    "dit1d": (DiT1D, DiT1DConfig),
}
PRESETS = {  # kind -> named configs
    "unet": UNET_PRESETS, "dit": DIT_PRESETS, "uvit": UVIT_PRESETS, "text_transformer": TEXT_PRESETS,
    "unet1d": UNET1D_PRESETS, "dit1d": DIT1D_PRESETS,
}


def build_net(kind: str, preset: str | None = None, **fields) -> nn.Module:
    """A network by kind (see NETS) from its config defaults, a named preset (PRESETS[kind]) and `fields`."""
    check_choice("net kind", kind, NETS)
    cls, config_cls = NETS[kind]
    if preset is not None:
        presets = PRESETS.get(kind, {})
        check_choice(f"{kind} preset", preset, presets)
        return cls.from_config(presets[preset].replace(**fields))
    return cls.from_config(config_cls(**fields))


__all__ = [
    "NETS", "PRESETS", "build_net", "timestep_embedding", "sincos_position_embedding_2d", "TimeEmbedding", "UNet",
    "UNetConfig", "UNET_PRESETS", "count_parameters", "DiT", "DiTConfig", "DIT_PRESETS", "DIT_SIZES", "UViT",
    "UViTConfig", "UVIT_PRESETS", "UVIT_SIZES", "MLPDenoiserNet", "MLPConfig", "ResMLPBlock", "ClassifierConfig",
    "NoisyClassifier", "AutoencoderConfig", "AutoencoderNet", "KLAutoencoder", "TextTransformer",
    "TextTransformerConfig", "TEXT_PRESETS", "TEXT_SIZES", "macs_per_sequence", "macs_per_token",
    "shift_for_next_token", "UNet1D", "UNet1DConfig", "UNET1D_PRESETS", "DiT1D", "DiT1DConfig", "DIT1D_PRESETS",
]
