"""A joint (image, label) model used both ways (docs/conditioning.md): p(y | x), classification, by inpainting the
label block given the image, and p(x | y), a class's images, by inpainting the image given the label block.

The model is one denoiser of packed pairs z = pack_pair(x, y) (data.joint), y = scale (2 onehot - 1). Three ways
to read p(y | x):

* ``oneshot``: one call of the denoiser at level sigma on (x, y_c), y_c the centroid of the K label blocks. Every
  class's block is at the same distance from y_c, so for the exact denoiser the label part of the posterior is flat
  and E[y0 | x_sigma = x, y_sigma = y_c] = scale (2 p(k | x_sigma = x) - 1): the class posterior of the image
  seen at level sigma, read back by data.joint.label_probabilities. 1 NFE.
* ``replacement``: edit.impute of the label block given the image (Song et al. 2021, app. I), the argmax of each
  draw's label block a vote; the votes' frequencies over `samples` draws are the probability.
* ``repaint``: the same with RePaint's resampling (Lugmayr et al. 2022, Alg. 1), `resample` passes per level.
"""
from __future__ import annotations

import torch

from ..build import joint_image_channels, load_denoiser
from ..checkpoint import CheckpointError
from ..data.joint import encode_labels, label_probabilities, pack_pair, pair_mask, unpack_pair
from ..edit import DEFAULT_STEP_SAMPLER, impute
from ..guidance import class_labels_for
from ..sampling import SampleConfig, generate, get_sigmas
from ..sampling.core import expand_sigma
from ..utils import check_choice

CLASSIFY_METHODS = ("oneshot", "replacement", "repaint")
ONESHOT_SIGMA = 1.5        # default level of the one-shot read: the image still shows, the label block is hidden
                           # (picked on MNIST test images 5000-5999, docs/conditioning.md)
REPAINT_RESAMPLE = 10      # default resampling passes per level of method repaint (their sec. 4.2 uses 10)


def load_joint(path, *, device="cpu"):
    """(denoiser, config) of a task-joint checkpoint; another task's checkpoint is refused."""
    denoiser, cfg, _ = load_denoiser(path, device=device)
    if cfg.task != "joint":
        raise CheckpointError(f"{path} holds a {cfg.task!r} model, not a joint (image, label) one (task joint)")
    return denoiser, cfg


def joint_layout(cfg) -> tuple[int, int, float]:
    """(image channels, classes, label scale) of a joint run's configuration."""
    return joint_image_channels(cfg), cfg.joint.classes, cfg.joint.label_scale


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")


@torch.no_grad()
def label_oneshot(denoiser, images: torch.Tensor, *, classes: int, scale: float,
                  sigma: float = ONESHOT_SIGMA) -> torch.Tensor:
    """p(k | x_sigma = images) (N, K) from one denoiser call on (images, centroid) at level `sigma` (clamped to
    [0, 1] and renormalised: a learned denoiser's read need not be a distribution)."""
    n = images.shape[0]
    centroid = torch.full((n, classes), scale * (2.0 / classes - 1.0), device=images.device)  # (N, K)
    z = pack_pair(images, centroid)
    y = unpack_pair(denoiser(z, expand_sigma(sigma, z)), classes)[1]  # (N, K)
    p = label_probabilities(y, scale).clamp(0, 1)
    return p / p.sum(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def classify(denoiser, images: torch.Tensor, sigmas: torch.Tensor, *, classes: int, scale: float,
             method: str = "replacement", samples: int = 1, seed: int = 0, sampler: str = DEFAULT_STEP_SAMPLER,
             resample: int = REPAINT_RESAMPLE, jump_length: int = 1, sigma: float = ONESHOT_SIGMA,
             batch_size: int = 256) -> torch.Tensor:
    """p(y | x) of `images` (N, C, H, W) as class probabilities (N, K), by `method` (CLASSIFY_METHODS; see the
    module docstring). `sigmas` is the grid of the inpainting methods, `sigma` the one-shot level."""
    check_choice("method", method, CLASSIFY_METHODS)
    _check_images(images)
    if method == "oneshot":
        return label_oneshot(denoiser, images, classes=classes, scale=scale, sigma=sigma)
    channels = images.shape[1]
    z = pack_pair(images, torch.zeros(images.shape[0], classes, device=images.device))  # free block ignored
    draws = impute(denoiser, z, pair_mask(channels, classes, "x").to(z), sigmas, samples=samples, seed=seed,
                   sampler=sampler, batch_size=batch_size, resample=resample if method == "repaint" else 1,
                   jump_length=jump_length)  # (S, N, C + K, H, W)
    y = unpack_pair(draws.flatten(0, 1), classes)[1].view(samples, -1, classes)  # (S, N, K)
    votes = torch.nn.functional.one_hot(y.argmax(-1), classes).float()  # (S, N, K)
    return votes.mean(0)


def generate_given_labels(denoiser, labels: torch.Tensor, sigmas: torch.Tensor, *, channels: int, classes: int,
                          scale: float, image_size: tuple, seed: int = 0, sampler: str = DEFAULT_STEP_SAMPLER,
                          resample: int = 1, jump_length: int = 1, batch_size: int = 256) -> torch.Tensor:
    """p(x | y): one image (N, C, H, W) per class index of `labels` (N,), by inpainting the image given the label
    block (resample > 1: RePaint's resampling). Image n draws from the generator seeded (seed, n)."""
    y = encode_labels(labels, classes, scale)  # (N, K); refuses labels that are not class indices
    z = pack_pair(torch.zeros(len(y), channels, *image_size), y)
    draws = impute(denoiser, z, pair_mask(channels, classes, "y"), sigmas, samples=1, seed=seed, sampler=sampler,
                   batch_size=batch_size, resample=resample, jump_length=jump_length)[0]
    return unpack_pair(draws, classes)[0]


@torch.no_grad()
def sample_joint(denoiser, cfg, shape: tuple, spec: SampleConfig, *, progress: bool = False):
    """What `torchdiffusion sample` draws from a joint model: (images (n, C, H, W), labels (n,)). With
    spec.class_label None, pairs from the joint model and the class each carries (the argmax of its label block);
    with a class (or -1: class i mod K), images given that label (p(x | y), :func:`generate_given_labels` on
    spec's grid)."""
    channels, classes, scale = joint_layout(cfg)
    if spec.guidance != "none":
        raise ValueError(f"a joint (image, label) model conditions by inpainting the label block, not by guidance "
                         f"{spec.guidance!r}: drop --guidance (give --class-label for a class's images)")
    if spec.class_label is None:
        z = generate(denoiser, shape, spec, progress=progress)
        x, y = unpack_pair(z, classes)
        return x, label_probabilities(y, scale).argmax(1)
    labels = class_labels_for(spec.n, spec.class_label, classes)  # (n,)
    sigmas = get_sigmas(denoiser.schedule, spec.steps, spec.spacing, sigmas=spec.sigmas or None)
    x = generate_given_labels(denoiser, labels, sigmas, channels=channels, classes=classes, scale=scale,
                              image_size=tuple(shape[1:]), seed=spec.seed, batch_size=spec.batch_size)
    return x.clamp(-1, 1) if spec.clip_x0 else x, labels
