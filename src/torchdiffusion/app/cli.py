"""Command line: ``torchdiffusion {train,distill,sample,demo,config,prepare-data,train-feature-net,evaluate,inpaint,
img2img,invert,interpolate,export,report,bench,generate-text}``.

Run options come from the configuration dataclasses (``torchdiffusion.config``): give a preset or a YAML
file with ``--config`` and change any field with ``key=value`` (e.g. ``train.steps=500 model.unet.channels=64``).
Sampling options are the fields of :class:`~torchdiffusion.sampling.SampleConfig`, one flag each.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import __version__, viz
from ..build import NO_TEACHER, codec_for, load_denoiser, load_noisy_classifier, net_input_shape
from ..checkpoint import CheckpointError, read_meta
from ..config import ConfigError, TextSampleConfig, check_sample_values, load_config, presets, to_dict
from ..data import prepare_fashion_mnist, prepare_mnist, prepare_shakespeare, prepare_text
from ..edit import STEP_SAMPLERS, edit_plan, sample_cascade, sdedit_sigmas
from ..evaluate import (FEATURE_DATASETS, evaluate_samples, feature_net_metadata, feature_net_path,
                        train_feature_net)
from ..evaluate.quality import FLOOR_DRAWS, num_classes
from ..evaluate.report import evaluate_checkpoint, format_table
from ..evaluate.text import evaluate_text_checkpoint, format_text_table
from ..fewstep import METHODS
from ..guidance import class_labels_for
from ..interop.diffusers import export_diffusers
from ..interop.export import FORMATS, ONNX_OPSET, SUFFIXES, export, input_names
from ..latent.edit import Edits
from ..sampling import SampleConfig, generate, grid_steps
from ..training import dist_info, train
from ..utils import check_choice, sample_generators
from .demo import run_demo
from .distill import run_distill
from .forecast import add_forecast_command
from .hooks import standard_hooks
from .inputs import load_images, load_samples, make_mask
from .joint import sample_joint
from .prompts import check_prompt_spec, sample_prompts
from .run_report import write_report
from .text import generate_text, write_text_samples

NONE_ARG = "none"  # `--class-label none`: unconditional, whatever the run's sample.class_label says
BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"  # the benchmarks of a source checkout
BENCHMARKS = {"samplers": "samplers.py", "train-speed": "train_speed.py", "guidance": "guidance.py",
              "structure": "structure.py", "floor": "floor.py", "backbones": "backbones.py", "latent": "latent.py",
              "fewstep": "fewstep.py", "faults": "faults.py", "interop": "interop.py", "norm-act": "norm_act.py",
              "timeseries": "timeseries.py", "text": "text.py", "adaptive": "adaptive.py",
              "conditioning": "conditioning.py", "text-conditioning": "text_conditioning.py",
              "likelihood": "likelihood.py", "joint": "joint.py"}
EDIT_SAMPLE_FIELDS = ("sampler", "steps", "spacing", "sampler_options", "seed", "use_ema", "clip_x0", "class_label")
EVAL_SAMPLE_FIELDS = ("sampler", "steps", "spacing", "final", "sampler_options", "seed", "batch_size", "use_ema",
                      "clip_x0", "class_label", "guidance", "guidance_scale", "classifier")
RENAMED = {"train-classifier": "train-feature-net"}  # old command name -> new one (the old one still works)


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"a preset ({', '.join(presets())}) or a YAML file" + (f" (default: {default})" if default else ""))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change any config field, e.g. train.steps=500")


def _int_or_none(v: str):
    if v.lower() == NONE_ARG:
        return NONE_ARG
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or '{NONE_ARG}', got {v!r}") from None


def _floats(v: str) -> tuple:
    """A comma-separated list of numbers (--sigmas 80,0.8)."""
    try:
        return tuple(float(x) for x in v.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 80,0.8, got {v!r}") from None


def _option(v: str):
    """KEY=VALUE (VALUE read as YAML: 0.5, true, heun) for --sampler-option."""
    if "=" not in v or not v.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. eta=0.5, got {v!r}")
    k, val = v.split("=", 1)
    return k.strip(), yaml.safe_load(val)


def _add_sample_args(p: argparse.ArgumentParser, only: tuple | None = None) -> None:
    """One flag per SampleConfig field (or per field in `only`), so the sampling options live in one place."""
    for f in dataclasses.fields(SampleConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: from the run, else {default})")
        elif str(f.type) == "dict":
            p.add_argument("--sampler-option", dest=f.name, type=_option, action="append", default=None,
                           metavar="KEY=VALUE", help="an option of the sampler, e.g. eta=0.5 (repeatable; default: "
                           "the run's sample.sampler_options)")
        else:
            typ = {"int": int, "float": float, "str": str, "int | None": _int_or_none,
                   "tuple": _floats}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=None,
                           help=f"(default: from the run, else {default if default != '' else repr('')})"
                           + (f"; '{NONE_ARG}': unconditional" if typ is _int_or_none else ""))
    if only is None or "class_label" in only:
        p.add_argument("--class", dest="class_label", type=_int_or_none, default=None, help="same as --class-label")


def _sample_overrides(args) -> dict:
    """The SampleConfig fields given on the command line (None: not given; 'none': the value None)."""
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    out = {k: (None if v == NONE_ARG else v) for k, v in vars(args).items() if k in names and v is not None}
    if "sampler_options" in out:
        out["sampler_options"] = dict(out["sampler_options"])
    return out


def _spec(run_sample: SampleConfig, args, **fixed) -> SampleConfig:
    """The run's sample configuration with the command line's flags (and `fixed` fields) applied. A sampler given
    on the command line drops the run's sampler options, which belong to the run's sampler."""
    over = {**_sample_overrides(args), **fixed}
    if "sampler" in over and over["sampler"] != run_sample.sampler and "sampler_options" not in over:
        over["sampler_options"] = {}
    spec = dataclasses.replace(run_sample, **over)
    check_sample_values(spec, prefix="--")  # --n 0, --batch-size 0, --guidance-scale nan: refused before any work
    if spec.guidance == "none" and spec.guidance_scale != 1.0:
        raise ConfigError(f"--guidance-scale {spec.guidance_scale:g} needs a guidance method: add --guidance cfg "
                          "(classifier-free) or --guidance classifier --classifier CKPT")
    return spec


def _writable(out: Path) -> Path:
    """The output folder `out`, created, once a file could be written in it (so that a read-only --out fails
    before any sampling, not after)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to {out} ({e.strerror or e}): pass --out with a writable folder") from None
    return out


