"""diffusers models in and out.

**In.** A diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) with its
scheduler's ``scheduler_config.json`` (beside it, or a pipeline folder with ``unet/`` and ``scheduler/``) becomes a
denoiser on this library's contract: the scheduler's betas give a :class:`~torchdiffusion.schedules.DiscreteSchedule`
(diffusers' timestep index t = 0..T-1 is this library's table index, with the same alpha_bar), its
``prediction_type`` the preconditioning (epsilon -> eps, v_prediction -> v, sample -> x0), its ``clip_sample`` the
sampling's clip_x0. Every sampler, guidance and edit then runs on it. Needs the optional ``diffusers`` package.

**Out.** :func:`export_diffusers` writes a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) that
``DDPMPipeline`` / ``DDIMPipeline.from_pretrained`` load, for the U-Nets of :mod:`torchdiffusion.nets.unet` whose
architecture maps onto ``UNet2DModel`` (residual blocks with FiLM or additive time conditioning, self-attention at
chosen levels and in the middle, stride-2 convolution down, nearest x2 + convolution up). What does not map is
refused, naming it. The weights are renamed, never changed: the exported network computes the same function.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..nets import UNet
from ..precond import Precond
from ..schedules import DiscreteSchedule

DIFFUSERS_HINT = "pip install 'torchdiffusion[diffusers]' (or pip install diffusers)"
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers name -> ours
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
COSINE_MAX_BETA = 0.999  # diffusers' squaredcos_cap_v2 clip


class MappingError(ValueError):
    """A model or scheduler that has no counterpart on the other side; the message says which part."""


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"this needs the diffusers package: {DIFFUSERS_HINT}") from None
    return diffusers


# ---------------------------------------------------------------------------------------------- schedules
def betas_from_scheduler_config(cfg: dict) -> torch.Tensor:
    """The (T,) float64 betas of a diffusers DDPM/DDIM scheduler config, computed as diffusers does."""
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    if cfg.get("rescale_betas_zero_snr"):
        raise MappingError("rescale_betas_zero_snr makes alpha_bar(T) = 0 (sigma infinite); not supported")
    T = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if kind == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), COSINE_MAX_BETA) for i in range(T)],
                            dtype=torch.float64)
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (b1 - b0) + b0
    raise MappingError(f"unknown beta_schedule {kind!r}; allowed values: {', '.join(map(repr, BETA_SCHEDULES))}")


def schedule_from_scheduler_config(cfg: dict) -> tuple[DiscreteSchedule, str]:
    """(schedule, prediction) of a diffusers scheduler config."""
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise MappingError(f"prediction_type {pred!r} has no counterpart; allowed: {', '.join(PREDICTION_TYPES)}")
    if cfg.get("variance_type", "fixed_small") in ("learned", "learned_range"):
        raise MappingError("learned-variance UNets (variance_type learned*) output 2C channels; not supported")
    return DiscreteSchedule(betas_from_scheduler_config(cfg), name="diffusers"), PREDICTION_TYPES[pred]


# ------------------------------------------------------------------------------------------------------ in
class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as this library's raw network F(x_in, t, class_labels=None) -> output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.num_classes = None  # diffusers' class embeddings have no null row: guidance needs our own models

    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels).sample


def find_folders(path) -> tuple[Path, Path]:
    """(unet folder, scheduler config file) of a pipeline folder or a bare UNet2DModel folder."""
    path = Path(path)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                 unet_dir / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise FileNotFoundError(f"{path} holds no scheduler_config.json (looked in {path}/scheduler/ and {path}); a "
                            "diffusers model needs its scheduler's config to define the noise schedule")


def is_diffusers_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()
                              or ((path / "config.json").is_file() and (path / "scheduler_config.json").is_file()))


def load_diffusers(path, device="cpu") -> tuple[Precond, dict]:
    """A diffusers UNet2DModel folder as a denoiser: (Precond in eval mode, info) where info holds the data shape,
    the scheduler's clip_sample and the source configs."""
    unet_dir, sched_file = find_folders(path)
    sched_cfg = json.loads(sched_file.read_text())
    schedule, prediction = schedule_from_scheduler_config(sched_cfg)
    unet = _diffusers().UNet2DModel.from_pretrained(str(unet_dir)).to(device).eval()
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
    info = {"data_shape": [c.in_channels, *size], "clip_x0": bool(sched_cfg.get("clip_sample", True)),
            "prediction": prediction, "scheduler_config": sched_cfg, "unet_config": dict(c)}
    return Precond(DiffusersUNet(unet), schedule, prediction).eval(), info


