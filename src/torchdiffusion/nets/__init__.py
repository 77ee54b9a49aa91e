"""Raw networks F(x_in, t, **cond) -> output, to be wrapped by :mod:`torchdiffusion.precond`.

``NETS`` is the registry: a kind names a network class (with ``from_config``) and its config dataclass; the
run configuration's ``model.<kind>`` section holds that config. Denoising networks return a tensor shaped like
x_in; the noisy classifier returns class logits.

    build_net("unet", preset="mnist")            # a preset from UNET_PRESETS
    build_net("unet", channels=64, image_size=32, in_channels=3, attn_resolutions=(8,))
    build_net("mlp", dim=2, hidden=256)
"""
from __future__ import annotations

from torch import nn

from ..utils import check_choice

from .classifier import ClassifierConfig, NoisyClassifier
from .embeddings import TimeEmbedding, timestep_embedding
from .mlp import MLPConfig, MLPDenoiserNet, ResMLPBlock
from .unet import UNET_PRESETS, UNet, UNetConfig, count_parameters

NETS = {  # kind -> (network class, its config dataclass)
    "unet": (UNet, UNetConfig),
    "mlp": (MLPDenoiserNet, MLPConfig),
    "noisy_classifier": (NoisyClassifier, ClassifierConfig),
}
PRESETS = {"unet": UNET_PRESETS}  # kind -> named configs


def build_net(kind: str, preset: str | None = None, **fields) -> nn.Module:
    """A network by kind (see NETS) from its config defaults, a named preset (U-Net: UNET_PRESETS) and `fields`."""
    check_choice("net kind", kind, NETS)
    cls, config_cls = NETS[kind]
    if preset is not None:
        presets = PRESETS.get(kind, {})
        check_choice(f"{kind} preset", preset, presets)
        return cls.from_config(presets[preset].replace(**fields))
    return cls.from_config(config_cls(**fields))


__all__ = [
    "NETS", "PRESETS", "build_net", "timestep_embedding", "TimeEmbedding", "UNet", "UNetConfig", "UNET_PRESETS",
    "count_parameters", "MLPDenoiserNet", "MLPConfig", "ResMLPBlock", "ClassifierConfig", "NoisyClassifier",
]
