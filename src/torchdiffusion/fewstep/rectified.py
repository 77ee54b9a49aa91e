"""Rectified flow and reflow (Liu et al. 2022, "Flow straight and fast"), on the denoiser contract.

The rectified-flow path x_t = (1 - t) x0 + t n is the schedule ``rf`` (sigma = t / (1 - t), VE coordinates
x = x0 + sigma n), trained with velocity prediction (u = n - x0). **Reflow** replaces the independent pairing of
data and noise by the pairing the trained flow itself makes: draw n, solve the probability-flow ODE from it with the
teacher, and retrain on the pairs (x0 = ODE(n), n) (Liu et al. 2022, Algorithm 1 with the k-th rectified flow as
teacher). Each reflow makes the trajectories straighter, which the **straightness**
S = int_0^1 E ||(Z_0 - Z_1) - dZ_t/dt||^2 dt (Liu et al. 2022, eq. 8, in the direction of sampling) measures, and a
straight flow is solved in one step; **one-step distillation** then trains D(sigma_max n, sigma_max) to the paired
sample directly.
"""
from __future__ import annotations

import math

import torch

from ..objectives import DiffusionObjective
from ..sampling.core import expand_sigma
from ..utils import randn, sample_generators

COUPLED_NOISE = "coupled_noise"  # the conditioning key under which a coupling data set hands over each noise


@torch.no_grad()
def make_coupling(teacher, shape: tuple, n: int, sigmas: torch.Tensor, *, sampler, seed: int = 0,
                  batch_size: int = 256, cond: dict | None = None, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (n, *shape), samples (n, *shape)): sample i solves the teacher's ODE from x = sigmas[0] noise_i with the
    deterministic `sampler` (a function of this library's contract). Per-sample seeds: independent of batching."""
    noises, samples = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = randn((b, *shape), generator=sample_generators(seed, b, offset=start))
        bound = {k: v[start:start + b] for k, v in (cond or {}).items()}
        den = (lambda x, s, _c=bound: teacher(x, s, **_c)) if bound else teacher
        samples.append(sampler(den, z * sigmas[0], sigmas, **options).float())
        noises.append(z)
    return torch.cat(noises), torch.cat(samples)


class CouplingDataset:
    """Pairs (sample, noise) as a data set: ``batch`` returns (samples, labels, {coupled_noise: noise})."""

    def __init__(self, samples: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None,
                 num_classes: int = 0, name: str = "coupling"):
        if samples.shape != noise.shape:
            raise ValueError(f"samples {tuple(samples.shape)} and noise {tuple(noise.shape)} must pair up one to one")
        self.samples, self.noise, self.labels = samples.float(), noise.float(), labels
        self.num_classes, self.name = num_classes, name

    def __len__(self) -> int:
        return self.samples.shape[0]

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.samples.shape[1:])

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        if flip:
            raise ValueError("data.flip would break the pairing of samples and noise; turn it off for reflow")
        idx = torch.as_tensor(indices, dtype=torch.int64)
        y = None if self.labels is None else self.labels[idx].to(device)
        return self.samples[idx].to(device), y, {COUPLED_NOISE: self.noise[idx].to(device)}


class ReflowObjective(DiffusionObjective):
    """The rectified-flow loss on coupled pairs: the noise of each example is its partner's
    (cond[COUPLED_NOISE]), not a fresh draw, even where a `noise` is passed (the trainer's fixed validation noise,
    which only a batch without partners uses); the noise level is drawn as usual."""

    def per_sample(self, denoiser, x0, cond=None, *, generator=None, sigma=None, noise=None, **kwargs):
        cond = dict(cond or {})
        coupled = cond.pop(COUPLED_NOISE, None)
        if coupled is None and noise is None:
            raise ValueError("reflow trains on coupled pairs: the data set must supply each example's noise "
                             "(torchdiffusion.fewstep.rectified.CouplingDataset)")
        return super().per_sample(denoiser, x0, cond, generator=generator, sigma=sigma,
                                  noise=noise if coupled is None else coupled, **kwargs)


class OneStepDistillation:
    """``objective(student, x0, cond)`` on coupled pairs: ||D(sigma_max n, sigma_max) - x0||^2 (the student maps a
    noise straight to its partner sample: the one-step distillation of a k-rectified flow)."""

    def __init__(self, sigma_max: float):
        self.sigma_max = float(sigma_max)
        self.last_terms: dict = {}

    def per_sample(self, student, x0, cond=None, *, generator=None, sigma=None, noise=None):
        cond = dict(cond or {})
        n = cond.pop(COUPLED_NOISE, noise)
        if n is None:
            raise ValueError("one-step distillation trains on coupled pairs (CouplingDataset)")
        return (student(self.sigma_max * n, expand_sigma(self.sigma_max, x0), **cond) - x0).flatten(1).pow(2).mean(1)

    def __call__(self, student, x0, cond=None, *, generator=None):
        return self.per_sample(student, x0, cond, generator=generator).mean()


@torch.no_grad()
def straightness(denoiser, noise: torch.Tensor, *, steps: int = 100, t_max: float = 1 - 1e-4, t_min: float = 0.0,
                 **cond) -> float:
    """S = mean over Euler steps of ||(Z_end - Z_start) / (t_end - t_start) - dZ/dt||^2 per dimension along the
    rectified-flow ODE from `noise` (t = t_max) to t_min, in the path's own coordinates z_t = (1 - t) x0 + t n with
    velocity dz/dt = n_hat - x0_hat from the denoiser. 0 for straight paths (Liu et al. 2022, eq. 8)."""
    ts = torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64).tolist()
    z = noise.double() * ts[0]  # z = (1 - t) x with x = sigma_max n in VE coordinates: the sampler's start
    start, velocities = z.clone(), []
    for t, t_next in zip(ts[:-1], ts[1:]):
        sigma = t / (1 - t)
        x = z / (1 - t)                                        # VE coordinates
        d = denoiser(x.float(), expand_sigma(sigma, x), **cond).double()
        v = (x - d) / sigma - d                                # u = n_hat - x0_hat = dz/dt
        velocities.append(v)
        z = z + (t_next - t) * v
    chord = (z - start) / (ts[-1] - ts[0])                     # the straight line's velocity
    dims = math.prod(noise.shape[1:])
    return float(sum((chord - v).pow(2).sum() for v in velocities) / (len(velocities) * noise.shape[0] * dims))
