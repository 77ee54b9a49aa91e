"""The edits of :mod:`torchdiffusion.edit` for a model that works on latents: images are encoded, edited in latent
space and decoded.

Inpainting brings the mask to latent resolution (a latent cell is known only when its whole patch is known,
:func:`~.codec.mask_to_latent`), inpaints the latents, decodes, and then restores the known pixels exactly: the
result equals the input wherever the mask is 1, as in pixel space.
"""
from __future__ import annotations

import torch

from .. import edit
from .codec import LatentCodec, mask_to_latent


def inpaint(codec: LatentCodec, denoiser, images: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor,
            **kwargs) -> torch.Tensor:
    """Fill the pixels where mask = 0 (mask broadcastable to the images), with `denoiser` on latents."""
    mask = edit._check_mask(images, mask)
    z = codec.encode(images)                                            # (N, C, h, w)
    z_mask = mask_to_latent(mask.expand_as(images)[:, :1], codec.factor).expand_as(z)
    out = codec.decode(edit.inpaint(denoiser, z, z_mask, sigmas, **kwargs))
    return torch.where(mask.to(torch.bool), images, out.to(images.dtype))


def sdedit(codec: LatentCodec, denoiser, images: torch.Tensor, sigmas: torch.Tensor, strength: float,
           **kwargs) -> torch.Tensor:
    return codec.decode(edit.sdedit(denoiser, codec.encode(images), sigmas, strength, **kwargs))


def invert(codec: LatentCodec, denoiser, images: torch.Tensor, sigmas: torch.Tensor, *, iters: int = 0):
    """(latent noise, decoded reconstruction) of DDIM inversion in latent space."""
    z = edit.ddim_invert(denoiser, codec.encode(images), sigmas, iters=iters)
    return z, codec.decode(edit.get_sampler("ddim")(denoiser, z, sigmas))


def interpolate(codec: LatentCodec, denoiser, a: torch.Tensor, b: torch.Tensor, sigmas: torch.Tensor,
                **kwargs) -> torch.Tensor:
    za, zb = codec.encode(torch.stack([a, b]))
    return codec.decode(edit.interpolate(denoiser, za, zb, sigmas, **kwargs))


class Edits:
    """The four edits on images in [-1, 1], for a pixel model (codec None) or a latent one (codec given): the same
    calls either way (what the command line and the Python API use)."""

    def __init__(self, codec: LatentCodec | None = None):
        self.codec = codec

    def inpaint(self, denoiser, images, mask, sigmas, **kwargs):
        if self.codec is None:
            return edit.inpaint(denoiser, images, mask, sigmas, **kwargs)
        return inpaint(self.codec, denoiser, images, mask, sigmas, **kwargs)

    def sdedit(self, denoiser, images, sigmas, strength, **kwargs):
        if self.codec is None:
            return edit.sdedit(denoiser, images, sigmas, strength, **kwargs)
        return sdedit(self.codec, denoiser, images, sigmas, strength, **kwargs)

    def invert(self, denoiser, images, sigmas, *, iters: int = 0):
        """(the noise DDIM maps to each image, the reconstruction)."""
        if self.codec is None:
            z = edit.ddim_invert(denoiser, images, sigmas, iters=iters)
            return z, edit.get_sampler("ddim")(denoiser, z, sigmas)
        return invert(self.codec, denoiser, images, sigmas, iters=iters)

    def interpolate(self, denoiser, a, b, sigmas, **kwargs):
        if self.codec is None:
            return edit.interpolate(denoiser, a, b, sigmas, **kwargs)
        return interpolate(self.codec, denoiser, a, b, sigmas, **kwargs)
