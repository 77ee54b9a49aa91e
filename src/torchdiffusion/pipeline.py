"""Assembling the pieces from a configuration: network, denoiser, objective; loading a trained denoiser."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import RunConfig, from_dict
from .nets import MLPDenoiserNet, NoisyClassifier, UNet
from .objectives import DiffusionObjective
from .precond import Precond
from .schedules import Schedule, get_schedule
from .utils import check_choice

NET_KINDS = ("unet", "mlp", "classifier")


def build_schedule(cfg: RunConfig) -> Schedule:
    d = cfg.diffusion
    return get_schedule(d.schedule, d.T) if d.schedule in ("linear", "cosine", "sigmoid") else get_schedule(d.schedule)


def build_net(cfg: RunConfig) -> torch.nn.Module:
    check_choice("model.kind", cfg.model.kind, NET_KINDS)
    if cfg.model.kind == "unet":
        return UNet.from_config(cfg.model.unet)
    if cfg.model.kind == "classifier":
        return NoisyClassifier.from_config(cfg.model.classifier)
    return MLPDenoiserNet.from_config(cfg.model.mlp)


def net_input_shape(cfg: RunConfig) -> tuple:
    """The shape of one example the configured network accepts."""
    if cfg.model.kind == "mlp":
        return (cfg.model.mlp.dim,)
    u = cfg.model.classifier if cfg.model.kind == "classifier" else cfg.model.unet
    size = (u.image_size, u.image_size) if isinstance(u.image_size, int) else tuple(u.image_size)
    return (u.in_channels, *size)


def num_classes(cfg: RunConfig) -> int | None:
    check_choice("model.kind", cfg.model.kind, NET_KINDS)
    return getattr(cfg.model, cfg.model.kind).num_classes


def build_denoiser(cfg: RunConfig, net: torch.nn.Module | None = None) -> Precond:
    """The network wrapped for its schedule: a Precond denoiser, or for model.kind 'classifier' a SigmaClassifier
    (x, sigma) -> logits (what the trainer and guidance call)."""
    net = net if net is not None else build_net(cfg)
    if cfg.model.kind == "classifier":
        from .guidance import SigmaClassifier

        return SigmaClassifier(net, build_schedule(cfg))
    return Precond(net, build_schedule(cfg), cfg.diffusion.prediction)


def build_objective(cfg: RunConfig, schedule: Schedule | None = None) -> DiffusionObjective:
    if cfg.model.kind == "classifier":
        from .guidance import ClassifierObjective

        return ClassifierObjective(schedule or build_schedule(cfg))
    return DiffusionObjective(schedule or build_schedule(cfg), cfg.diffusion.objective, num_classes=num_classes(cfg))


def load_denoiser(path: str | Path, *, use_ema: bool = True, device="cpu") -> tuple[Precond, RunConfig, dict]:
    """Rebuild the denoiser of a checkpoint (EMA weights by default): (denoiser in eval mode, config, meta)."""
    return _load_model(path, use_ema=use_ema, device=device, classifier=False)


def load_noisy_classifier(path: str | Path, *, use_ema: bool = True, device="cpu"):
    """Rebuild a noise-conditional classifier (model.kind 'classifier') as a SigmaClassifier (x, sigma) -> logits
    in eval mode: (classifier, config, meta)."""
    return _load_model(path, use_ema=use_ema, device=device, classifier=True)


def _load_model(path, *, use_ema: bool, device, classifier: bool):
    meta, groups = load_checkpoint(path, device=device)
    if "config" not in meta:
        raise CheckpointError(f"{path} holds no run configuration")
    cfg = from_dict(RunConfig, meta["config"])
    if (cfg.model.kind == "classifier") != classifier:
        raise CheckpointError(f"{path} holds a model of kind {cfg.model.kind!r}; "
                              + ("a noise-conditional classifier has kind 'classifier'" if classifier
                                 else "load a classifier with load_noisy_classifier"))
    group = "ema" if use_ema and groups.get("ema") else "model"
    if not groups.get(group):
        raise CheckpointError(f"{path} holds no {group!r} weights")
    denoiser = build_denoiser(cfg).to(device)
    missing, unexpected = denoiser.net.load_state_dict(groups[group], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the configured network "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return denoiser.eval(), cfg, meta


SAMPLER_ARGS = ("denoiser", "x", "sigmas", "generator", "callback")  # the contract, not options


def sample_kwargs(s, shape: tuple) -> dict:
    """generate() arguments from a SampleConfig; clip_x0 applies to images only."""
    interval = None
    if s.guidance_sigma_min > 0 or s.guidance_sigma_max > 0:
        interval = (s.guidance_sigma_min, s.guidance_sigma_max if s.guidance_sigma_max > 0 else float("inf"))
    return dict(sampler=s.sampler, steps=s.steps, spacing=s.spacing, seed=s.seed, batch_size=s.batch_size,
                clip_x0=s.clip_x0 and len(shape) == 3, class_label=s.class_label,
                guidance="cfg" if s.guidance == "none" and s.guidance_scale != 1.0 else s.guidance,
                guidance_scale=s.guidance_scale, guidance_interval=interval, guidance_rescale=s.guidance_rescale,
                classifier=s.classifier or None, **({"final": s.final} if s.final else {}))


def requested_labels(n: int, class_label: int | None, guidance: str, num_classes: int | None):
    """The (n,) classes generate() asks for (None: unconditional): class_label as in class_labels_for, where
    None means -1 (class i mod K) once guidance is on."""
    from .guidance import class_labels_for

    return class_labels_for(n, -1 if class_label is None and guidance != "none" else class_label, num_classes)


def generate(denoiser, shape: tuple, *, n: int, sampler: str = "ddim", steps: int = 50, spacing: str = "uniform",
             seed: int = 0, batch_size: int = 256, device="cpu", progress: bool = False, clip_x0: bool = False,
             class_label: int | torch.Tensor | None = None, guidance: str = "none", guidance_scale: float = 1.0,
             guidance_interval: tuple[float, float] | None = None, guidance_rescale: float = 0.0,
             classifier=None, cond: dict | None = None, **opts) -> torch.Tensor:
    """Draw `n` samples of `shape` (per example); sample i uses generator (seed, i), so results do not depend on
    `batch_size`. `clip_x0` clips predicted x0 to [-1, 1] (images), and the samples too (a final step such as
    'heun0' averages x and x0, which can pass the bounds by the last noise level). Returns float32 (n, *shape)
    on the CPU.

    Class-conditional models: `class_label` is one class for all samples, -1 for class i mod K for sample i, an
    (n,) tensor of labels, or None (the null class, unless guidance is on: then -1). `guidance` ('none', 'cfg',
    'classifier') with `guidance_scale`, `guidance_interval` (sigma_lo, sigma_hi), `guidance_rescale` (cfg) and
    `classifier` (a SigmaClassifier or a checkpoint path) wraps the denoiser, see :mod:`torchdiffusion.guidance`.
    `cond`: other per-sample conditioning tensors (n, ...), e.g. a super-resolution net's low_res and
    low_res_sigma (see :func:`torchdiffusion.edit.sample_cascade`), bound to the denoiser batch by batch."""
    from .guidance import guide, net_num_classes
    from .precond import ClampX0, Conditioned
    from .sampling import get_sampler, get_sigmas
    from .utils import randn, sample_generators

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if isinstance(classifier, (str, Path)):
        classifier = load_noisy_classifier(classifier, device=device)[0]
    denoiser = guide(denoiser, guidance, guidance_scale, classifier=classifier, interval=guidance_interval,
                     rescale=guidance_rescale)
    labels = class_label if isinstance(class_label, torch.Tensor) else \
        requested_labels(n, class_label, guidance, classifier.num_classes if guidance == "classifier" else
                         net_num_classes(denoiser))  # (n,) or None
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"class_label must be an int or a tensor of shape ({n},), got {tuple(labels.shape)}")
    if clip_x0:
        denoiser = ClampX0(denoiser)

    fn = get_sampler(sampler)
    params = inspect.signature(fn).parameters
    if set(opts) - set(params):
        raise ValueError(f"sampler {sampler!r} takes no option(s) {', '.join(sorted(set(opts) - set(params)))}; "
                         f"its options: {', '.join(p for p in params if p not in SAMPLER_ARGS)}")
    sigmas = get_sigmas(denoiser.schedule, steps, spacing).to(device)
    out = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling ({sampler}, {steps} steps)", unit="batch")
    for start in starts:
        b = min(batch_size, n - start)
        gens = sample_generators(seed, b, offset=start)
        x = randn((b, *shape), generator=gens, device=device) * sigmas[0]
        bound = {k: v[start:start + b].to(device) for k, v in (cond or {}).items()}  # each (b, ...)
        if labels is not None:
            bound["class_labels"] = labels[start:start + b].to(device)
        d = Conditioned(denoiser, **bound) if bound else denoiser
        x = fn(d, x, sigmas, generator=gens, **opts)
        out.append((x.clamp(-1, 1) if clip_x0 else x).float().cpu())
    return torch.cat(out)
