"""Run configuration: one dataclass per component, loaded from YAML, every field overridable as key=value.

A hyperparameter lives in exactly one dataclass field; the YAML presets and the command line are derived from
these dataclasses (unknown keys are an error that lists the valid ones).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.joint import JointConfig, check_joint_config
from .data.timeseries import SeriesConfig, check_series_config
from .discrete import DiscreteObjectiveConfig
from .nets import (AutoencoderConfig, ClassifierConfig, DiT1DConfig, DiTConfig, MLPConfig, NETS, TextTransformerConfig,
                   UNet1DConfig, UNetConfig, UViTConfig)
from .latent.objective import AutoencoderLossConfig
from .fewstep.methods import DistillConfig, check_distill
from .objectives import KINDS as OBJECTIVE_KINDS, ObjectiveConfig
from .precond import PREDICTIONS
from .sampling import SAMPLERS, SPACINGS, SampleConfig, check_sampler_options
from .sampling.generate import nonfinite_field
from .schedules import DISCRETE_SCHEDULES, SCHEDULES, check_schedule_options
from .text_encoder.conditioning import CaptionConfig, check_caption_config
from .utils import check_choice
from .vdm import check_vdm_config

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    dataset: str = "mnist"          # mnist, a folder of images, an .npz file, or a 2-D toy set name; task text:
                                    # shakespeare, or a UTF-8 text file or folder of .txt files
    image_size: int | None = None   # resize images to this size (None: keep)
    subset: int | None = None       # train on a fixed random subset of N examples
    flip: bool = False              # random horizontal flips (never for digits)
    autoencoder: str = ""           # an autoencoder checkpoint: train on its latents of the data ('' : pixels)
    seq_len: int = 256              # task text: tokens per window (and the network's positions)
    tokenizer: str = "char"         # task text: char (the training split's characters) or byte (UTF-8 bytes)


@dataclass
class DiffusionConfig:
    schedule: str = "linear"        # linear, cosine, sigmoid (discrete), vp, edm or rf
    T: int = 1000                   # steps of a discrete schedule
    schedule_options: dict = field(default_factory=dict)  # the schedule's own options (edm sigma_data, vp beta_max, ...)
    prediction: str = "eps"         # what the network predicts: eps, x0, v, velocity or edm
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass
class ModelConfig:
    kind: str = "unet"              # the network: unet, dit, uvit, mlp (denoisers), noisy_classifier, autoencoder or
                                    # text_transformer (task text)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    uvit: UViTConfig = field(default_factory=UViTConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    noisy_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_transformer: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    unet1d: UNet1DConfig = field(default_factory=UNet1DConfig)  # task series: the 1-D U-Net
    dit1d: DiT1DConfig = field(default_factory=DiT1DConfig)     # task series: the 1-D patch transformer


@dataclass
class TrainConfig:
    steps: int = 2000               # optimizer steps in total
    batch_size: int = 128           # examples per optimizer step
    lr: float = 2e-3                # peak learning rate of AdamW
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    adam_betas: tuple = (0.9, 0.99)  # AdamW (beta1, beta2)
    warmup_steps: int = 100         # linear warm-up from 0 to lr
    lr_schedule: str = "cosine"     # cosine (to min_lr_ratio * lr) or constant after warm-up
    min_lr_ratio: float = 0.05      # final learning rate as a fraction of lr
    lr_schedule_over: str = "steps"  # steps (warm-up and decay over train.steps) or time (over train.max_minutes of
                                    # training time: the final lr at the budget whatever the step rate)
    clock: str = "wall"             # what train_seconds counts with lr_schedule_over=time: wall (elapsed seconds) or
                                    # cpu (this process's CPU seconds: a budget in CPU-minutes, which other jobs on
                                    # the machine do not eat into; all threads count)
    grad_clip: float = 1.0          # max global gradient norm (0: off)
    ema_decay: float = 0.999        # EMA of the weights; effective decay min(this, (1+k)/(10+k))
    precision: str = "fp32"         # fp32, bf16 (autocast, fp32 master weights) or auto (the faster here, measured)
    channels_last: bool = False     # channels-last memory format for images
    grad_accum: int = 1             # micro-batches per optimizer step (same total batch, less memory)
    compile: bool = False           # torch.compile the network (falls back to eager with a warning)
    seed: int = 0                   # seed of data order, noise and initialisation
    threads: int = 0                # torch CPU threads (0: leave torch's default)
    log_every: int = 25             # steps between logged scalars
    sample_every: int = 500         # steps between sample grids (0: off)
    eval_every: int = 0             # steps between FD/KID/precision/recall evaluations (0: off; MNIST only)
    eval_samples: int = 256         # samples drawn (and real test images compared) at each evaluation
    ckpt_every: int = 500           # steps between checkpoints (0: only at the end)
    max_minutes: float = 0.0        # stop cleanly with a checkpoint after this wall time (0: no limit)
    keep_last: int = 2              # earlier checkpoints kept as checkpoints/step_<step>.safetensors (0: none)
    nonfinite_skips: int = 0        # steps in a row with a NaN/inf loss or gradient skipped before stopping (0: none)
    dist_timeout_s: float = 600.0   # data-parallel: seconds a process waits for the others before it fails


TASKS = ("denoiser", "noisy_classifier", "autoencoder", "distill", "text", "series", "joint")  # what a run trains; see build


@dataclass
class TextSampleConfig:
    n: int = 4                      # samples to draw
    steps: int = 0                  # diffusion sampler steps (blocks: per block; 0: one per generated token)
    sampler: str = "ancestral"      # ancestral (MDLM / D3PM / left to right for ar), remask (LLaDA) or blocks (BD3-LM)
    block_size: int = 16            # blocks: tokens per block
    seed: int = 0                   # sample i draws from the generator seeded (seed, i)
    blank: str = "_"                # infill templates: the character that marks a position to generate


@dataclass
class TextConfig:
    objective: str = "mdlm"         # mdlm (absorbing, MDLM's NELBO), d3pm (uniform, hybrid loss) or ar (next token)
    loss: DiscreteObjectiveConfig = field(default_factory=DiscreteObjectiveConfig)  # mdlm / d3pm: the bound's
                                    # schedule, eps, steps (d3pm: T > 0), antithetic, hybrid_weight; process follows
    eval_draws: int = 4             # mdlm / d3pm: Monte Carlo time draws per window when evaluating the bound
    valid_windows: int = 64         # validation windows (the first of the validation split) at each checkpoint
    sample: TextSampleConfig = field(default_factory=TextSampleConfig)  # generate-text defaults


@dataclass
class RunConfig:
    name: str = "run"               # run name; outputs go to out_dir/name
    out_dir: str = "outputs"        # folder of runs
    task: str = "denoiser"          # denoiser (a diffusion model), noisy_classifier (for guidance), autoencoder or
                                    # distill (a few-step student, see the distill section and docs/fewstep.md)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)  # task autoencoder
    distill: DistillConfig = field(default_factory=DistillConfig)  # task distill: the method and its teacher
    text: TextConfig = field(default_factory=TextConfig)  # task text: the objective, its evaluation and sampling
    series: SeriesConfig = field(default_factory=SeriesConfig)  # task series: windows, horizon, split (data.dataset
                                                                # names the series; docs/timeseries.md)
    captions: CaptionConfig = field(default_factory=CaptionConfig)  # task denoiser: condition on captions through a
                                                                    # frozen sentence encoder (docs/conditioning.md)
    joint: JointConfig = field(default_factory=JointConfig)  # task joint: one diffusion over (image, label)
                                                             # (docs/conditioning.md)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


def _coerce(value, typ, where: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, inner, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(" or ".join(errors))
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {sorted(f.name for f in dataclasses.fields(typ))}")
        return from_dict(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if typ is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} must be a mapping of option names to values, got {value!r}")
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{where}.{k} must be a finite number, got {v!r}")
        return dict(value)
    if typ is tuple or origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (d or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + repr(where) if where else ''}: "
                              f"{', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)

    def fix(o):
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, tuple):
            return [fix(v) for v in o]
        return o

    return fix(d)


def set_by_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = d.get(k)
        if node is None:
            node = d[k] = {}
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted!r}: {k!r} is not a section")
        d = node
    d[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.steps=500")
        k, v = item.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
    return out


def upgrade_config(d: dict) -> dict:
    """A configuration dict written before the layout with `task` (a checkpoint's or a YAML file's) in today's
    form: model.kind 'classifier' becomes task 'noisy_classifier' with model.kind 'noisy_classifier', the section
    model.classifier becomes model.noisy_classifier, and sample.guidance 'none' with a scale other than 1 (which
    then meant classifier-free guidance) becomes 'cfg'. Today's dicts pass through unchanged."""
    d = {**d}
    earlier = "task" not in d
    model = dict(d.get("model") or {})
    if "classifier" in model:
        model["noisy_classifier"] = model.pop("classifier")
    if model.get("kind") == "classifier":
        model["kind"] = "noisy_classifier"
        d.setdefault("task", "noisy_classifier")
    if model:
        d["model"] = model
    if d.get("task") == "joint" and "readout" not in (d.get("joint") or {}):  # written before joint.readout
        d["joint"] = {**(d.get("joint") or {}), "readout": "planes"}
    sample = d.get("sample")
    if earlier and isinstance(sample, dict) and sample.get("guidance", "none") == "none" \
            and sample.get("guidance_scale", 1.0) != 1.0:
        d["sample"] = {**sample, "guidance": "cfg"}
    return d


