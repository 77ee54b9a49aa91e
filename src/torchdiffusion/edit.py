"""Editing and constrained sampling on the denoiser contract: projections applied after every sampler step,
inpainting (replacement and RePaint resampling), SDEdit, DDIM inversion, interpolation, and the
super-resolution cascade.

Everything here drives the ordinary samplers (:data:`torchdiffusion.sampling.SAMPLERS`) over sub-sequences of
a sigma grid and works in VE coordinates (x = x0 + sigma n):

* constrained sampling: after each step sigma -> sigma' the state is projected, x <- Pi_C(x, sigma'), and the
  result (sigma' = 0) lies in C exactly. Box: clamp. Linear equality A x = b: the orthogonal projection
  x - A^T (A A^T)^-1 (A x - b'), with b' = b + sigma' A n when `noisy` (the constrained part set to a draw of
  its noised value, so intermediate states stay on the noisy marginal).
* inpainting (mask = 1 on known pixels) is the equality constraint with A the pixel selection: known pixels are
  replaced by image + sigma' n after every step (Song et al. 2021, "Score-based generative modeling through
  SDEs", app. I; Lugmayr et al. 2022, "RePaint", eq. 8), and RePaint's resampling (Alg. 1) goes back up
  `jump_length` levels by the forward process, x <- x + sqrt(sigma_hi^2 - sigma_lo^2) n, `resample` times.
* SDEdit (Meng et al. 2022): x = image + sigma(t0) n, then the sampler on the grid truncated to start at t0.
* DDIM inversion (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021, app. F): the probability-flow ODE run
  from sigma = 0 up to sigma_max; DDIM sampling from the result reconstructs the image.
* interpolation: invert two images, slerp the noises, decode each with DDIM.
* cascade (Ho et al. 2021, "Cascaded diffusion models"): a base model, then a super-resolution model
  conditioned on its samples, noise-augmented at level `aug_sigma`.
* series (N, C, L): forecasting and gap filling are inpainting of the unknown steps (`series_mask`, `impute`:
  several draws per window, each with its own generator; docs/timeseries.md).
* packed (image, label) pairs (data.joint.pack_pair): `PlaneMean` projects the denoised label planes onto their
  plane means, where the exact denoiser of such data lies (docs/conditioning.md).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .objectives import low_res_condition
from .precond import DenoiserTransform
from .sampling import SampleConfig, generate, get_sampler, plan_sampling
from .sampling.core import expand_sigma, levels, to_d
from .utils import append_dims, check_choice, hash_seed, randn, randn_like, sample_generators, slerp

# Samplers whose step over [sigma, sigma'] depends only on (x, sigma, sigma'): they can be run one interval at a
# time with a projection in between. Multistep samplers (dpmpp_2m/3m, unipc, ...) would lose their history.
STEP_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "euler_ancestral", "dpmpp_2s")
DEFAULT_STEP_SAMPLER = "ddpm"  # what inpainting uses when the run samples with a multistep sampler
CASCADE_STREAM = 7  # seed stream of the super-resolution stage's noise (base stage: the seed itself)

Projection = Callable[..., torch.Tensor]  # project(x, sigma, *, generator=None) -> x in C (at level sigma)


# --------------------------------------------------------------------------------------------- projections
def box_projection(lo: float = -1.0, hi: float = 1.0) -> Projection:
    """Pi_C for the box C = [lo, hi]^D: elementwise clamp (at every noise level)."""
    if not lo < hi:
        raise ValueError(f"need lo < hi, got {lo}, {hi}")

    def project(x, sigma, *, generator=None):
        return x.clamp(lo, hi)

    return project


def linear_equality_projection(A: torch.Tensor, b: torch.Tensor, *, noisy: bool = True) -> Projection:
    """Pi_C for C = {x : A x = b} per sample (x flattened to D): x - A^T (A A^T)^-1 (A x - b').

    A: (m, D) of full row rank; b: (m,) or (N, m). With `noisy`, b' = b + sigma A n (n ~ N(0, I_D) from the
    generator) so that at level sigma the constrained part is a draw of its noised value; at sigma = 0, b' = b.
    """
    A = torch.as_tensor(A, dtype=torch.float64)
    if A.ndim != 2:
        raise ValueError(f"A must have shape (m, D), got {tuple(A.shape)}")
    gram = A @ A.T  # (m, m)
    try:
        chol = torch.linalg.cholesky(gram)
    except RuntimeError:
        raise ValueError("A must have full row rank (A A^T is singular)") from None
    b = torch.as_tensor(b, dtype=torch.float64)

    def project(x, sigma, *, generator=None):
        xf = x.to(torch.float64).flatten(1)  # (N, D)
        if xf.shape[1] != A.shape[1]:
            raise ValueError(f"A has {A.shape[1]} columns but samples have {xf.shape[1]} values")
        target = b.to(xf.device).expand(xf.shape[0], A.shape[0])  # (N, m)
        if noisy and float(sigma) > 0:
            n = randn(xf.shape, generator=generator, dtype=x.dtype).to(xf.device, torch.float64)  # (N, D)
            target = target + float(sigma) * n @ A.T
        r = xf @ A.T - target  # (N, m)
        lam = torch.cholesky_solve(r.T, chol).T  # (N, m) = r (A A^T)^-1
        return (xf - lam @ A).view_as(x).to(x.dtype)

    return project


def inpaint_projection(image: torch.Tensor, mask: torch.Tensor) -> Projection:
    """Replacement (Lugmayr et al. 2022, eq. 8): known pixels (mask = 1) <- image + sigma n; others kept.

    This is :func:`linear_equality_projection` with A selecting the known pixels (same noise draws), computed
    with a mask; at sigma = 0 the known pixels equal `image` exactly.
    """
    keep = mask.to(torch.bool)

    def project(x, sigma, *, generator=None):
        if float(sigma) > 0:
            known = image + float(sigma) * randn_like(x, generator=generator)  # (N, C, H, W)
        else:
            known = image.expand_as(x)
        return torch.where(keep, known.to(x.dtype), x)

    return project


class PlaneMean(DenoiserTransform):
    """D'(z, sigma) = P D(z, sigma): the channels from `channels` on are replaced by their plane means.

    P is the orthogonal projection onto constant planes. For data that lie there (a packed (image, label) pair,
    data.joint.pack_pair) the exact denoiser E[z0 | z] lies there too, so P leaves it unchanged and can only lower
    the error of a learned one; the trainer trains P D (docs/conditioning.md).

    `readout` s (None: off) shows the inner denoiser the planes as s times their plane means and reads its planes
    back divided by s: D'(z) = S^-1 P D(S P z) on the planes, S = s on them and 1 on the image channels. With
    s = sqrt(H W) a packed label value y_k / sqrt(H W) per pixel reaches the network as y_k + sigma n_k in every
    pixel (the noise off the constant planes, which carries nothing about the data, is dropped), and the network's
    plane means are the label block's output at the image's scale. `label_weight` w is the weight of the planes'
    squared error in the loss (:meth:`loss_weights`), 1 on the image channels."""

    def __init__(self, inner, channels: int, *, readout: float | None = None, label_weight: float = 1.0):
        super().__init__(inner)
        if readout is not None and not readout > 0:
            raise ValueError(f"readout must be a positive scale or None, got {readout}")
        if not label_weight > 0:
            raise ValueError(f"label_weight must be positive, got {label_weight}")
        self.channels = int(channels)  # the image channels; those after them are constant planes
        self.readout = readout
        self.label_weight = float(label_weight)

    @property
    def net(self):
        """The wrapped denoiser's network (what checkpoints hold)."""
        return self.inner.net

    def planes(self, z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """z with its planes replaced by scale times their plane means."""
        means = z[:, self.channels:].mean((-2, -1), keepdim=True) * scale
        return torch.cat([z[:, :self.channels], means.expand_as(z[:, self.channels:])], 1)

    def forward(self, x, sigma, **cond):
        if self.readout is None:
            return self.planes(self.inner(x, sigma, **cond))  # (N, C + K, H, W)
        return self.planes(self.inner(self.planes(x, self.readout), sigma, **cond), 1.0 / self.readout)

    def loss_weights(self, x0: torch.Tensor) -> torch.Tensor | None:
        """Per-channel weights (1, C + K, 1, 1) of the squared error (DiffusionObjective); None when all are 1. Any
        positive weights keep the loss's minimiser, E[z0 | z], and set how much each block's error counts."""
        if self.label_weight == 1.0:
            return None
        w = torch.ones(x0.shape[1], device=x0.device, dtype=x0.dtype)
        w[self.channels:] = self.label_weight
        return append_dims(w[None], x0.ndim)


# ------------------------------------------------------------------------------------ constrained sampling
def check_step_sampler(sampler: str) -> str:
    return check_choice("sampler (single-step samplers only)", sampler, STEP_SAMPLERS)


def resample_path(steps: int, jump_length: int = 1, resample: int = 1) -> list[int]:
    """Indices into a sigma grid of `steps` intervals visited by RePaint (Lugmayr et al. 2022, Alg. 1 with
    jumps, their sec. 4.2): walk down one level at a time; after every `jump_length` levels go back up
    `jump_length` levels, so each block is traversed `resample` times. resample = 1 is the plain descent."""
    if jump_length < 1 or resample < 1:
        raise ValueError(f"jump_length and resample must be at least 1, got {jump_length}, {resample}")
    path, i, jumps = [0], 0, {}
    while i < steps:
        i += 1
        path.append(i)
        if i % jump_length == 0 and i < steps and jumps.get(i, 0) < resample - 1:
            jumps[i] = jumps.get(i, 0) + 1
            i -= jump_length
            path.append(i)
    return path


@torch.no_grad()
def sample_constrained(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, project: Projection,
                       sampler: str = "ddim", resample: int = 1, jump_length: int = 1, generator=None,
                       callback=None, **opts) -> torch.Tensor:
    """Run `sampler` one interval sigmas[i:i+2] at a time and apply x <- project(x, sigmas[i+1]) after every
    step (and to the start). With resample > 1, RePaint's resampling (:func:`resample_path`): going back up
    from level lo to hi adds forward noise, x + sqrt(hi^2 - lo^2) n. Only single-step samplers (STEP_SAMPLERS)
    are allowed: a multistep one would restart at its first-order step in every interval. Heun's churn is
    computed per interval (n = 1 in Karras et al.'s gamma)."""
    fn = get_sampler(check_step_sampler(sampler))
    x = project(x, float(sigmas[0]), generator=generator)
    path = resample_path(len(sigmas) - 1, jump_length, resample)
    for k, (a, b) in enumerate(zip(path[:-1], path[1:])):
        if b > a:  # one step down
            step_cb = None if callback is None else (lambda info, k=k: callback({**info, "i": k}))
            x = fn(denoiser, x, sigmas[a:b + 1], generator=generator, callback=step_cb, **opts)
            x = project(x, float(sigmas[b]), generator=generator)
        else:  # back up by the forward process q(x_hi | x_lo)
            x = x + float(sigmas[b] ** 2 - sigmas[a] ** 2) ** 0.5 * randn_like(x, generator=generator)
    return x


def _check_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    try:
        ok = torch.broadcast_shapes(mask.shape, image.shape) == image.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the images {tuple(image.shape)}; "
                         f"give one that broadcasts, e.g. {tuple(image.shape[-2:])}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 (to fill) and 1 (known)")
    return mask.to(image.device)


