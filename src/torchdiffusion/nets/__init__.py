"""Raw networks F(x_in, t, **cond) -> tensor shaped like x_in, to be wrapped by :class:`torchdiffusion.precond.Precond`.

    build_net("unet", preset="mnist")            # a preset from UNET_PRESETS
    build_net("unet", channels=64, image_size=32, in_channels=3, attn_resolutions=(8,))
    build_net("mlp", dim=2, hidden=256)
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .classifier import ClassifierConfig, NoisyClassifier
from .embeddings import TimeEmbedding, timestep_embedding
from .mlp import MLPConfig, MLPDenoiserNet, ResMLPBlock
from .unet import UNET_PRESETS, UNet, UNetConfig, build_unet, count_parameters


def _build_mlp(preset: Optional[str] = None, **cfg) -> MLPDenoiserNet:
    if preset is not None:
        raise ValueError("the mlp net has no presets; pass MLPConfig fields instead")
    return MLPDenoiserNet.from_config(MLPConfig(**cfg))


NETS = {"unet": build_unet, "mlp": _build_mlp}


def build_net(kind: str, **cfg) -> nn.Module:
    """Build a network by kind ('unet' or 'mlp'); keyword arguments are config fields (unet also takes preset=)."""
    if kind not in NETS:
        raise ValueError(f"unknown net kind {kind!r}; allowed kinds: {', '.join(map(repr, NETS))}")
    return NETS[kind](**cfg)


__all__ = [
    "NETS", "build_net", "timestep_embedding", "TimeEmbedding", "UNet", "UNetConfig", "UNET_PRESETS", "build_unet",
    "count_parameters", "MLPDenoiserNet", "MLPConfig", "ResMLPBlock", "ClassifierConfig", "NoisyClassifier",
]