def validate(cfg: RunConfig) -> RunConfig:
    """Check the choices and options that dataclass types cannot: names against their registries, the schedule's
    and sampler's options against their signatures. Raises ConfigError naming the field and the allowed values."""
    try:
        check_choice("task", cfg.task, TASKS)
        check_choice("model.kind", cfg.model.kind, tuple(NETS))
        check_choice("diffusion.schedule", cfg.diffusion.schedule, SCHEDULES)
        check_choice("diffusion.prediction", cfg.diffusion.prediction, PREDICTIONS)
        check_schedule_options(cfg.diffusion.schedule, cfg.diffusion.schedule_options)
        check_choice("sample.sampler", cfg.sample.sampler, sorted(SAMPLERS))
        check_choice("sample.spacing", cfg.sample.spacing, SPACINGS)
        check_sampler_options(cfg.sample.sampler, {**cfg.sample.sampler_options,
                                                   **({"final": cfg.sample.final} if cfg.sample.final else {})})
        check_values(cfg)
        check_objective_kind(cfg)
        if cfg.distill.method and cfg.task != "distill":
            raise ValueError(f"distill.method is {cfg.distill.method!r} but task is {cfg.task!r}: a few-step student "
                             "is task 'distill' (torchdiffusion distill METHOD TEACHER)")
        if cfg.task == "distill":
            check_distill(cfg.distill)
        if cfg.task == "text":
            check_text(cfg)
        if cfg.captions.enabled:
            check_captions(cfg)
        if cfg.task == "joint":
            check_joint(cfg)
        if cfg.task == "series":
            check_series_config(cfg.series)
            if cfg.train.sample_every or cfg.train.eval_every:
                raise ValueError("task series draws no sample grids or image evaluations during training (forecasts "
                                 "are scored by torchdiffusion forecast and bench/timeseries.py): set "
                                 "train.sample_every=0 and train.eval_every=0")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def check_captions(cfg: RunConfig) -> None:
    """A captioned run is a denoiser of MNIST / Fashion-MNIST pixels whose network cross-attends to the encoder."""
    if cfg.task != "denoiser":
        raise ValueError(f"captions.enabled conditions a denoiser (task denoiser), not task {cfg.task!r}")
    if cfg.train.sample_every or cfg.train.eval_every:
        raise ValueError("a captioned run draws no sample grids or evaluations while it trains (they need prompts): "
                         "set train.sample_every=0 and train.eval_every=0, and sample with --prompt afterwards")
    net = getattr(cfg.model, cfg.model.kind, None)
    check_caption_config(cfg.captions, getattr(net, "context_dim", None), cfg.data.dataset, cfg.data.autoencoder)