# ----------------------------------------------------------------------------------------------------- out
def unet_to_diffusers_config(net: UNet) -> dict:
    """The UNet2DModel config of one of our U-Nets, or MappingError naming what does not map."""
    c = net.config
    levels = len(c.channel_mult)
    widths = [c.channels * m for m in c.channel_mult]
    heights = [s[0] for s in net.level_sizes]
    problems = []
    if c.cond_channels:
        problems.append("cond_channels (a super-resolution net's low-res input)")
    if getattr(c, "fourier_features", ()):
        problems.append(f"fourier_features={list(c.fourier_features)} (UNet2DModel has no Fourier-feature inputs)")
    if c.time_embed_mult != 4:
        problems.append(f"time_embed_mult={c.time_embed_mult} (UNet2DModel's time embedding is 4 x channels)")
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) != 1:
        problems.append(f"GroupNorm with {sorted(groups)} groups (UNet2DModel uses one group count everywhere)")
    for h, w in net.level_sizes[:-1]:
        if h % 2 or w % 2:
            problems.append(f"image size {tuple(net.image_size)}: a {h}x{w} level does not halve exactly "
                            "(UNet2DModel upsamples by exactly 2)")
            break
    attn_widths = [w for w, h in zip(widths, heights) if h in c.attn_resolutions]
    attn_widths += [widths[-1]] if c.mid_attention else []
    if c.head_channels:
        head_dim = c.head_channels
    else:
        dims = {w // c.num_heads for w in attn_widths}
        if len(dims) > 1:
            problems.append(f"num_heads={c.num_heads} at widths {sorted(set(attn_widths))} (UNet2DModel has one head "
                            "width; set head_channels)")
        head_dim = dims.pop() if dims else c.channels
    if problems:
        raise MappingError("this U-Net does not map onto diffusers' UNet2DModel: " + "; ".join(problems))
    down = ["AttnDownBlock2D" if h in c.attn_resolutions else "DownBlock2D" for h in heights]
    return {
        "sample_size": list(net.image_size), "in_channels": c.in_channels, "out_channels": net.out_channels,
        "layers_per_block": c.num_res_blocks, "block_out_channels": widths, "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)], "attention_head_dim": head_dim,
        "norm_num_groups": groups.pop(), "attn_norm_num_groups": None if not attn_widths else c.norm_groups,
        "norm_eps": 1e-6, "resnet_time_scale_shift": "scale_shift" if c.scale_shift else "default",
        "add_attention": c.mid_attention, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
        "dropout": c.dropout, "num_class_embeds": None if c.num_classes is None else c.num_classes + 1,
        "_class_name": "UNet2DModel", "levels": levels,
    }


def _res_keys(src: str, dst: str) -> dict:
    pairs = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


def _level_plan(levels: int, blocks: int, prefix: str) -> list[tuple[str, int | None]]:
    """(diffusers block prefix, resnet index or None for the block's resampler) for each entry of our down or up
    ModuleList, in order: `blocks` residual blocks per level, then a resampler on every level but the last."""
    plan = []
    for level in range(levels):
        plan += [(f"{prefix}.{level}", j) for j in range(blocks)]
        plan += [(f"{prefix}.{level}", None)] if level != levels - 1 else []
    return plan


def unet_state_to_diffusers(net: UNet) -> dict[str, torch.Tensor]:
    """Our U-Net's weights under UNet2DModel's names (the fused qkv split into to_q, to_k, to_v)."""
    sd = net.state_dict()
    pw = ("weight", "bias")
    names = {"conv_in": "conv_in", "time_embed.mlp.0": "time_embedding.linear_1",
             "time_embed.mlp.2": "time_embedding.linear_2", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    rename = {f"{a}.{p}": f"{b}.{p}" for a, b in names.items() for p in pw}
    rename["class_embed.weight"] = "class_embedding.weight"
    attn = {}  # our attention prefix -> diffusers prefix
    c, L = net.config, len(net.config.channel_mult)
    for side, modules, blocks, resampler in (("down", net.down, c.num_res_blocks, ("op", "downsamplers.0.conv")),
                                              ("up", net.up, c.num_res_blocks + 1, ("conv", "upsamplers.0.conv"))):
        for i, (prefix, j) in enumerate(_level_plan(L, blocks, f"{side}_blocks")):
            if j is None:
                rename.update({f"{side}.{i}.{resampler[0]}.{p}": f"{prefix}.{resampler[1]}.{p}" for p in pw})
                continue
            rename.update(_res_keys(f"{side}.{i}.res", f"{prefix}.resnets.{j}"))
            if modules[i].attn is not None:
                attn[f"{side}.{i}.attn"] = f"{prefix}.attentions.{j}"
    rename.update(_res_keys("mid.0.res", "mid_block.resnets.0"))
    rename.update(_res_keys("mid.1.res", "mid_block.resnets.1"))
    if net.mid[0].attn is not None:
        attn["mid.0.attn"] = "mid_block.attentions.0"
    out = {rename[k]: v for k, v in sd.items() if k in rename}
    for src, dst in attn.items():
        for part, w, b in zip(("to_q", "to_k", "to_v"), sd[f"{src}.qkv.weight"].chunk(3), sd[f"{src}.qkv.bias"].chunk(3)):
            out[f"{dst}.{part}.weight"], out[f"{dst}.{part}.bias"] = w, b
        for ours, theirs in (("proj", "to_out.0"), ("norm", "group_norm")):
            out.update({f"{dst}.{theirs}.{p}": sd[f"{src}.{ours}.{p}"] for p in pw})
    used = set(rename) | {f"{s}.{m}.{p}" for s in attn for m in ("qkv", "proj", "norm") for p in pw}
    missing = sorted(set(sd) - used)
    if missing:
        raise MappingError(f"weights without a UNet2DModel counterpart: {missing[:5]}")
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def scheduler_config(schedule, prediction: str, clip_sample: bool) -> dict:
    """A DDPMScheduler config with this schedule's betas (exactly, as trained_betas)."""
    if not isinstance(schedule, DiscreteSchedule):
        raise MappingError(f"the {schedule.name!r} schedule is continuous; diffusers' DDPM/DDIM schedulers need a "
                           "discrete one (linear, cosine, sigmoid)")
    ours = {v: k for k, v in PREDICTION_TYPES.items()}
    if prediction not in ours:
        raise MappingError(f"prediction {prediction!r} has no diffusers counterpart; allowed: {', '.join(ours)}")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": schedule.T, "beta_schedule": "linear",
            "trained_betas": schedule.betas.tolist(), "prediction_type": ours[prediction],
            "clip_sample": bool(clip_sample), "variance_type": "fixed_small", "timestep_spacing": "leading",
            "steps_offset": 0}


def export_diffusers(denoiser: Precond, out_dir, *, clip_sample: bool = True) -> Path:
    """Write `denoiser` (a Precond around one of our U-Nets, discrete schedule) as a diffusers pipeline folder:
    model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors}, scheduler/scheduler_config.json."""
    if type(denoiser) is not Precond:  # a consistency or MeanFlow student is not a diffusers scheduler step
        raise MappingError(f"only a diffusion model (a Precond around a U-Net) maps onto a diffusers pipeline, not a "
                           f"{type(denoiser).__name__}; export it with --format onnx, torch-export or torchscript")
    if not isinstance(denoiser.net, UNet):
        raise MappingError(f"only U-Nets map onto UNet2DModel, not {type(denoiser.net).__name__}")
    sched = scheduler_config(denoiser.schedule, denoiser.prediction, clip_sample)
    ucfg = unet_to_diffusers_config(denoiser.net)
    ucfg.pop("levels")
    weights = unet_state_to_diffusers(denoiser.net)
    out = Path(out_dir)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "unet" / "config.json").write_text(json.dumps(ucfg, indent=2))
    save_file(weights, str(out / "unet" / WEIGHTS_FILE))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                      "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    check = load_file(str(out / "unet" / WEIGHTS_FILE))
    if set(check) != set(weights):
        raise RuntimeError(f"the written weights file {out / 'unet' / WEIGHTS_FILE} does not read back")
    return out