def inpaint(denoiser, image: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor, *, sampler: str = "ddpm",
            resample: int = 1, jump_length: int = 10, generator=None, callback=None, **opts) -> torch.Tensor:
    """Fill the pixels where mask = 0 given `image` (N, ...) where mask = 1, with any unconditional (or
    Conditioned) denoiser; the known pixels of the result equal `image` exactly. resample = 1 is the
    replacement method, resample > 1 RePaint's resampling with `jump_length`."""
    mask = _check_mask(image, mask)
    x = randn_like(image, generator=generator) * sigmas[0]
    return sample_constrained(denoiser, x, sigmas, project=inpaint_projection(image, mask), sampler=sampler,
                              resample=resample, jump_length=jump_length, generator=generator, callback=callback,
                              **opts)


def edit_plan(denoiser, shape: tuple, spec: SampleConfig, n: int, *, step_sampler: bool = False,
              latent: bool = False):
    """What an edit of n images needs from a sampling configuration: (denoiser with the images' classes
    (spec.class_label) bound and x0 clipped as spec says, sigmas, the sampler's options, the configuration used).
    Guidance is off: an edited image is conditioned on its own class. With `step_sampler`, a multistep spec.sampler
    is replaced by DEFAULT_STEP_SAMPLER (the returned configuration says so). `latent`: the model works on latents
    (no clipping of its x0)."""
    if step_sampler and spec.sampler not in STEP_SAMPLERS:
        spec = dataclasses.replace(spec, sampler=DEFAULT_STEP_SAMPLER, sampler_options={}, final="")
    spec = dataclasses.replace(spec, guidance="none", guidance_scale=1.0)
    plan = plan_sampling(denoiser, shape, spec, n=n, latent=latent)
    return plan.bind(), plan.sigmas, plan.options, spec