def check_joint(cfg: RunConfig) -> None:
    """A joint run is an unconditional U-Net over the packed pair (image channels + joint.classes planes)."""
    net = getattr(cfg.model, cfg.model.kind, None)
    if cfg.model.kind != "unet" or net.num_classes is not None or cfg.captions.enabled or cfg.data.autoencoder:
        raise ValueError("task joint learns p(image, label) with an unconditional U-Net on pixels: model.kind=unet, "
                         "model.unet.num_classes=null, captions.enabled=false, data.autoencoder=''")
    if cfg.train.sample_every or cfg.train.eval_every:
        raise ValueError("a joint run draws no sample grids or evaluations while it trains (its samples are pairs): "
                         "set train.sample_every=0 and train.eval_every=0; bench/joint.py measures the model")
    check_joint_config(cfg.joint, net.in_channels)
    obj = cfg.diffusion.objective
    if cfg.joint.label_weight != 1.0 and (obj.kind != "simple" or obj.mask_ratio > 0):
        raise ValueError(f"joint.label_weight weights the simple loss; diffusion.objective.kind={obj.kind!r} "
                         f"(mask_ratio {obj.mask_ratio}) does not take it: set joint.label_weight=1 or kind=simple")


# fields with a lowest allowed value: dotted name -> (lowest value, what the field means)
AT_LEAST = {
    "train.steps": (1, "optimizer steps in total"), "train.batch_size": (1, "examples per optimizer step"),
    "train.grad_accum": (1, "micro-batches per step"), "train.log_every": (1, "steps between logged scalars"),
    "train.eval_samples": (1, "samples per evaluation"), "train.warmup_steps": (0, "0: no warm-up"),
    "train.grad_clip": (0, "0: no clipping"), "train.threads": (0, "0: torch's default"),
    "train.sample_every": (0, "0: no sample grids"), "train.eval_every": (0, "0: no evaluations"),
    "train.ckpt_every": (0, "0: a checkpoint only at the end"), "train.max_minutes": (0, "0: no time limit"),
    "train.weight_decay": (0, "0: none"), "train.min_lr_ratio": (0, "final lr as a fraction of lr"),
    "train.keep_last": (0, "0: keep only last and best"), "train.nonfinite_skips": (0, "0: stop at the first"),
    "sample.steps": (1, "sampler steps"), "sample.n": (1, "samples to draw"),
    "sample.batch_size": (1, "samples per denoiser batch"),
}
POSITIVE = {"train.lr": "the peak learning rate", "train.dist_timeout_s": "seconds to wait for the other processes"}


