"""Assembling a run from its configuration: schedule, network, the module the trainer trains, its objective;
and loading a trained model back from a checkpoint.

A run's ``task`` says what it trains; each task pairs a wrapper of the raw network with an objective:

    task              module (what the trainer calls)          objective                  network kinds
    denoiser          Precond: D(x, sigma, **cond) -> x0        DiffusionObjective         unet, dit, uvit, mlp
    noisy_classifier  SigmaClassifier: (x, sigma) -> logits     ClassifierObjective        noisy_classifier
    autoencoder       AutoencoderModule                         AutoencoderObjective       autoencoder
    distill           a student denoiser (fewstep.methods)      the method's objective     unet, dit, uvit, mlp
    text              TextModule: (x_t, t) -> logits            DiscreteObjective (mdlm,   text_transformer
                                                                d3pm), NextTokenObjective (ar)
    series            Precond on windows (N, C, L)              DiffusionObjective         unet1d, dit1d
    joint             PlaneMean(Precond) on packed (x, y) pairs DiffusionObjective         unet
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, check_tensors, load_checkpoint, read_meta, save_checkpoint
from .config import (TEXT_NET, TEXT_OBJECTIVES, ConfigError, RunConfig, from_dict, load_config, parse_overrides,
                     set_by_path, text_derived, to_dict, upgrade_config, validate)
from .discrete import DiscreteObjective, NextTokenObjective, bits_per_character
from .interop.diffusers import is_diffusers_folder, load_diffusers
from .data import make_dataset, make_series_dataset, make_text_dataset, tokenizer_from_dict
from .data.joint import JointImageLabel
from .fewstep import CouplingDataset, make_coupling
from .fewstep.methods import (METHODS, NEW_INPUTS, coupling_sigmas, default_spacing, make_objective, round_steps,
                              rounds_of, sample_defaults, served, student_denoiser, usable_spacing)
from .edit import PlaneMean
from .latent.codec import SCALE_EXAMPLES, LatentCodec, LatentDataset, cache_key, latent_scale
from .latent.objective import AutoencoderModule, AutoencoderObjective
from .latent.perceptual import perceptual_distance
from .nets import NETS, TextTransformerConfig
from .nets.unet import _pair
from .objectives import LEARNED_VARIANCE_KINDS, ClassifierObjective, DiffusionObjective
from .precond import DenoiserTransform, Precond, SigmaClassifier
from .sampling import get_sampler
from .schedules import DISCRETE_SCHEDULES, Schedule, get_schedule
from .text_encoder import captioned_dataset
from .utils import cached_file_sha256, check_choice, file_sha256, hash_seed
from .vdm import LearnedSchedule, attach_learned_gamma


@dataclass(frozen=True)
class Task:
    """What a task builds: `wrap(net, schedule, cfg)` -> module, `objective(schedule, cfg)`, the network kinds it
    accepts, whether its module draws samples (a denoiser) or not (a classifier), and optionally
    `save_meta(trainer) -> dict`, what its checkpoints record beside the weights; `init(module, cfg)`, what a new
    run does to its fresh module (a student takes its teacher's weights); `check_resume(meta, cfg, path)`, what a
    continued run checks in the checkpoint it continues (a student's teacher is the same file); `serve(module,
    cfg)`, the trained module as it is sampled (a consistency student in its consistency function);
    `configure(cfg, data) -> cfg`, what a new run's configuration takes from its training data (text: the
    tokeniser's vocabulary); `validation(cfg, data) -> fn(module) -> float`, the validation loss that picks the
    best checkpoint when the task has its own (text: bits per character of validation windows)."""

    wrap: Callable
    objective: Callable
    kinds: tuple
    samples: bool
    save_meta: Callable | None = None
    init: Callable | None = None
    check_resume: Callable | None = None
    serve: Callable | None = None
    configure: Callable | None = None
    validation: Callable | None = None


TASKS = {
    "denoiser": Task(
        wrap=lambda net, schedule, cfg: denoiser_module(net, schedule, cfg),
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
    "distill": Task(
        wrap=lambda net, schedule, cfg: student_denoiser(net, schedule, cfg.diffusion.prediction, cfg.distill),
        objective=lambda schedule, cfg: distill_objective(schedule, cfg),
        kinds=("unet", "dit", "uvit", "mlp"), samples=True,
        save_meta=lambda trainer: teacher_meta(trainer.cfg),
        init=lambda module, cfg: init_student(module, cfg),
        check_resume=lambda meta, cfg, path: check_teacher(meta, cfg, path),
        serve=lambda module, cfg: served(module, cfg.distill, module.schedule)),
    "text": Task(
        wrap=lambda net, schedule, cfg: TextModule(net),
        objective=lambda schedule, cfg: text_objective(cfg),
        kinds=("text_transformer",), samples=False,
        save_meta=lambda trainer: {"tokenizer": trainer.data.tokenizer.to_dict()},
        configure=lambda cfg, data: text_config(cfg, data.tokenizer.vocab_size),
        validation=lambda cfg, data: text_validation(cfg, data.tokenizer)),
}
TASKS["series"] = dataclasses.replace(  # a denoiser of series windows (docs/timeseries.md)
    TASKS["denoiser"], kinds=("unet1d", "dit1d"), configure=lambda cfg, data: series_config(cfg, data))
TASKS["joint"] = dataclasses.replace(  # one denoiser of packed (image, label) pairs (docs/conditioning.md)
    TASKS["denoiser"], kinds=("unet",),
    wrap=lambda net, schedule, cfg: joint_module(net, schedule, cfg))


def joint_module(net: nn.Module, schedule: Schedule, cfg: RunConfig) -> PlaneMean:
    """The joint task's denoiser: PlaneMean over the Precond, with the label planes' readout (joint.readout) and
    loss weight (joint.label_weight)."""
    h, w = _pair(net_config(cfg).image_size)
    readout = math.sqrt(h * w) if cfg.joint.readout == "scaled" else None
    return PlaneMean(denoiser_module(net, schedule, cfg), joint_image_channels(cfg), readout=readout,
                     label_weight=cfg.joint.label_weight)


def joint_image_channels(cfg: RunConfig) -> int:
    """The image channels of a joint run: the network's inputs less the joint.classes label planes."""
    return net_config(cfg).in_channels - cfg.joint.classes


def denoiser_module(net: nn.Module, schedule: Schedule, cfg: RunConfig) -> Precond:
    """The denoiser of a run: Precond, with the learned variance of kinds hybrid and vlb; kind vdm keeps its learned
    noise schedule in the network (submodule vdm_gamma, trained and saved as weights) and samples by it."""
    obj = cfg.diffusion.objective
    if obj.kind == "vdm":
        schedule = LearnedSchedule(attach_learned_gamma(net, obj.vdm), schedule)
    return Precond(net, schedule, cfg.diffusion.prediction, learned_variance=obj.kind in LEARNED_VARIANCE_KINDS)


def series_config(cfg: RunConfig, data) -> RunConfig:
    """A series run's network takes its window length (series.length) and channels from the data; a length set by
    hand to another value is refused."""
    net, kind = net_config(cfg), cfg.model.kind
    channels, length = data.sample_shape
    if net.length not in (length, type(net)().length):
        raise ConfigError(f"model.{kind}.length={net.length} contradicts series.length={length}: leave "
                          f"model.{kind}.length out (it follows from series.length)")
    model = dataclasses.replace(cfg.model, **{kind: net.replace(length=length, in_channels=channels)})
    return validate(dataclasses.replace(cfg, model=model))


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
    if loss.perceptual_weight <= 0:
        return None
    return perceptual_distance(loss.perceptual, cfg.data.dataset, image_size=cfg.data.image_size)


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
    if hasattr(c, "seq_len"):  # token ids (L,)
        return (c.seq_len,)
    if hasattr(c, "length"):  # series windows (C, L)
        return (c.in_channels, c.length)
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
    model folder (see :mod:`torchdiffusion.interop.diffusers`) loads as a denoiser too, and so does every task whose
    module draws samples (a few-step student, as its task's `serve` wraps it)."""
    if is_diffusers_folder(path):
        if task not in (None, "denoiser"):
            raise CheckpointError(f"{path} is a diffusers denoiser, not a {task!r} model")
        return load_diffusers_run(path, device=device)
    meta, groups = load_checkpoint(path, device=device)
    cfg = config_from_meta(meta, path)
    if task is not None and cfg.task != task and not (task == "denoiser" and TASKS[cfg.task].samples):
        hint = {"denoiser": "load_denoiser", "noisy_classifier": "load_noisy_classifier",
                "text": "load_text_model (torchdiffusion generate-text)"}.get(cfg.task, "load_model")
        raise CheckpointError(f"{path} holds a {cfg.task!r} model, not a {task!r} one; load it with {hint}")
    group = "ema" if use_ema and groups.get("ema") else "model"
    if not groups.get(group):
        raise CheckpointError(f"{path} holds no {group!r} weights")
    module = build_module(cfg).to(device)
    check_tensors(group, groups[group], module.net.state_dict(), path)
    module.net.load_state_dict(groups[group])
    if "data_shape" not in meta:
        meta = {**meta, "data_shape": list(net_input_shape(cfg))}
    serve = TASKS[cfg.task].serve
    return (serve(module, cfg) if serve is not None else module).eval(), cfg, meta


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
    once and cached, a fresh posterior draw per example and batch); for a reflow or one-step student, the noise-sample
    pairs of its teacher (:func:`coupling_dataset`); with captions.enabled, the images with their encoded captions
    (text_encoder.CaptionedDataset)."""
    if cfg.task == "distill" and METHODS[cfg.distill.method].coupled and split == "train":
        return coupling_dataset(cfg)
    d = cfg.data
    if cfg.task == "text":
        return text_dataset(cfg, split, verbose=progress)
    if cfg.task == "series":
        return make_series_dataset(d.dataset, split, cfg.series)
    images = make_dataset(d.dataset, split=split, image_size=d.image_size, subset=d.subset)
    if cfg.captions.enabled:  # each example's caption as the context; training drops it like a class label
        drop = cfg.diffusion.objective.cond_drop_prob if split == "train" else 0.0
        return captioned_dataset(images, d.dataset, cfg.captions, drop_prob=drop)
    if cfg.task == "joint":
        return JointImageLabel(images, cfg.joint)
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


# ------------------------------------------------------------------------------------------ few-step students
NO_TEACHER = "-"                        # `distill METHOD -`: a method without a teacher, on a preset or YAML run
COUPLING_FILE = "coupling.safetensors"  # a reflow / one-step run's noise-sample pairs, drawn once, in its folder
COUPLING_STREAM = 5                     # hash_seed(train.seed, COUPLING_STREAM) seeds the couplings' noise, labels


class FollowInput(DenoiserTransform):
    """A frozen teacher that moves to the device of its input at its first call (the trainer picks the device
    after the objective is built)."""

    def forward(self, x, sigma, **cond):
        p = next(self.inner.parameters(), None)
        if p is not None and p.device != x.device:
            self.inner.to(x.device)
        return self.inner(x, sigma, **cond)


def teacher_file(path) -> Path:
    """The teacher checkpoint file (a run's checkpoints folder: its last.safetensors)."""
    p = Path(path)
    p = p / "last.safetensors" if p.is_dir() else p
    if not p.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {p}")
    return p


def teacher_sha256(path) -> str:
    """The SHA-256 of the teacher checkpoint file, what a student's checkpoints record and a continuation checks."""
    return cached_file_sha256(teacher_file(path))


def teacher_meta(cfg: RunConfig) -> dict:
    """What a student's checkpoints record of its teacher: the path given and the file's SHA-256."""
    t = cfg.distill.teacher
    return {"teacher": t, "teacher_sha256": teacher_sha256(t)} if t else {}


def check_teacher(meta: dict, cfg: RunConfig, path) -> None:
    """A continued student must have the teacher it started with: the file's hash against the checkpoint's."""
    want, teacher = meta.get("teacher_sha256"), cfg.distill.teacher
    if not want or not teacher:
        return
    got = teacher_sha256(teacher)
    if got != want:
        raise CheckpointError(f"{path} is a student of the teacher with sha256 {want[:12]}..., but {teacher} now has "
                              f"sha256 {got[:12]}...: put the original teacher file back to continue, or start a new "
                              "student from this one (another name=..., or --no-resume)")


def load_teacher(cfg: RunConfig):
    """The run's teacher (distill.teacher) as (frozen denoiser in eval mode, its config, its checkpoint metadata)."""
    den, tcfg, meta = load_denoiser(teacher_file(cfg.distill.teacher), use_ema=cfg.distill.teacher_ema)
    return FollowInput(den.requires_grad_(False)).eval(), tcfg, meta


def distill_objective(schedule: Schedule, cfg: RunConfig):
    """The method's objective (fewstep.methods.make_objective) with the frozen teacher where it runs one."""
    d = cfg.distill
    method = METHODS[d.method]
    teacher = load_teacher(cfg)[0] if method.teacher == "denoiser" and not method.coupled else None
    feature = None
    if d.distance == "feature":
        if cfg.data.autoencoder:
            raise ConfigError("distill.distance 'feature' compares images, and this student is trained on latents: "
                              "use l2 or pseudo_huber")
        feature = perceptual_distance(d.feature, cfg.data.dataset, image_size=cfg.data.image_size)
    return make_objective(d, schedule, teacher=teacher, total_steps=cfg.train.steps, feature=feature,
                          num_classes=num_classes(cfg), prediction=cfg.diffusion.prediction,
                          objective_cfg=cfg.diffusion.objective,
                          patch_size=getattr(net_config(cfg), "patch_size", None))


def init_student(module, cfg: RunConfig) -> None:
    """A student whose method starts from the teacher gets the teacher's weights; an input the teacher's network
    lacks (LCM's guidance-scale embedding) starts with its output layer at zero, so the student starts as the
    teacher. Methods trained from scratch (consistency-training, meanflow) keep their initialisation."""
    d = cfg.distill
    if METHODS[d.method].teacher == "none":
        return
    path = teacher_file(d.teacher)
    _, groups = load_checkpoint(path)
    weights = groups.get("ema") if d.teacher_ema and groups.get("ema") else groups.get("model", {})
    own = module.net.state_dict()
    added = sorted(k for k in own if k not in weights)
    if any(k not in own for k in weights) or any(not k.startswith(NEW_INPUTS) for k in added):
        raise CheckpointError(f"{path}: a {d.method} student starts from its teacher's weights, so its network must be "
                              f"the teacher's (the teacher run's model.{cfg.model.kind}; only {', '.join(NEW_INPUTS)} "
                              "may be added)")
    check_tensors("teacher", weights, {k: own[k] for k in weights}, path)
    module.net.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for name in sorted({k.split(".")[0] for k in added}):
            out = getattr(module.net, name).mlp[-1]  # a TimeEmbedding's last Linear
            out.weight.zero_()
            out.bias.zero_()


def coupling_meta(cfg: RunConfig) -> dict:
    """What a coupling file must match to be reused: the teacher's hash and how the pairs were drawn."""
    d = cfg.distill
    return {"teacher_sha256": teacher_sha256(d.teacher), "couplings": d.couplings, "sampler": d.coupling_sampler,
            "steps": d.coupling_steps, "spacing": d.spacing, "seed": cfg.train.seed}


def coupling_dataset(cfg: RunConfig) -> CouplingDataset:
    """A reflow or one-step run's noise-sample pairs (Liu et al. 2022, Algorithm 1): read from the run folder's
    COUPLING_FILE when it holds this teacher's pairs drawn this way, else drawn once with the teacher's ODE
    (per-sample seeds; uniform labels for a class-conditional teacher) and written there."""
    d, path, want = cfg.distill, cfg.run_dir / COUPLING_FILE, coupling_meta(cfg)
    if path.is_file():
        meta, groups = load_checkpoint(path)
        if {k: meta.get(k) for k in want} == want:
            return _coupling(groups["coupling"], cfg)
        print(f"note: {path} holds couplings drawn otherwise; drawing them again", file=sys.stderr)
    teacher, _, tmeta = load_teacher(cfg)
    seed, k = hash_seed(cfg.train.seed, COUPLING_STREAM), num_classes(cfg)
    labels = None if k is None else torch.randint(0, k, (d.couplings,), generator=torch.Generator().manual_seed(seed))
    print(f"drawing {d.couplings} couplings with the teacher ({d.coupling_sampler}, {d.coupling_steps} steps)",
          file=sys.stderr)
    noise, samples = make_coupling(teacher, tuple(tmeta["data_shape"]), d.couplings,
                                   coupling_sigmas(build_schedule(cfg), d), sampler=get_sampler(d.coupling_sampler),
                                   seed=seed, batch_size=cfg.sample.batch_size,
                                   cond=None if labels is None else {"class_labels": labels})
    data = _coupling({"noise": noise, "samples": samples, **({} if labels is None else {"labels": labels})}, cfg)
    save_coupling(cfg, data)
    return data


def _coupling(t: dict, cfg: RunConfig) -> CouplingDataset:
    data = CouplingDataset(t["samples"], t["noise"], t.get("labels"), num_classes=num_classes(cfg) or 0)
    if cfg.data.autoencoder:  # pairs of latents: decoded for pictures and evaluations like a LatentDataset
        data.codec = load_codec(cfg.data.autoencoder)
        data.meta = {"autoencoder_sha256": data.codec.sha256}
    return data


def save_coupling(cfg: RunConfig, data: CouplingDataset) -> Path:
    """Write the pairs to the run folder's COUPLING_FILE (safetensors + JSON, atomically)."""
    labels = {} if data.labels is None else {"labels": data.labels}
    return save_checkpoint(cfg.run_dir / COUPLING_FILE, meta=coupling_meta(cfg),
                           coupling={"noise": data.noise, "samples": data.samples, **labels})


def distill_config(method: str, teacher=None, overrides=(), *, config=None) -> RunConfig:
    """A few-step student's configuration (``torchdiffusion distill METHOD TEACHER key=value ...``): the teacher
    run's (data, network, schedule, training, sampling), or for a method without a teacher (`teacher` None or '-')
    the preset or YAML `config`; then task 'distill' with the method and teacher, named <run>-<method>, the network
    input the method adds, the sampling its student is drawn with by default (fewstep.methods.sample_defaults),
    and last the key=value `overrides`, which win over all of it."""
    check_choice("distill method", method, METHODS)
    teacher = None if teacher in (None, "", NO_TEACHER) else str(teacher)
    if teacher is None and METHODS[method].teacher != "none":
        raise ValueError(f"method {method!r} needs a teacher checkpoint; only "
                         f"{' and '.join(m for m, v in METHODS.items() if v.teacher == 'none')} train without one "
                         f"(teacher {NO_TEACHER!r} with --config)")
    if teacher is not None and config is not None:
        raise ValueError("the student's configuration is its teacher's: give a teacher checkpoint or --config (for a "
                         f"method without a teacher, teacher {NO_TEACHER!r}), not both")
    base = config_from_meta(read_meta(teacher_file(teacher)), teacher) if teacher else load_config(config)
    if not TASKS[base.task].samples:
        raise ValueError(f"{teacher or config} holds a {base.task!r} model, not a denoiser to distil")
    d = to_dict(base)
    d.update(task="distill", name=f"{base.name}-{method}", distill={"method": method, "teacher": teacher or ""})
    _student_changes(d, method, base)
    over = parse_overrides(list(overrides))
    for key, value in over:
        set_by_path(d, key, value)
    cfg = validate(from_dict(RunConfig, d))
    schedule = build_schedule(cfg)
    if not cfg.distill.spacing:
        cfg.distill.spacing = default_spacing(method, base.sample.spacing, schedule)
    mine = {k.split(".", 1)[1] for k, _ in over if k.startswith("sample.")}
    scale = base.sample.guidance_scale if base.sample.guidance == "cfg" else \
        (cfg.distill.guidance_min + cfg.distill.guidance_max) / 2
    changes = {k: v for k, v in sample_defaults(cfg.distill, schedule, scale).items() if k not in mine}
    if "spacing" not in mine:
        changes["spacing"] = usable_spacing(cfg.sample.spacing, schedule)
    cfg.sample = dataclasses.replace(cfg.sample, **changes)
    return validate(cfg)


def _student_changes(d: dict, method: str, base: RunConfig) -> None:
    """What the method changes in the template's configuration dict `d`: lcm's guidance-scale input (after
    checking the teacher is a guided latent model), MeanFlow's interval input and rectified-flow path, and no
    flips for the stored pairs of reflow and one-step."""
    kind, net = base.model.kind, d["model"][base.model.kind]
    if method == "lcm":
        if not base.data.autoencoder or num_classes(base) is None or base.diffusion.objective.cond_drop_prob <= 0:
            raise ValueError("lcm distils a latent diffusion model under classifier-free guidance (Luo et al. 2023): "
                             "the teacher must be trained on an autoencoder's latents (data.autoencoder=...), be "
                             "class-conditional and drop labels (diffusion.objective.cond_drop_prob > 0); for another "
                             "teacher use consistency-distillation")
        net["guidance_embed"] = True
    if method == "meanflow":
        if "interval_embed" not in net:
            raise ValueError(f"meanflow needs a network with a second time input (interval_embed): model.kind unet, "
                             f"dit or mlp, not {kind!r}")
        net["interval_embed"] = True
        d["diffusion"].update(schedule="rf", schedule_options={}, prediction="velocity")
    if METHODS[method].coupled:
        d["data"]["flip"] = False


def progressive_rounds(cfg: RunConfig) -> list[RunConfig]:
    """Progressive distillation's rounds (Salimans & Ho 2022, Algorithm 2) as runs of their own in
    out_dir/name/round<k>-<steps>step, each halving the steps: round k's teacher is round k-1's student (its last
    checkpoint), the first round's the given teacher; each student samples with DDIM on its halved grid."""
    runs, teacher = [], cfg.distill.teacher
    for k in range(1, rounds_of(cfg.distill) + 1):
        d = dataclasses.replace(cfg.distill, round=k, teacher=teacher)
        c = dataclasses.replace(cfg, out_dir=str(cfg.run_dir), name=f"round{k}-{round_steps(d)[1]}step", distill=d)
        grid = sample_defaults(d, build_schedule(c), 1.0)
        c.sample = dataclasses.replace(c.sample, steps=grid["steps"], sigmas=grid["sigmas"])
        runs.append(validate(c))
        teacher = str(c.run_dir / "checkpoints" / "last.safetensors")
    return runs


# --------------------------------------------------------------------------------------- text language models
TEXT_VAL_SEED = 0x7E47  # the validation windows' time draws and noise (fixed: every checkpoint sees the same)


class TextModule(nn.Module):
    """The text task's module: its network as the discrete objectives and samplers call a model,
    ``model(x_t, t) -> logits`` (docs/text.md); ``.net`` holds the weights."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t=None, **cond) -> torch.Tensor:
        return self.net(x, t, **cond)  # (N, L, V_out)


def text_config(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The text run's configuration with what follows from its data and objective written in: the network's
    vocab_size (the tokeniser's), seq_len (data.seq_len), mask_token, causal and time_cond (text.objective), and
    the loss's process. A vocab_size set by hand to another value is refused."""
    net = cfg.model.text_transformer
    if net.vocab_size not in (vocab_size, TextTransformerConfig().vocab_size):
        raise ConfigError(f"{TEXT_NET}.vocab_size={net.vocab_size} contradicts the {cfg.data.tokenizer} tokeniser of "
                          f"{cfg.data.dataset!r}, which has {vocab_size} tokens: leave {TEXT_NET}.vocab_size out")
    model = dataclasses.replace(cfg.model, text_transformer=net.replace(vocab_size=vocab_size, **text_derived(cfg)))
    process = TEXT_OBJECTIVES[cfg.text.objective]["process"]
    loss = dataclasses.replace(cfg.text.loss, process=process) if process else cfg.text.loss
    return validate(dataclasses.replace(cfg, model=model, text=dataclasses.replace(cfg.text, loss=loss)))


def text_objective(cfg: RunConfig, *, evaluation: bool = False):
    """mdlm / d3pm: DiscreteObjective on text.loss; ar: NextTokenObjective. `evaluation`: the bound itself (for
    d3pm L_vb, the hybrid loss's lambda set to 0) with independent time draws per window (no antithetic strata over
    the batch), so a window's estimate does not depend on its batch."""
    k = cfg.model.text_transformer.vocab_size
    if cfg.text.objective == "ar":
        return NextTokenObjective(k)
    loss = cfg.text.loss
    if evaluation:
        loss = dataclasses.replace(loss, antithetic=False, hybrid_weight=0.0)
    return DiscreteObjective(k, loss)


def text_dataset(cfg: RunConfig, split: str = "train", tokenizer=None, *, verbose: bool = True):
    """TextWindows of data.seq_len tokens of one split of data.dataset, with data.tokenizer (or the given tokeniser
    object, e.g. a checkpoint's)."""
    d = cfg.data
    return make_text_dataset(d.dataset, split, seq_len=d.seq_len, tokenizer=tokenizer or d.tokenizer,
                             verbose=verbose)


@torch.no_grad()
def window_nats(objective, model, x: torch.Tensor, *, draws: int = 1, seed: int = TEXT_VAL_SEED,
                offset: int = 0) -> torch.Tensor:
    """The bound (or, for ar, the exact NLL) of each window of x (B, L) in nats, float64 (B,), averaged over `draws`
    Monte Carlo draws; window i of a split (i = offset + row) draws from a generator seeded by (seed, draw, i), so
    its estimate does not depend on the batch. An exact objective needs one draw."""
    draws = 1 if isinstance(objective, NextTokenObjective) else draws
    device = next(model.parameters()).device
    x = x.to(device)
    total = torch.zeros(len(x), dtype=torch.float64)
    for r in range(draws):
        gens = [torch.Generator(device=device).manual_seed(hash_seed(seed, r, i))
                for i in range(offset, offset + len(x))]
        total += objective.per_sample(model, x, generator=gens).double().cpu()
    return total / draws


def text_validation(cfg: RunConfig, tokenizer):
    """The text task's validation: bits per character of the first text.valid_windows windows of the validation
    split, with text.eval_draws fixed time draws per window (the same at every checkpoint)."""
    windows = text_dataset(cfg, "valid", tokenizer, verbose=False)
    n = min(cfg.text.valid_windows, windows.num_eval_windows())
    x = next(windows.eval_batches(n))  # (n, L)
    objective = text_objective(cfg, evaluation=True)

    chars = text_characters(x, tokenizer)

    def bits_per_char(module) -> float:
        nats = float(window_nats(objective, module, x, draws=cfg.text.eval_draws).sum())
        return bits_per_character(nats / x.numel(), tokens=x.numel(), characters=chars)
    return bits_per_char


def text_characters(x: torch.Tensor, tokenizer) -> int:
    """Characters in token ids x: one per token, or for bytes one per byte that is not a UTF-8 continuation."""
    if getattr(tokenizer, "kind", "char") == "byte":
        return int(((x < 0x80) | (x >= 0xC0)).sum())
    return x.numel()


def load_text_model(path, *, use_ema: bool = True, device="cpu"):
    """A text checkpoint as (TextModule in eval mode, config, meta, tokeniser rebuilt from the metadata)."""
    module, cfg, meta = load_model(path, task="text", use_ema=use_ema, device=device)
    if not isinstance(meta.get("tokenizer"), dict):
        raise CheckpointError(f"{path} holds no tokeniser; every text checkpoint records one")
    return module, cfg, meta, tokenizer_from_dict(meta["tokenizer"])