# ------------------------------------------------------------------------------------------------- SDEdit
def sdedit_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The grid truncated to its last round(strength * steps) intervals: strength 1 is the whole grid,
    strength -> 0 no step at all (only the final 0)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    return sigmas[steps - int(round(strength * steps)):]


@torch.no_grad()
def sdedit(denoiser, image: torch.Tensor, sigmas: torch.Tensor, strength: float, *, sampler: str = "ddim",
           generator=None, callback=None, **opts) -> torch.Tensor:
    """SDEdit (Meng et al. 2022, Alg. 1): x = image + sigma(t0) n at the level where a `strength` fraction of
    the grid remains, then the sampler from there to 0. strength small: close to the input; 1: a new sample."""
    sub = sdedit_sigmas(sigmas, strength)
    if len(sub) < 2:
        return image.clone()
    x = image + sub[0] * randn_like(image, generator=generator)
    return get_sampler(sampler)(denoiser, x, sub, generator=generator, callback=callback, **opts)


# -------------------------------------------------------------------------------------------- DDIM inversion
@torch.no_grad()
def ddim_invert(denoiser, image: torch.Tensor, sigmas: torch.Tensor, *, iters: int = 0,
                callback=None) -> torch.Tensor:
    """The noise at sigmas[0] from which deterministic DDIM on `sigmas` (decreasing, ending in 0) returns
    `image`: the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma integrated upwards.

    DDIM with eta = 0 in VE coordinates is the Euler step x_lo = x_hi + (lo - hi) d(x_hi, hi). The inversion
    takes the explicit Euler step upwards, x_hi = x_lo + (hi - lo) d(x_lo, lo) (Song et al. 2021, sec. 4.3;
    from lo = 0, where d is undefined, d(x_lo, hi)); its error is O(step size). Inverting the sampler's step
    exactly means solving x_hi = x_lo + (hi - lo) d(x_hi, hi): `iters` fixed-point iterations of that equation
    refine each step (Pan et al. 2023, "Effective real image editing with accelerated iterative diffusion
    inversion"); they converge where (hi - lo) |dd/dx| < 1, i.e. for small enough steps.
    """
    if iters < 0:
        raise ValueError(f"iters must be non-negative, got {iters}")
    x = image
    rev = levels(sigmas)[::-1]  # increasing: 0, sigma_min, ..., sigma_max
    for i, (lo, hi) in enumerate(zip(rev[:-1], rev[1:])):
        x_lo, level = x, (lo if lo > 0 else hi)
        denoised = denoiser(x_lo, expand_sigma(level, x_lo))
        x = x_lo + (hi - lo) * to_d(x_lo, level, denoised)
        for _ in range(iters):
            denoised = denoiser(x, expand_sigma(hi, x))
            x = x_lo + (hi - lo) * to_d(x, hi, denoised)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": hi, "sigma_prev": lo, "denoised": denoised})
    return x


