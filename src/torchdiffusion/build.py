"""Assembling a run from its configuration: schedule, network, the module the trainer trains, its objective;
and loading a trained model back from a checkpoint.

A run's ``task`` says what it trains; each task pairs a wrapper of the raw network with an objective:

    task              module (what the trainer calls)          objective                  network kinds
    denoiser          Precond: D(x, sigma, **cond) -> x0        DiffusionObjective         unet, mlp
    noisy_classifier  SigmaClassifier: (x, sigma) -> logits     ClassifierObjective        noisy_classifier
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, RunConfig, from_dict, upgrade_config, validate
from .nets import NETS
from .objectives import ClassifierObjective, DiffusionObjective
from .precond import Precond, SigmaClassifier
from .schedules import DISCRETE_SCHEDULES, Schedule, get_schedule
from .utils import check_choice


@dataclass(frozen=True)
class Task:
    """What a task builds: `wrap(net, schedule, cfg)` -> module, `objective(schedule, cfg)`, the network kinds it
    accepts, and whether its module draws samples (a denoiser) or not (a classifier)."""

    wrap: Callable
    objective: Callable
    kinds: tuple
    samples: bool


TASKS = {
    "denoiser": Task(
        wrap=lambda net, schedule, cfg: Precond(net, schedule, cfg.diffusion.prediction),
        objective=lambda schedule, cfg: DiffusionObjective(schedule, cfg.diffusion.objective,
                                                           prediction=cfg.diffusion.prediction,
                                                           num_classes=num_classes(cfg)),
        kinds=("unet", "mlp"), samples=True),
    "noisy_classifier": Task(
        wrap=lambda net, schedule, cfg: SigmaClassifier(net, schedule),
        objective=lambda schedule, cfg: ClassifierObjective(schedule),
        kinds=("noisy_classifier",), samples=False),
}


def task_of(cfg: RunConfig) -> Task:
    """The run's task, checked against its network kind."""
    try:
        task = TASKS[check_choice("task", cfg.task, TASKS)]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.kind not in task.kinds:
        raise ConfigError(f"task {cfg.task!r} trains a network of kind {' or '.join(map(repr, task.kinds))}, "
                          f"not model.kind={cfg.model.kind!r}")
    return task


def build_schedule(cfg: RunConfig) -> Schedule:
    d = cfg.diffusion
    if d.schedule in DISCRETE_SCHEDULES:
        return get_schedule(d.schedule, d.T, **d.schedule_options)
    return get_schedule(d.schedule, **d.schedule_options)


def net_config(cfg: RunConfig):
    """The config dataclass of the configured network (the section model.<kind>)."""
    return getattr(cfg.model, cfg.model.kind)


def build_net(cfg: RunConfig) -> torch.nn.Module:
    """The raw network of the run (model.kind, configured by model.<kind>)."""
    task_of(cfg)
    return NETS[cfg.model.kind][0].from_config(net_config(cfg))


def net_input_shape(cfg: RunConfig) -> tuple:
    """The shape of one example the configured network accepts."""
    c = net_config(cfg)
    if hasattr(c, "dim"):
        return (c.dim,)
    size = (c.image_size, c.image_size) if isinstance(c.image_size, int) else tuple(c.image_size)
    return (c.in_channels, *size)


def num_classes(cfg: RunConfig) -> int | None:
    return net_config(cfg).num_classes


def build_module(cfg: RunConfig, net: torch.nn.Module | None = None, schedule: Schedule | None = None):
    """The network wrapped for its task (a Precond denoiser, or a SigmaClassifier): what the trainer trains,
    samplers and guidance call, and checkpoints hold the weights of (as ``.net``)."""
    task = task_of(cfg)
    return task.wrap(net if net is not None else build_net(cfg), schedule or build_schedule(cfg), cfg)


def build_objective(cfg: RunConfig, schedule: Schedule | None = None):
    """The task's objective, ``objective(module, x0, cond, generator=None) -> loss``."""
    return task_of(cfg).objective(schedule or build_schedule(cfg), cfg)


def config_from_meta(meta: dict, path) -> RunConfig:
    """The run configuration stored in a checkpoint's metadata (older layouts upgraded, see upgrade_config)."""
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} holds no run configuration")
    try:
        return validate(from_dict(RunConfig, upgrade_config(meta["config"])))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its run configuration is invalid here ({e})") from None


def load_model(path: str | Path, *, task: str | None = None, use_ema: bool = True, device="cpu"):
    """Rebuild the module of a checkpoint (EMA weights by default) in eval mode: (module, config, meta). `task`,
    when given, is the task the caller expects; a checkpoint of another task is refused with a message."""
    meta, groups = load_checkpoint(path, device=device)
    cfg = config_from_meta(meta, path)
    if task is not None and cfg.task != task:
        hint = {"denoiser": "load_denoiser", "noisy_classifier": "load_noisy_classifier"}.get(cfg.task, "load_model")
        raise CheckpointError(f"{path} holds a {cfg.task!r} model, not a {task!r} one; load it with {hint}")
    group = "ema" if use_ema and groups.get("ema") else "model"
    if not groups.get(group):
        raise CheckpointError(f"{path} holds no {group!r} weights")
    module = build_module(cfg).to(device)
    missing, unexpected = module.net.load_state_dict(groups[group], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the configured network "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module.eval(), cfg, meta


def load_denoiser(path: str | Path, *, use_ema: bool = True, device="cpu") -> tuple[Precond, RunConfig, dict]:
    """Rebuild the denoiser of a checkpoint (EMA weights by default): (denoiser in eval mode, config, meta)."""
    return load_model(path, task="denoiser", use_ema=use_ema, device=device)


def load_noisy_classifier(path: str | Path, *, use_ema: bool = True, device="cpu"):
    """Rebuild a noise-conditional classifier (task noisy_classifier) as a SigmaClassifier (x, sigma) -> logits in
    eval mode: (classifier, config, meta)."""
    return load_model(path, task="noisy_classifier", use_ema=use_ema, device=device)
