"""Assembling a run from its configuration: schedule, network, the module the trainer trains, its objective;
and loading a trained model back from a checkpoint.

A run's ``task`` says what it trains; each task pairs a wrapper of the raw network with an objective:

    task              module (what the trainer calls)          objective                  network kinds
    denoiser          Precond: D(x, sigma, **cond) -> x0        DiffusionObjective         unet, dit, uvit, mlp
    noisy_classifier  SigmaClassifier: (x, sigma) -> logits     ClassifierObjective        noisy_classifier
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, check_tensors, load_checkpoint
from .config import ConfigError, RunConfig, from_dict, upgrade_config, validate
from .interop.diffusers import is_diffusers_folder, load_diffusers
from .data import make_dataset
from .latent.codec import SCALE_EXAMPLES, LatentCodec, LatentDataset, cache_key, file_sha256, latent_scale
from .latent.objective import AutoencoderModule, AutoencoderObjective
from .latent.perceptual import perceptual_distance
from .nets import NETS
from .objectives import ClassifierObjective, DiffusionObjective
from .precond import Precond, SigmaClassifier
from .schedules import DISCRETE_SCHEDULES, Schedule, get_schedule
from .utils import check_choice


@dataclass(frozen=True)
class Task:
    """What a task builds: `wrap(net, schedule, cfg)` -> module, `objective(schedule, cfg)`, the network kinds it
    accepts, whether its module draws samples (a denoiser) or not (a classifier), and optionally
    `save_meta(trainer) -> dict`, what its checkpoints record beside the weights."""

    wrap: Callable
    objective: Callable
    kinds: tuple
    samples: bool
    save_meta: Callable | None = None


TASKS = {
    "denoiser": Task(
        wrap=lambda net, schedule, cfg: Precond(net, schedule, cfg.diffusion.prediction),
        objective=lambda schedule, cfg: DiffusionObjective(schedule, cfg.diffusion.objective,
                                                           prediction=cfg.diffusion.prediction,
                                                           num_classes=num_classes(cfg),
                                                           patch_size=getattr(net_config(cfg), "patch_size", None)),
        kinds=("unet", "dit", "uvit", "mlp"), samples=True),
    "noisy_classifier": Task(
        wrap=lambda net, schedule, cfg: SigmaClassifier(net, schedule),
        objective=lambda schedule, cfg: ClassifierObjective(schedule),
        kinds=("noisy_classifier",), samples=False),
    "autoencoder": Task(
        wrap=lambda net, schedule, cfg: AutoencoderModule(net),
        objective=lambda schedule, cfg: AutoencoderObjective(cfg.autoencoder_loss, perceptual_for(cfg)),
        kinds=("autoencoder",), samples=False,
        save_meta=lambda trainer: {"latent_scale": autoencoder_latent_scale(trainer)}),
}


def autoencoder_latent_scale(trainer) -> float:
    """1 / std of the EMA autoencoder's posterior samples of the first training images: what scales its latents to
    unit variance for a latent diffusion model (stored in every autoencoder checkpoint)."""
    n = min(SCALE_EXAMPLES, len(trainer.data))
    x, _ = trainer.data.batch(torch.arange(n), device=trainer.device)[:2]
    with torch.no_grad():
        return latent_scale(trainer.ema_module.net.autoencoder, x)


def perceptual_for(cfg: RunConfig):
    """The autoencoder objective's perceptual distance (None when its weight is 0)."""
    loss = cfg.autoencoder_loss
    return perceptual_distance(loss.perceptual, cfg.data.dataset) if loss.perceptual_weight > 0 else None


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
    """The classes of a class-conditional network (None: unconditional, and for networks without classes)."""
    return getattr(net_config(cfg), "num_classes", None)


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
    when given, is the task the caller expects; a checkpoint of another task is refused with a message. A diffusers
    model folder (see :mod:`torchdiffusion.interop.diffusers`) loads as a denoiser too."""
    if is_diffusers_folder(path):
        if task not in (None, "denoiser"):
            raise CheckpointError(f"{path} is a diffusers denoiser, not a {task!r} model")
        return load_diffusers_run(path, device=device)
    meta, groups = load_checkpoint(path, device=device)
    cfg = config_from_meta(meta, path)
    if task is not None and cfg.task != task:
        hint = {"denoiser": "load_denoiser", "noisy_classifier": "load_noisy_classifier"}.get(cfg.task, "load_model")
        raise CheckpointError(f"{path} holds a {cfg.task!r} model, not a {task!r} one; load it with {hint}")
    group = "ema" if use_ema and groups.get("ema") else "model"
    if not groups.get(group):
        raise CheckpointError(f"{path} holds no {group!r} weights")
    module = build_module(cfg).to(device)
    check_tensors(group, groups[group], module.net.state_dict(), path)
    module.net.load_state_dict(groups[group])
    if "data_shape" not in meta:
        meta = {**meta, "data_shape": list(net_input_shape(cfg))}
    return module.eval(), cfg, meta


def load_denoiser(path: str | Path, *, use_ema: bool = True, device="cpu") -> tuple[Precond, RunConfig, dict]:
    """Rebuild the denoiser of a checkpoint (EMA weights by default): (denoiser in eval mode, config, meta)."""
    return load_model(path, task="denoiser", use_ema=use_ema, device=device)


def load_noisy_classifier(path: str | Path, *, use_ema: bool = True, device="cpu"):
    """Rebuild a noise-conditional classifier (task noisy_classifier) as a SigmaClassifier (x, sigma) -> logits in
    eval mode: (classifier, config, meta)."""
    return load_model(path, task="noisy_classifier", use_ema=use_ema, device=device)


def load_diffusers_run(path, device="cpu"):
    """A diffusers model folder as (denoiser, config, meta) like a checkpoint: the config's sample section follows
    the scheduler (DDIM, leading spacing as diffusers' pipelines use, clip_x0 = clip_sample)."""
    denoiser, info = load_diffusers(path, device=device)
    cfg = RunConfig(name=f"diffusers-{Path(path).resolve().name}")
    cfg.sample.sampler, cfg.sample.spacing, cfg.sample.clip_x0 = "ddim", "leading", info["clip_x0"]
    cfg.diffusion.prediction = info["prediction"]
    meta = {"data_shape": info["data_shape"], "step": None, "source": "diffusers", "path": str(path)}
    return denoiser, cfg, meta


# --------------------------------------------------------------------------------------------------- data
def build_dataset(cfg: RunConfig, split: str = "train", *, progress: bool = True):
    """The run's data: cfg.data.dataset (see data.make_dataset), or its latents under cfg.data.autoencoder (encoded
    once and cached, a fresh posterior draw per example and batch)."""
    d = cfg.data
    images = make_dataset(d.dataset, split=split, image_size=d.image_size, subset=d.subset)
    if not d.autoencoder:
        return images
    codec = load_codec(d.autoencoder)
    return LatentDataset(codec, images, key=cache_key(d.dataset, split, d.image_size, d.subset), progress=progress)


def load_codec(path) -> LatentCodec:
    """The autoencoder checkpoint at `path` as a LatentCodec (EMA weights, its stored latent scale, its hash)."""
    module, _, meta = load_model(path, task="autoencoder")
    if not isinstance(meta.get("latent_scale"), (int, float)):
        raise CheckpointError(f"{path} holds no latent scale; it is written with every autoencoder checkpoint: "
                              "continue the autoencoder's training for a step to write one")
    return LatentCodec(module.net.autoencoder, float(meta["latent_scale"]), file_sha256(path))


def codec_for(cfg: RunConfig, meta: dict, path="the checkpoint") -> LatentCodec | None:
    """For a model trained on latents: the codec of its autoencoder, refused when the autoencoder file is not the one
    the model was trained on (its hash is recorded in the model's checkpoint). None for a pixel model."""
    if not cfg.data.autoencoder:
        return None
    codec = load_codec(cfg.data.autoencoder)
    want = (meta.get("data") or {}).get("autoencoder_sha256")
    if want and want != codec.sha256:
        raise CheckpointError(f"{path} was trained on the latents of the autoencoder with sha256 {want[:12]}..., but "
                              f"{cfg.data.autoencoder} is {codec.sha256[:12]}...: put the original autoencoder "
                              "file back at that path, or retrain the model on this autoencoder")
    return codec