@torch.no_grad()
def interpolate(denoiser, a: torch.Tensor, b: torch.Tensor, sigmas: torch.Tensor, *, frames: int = 8,
                iters: int = 0) -> torch.Tensor:
    """Invert images a and b (C, H, W), slerp their noises at t = 0 .. 1 (`frames` values) and decode each with
    DDIM. Returns (frames, C, H, W); the ends reconstruct a and b up to the inversion error."""
    if frames < 2:
        raise ValueError(f"frames must be at least 2, got {frames}")
    z = ddim_invert(denoiser, torch.stack([a, b]), sigmas, iters=iters)  # (2, C, H, W)
    ts = torch.linspace(0, 1, frames).tolist()
    zs = torch.cat([slerp(z[:1], z[1:], t) for t in ts])  # (frames, C, H, W)
    return get_sampler("ddim")(denoiser, zs, sigmas)


# ---------------------------------------------------------------------------------------------------- cascade
def sample_cascade(base, sr, base_shape: tuple, sr_shape: tuple, spec: SampleConfig, *, n: int | None = None,
                   low_res: int | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage cascade (Ho et al. 2021): `base` draws n (default spec.n) low-resolution samples of `base_shape`;
    `sr`, a denoiser whose net takes `low_res` / `low_res_sigma` (UNet cond_channels > 0), draws the
    high-resolution ones of `sr_shape` conditioned on them, noised at level spec.sr_aug_sigma (conditioning
    augmentation). Both stages sample as `spec` says; sample i of each uses its own generators, so results do
    not depend on batching. Returns (low, high)."""
    n = spec.n if n is None else n
    if spec.sr_aug_sigma < 0:
        raise ValueError(f"sr_aug_sigma must be non-negative, got {spec.sr_aug_sigma}")
    size = low_res or base_shape[-1]
    if base_shape[-1] != size or base_shape[-2] != size or base_shape[0] != sr_shape[0]:
        raise ValueError(f"the super-resolution model takes {sr_shape[0]}x{size}x{size} conditioning images but "
                         f"the base model draws {'x'.join(map(str, base_shape))}")
    low = generate(base, base_shape, spec, n=n, progress=progress)  # (n, C, h, w)
    aug = torch.full((n,), float(spec.sr_aug_sigma))
    cond = low_res_condition(low, size, aug, generator=sample_generators(hash_seed(spec.seed, CASCADE_STREAM), n))
    sr_spec = dataclasses.replace(spec, seed=hash_seed(spec.seed, CASCADE_STREAM + 1))
    high = generate(sr, sr_shape, sr_spec, n=n, cond=cond, progress=progress)
    return low, high


# ------------------------------------------------------------------------- series: forecasting, gap filling
def series_mask(length: int, *, horizon: int = 0, gaps=()) -> torch.Tensor:
    """The known-steps mask (1, L) of a window (N, C, L) for :func:`inpaint` (1 = observed): forecasting hides the
    last `horizon` steps, gap filling the half-open ranges `gaps` [(start, stop), ...]."""
    if not 0 <= horizon < length:
        raise ValueError(f"horizon={horizon} must be in [0, {length}) for a window of {length} steps (it needs "
                         "observed steps before the horizon): lower the horizon or use a longer window")
    mask = torch.ones(1, length)
    mask[:, length - horizon:] = 0
    for start, stop in gaps:
        if not 0 <= start < stop <= length:
            raise ValueError(f"gap ({start}, {stop}) is not a range inside [0, {length})")
        mask[:, start:stop] = 0
    if mask.all():
        raise ValueError("nothing to fill: give a horizon > 0 or a gap")
    return mask


def impute(denoiser, window: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor, *, samples: int,
           seed: int = 0, sampler: str = DEFAULT_STEP_SAMPLER, batch_size: int = 256, **opts) -> torch.Tensor:
    """`samples` draws of the unknown steps (mask = 0) of each window (N, C, L) given its known steps, by
    :func:`inpaint` (the known steps of every draw equal `window` exactly): (samples, N, C, L). Draw s of window
    n uses its own generator seeded (seed, s N + n), so it does not depend on `samples` or `batch_size`. Any batch
    (N, ...) works alike, e.g. vectors (x, y) of a joint model (docs/conditioning.md)."""
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be at least 1, got {samples}, {batch_size}")
    n = window.shape[0]
    x = window.unsqueeze(0).expand(samples, *window.shape).reshape(samples * n, *window.shape[1:])  # (S N, C, L)
    out = []
    for lo in range(0, samples * n, batch_size):
        part = x[lo:lo + batch_size]
        gens = sample_generators(seed, len(part), offset=lo, device=str(part.device))
        out.append(inpaint(denoiser, part, mask, sigmas, sampler=sampler, generator=gens, **opts))
    return torch.cat(out).view(samples, *window.shape)
