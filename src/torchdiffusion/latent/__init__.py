"""Latent diffusion: the autoencoder's objective and perceptual distances, the codec between images and scaled
latents, the latent data set, and the edits in latent space (Rombach et al. 2022)."""
from .codec import LatentCodec, LatentDataset, latent_scale, mask_to_latent
from .objective import AutoencoderLossConfig, AutoencoderModule, AutoencoderObjective

__all__ = ["LatentCodec", "LatentDataset", "latent_scale", "mask_to_latent", "AutoencoderLossConfig",
           "AutoencoderModule", "AutoencoderObjective"]