def check_sample_values(spec, prefix: str = "sample.") -> None:
    """The bounds of AT_LEAST on a SampleConfig, and its numbers finite; `prefix` '--' names command-line flags."""
    name = (lambda f: "--" + f.replace("_", "-")) if prefix == "--" else (lambda f: prefix + f)
    bad = nonfinite_field(spec)
    if bad is not None:
        raise ConfigError(f"{name(bad[0])} must be a finite number, got {bad[1]!r}")
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        low = AT_LEAST.get(f"sample.{f.name}")
        if low is not None and v < low[0]:
            raise ConfigError(f"{name(f.name)} must be at least {low[0]}, got {v} ({low[1]})")


def check_objective_kind(cfg: RunConfig) -> None:
    """diffusion.objective.kind hybrid or vlb (learned variances, docs/likelihood.md) needs a discrete schedule and
    a network built with learn_sigma; kind vdm a continuous schedule and no variance channels."""
    kind = check_choice("diffusion.objective.kind", cfg.diffusion.objective.kind, OBJECTIVE_KINDS)
    if kind == "simple" or cfg.task not in ("denoiser", "series"):
        return
    if kind == "vdm":  # VDM (docs/likelihood.md): its own schedule; the configured one is the network's view of sigma
        net = getattr(cfg.model, cfg.model.kind, None)
        if cfg.diffusion.schedule in DISCRETE_SCHEDULES or getattr(net, "learn_sigma", False):
            raise ValueError("diffusion.objective.kind=vdm learns its noise schedule: set diffusion.schedule to a "
                             "continuous one (vp, edm or rf; it fixes how the network sees x and sigma) and leave "
                             "learn_sigma off (VDM has no variance channels)")
        check_vdm_config(cfg.diffusion.objective.vdm)
        return
    if cfg.diffusion.schedule not in DISCRETE_SCHEDULES:
        raise ValueError(f"diffusion.objective.kind={kind} learns the variance of DDPM's discrete steps: set "
                         f"diffusion.schedule to one of {', '.join(DISCRETE_SCHEDULES)}, not "
                         f"{cfg.diffusion.schedule!r}")
    if not getattr(getattr(cfg.model, cfg.model.kind, None), "learn_sigma", False):
        raise ValueError(f"diffusion.objective.kind={kind} trains a learned variance: set "
                         f"model.{cfg.model.kind}.learn_sigma=true (kinds with variance channels: unet, dit)")


