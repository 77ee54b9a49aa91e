"""The one front door to sampling: the sampler registry, the sampling configuration, and :func:`generate` (a
loaded denoiser and a :class:`SampleConfig` in, samples out).

:func:`plan_sampling` turns the configuration into what a sampler call needs (the guided, clipped denoiser, the
noise levels, the sampler function with its checked options, the requested classes); :func:`generate` runs that
plan over batches with per-sample generators, and the editing commands run their own loops on the same plan.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..guidance import guide, net_num_classes, requested_labels
from ..precond import ClampX0, Conditioned, Denoiser
from ..utils import check_choice, randn, sample_generators
from .consistency import sample_consistency, sample_meanflow
from .core import sample_ddim, sample_ddpm, sample_euler
from .dpm_solver import (sample_dpm_solver_1, sample_dpm_solver_2, sample_dpm_solver_3, sample_dpm_solver_adaptive,
                         sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s, sample_dpmpp_3m)
from .ode import sample_euler_ancestral, sample_heun, sample_ode_reference
from .sde import sample_euler_maruyama, sample_pc
from .sigmas import get_sigmas
from .unipc import sample_unipc

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpm_solver_1": sample_dpm_solver_1,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpm_solver_3": sample_dpm_solver_3,
    "dpm_solver_adaptive": sample_dpm_solver_adaptive,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "ode_reference": sample_ode_reference,
    "consistency": sample_consistency,
    "meanflow": sample_meanflow,    # a denoiser told the level it jumps to (fewstep.MeanFlowDenoiser)
}
SAMPLER_ARGS = ("denoiser", "x", "sigmas", "generator", "callback")  # the contract every sampler shares


def get_sampler(name: str):
    """The sampler function registered under `name`."""
    return SAMPLERS[check_choice("sampler", name, sorted(SAMPLERS))]


def sampler_option_names(name: str) -> list[str]:
    """The keyword options of a sampler beyond the shared contract (eta, s_churn, order, final, ...)."""
    params = inspect.signature(get_sampler(name)).parameters
    return [p for p, v in params.items() if p not in SAMPLER_ARGS and v.kind is inspect.Parameter.KEYWORD_ONLY]


def check_sampler_options(name: str, options: dict) -> dict:
    """Refuse options the sampler does not take, naming the ones it does; returns `options`."""
    allowed = sampler_option_names(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r} takes no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(allowed) or '(none)'}")
    return dict(options)


@dataclass
class SampleConfig:
    sampler: str = "ddim"           # a name in torchdiffusion.sampling.SAMPLERS
    steps: int = 50                 # sampler steps
    spacing: str = "uniform"        # sigma spacing, see torchdiffusion.sampling.SPACINGS
    sigmas: tuple = ()              # an explicit grid of noise levels (decreasing); overrides steps and spacing
    final: str = ""                 # last step to sigma 0 (denoise, heun0, ...) for samplers that take one; '' default
    sampler_options: dict = field(default_factory=dict)  # other keyword options of the sampler (eta, s_churn, ...)
    n: int = 64                     # samples to draw
    batch_size: int = 256           # samples per denoiser batch
    seed: int = 0                   # sample i uses a generator seeded from (seed, i)
    use_ema: bool = True            # sample with the EMA weights
    clip_x0: bool = True            # clip predicted x0 (and samples) to [-1, 1]; images (C, H, W) only
    class_label: int | None = None  # class of every sample; -1: sample i gets class i mod K; None: unconditional
    guidance: str = "none"          # none, cfg (classifier-free) or classifier (needs `classifier`)
    guidance_scale: float = 1.0     # guidance scale s (cfg: 1 is the conditional model, 0 the unconditional)
    guidance_sigma_min: float = 0.0  # guide only for sigma > this (guidance interval)
    guidance_sigma_max: float = 0.0  # guide only for sigma <= this (0: no upper limit)
    guidance_rescale: float = 0.0   # cfg rescale phi of Lin et al. 2024 (0: off)
    classifier: str = ""            # noise-conditional classifier checkpoint for guidance=classifier
    sr_checkpoint: str = ""         # super-resolution checkpoint: sample runs the cascade base -> SR
    sr_aug_sigma: float = 0.1       # noise level of the conditioning augmentation of the cascade's SR stage


def grid_steps(spec: SampleConfig) -> int:
    """The number of sampler steps `spec` asks for: the explicit grid's intervals (a final 0 is appended when it
    lacks one, as `get_sigmas` does) when `spec.sigmas` is set, else `spec.steps`."""
    if not spec.sigmas:
        return int(spec.steps)
    return len(spec.sigmas) - (1 if float(spec.sigmas[-1]) == 0 else 0)


def nonfinite_field(spec: SampleConfig) -> tuple[str, float] | None:
    """(name, value) of the first float field of `spec` that is NaN or infinite (a NaN guidance scale would draw
    NaN images without a word), or None."""
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            return f.name, v
    return None


def sampler_options(spec: SampleConfig) -> dict:
    """The keyword options of the configured sampler (`final` included when set), checked against its signature."""
    opts = {**spec.sampler_options, **({"final": spec.final} if spec.final else {})}
    return check_sampler_options(spec.sampler, opts)


def guidance_interval(spec: SampleConfig) -> tuple[float, float] | None:
    """(sigma_lo, sigma_hi) of the guidance interval, or None when guidance applies at every level."""
    if spec.guidance_sigma_min <= 0 and spec.guidance_sigma_max <= 0:
        return None
    return (spec.guidance_sigma_min, spec.guidance_sigma_max if spec.guidance_sigma_max > 0 else float("inf"))


@dataclass
class SamplingPlan:
    """What one sampler call needs: run ``sampler(plan.bind(...), x, sigmas, generator=..., **options)``."""

    denoiser: Denoiser              # guided and (for images) clipped
    sigmas: torch.Tensor            # (steps + 1,) decreasing, ending in 0
    sampler: Callable               # the sampler function
    options: dict                   # its keyword options
    labels: torch.Tensor | None     # (n,) requested classes, or None (unconditional)
    clip: bool                      # samples are clamped to [-1, 1] at the end
    extra: dict = field(default_factory=dict)  # other per-sample inputs of the network, (n, ...) each

    def bind(self, start: int = 0, stop: int | None = None, cond: dict | None = None, device=None) -> Denoiser:
        """The denoiser with samples start:stop of the labels and of every conditioning tensor in `cond` bound."""
        bound = {k: v[start:stop].to(device) for k, v in {**self.extra, **(cond or {})}.items()}  # each (b, ...)
        if self.labels is not None:
            bound["class_labels"] = self.labels[start:stop].to(device)
        return Conditioned(self.denoiser, **bound) if bound else self.denoiser


def plan_sampling(denoiser: Denoiser, shape: tuple, spec: SampleConfig, *, n: int, classifier=None,
                  labels: torch.Tensor | None = None, device="cpu", latent: bool = False) -> SamplingPlan:
    """Guidance (`classifier`: a SigmaClassifier for guidance 'classifier'; for 'embedded' the scale is bound as
    the network's guidance_scale input), the requested classes (`labels`, else
    :func:`~torchdiffusion.guidance.requested_labels` of spec.class_label), clipping for images (not for `latent`
    samples, which are decoded first), sigmas (spec.sigmas when given), and the sampler with its options."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    options = sampler_options(spec)
    guided = guide(denoiser, spec.guidance, spec.guidance_scale, classifier=classifier,
                   interval=guidance_interval(spec), rescale=spec.guidance_rescale)
    if labels is None:
        k = classifier.num_classes if spec.guidance == "classifier" else net_num_classes(denoiser)
        labels = requested_labels(n, spec.class_label, spec.guidance, k)  # (n,) or None
    elif labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    clip = spec.clip_x0 and len(shape) == 3 and not latent
    if clip:
        guided = ClampX0(guided)
    schedule = getattr(denoiser, "schedule", None)
    if schedule is None and not spec.sigmas:
        raise ValueError("this denoiser declares no schedule to space the noise levels by: give them (sigmas=...)")
    sigmas = get_sigmas(schedule, spec.steps, spec.spacing, sigmas=spec.sigmas or None).to(device)
    extra = {"guidance_scale": torch.full((n,), float(spec.guidance_scale))} if spec.guidance == "embedded" else {}
    return SamplingPlan(guided, sigmas, get_sampler(spec.sampler), options, labels, clip, extra)