def _classifier(spec: SampleConfig):
    """The noise-conditional classifier that guidance 'classifier' needs, loaded from spec.classifier."""
    if spec.guidance != "classifier":
        return None
    if not spec.classifier:
        raise ConfigError("guidance 'classifier' needs a noise-conditional classifier: --classifier CKPT")
    return load_noisy_classifier(spec.classifier)[0]


# ------------------------------------------------------------------------------------------------ training
def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=not args.no_resume, log_lines=True, hooks=standard_hooks(cfg))
    if dist_info().is_main:  # under torchrun, one report
        print(json.dumps(result, indent=2))
    return 0


def cmd_distill(args) -> int:
    result = run_distill(args.method, args.teacher, args.overrides, config=args.config, resume=not args.no_resume,
                         log_lines=True, hooks=standard_hooks)
    print(json.dumps(result, indent=2))
    return 0


def cmd_demo(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(f"demo: training {cfg.train.steps} steps of batch {cfg.train.batch_size} on {cfg.data.dataset}; "
          f"outputs in {cfg.run_dir}", file=sys.stderr)
    result = run_demo(cfg, resume=not args.no_resume)
    print(json.dumps(result, indent=2))
    print(f"\npictures: {cfg.run_dir}/samples.png, forward_noising.png, denoising_trajectory.png, loss_curve.png",
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ sampling
def cmd_sample(args) -> int:
    denoiser, cfg, meta = load_denoiser(args.checkpoint, use_ema=args.use_ema is not False)
    s = _spec(cfg.sample, args)
    prompts = getattr(args, "prompt", None)
    check_prompt_spec(cfg, s, prompts)  # before any work: --prompt for a model without captions is refused
    shape = tuple(meta["data_shape"])
    out = _writable(Path(args.out) if args.out else cfg.run_dir / "samples")
    steps = grid_steps(s)  # an explicit --sigmas grid sets the step count, not sample.steps
    stem = f"{s.sampler}_{steps}steps_seed{s.seed}"
    if s.sr_checkpoint:
        return _sample_cascade(denoiser, shape, s, out, stem, meta)
    labels = None
    if cfg.captions.enabled:  # a text-conditioned model: sample i from prompt i mod P
        x = sample_prompts(denoiser, cfg, meta, shape, s, prompts, progress=sys.stderr.isatty())
        stem += "_prompts" if prompts else ""
    elif cfg.task == "joint":  # an (image, label) model: pairs, or images given a label by inpainting
        x, labels = sample_joint(denoiser, cfg, shape, s, progress=sys.stderr.isatty())
    else:
        codec = codec_for(cfg, meta, args.checkpoint)  # a model on latents: decode its samples
        x = generate(denoiser, shape, s, classifier=_classifier(s), progress=sys.stderr.isatty(),
                     decode=codec.decode if codec is not None else None)
    if s.class_label is not None:
        stem += f"_class{s.class_label}"
    if s.guidance != "none":
        stem += f"_{s.guidance}{s.guidance_scale:g}"
    files = viz.save_samples(x, out, stem)
    print(json.dumps({"n": s.n, "sampler": s.sampler, "steps": steps,
                      **({"sigmas": list(s.sigmas)} if s.sigmas else {"spacing": s.spacing}),
                      **({"prompts": prompts} if prompts else {}),
                      **({"labels": labels.tolist()} if labels is not None else {}),
                      "checkpoint_step": meta.get("step"), **files}, indent=2))
    return 0


def _sample_cascade(base, base_shape, s: SampleConfig, out: Path, stem: str, meta: dict) -> int:
    """`sample BASE --sr-checkpoint SR`: the two-stage cascade (torchdiffusion.edit.sample_cascade)."""
    sr, sr_cfg, _ = load_denoiser(s.sr_checkpoint, use_ema=s.use_ema)
    low, high = sample_cascade(base, sr, base_shape, net_input_shape(sr_cfg), s,
                               low_res=sr_cfg.diffusion.objective.low_res or None, progress=sys.stderr.isatty())
    stem += f"_sr_aug{s.sr_aug_sigma:g}"
    files = {"base": viz.save_samples(low, out, stem + "_base"), "cascade": viz.save_samples(high, out, stem)}
    k = min(8, s.n)
    files["pairs"] = str(viz.image_table([list(low[:k]), list(high[:k])], out / f"{stem}_pairs.png",
                                         row_titles=[f"base {low.shape[-1]}x{low.shape[-2]}",
                                                     f"SR {high.shape[-1]}x{high.shape[-2]}"]))
    print(json.dumps({"n": s.n, "sampler": s.sampler, "steps": grid_steps(s), "sr_aug_sigma": s.sr_aug_sigma,
                      "checkpoint_step": meta.get("step"), **files}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------- editing
def _edit_setup(args, *, step_sampler: bool = False):
    """(denoiser with the images' classes bound, images, sigmas, generators, sample config, out folder, sampler
    options) for the editing commands. The class comes from --class-label alone (default: the null class), not
    from the run's sample.class_label, which is about drawing new samples: an edited image has its own class. With
    `step_sampler`, a run sampler that is multistep is replaced by DEFAULT_STEP_SAMPLER (with a notice), unless
    --sampler asked for it (then it is refused)."""
    denoiser, cfg, meta = load_denoiser(args.checkpoint, use_ema=args.use_ema is not False)
    s = _spec(dataclasses.replace(cfg.sample, class_label=None), args)
    shape = tuple(meta["data_shape"])
    if len(shape) != 3:
        raise ValueError(f"editing needs an image model; this checkpoint holds data of shape {shape}")
    codec = codec_for(cfg, meta, args.checkpoint)
    images = load_images(args.images, codec.image_shape if codec else shape)  # (N, C, H, W)
    den, sigmas, opts, used = edit_plan(denoiser, shape, s, len(images), latent=codec is not None,
                                        step_sampler=step_sampler and args.sampler is None)
    if used.sampler != s.sampler:
        print(f"{args.command}: the run samples with {s.sampler!r}, which is multistep; using {used.sampler!r}"
              f" (--sampler chooses one of {', '.join(STEP_SAMPLERS)})", file=sys.stderr)
    out = _writable(Path(args.out) if args.out else cfg.run_dir / "edits")
    return den, images, sigmas, sample_generators(used.seed, len(images)), used, out, opts, Edits(codec)


def _edit_outputs(out: Path, name: str, rows: list, titles: list, result, **info) -> int:
    """A picture (one row per kind: input, ..., result; one column per image), the result as uint8 .npz, JSON."""
    out.mkdir(parents=True, exist_ok=True)
    png = viz.image_table([list(r) for r in rows], out / f"{name}.png", row_titles=titles)
    np.savez_compressed(out / f"{name}.npz", images=viz.to_uint8(result))
    print(json.dumps({**info, "picture": str(png), "npz": str(out / f"{name}.npz")}, indent=2))
    return 0


def cmd_inpaint(args) -> int:
    denoiser, images, sigmas, gens, s, out, opts, edits = _edit_setup(args, step_sampler=True)
    mask = make_mask(args.mask, tuple(images.shape[1:]))
    x = edits.inpaint(denoiser, images, mask, sigmas, sampler=s.sampler, resample=args.resample,
                      jump_length=args.jump_length, generator=gens, **opts)
    return _edit_outputs(out, "inpaint", [images, images * mask, x], ["original", "known", "inpainted"], x,
                         sampler=s.sampler, steps=s.steps, resample=args.resample, jump_length=args.jump_length)


def cmd_img2img(args) -> int:
    denoiser, images, sigmas, gens, s, out, opts, edits = _edit_setup(args)
    for st in args.strength:
        sdedit_sigmas(sigmas, st)  # check every strength before any work
    results = [edits.sdedit(denoiser, images, sigmas, st, sampler=s.sampler, generator=gens, **opts)
               for st in args.strength]
    return _edit_outputs(out, "img2img", [images, *results], ["input"] + [f"strength {st:g}" for st in args.strength],
                         torch.stack(results, 1).flatten(0, 1), sampler=s.sampler, steps=s.steps,
                         strength=args.strength)


def cmd_invert(args) -> int:
    denoiser, images, sigmas, _, s, out, _, edits = _edit_setup(args)
    z, rec = edits.invert(denoiser, images, sigmas, iters=args.iters)
    rmse = float((rec - images).pow(2).mean().sqrt())
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "inverted_noise.npz", noise=z.numpy(), sigma_max=float(sigmas[0]))
    return _edit_outputs(out, "invert", [images, rec], ["original", "reconstructed"], rec, steps=s.steps,
                         iters=args.iters, reconstruction_rmse=rmse, noise=str(out / "inverted_noise.npz"))


def cmd_interpolate(args) -> int:
    denoiser, images, sigmas, _, s, out, _, edits = _edit_setup(args)
    if len(images) != 2:
        raise ValueError(f"interpolate needs exactly 2 images, got {len(images)} from {args.images!r}")
    x = edits.interpolate(denoiser, images[0], images[1], sigmas, frames=args.frames, iters=args.iters)
    return _edit_outputs(out, "interpolation", [x], ["slerp"], x, steps=s.steps, frames=args.frames)


# ---------------------------------------------------------------------------------------- everything else
def cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


PREPARE = {"mnist": prepare_mnist, "fashion-mnist": prepare_fashion_mnist,  # prepare-data --dataset
           "shakespeare": prepare_shakespeare}


def cmd_prepare_data(args) -> int:
    if args.dataset in PREPARE:
        print(PREPARE[args.dataset](force=args.force))
    elif Path(args.dataset).exists():  # a UTF-8 text file or a folder of .txt files
        print(prepare_text(args.dataset, force=args.force))
    else:
        raise ValueError(f"unknown --dataset {args.dataset!r}; allowed values: {', '.join(sorted(PREPARE))}, or the "
                         "path of a UTF-8 text file or folder of .txt files")
    return 0


def _text_checkpoint(target: Path) -> Path | None:
    """The checkpoint file of `target` when it holds a text model (task text), else None."""
    path = target / "last.safetensors" if target.is_dir() else target
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return path if (read_meta(path).get("config") or {}).get("task") == "text" else None


def cmd_generate_text(args) -> int:
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TextSampleConfig)
               if getattr(args, f.name) is not None}
    result = generate_text(args.checkpoint, prompt=args.prompt or "", infill=args.infill or "",
                           use_ema=not args.no_ema, **options)
    for i, text in enumerate(result["samples"]):
        print(f"=== sample {i} ===\n{text}")
    ckpt = Path(args.checkpoint)
    run_dir = ckpt.parent.parent if ckpt.is_file() else ckpt.parent
    txt, js = write_text_samples(result, Path(args.out) if args.out else run_dir / "text")
    print(f"{result['model_calls']} model calls; wrote {txt} and {js}", file=sys.stderr)
    return 0


def _evaluate_text(path: Path, args) -> dict:
    """evaluate on a text checkpoint: bits per character of the test and validation splits."""
    seed = {} if args.seed is None else {"seed": args.seed}  # default: the evaluation's own TEXT_EVAL_SEED
    result = evaluate_text_checkpoint(path, draws=args.draws, batch_size=args.batch_size or 64,
                                      use_ema=args.use_ema is not False, **seed)
    print(format_text_table(result))
    return result


def cmd_train_feature_net(args) -> int:
    path = feature_net_path(args.dataset)
    if path.exists() and not args.force:
        acc = feature_net_metadata(args.dataset)["test_accuracy"]
        print(f"feature network exists: {path} (test accuracy {acc:.4f}); --force retrains it")
        return 0
    path = train_feature_net(args.dataset, epochs=args.epochs, seed=args.seed, progress=sys.stderr.isatty())
    print(f"{args.dataset} test accuracy {feature_net_metadata(args.dataset, path=path)['test_accuracy']:.4f}; "
          f"saved to {path}")
    return 0


def cmd_evaluate(args) -> int:
    which = tuple(w for w in (args.likelihood or "").split(",") if w)
    target = Path(args.target)
    text = _text_checkpoint(target)
    if text is not None:
        result = _evaluate_text(text, args)
    elif target.suffix == ".safetensors" or (target.is_dir() and (target / "last.safetensors").exists()):
        overrides = {k: v for k, v in _sample_overrides(args).items() if k != "n"}
        result = evaluate_checkpoint(target, n=args.n, likelihood=which, likelihood_n=args.likelihood_n,
                                     rtol=args.rtol, progress=sys.stderr.isatty(), seeds=args.seeds,
                                     floor_draws=args.floor_draws, n_ref=args.n_ref, **overrides)
    else:
        if which or args.seeds:
            raise ValueError("--likelihood and --seeds need a checkpoint, not a set of samples")
        x, note = load_samples(target)
        x = x[: args.n] if args.n else x
        label = None if args.class_label in (None, NONE_ARG) else args.class_label   # the classes the file asked for
        labels = class_labels_for(len(x), label, num_classes(args.dataset))
        print(f"read {note}; " + ("unconditional (no --class-label): random floor draws" if labels is None else
                                   f"--class-label {label}: the floor has the same class counts"), file=sys.stderr)
        result = {"samples": str(target), **evaluate_samples(x, args.dataset, labels=labels, n_ref=args.n_ref,
                                                             floor_draws=args.floor_draws, seed=args.seed or 0)}
    if text is None:
        print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    denoiser, cfg, meta = load_denoiser(args.checkpoint, use_ema=not args.no_ema)
    shape = tuple(meta["data_shape"])
    out = Path(args.out) if args.out else cfg.run_dir / "export" / args.format
    if args.format == "diffusers":
        path = export_diffusers(denoiser, out, clip_sample=cfg.sample.clip_x0)
    else:
        path = export(denoiser, out if out.suffix else out / f"denoiser{SUFFIXES[args.format]}", shape, args.format,
                      num_classes=getattr(denoiser, "num_classes", None))
    print(json.dumps({"format": args.format, "path": str(path), "shape": list(shape),
                      "inputs": input_names(getattr(denoiser, "num_classes", None) is not None),
                      **({"opset": ONNX_OPSET} if args.format == "onnx" else {})}, indent=2))
    return 0


def cmd_report(args) -> int:
    print(write_report(args.run_dir, args.out))
    return 0


def cmd_bench(args) -> int:
    """`torchdiffusion bench NAME ARGS`: runs `python bench/<name>.py ARGS` of a source checkout."""
    check_choice("benchmark", args.which, BENCHMARKS)
    script = BENCH_DIR / BENCHMARKS[args.which]
    if not script.is_file():
        raise FileNotFoundError(f"the benchmarks live in the source checkout's bench/ folder, not in the installed "
                                f"package; run `python bench/{BENCHMARKS[args.which]}` from a clone")
    print(f"torchdiffusion bench: running python {script}", file=sys.stderr)
    return load_bench(script.stem).main(args.rest) or 0


def load_bench(name: str, folder: str | Path = BENCH_DIR):
    """The benchmark script `folder`/<name>.py as a module (the benchmarks are scripts outside the package; a
    benchmark that uses another passes its own folder)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _add_run_commands(sub) -> None:
    """train, demo, sample, config, prepare-data."""
    t = sub.add_parser("train", help="train a model (continues the run in out_dir/name if one exists)")
    _add_config_args(t, None)
    t.add_argument("--no-resume", action="store_true", help="start over (an earlier run in the same folder is moved aside, not deleted)")
    t.set_defaults(func=cmd_train)

    ds = sub.add_parser("distill", help="train a few-step student of a teacher checkpoint (docs/fewstep.md); the same "
                        "command again continues it")
    ds.add_argument("method", help=" | ".join(METHODS))
    ds.add_argument("teacher", help=f"the teacher checkpoint ('{NO_TEACHER}': none, for "
                    f"{' and '.join(m for m, v in METHODS.items() if v.teacher == 'none')}, on --config)")
    ds.add_argument("--config", default=None, help="for a method without a teacher: the run to train, a preset "
                    f"({', '.join(presets())}) or a YAML file")
    ds.add_argument("overrides", nargs="*", metavar="key=value", help="change any config field, e.g. train.steps=500 "
                    "distill.levels=40")
    ds.add_argument("--no-resume", action="store_true", help="start over (an earlier student is moved aside)")
    ds.set_defaults(func=cmd_distill)

    d = sub.add_parser("demo", help="train the MNIST demo and write pictures to outputs/demo")
    _add_config_args(d, "demo")
    d.add_argument("--no-resume", action="store_true", help="start over (an earlier demo run is moved aside, not deleted)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="draw samples from a checkpoint: a grid PNG and an .npz")
    s.add_argument("checkpoint", help="a .safetensors checkpoint or a run's checkpoints folder")
    s.add_argument("--out", default=None, help="output folder (default: the run's samples/ folder)")
    s.add_argument("--prompt", action="append", default=None,
                   help="a text-conditioned checkpoint: the caption to draw (repeatable: sample i gets prompt i mod P; "
                   "none: unconditional); with --guidance cfg, guided against the empty caption")
    _add_sample_args(s)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    _add_config_args(c, None)
    c.set_defaults(func=cmd_config)

    pd = sub.add_parser("prepare-data", help="download / unpack MNIST, Fashion-MNIST or Shakespeare, or split a "
                        "text file or folder, into the cache")
    pd.add_argument("--dataset", default="mnist", help=f"{', '.join(sorted(PREPARE))}, or the path of a UTF-8 text "
                    "file or folder of .txt files (default: mnist)")
    pd.add_argument("--force", action="store_true", help="rebuild the cached file")
    pd.set_defaults(func=cmd_prepare_data)


def _add_edit_commands(sub) -> None:
    """inpaint, img2img, invert, interpolate: one checkpoint, some images, the edit's own options."""
    def edit_parser(name: str, help: str):
        e = sub.add_parser(name, help=help)
        e.add_argument("checkpoint", help="a .safetensors checkpoint of an image model")
        e.add_argument("--images", required=True,
                       help="an image file, a .npz file, or DATASET:INDICES such as mnist-test:0-7")
        e.add_argument("--out", default=None, help="output folder (default: the run's edits/ folder)")
        _add_sample_args(e, EDIT_SAMPLE_FIELDS)
        e.set_defaults(func=globals()[f"cmd_{name}"])
        return e

    e = edit_parser("inpaint", "fill masked pixels (replacement, or RePaint resampling with --resample)")
    e.add_argument("--mask", required=True, help="pixels to fill: left, right, top, bottom, center, outside, or a "
                   "mask image / .npz whose nonzero pixels are known")
    e.add_argument("--resample", type=int, default=1, help="RePaint: passes over each block of levels (1: replacement)")
    e.add_argument("--jump-length", type=int, default=10, help="RePaint: levels per block (default: 10)")
    e = edit_parser("img2img", "SDEdit: noise the images to a level, then denoise")
    e.add_argument("--strength", type=float, nargs="+", default=[0.5],
                   help="fractions of the sigma grid in (0, 1] to noise to (default: 0.5)")
    e = edit_parser("invert", "DDIM inversion: the noise that DDIM maps to each image, and the reconstruction")
    e.add_argument("--iters", type=int, default=0, help="fixed-point refinements per inversion step (default: 0)")
    e = edit_parser("interpolate", "invert two images, slerp their noises, decode with DDIM")
    e.add_argument("--frames", type=int, default=8, help="images in the strip, both ends included (default: 8)")
    e.add_argument("--iters", type=int, default=0, help="fixed-point refinements per inversion step (default: 0)")


def _add_eval_commands(sub) -> None:
    """train-feature-net (and its old name), evaluate, bench."""
    for name in ("train-feature-net", *RENAMED):
        tc = sub.add_parser(name, help="train the evaluation feature network of a data set (into the cache)"
                            if name not in RENAMED else f"old name of {RENAMED[name]}")
        tc.add_argument("--dataset", default="mnist", choices=FEATURE_DATASETS, help="which data set (default: mnist)")
        tc.add_argument("--epochs", type=int, default=None, help="training epochs (default: the data set's recipe, 3)")
        tc.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and shifts")
        tc.add_argument("--force", action="store_true", help="retrain even if the cached feature network exists")
        tc.set_defaults(func=cmd_train_feature_net)

    ev = sub.add_parser("evaluate", help="FD, FD-infinity, KID, precision/recall beside the matched real floor, class "
                        "coverage (and bits/dim) of a checkpoint or of samples (.npz or folder of PNGs); see "
                        "docs/evaluation.md. A text checkpoint: bits per character of its test and validation splits "
                        "(docs/text.md)")
    ev.add_argument("target", help="a .safetensors checkpoint, an .npz of samples (key 'samples') or a PNG folder")
    ev.add_argument("--n", type=int, default=1000, help="samples to draw from a checkpoint (default: 1000)")
    ev.add_argument("--likelihood", default="", help="comma-separated: vlb, ode (checkpoints only; slow)")
    ev.add_argument("--likelihood-n", type=int, default=256, help="test images for bits/dim (default: 256)")
    ev.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="two or more sampling seeds: one sample set each, spreads across them (default: one set, "
                         "bootstrap spreads)")
    ev.add_argument("--floor-draws", type=int, default=FLOOR_DRAWS,
                    help=f"real floor sets drawn from the training split (default: {FLOOR_DRAWS})")
    ev.add_argument("--n-ref", type=int, default=None,
                    help="reference images (default: the whole test split; else that many fixed test images)")
    ev.add_argument("--dataset", default="mnist", choices=FEATURE_DATASETS,
                    help="data set of a samples file (a checkpoint evaluates against its run's; default: mnist)")
    ev.add_argument("--rtol", type=float, default=1e-3, help="ODE solver tolerance (rtol = atol; default: 1e-3)")
    ev.add_argument("--draws", type=int, default=None, help="text checkpoints (mdlm, d3pm): Monte Carlo time draws "
                    "per window of the bound (default: the run's text.eval_draws; ar is exact)")
    ev.add_argument("--out", default=None, help="write the results as JSON here")
    _add_sample_args(ev, EVAL_SAMPLE_FIELDS)
    ev.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("bench", help="run a benchmark of a source checkout: "
                                     f"{', '.join(BENCHMARKS)} (python bench/<name>.py; see docs/benchmarks.md)")
    b.add_argument("which", help=" or ".join(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help of each)")
    b.set_defaults(func=cmd_bench)
    x = sub.add_parser("export", help="write a checkpoint's denoiser as a diffusers pipeline folder, an ONNX graph or a "
                                      "TorchScript module (docs/interop.md)")
    x.add_argument("checkpoint", help="a .safetensors checkpoint (or a diffusers folder, for onnx / torchscript)")
    x.add_argument("--format", required=True, choices=("diffusers", *FORMATS), help="what to write")
    x.add_argument("--out", default=None, help="output folder or file (default: the run's export/<format>/)")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    x.set_defaults(func=cmd_export)
    _add_generate_text(sub)
    r = sub.add_parser("report", help="write a self-contained HTML page about a run (RUN_DIR/report.html)")
    r.add_argument("run_dir", help="a run folder (out_dir/name)")
    r.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    r.set_defaults(func=cmd_report)


def _add_generate_text(sub) -> None:
    """generate-text: one flag per TextSampleConfig field (defaults: the run's text.sample)."""
    g = sub.add_parser("generate-text", help="generate text from a text checkpoint (mdlm, d3pm or ar; docs/text.md): "
                       "prints the samples and writes samples.txt and samples.json")
    g.add_argument("checkpoint", help="a text .safetensors checkpoint or a run's checkpoints folder")
    for f in dataclasses.fields(TextSampleConfig):
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=None,
                       help=f"(default: the run's text.sample.{f.name}, else {f.default!r})")
    g.add_argument("--prompt", default=None, help="fixed text at the start; the rest is generated")
    g.add_argument("--infill", default=None, help="a template: each blank character (--blank, default "
                   "'_') is a position to generate, every other character is kept (mdlm, d3pm only)")
    g.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA ones")
    g.add_argument("--out", default=None, help="output folder (default: the run's text/ folder)")
    g.set_defaults(func=cmd_generate_text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchdiffusion", description="Diffusion models in PyTorch.")
    p.add_argument("--version", action="version", version=f"torchdiffusion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_edit_commands(sub)
    _add_eval_commands(sub)
    add_forecast_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options too
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in RENAMED:
        print(f"note: `torchdiffusion {args.command}` is now `torchdiffusion {RENAMED[args.command]}`", file=sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"torchdiffusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