def check_values(cfg: RunConfig) -> None:
    """Bounds that types cannot say (AT_LEAST, POSITIVE, the EMA and Adam decays) and a run name that stays
    inside out_dir. Raises ConfigError naming the field, its value and what it means."""
    t = cfg.train
    for key, (low, what) in AT_LEAST.items():
        section, name = key.split(".")
        if section == "train" and getattr(t, name) < low:
            raise ConfigError(f"{key} must be at least {low}, got {getattr(t, name)} ({what})")
    for key, what in POSITIVE.items():
        v = getattr(t, key.split(".")[1])
        if not v > 0:
            raise ConfigError(f"{key} must be positive, got {v} ({what})")
    decays = [("train.ema_decay", t.ema_decay)] + [(f"train.adam_betas[{i}]", b) for i, b in enumerate(t.adam_betas)]
    for key, v in decays:
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ConfigError(f"{key} must be a number in [0, 1), got {v!r}")
    check_lr_schedule_over(t)
    check_sample_values(cfg.sample)
    if cfg.name in ("", ".", "..") or Path(cfg.name).name != cfg.name or "\\" in cfg.name:
        raise ConfigError(f"name must be a plain folder name (the run goes to out_dir/name), got {cfg.name!r}; "
                          "put the folder of runs in out_dir=...")


LR_SCHEDULE_OVER = ("steps", "time")  # what train.lr_schedule_over may be
TRAIN_CLOCKS = ("wall", "cpu")        # what train.clock may be


def check_lr_schedule_over(t: TrainConfig) -> None:
    """train.lr_schedule_over is steps or time, and time has a budget to run over (train.max_minutes > 0)."""
    check_choice("train.lr_schedule_over", t.lr_schedule_over, LR_SCHEDULE_OVER)
    if t.lr_schedule_over == "time" and not t.max_minutes > 0:
        raise ConfigError(f"train.lr_schedule_over='time' runs the learning-rate schedule over the time budget, but "
                          f"train.max_minutes is {t.max_minutes:g} (no budget): set train.max_minutes to the minutes "
                          "of training (e.g. train.max_minutes=10), or train.lr_schedule_over=steps")
    check_choice("train.clock", t.clock, TRAIN_CLOCKS)
    if t.clock == "cpu" and t.lr_schedule_over != "time":
        raise ConfigError("train.clock='cpu' counts the time budget in CPU seconds of training steps, which only the "
                          "time-based schedule reads: set train.lr_schedule_over=time (with train.max_minutes), or "
                          "train.clock=wall")


