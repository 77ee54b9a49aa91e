"""Assembling the pieces from a configuration: network, denoiser, objective; loading a trained denoiser."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import RunConfig, from_dict
from .nets import MLPDenoiserNet, UNet
from .objectives import DiffusionObjective
from .precond import Precond
from .schedules import Schedule, get_schedule
from .utils import check_choice

NET_KINDS = ("unet", "mlp")


def build_schedule(cfg: RunConfig) -> Schedule:
    d = cfg.diffusion
    return get_schedule(d.schedule, d.T) if d.schedule in ("linear", "cosine", "sigmoid") else get_schedule(d.schedule)


def build_net(cfg: RunConfig) -> torch.nn.Module:
    check_choice("model.kind", cfg.model.kind, NET_KINDS)
    if cfg.model.kind == "unet":
        return UNet.from_config(cfg.model.unet)
    return MLPDenoiserNet.from_config(cfg.model.mlp)


def net_input_shape(cfg: RunConfig) -> tuple:
    """The shape of one example the configured network accepts."""
    if cfg.model.kind == "mlp":
        return (cfg.model.mlp.dim,)
    u = cfg.model.unet
    size = (u.image_size, u.image_size) if isinstance(u.image_size, int) else tuple(u.image_size)
    return (u.in_channels, *size)


def num_classes(cfg: RunConfig) -> int | None:
    return cfg.model.unet.num_classes if cfg.model.kind == "unet" else cfg.model.mlp.num_classes


def build_denoiser(cfg: RunConfig, net: torch.nn.Module | None = None) -> Precond:
    return Precond(net if net is not None else build_net(cfg), build_schedule(cfg), cfg.diffusion.prediction)


def build_objective(cfg: RunConfig, schedule: Schedule | None = None) -> DiffusionObjective:
    return DiffusionObjective(schedule or build_schedule(cfg), cfg.diffusion.objective)


def load_denoiser(path: str | Path, *, use_ema: bool = True, device="cpu") -> tuple[Precond, RunConfig, dict]:
    """Rebuild the denoiser of a checkpoint (EMA weights by default): (denoiser in eval mode, config, meta)."""
    meta, groups = load_checkpoint(path, device=device)
    if "config" not in meta:
        raise CheckpointError(f"{path} holds no run configuration")
    cfg = from_dict(RunConfig, meta["config"])
    group = "ema" if use_ema and groups.get("ema") else "model"
    if not groups.get(group):
        raise CheckpointError(f"{path} holds no {group!r} weights")
    denoiser = build_denoiser(cfg).to(device)
    missing, unexpected = denoiser.net.load_state_dict(groups[group], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the configured network "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return denoiser.eval(), cfg, meta


def sample_kwargs(s, shape: tuple) -> dict:
    """generate() arguments from a SampleConfig; clip_x0 applies to images only."""
    return dict(sampler=s.sampler, steps=s.steps, spacing=s.spacing, seed=s.seed, batch_size=s.batch_size,
                clip_x0=s.clip_x0 and len(shape) == 3)


def generate(denoiser, shape: tuple, *, n: int, sampler: str = "ddim", steps: int = 50, spacing: str = "uniform",
             seed: int = 0, batch_size: int = 256, device="cpu", progress: bool = False, clip_x0: bool = False,
             **opts) -> torch.Tensor:
    """Draw `n` samples of `shape` (per example); sample i uses generator (seed, i), so results do not depend on
    `batch_size`. `clip_x0` clips predicted x0 to [-1, 1] (images). Returns float32 (n, *shape) on the CPU."""
    from .precond import ClampX0
    from .sampling import get_sampler, get_sigmas
    from .utils import randn, sample_generators

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if clip_x0:
        denoiser = ClampX0(denoiser)

    fn = get_sampler(sampler)
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
        out.append(fn(denoiser, x, sigmas, generator=gens, **opts).float().cpu())
    return torch.cat(out)