def generate(denoiser: Denoiser, shape: tuple, spec: SampleConfig | None = None, *, n: int | None = None,
             classifier=None, labels: torch.Tensor | None = None, cond: dict | None = None, device="cpu",
             progress: bool = False, callback=None, decode: Callable | None = None, **changes) -> torch.Tensor:
    """Draw n (default spec.n) samples of `shape` (per example) as `spec` says; keyword `changes` replace fields of
    `spec` (e.g. ``generate(d, (1, 28, 28), sampler="ddim", steps=20, n=16)``). Sample i starts from noise of
    generator (seed, i), so results do not depend on the batch size. `cond`: other per-sample conditioning tensors
    (n, ...), e.g. a super-resolution net's low_res and low_res_sigma. `callback` is passed to the sampler for
    every batch. `decode`: for a model on latents (shape is the latent's), the decoder applied to every batch
    (then clip_x0 clamps the decoded images). Returns float32 (n, *shape) on the CPU (decoded: the images)."""
    spec = dataclasses.replace(spec or SampleConfig(), **changes)
    bad = nonfinite_field(spec)
    if bad is not None:
        raise ValueError(f"sample.{bad[0]} must be a finite number, got {bad[1]!r}")
    n = spec.n if n is None else n
    plan = plan_sampling(denoiser, shape, spec, n=n, classifier=classifier, labels=labels, device=device,
                         latent=decode is not None)
    out = []
    starts = range(0, n, spec.batch_size)
    if progress:
        starts = tqdm(starts, desc=f"sampling ({spec.sampler}, {len(plan.sigmas) - 1} steps)", unit="batch")
    for start in starts:
        b = min(spec.batch_size, n - start)
        gens = sample_generators(spec.seed, b, offset=start)
        x = randn((b, *shape), generator=gens, device=device) * plan.sigmas[0]
        x = plan.sampler(plan.bind(start, start + b, cond, device), x, plan.sigmas, generator=gens,
                         callback=callback, **plan.options)
        if decode is not None:
            x = decode(x)
            x = x.clamp(-1, 1) if spec.clip_x0 else x
        out.append((x.clamp(-1, 1) if plan.clip else x).float().cpu())
    return torch.cat(out)