# task text: objective -> (the discrete process, and the network settings that follow from it; None: free)
TEXT_OBJECTIVES = {
    "mdlm": {"process": "absorbing", "mask_token": True, "causal": False, "time_cond": None},
    "d3pm": {"process": "uniform", "mask_token": False, "causal": False, "time_cond": True},
    "ar": {"process": None, "mask_token": False, "causal": True, "time_cond": False},
}
TEXT_SAMPLERS = ("ancestral", "remask", "blocks")
TEXT_NET = "model.text_transformer"


def text_derived(cfg: RunConfig) -> dict:
    """The fields of model.text_transformer that follow from the text run (vocab_size comes from the tokeniser,
    see build.text_config): the positions from data.seq_len, the mask token, causality and time input from
    text.objective."""
    rule = TEXT_OBJECTIVES[cfg.text.objective]
    return {"seq_len": cfg.data.seq_len, **{k: v for k, v in rule.items() if k != "process" and v is not None}}


def check_text(cfg: RunConfig) -> None:
    """Task text: the objective, tokeniser and sampler names, and no setting that contradicts what the objective
    fixes (a field left at its default is set from the objective; another value than the one it sets is refused)."""
    t, d = cfg.text, cfg.data
    check_choice("text.objective", t.objective, TEXT_OBJECTIVES)
    check_choice("data.tokenizer", d.tokenizer, ("char", "byte"))
    check_choice("text.sample.sampler", t.sample.sampler, TEXT_SAMPLERS)
    for key, low in (("data.seq_len", d.seq_len), ("text.eval_draws", t.eval_draws),
                     ("text.valid_windows", t.valid_windows), ("text.sample.n", t.sample.n),
                     ("text.sample.block_size", t.sample.block_size)):
        if low < 1:
            raise ValueError(f"{key} must be at least 1, got {low}")
    if t.sample.steps < 0 or len(t.sample.blank) != 1:
        raise ValueError(f"text.sample.steps must be >= 0 (0: one per token) and text.sample.blank one "
                         f"character, got {t.sample.steps} and {t.sample.blank!r}")
    if d.flip or d.autoencoder:
        raise ValueError("data.flip and data.autoencoder are for images: leave them out of a text run")
    net, default = cfg.model.text_transformer, TextTransformerConfig()
    for key, want in text_derived(cfg).items():
        got = getattr(net, key)
        if got != want and got != getattr(default, key):
            what = "data.seq_len" if key == "seq_len" else f"text.objective={t.objective!r}"
            raise ValueError(f"{TEXT_NET}.{key}={got!r} contradicts {what}, which sets it to {want!r}: leave "
                             f"{TEXT_NET}.{key} out (it follows from {what})")
    process = TEXT_OBJECTIVES[t.objective]["process"]
    if process is not None and t.loss.process not in (process, DiscreteObjectiveConfig().process):
        raise ValueError(f"text.loss.process={t.loss.process!r} contradicts text.objective={t.objective!r} (the "
                         f"{process} process): leave text.loss.process out")
    if t.objective == "d3pm" and t.loss.steps < 1:
        raise ValueError("text.objective 'd3pm' is D3PM's T-step hybrid loss: set text.loss.steps to T, e.g. 1000")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then a preset name or YAML file, then key=value overrides."""
    d: dict = {}
    if config is not None:
        path = Path(config)
        if not path.suffix and (PRESET_DIR / f"{config}.yaml").exists():
            path = PRESET_DIR / f"{config}.yaml"
        if not path.exists():
            raise ConfigError(f"config {config!r} is neither a file nor a preset; presets: {', '.join(presets())}")
        if not path.is_file():
            raise ConfigError(f"config {config!r} is a folder, not a YAML file; give a file or a preset "
                              f"({', '.join(presets())})")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {path}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must contain a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        set_by_path(d, key, value)
    return validate(from_dict(RunConfig, d))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
