"""Command line: ``torchdiffusion {train,sample,demo,config,prepare-data,bench}``.

Run options come from the configuration dataclasses (``torchdiffusion.config``): give a preset or a YAML
file with ``--config`` and change any field with ``key=value`` (e.g. ``train.steps=500 model.unet.channels=64``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from .config import ConfigError, SampleConfig, load_config, presets, to_dict


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"a preset ({', '.join(presets())}) or a YAML file" + (f" (default: {default})" if default else ""))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change any config field, e.g. train.steps=500")


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    """One flag per SampleConfig field, so the sampling options live in one place."""
    for f in dataclasses.fields(SampleConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: from the run, else {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default: from the run, else {f.default})")


def cmd_train(args) -> int:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=not args.no_resume, log_lines=True)
    print(json.dumps(result, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    cfg = load_config(args.config, args.overrides)
    print(f"demo: training {cfg.train.steps} steps of batch {cfg.train.batch_size} on {cfg.data.dataset}; "
          f"outputs in {cfg.run_dir}", file=sys.stderr)
    result = run_demo(cfg, resume=not args.no_resume)
    print(json.dumps(result, indent=2))
    print(f"\npictures: {cfg.run_dir}/samples.png, forward_noising.png, denoising_trajectory.png, loss_curve.png",
          file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    from .demo import save_samples
    from .pipeline import generate, load_denoiser, sample_kwargs

    denoiser, cfg, meta = load_denoiser(args.checkpoint, use_ema=args.use_ema is not False)
    s = dataclasses.replace(cfg.sample, **{k: v for k, v in vars(args).items()
                                           if k in {f.name for f in dataclasses.fields(SampleConfig)} and v is not None})
    shape = tuple(meta["data_shape"])
    x = generate(denoiser, shape, n=s.n, progress=sys.stderr.isatty(), **sample_kwargs(s, shape))
    out = Path(args.out) if args.out else cfg.run_dir / "samples"
    stem = f"{s.sampler}_{s.steps}steps_seed{s.seed}"
    if len(shape) == 3:
        files = save_samples(x, out, stem)
    else:
        import numpy as np

        from . import viz

        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / f"{stem}.npz", samples=x.numpy())
        files = {"npz": str(out / f"{stem}.npz"), "plot": str(viz.scatter_2d(x, out / f"{stem}.png"))}
    print(json.dumps({"n": s.n, "sampler": s.sampler, "steps": s.steps, "spacing": s.spacing,
                      "checkpoint_step": meta.get("step"), **files}, indent=2))
    return 0


def cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_prepare_data(args) -> int:
    from .data import prepare_mnist

    path = prepare_mnist(force=args.force)
    print(path)
    return 0


def cmd_bench(args) -> int:
    if args.which == "samplers":
        from .sampling.benchmark import main as bench_main

        return bench_main(args.rest) or 0
    raise ConfigError(f"unknown benchmark {args.which!r}; allowed values: 'samplers'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchdiffusion", description="Diffusion models in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (continues the run in out_dir/name if one exists)")
    _add_config_args(t, None)
    t.add_argument("--no-resume", action="store_true", help="start over (an earlier run in the same folder is moved aside, not deleted)")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train the MNIST demo and write pictures to outputs/demo")
    _add_config_args(d, "demo")
    d.add_argument("--no-resume", action="store_true", help="start over (an earlier demo run is moved aside, not deleted)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="draw samples from a checkpoint: a grid PNG and an .npz")
    s.add_argument("checkpoint", help="a .safetensors checkpoint or a run's checkpoints folder")
    s.add_argument("--out", default=None, help="output folder (default: the run's samples/ folder)")
    _add_sample_args(s)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    _add_config_args(c, None)
    c.set_defaults(func=cmd_config)

    pd = sub.add_parser("prepare-data", help="download / unpack MNIST into the cache")
    pd.add_argument("--force", action="store_true", help="rebuild the cached file")
    pd.set_defaults(func=cmd_prepare_data)

    b = sub.add_parser("bench", help="benchmarks (samplers: exact Gaussian-mixture sampler benchmark)")
    b.add_argument("which", help="samplers")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help of each)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options too
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
