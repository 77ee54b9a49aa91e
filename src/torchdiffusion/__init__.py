"""torchdiffusion: diffusion generative models in PyTorch, built on one contract, a denoiser D(x, sigma) -> x0.

``torchdiffusion.load(path)`` returns a :class:`~torchdiffusion.app.api.Model` (sample, inpaint, img2img, invert,
evaluate), or for a text checkpoint a :class:`~torchdiffusion.app.api.TextModel` (generate, score, evaluate); the
parts live in their modules (see docs/architecture.md).
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("torchdiffusion")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


def __getattr__(name):
    """`load`, `Model` and `TextModel` come from the app layer, imported on first use so that `import torchdiffusion`
    stays light."""
    if name in ("load", "Model", "TextModel"):
        from .app import api

        return getattr(api, name)
    raise AttributeError(f"module 'torchdiffusion' has no attribute {name!r}")
