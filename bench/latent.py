"""Latent diffusion on a CPU: how well the autoencoders reconstruct, and latent against pixel diffusion at equal
CPU-minutes of diffusion training.

``recon``: one autoencoder per (data set, factor f, KL weight), the ``<dataset>-vae`` preset (docs/latent.md) with
f and the KL weight changed, trained for ``--ae-minutes`` each (steps set from the timed step so that the cosine
decay completes in the budget). Reported on held-out test images (``evaluate.reconstruction``): PSNR, SSIM, rFD
against a fixed reference of other test images beside the real-vs-real floor (training images of the same classes)
and their ratio.

``versus``: the pixel model (the mnist-10min recipe's U-Net) and the latent model (the ``<dataset>-latent`` preset
on that data set's f = 4 autoencoder, trained first for ``--vae-minutes``) each trained for every budget of
``--pixel-minutes`` / ``--latent-minutes``, sampled as their presets sample (DPM-Solver++(2M) SDE, Karras, 20 NFE,
sample i asks for class i mod 10): FD over the matched floor, and sampling milliseconds per image (the latent
model's include decoding).

    python bench/latent.py recon --json outputs/latent_recon.json                    # both data sets, f 2 and 4
    python bench/latent.py versus --datasets mnist --json outputs/latent_versus.json
    python bench/latent.py all --quick --datasets mnist                              # a smoke run, seconds per row

Runs are kept under ``--out-dir``; ``--reuse`` takes a finished run there instead of training it again. The data
set needs its feature network in the cache (``torchdiffusion train-feature-net --dataset NAME``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchdiffusion.app.cli import load_bench
from torchdiffusion.build import codec_for, load_codec, load_denoiser
from torchdiffusion.checkpoint import read_meta
from torchdiffusion.config import load_config
from torchdiffusion.evaluate import evaluate_samples
from torchdiffusion.evaluate.quality import split_dataset
from torchdiffusion.evaluate.reconstruction import evaluate_reconstructions, held_out_test_indices, reconstruct
from torchdiffusion.guidance import requested_labels
from torchdiffusion.nets import count_parameters
from torchdiffusion.sampling import generate
from torchdiffusion.training import Trainer
from torchdiffusion.utils import check_choice
from torchdiffusion import viz

DATASETS = ("mnist", "fashion-mnist")
VAE_PRESET = {"mnist": "mnist-vae", "fashion-mnist": "fashion-vae"}
LATENT_PRESET = {"mnist": "mnist-latent", "fashion-mnist": "fashion-latent"}
PIXEL_RECIPE = "mnist-10min"
CHANNEL_MULT = {2: "[1, 2]", 4: "[1, 2, 4]"}   # encoder levels per factor (the preset's widths)
KL_WEIGHTS = (1e-6, 1e-5, 1e-4, 1e-3)
KINDS = ("pixel", "latent")
BUDGET_FILL = 0.95    # fraction of the budget the step count aims at (the cosine nearly completes)
TIMED_STEPS = 4
PICTURE_IMAGES = 10   # held-out test images in each autoencoder's picture
GRID_SAMPLES = 100    # samples in each versus row's grid (10 per class)
QUICK = dict(ae_minutes=0.05, vae_minutes=0.05, pixel_minutes=[0.05], latent_minutes=[0.05], samples=64,
             recon_n=200, floor_draws=2, bootstrap=10)


BENCH = Path(__file__).parent  # this folder: the benchmarks used here
speed = load_bench("train_speed", BENCH)
machine = load_bench("backbones", BENCH).machine


def timed_config(preset: str, overrides: list, minutes: float, *, quick: bool = False):
    """The preset with `overrides`, its step count set so that the cosine completes in `minutes` at the speed of
    its real training step (timed here on the real data: TIMED_STEPS after one warm-up)."""
    cfg = load_config(preset, overrides + [f"train.max_minutes={minutes}"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(replace(cfg, out_dir=tmp, name="timing"), progress=False, resume=False)
        try:
            sec = statistics.median(speed.time_steps(tr, TIMED_STEPS, warmup=1))
            params = count_parameters(tr.net)
        finally:
            tr.close()
    steps = max(2, int(BUDGET_FILL * minutes * 60 / sec))
    t = replace(cfg.train, steps=steps)
    if quick:
        t = replace(t, warmup_steps=min(t.warmup_steps, max(1, steps // 10)))
    return replace(cfg, train=t), {"params": params, "step_seconds": round(sec, 4), "planned_steps": steps}


def train(cfg, info: dict, *, reuse: bool, log) -> dict:
    """Train the run (or take the finished one in its folder with `reuse`); the run's summary."""
    ckpt = cfg.run_dir / "checkpoints" / "last.safetensors"
    if reuse and ckpt.is_file():
        meta = read_meta(ckpt)
        log(f"{cfg.name}: reusing {ckpt} (step {meta.get('step')})")
        return {**info, "steps": meta.get("step"), "train_seconds": None, "reused": True, "checkpoint": str(ckpt)}
    log(f"{cfg.name}: {info['params'] / 1e6:.2f} M parameters, {info['step_seconds']} s/step -> "
        f"train.steps={info['planned_steps']} in {cfg.train.max_minutes} min")
    fit = Trainer(cfg, progress=False, log_lines=True, resume=False).fit()
    return {**info, "steps": fit["steps"], "train_seconds": round(fit["seconds"], 1), "checkpoint": str(ckpt)}


# ---------------------------------------------------------------------------------------------- reconstruction
def vae_config(dataset: str, factor: int, kl: float, minutes: float, out_dir: str, quick: bool = False):
    over = [f"out_dir={out_dir}", f"name={dataset}-vae-f{factor}-kl{kl:g}", f"model.autoencoder.factor={factor}",
            f"model.autoencoder.channel_mult={CHANNEL_MULT[factor]}", f"autoencoder_loss.kl_weight={kl}",
            "train.sample_every=0"]
    return timed_config(VAE_PRESET[dataset], over, minutes, quick=quick)


def recon_row(dataset: str, factor: int, kl: float, *, ae_minutes: float, recon_n: int, floor_draws: int,
              bootstrap: int, out_dir: str, reuse: bool, quick: bool, log) -> dict:
    cfg, info = vae_config(dataset, factor, kl, ae_minutes, out_dir, quick)
    run = train(cfg, info, reuse=reuse, log=log)
    codec = load_codec(run["checkpoint"])
    res = evaluate_reconstructions(codec, dataset, n=recon_n, floor_draws=floor_draws, bootstrap=bootstrap)
    picture = autoencoder_picture(codec, dataset, cfg.run_dir / "bench_reconstructions.png",
                                  title=f"{dataset}, f = {factor}, KL weight {kl:g}")
    return {"picture": str(picture), "dataset": dataset, "factor": factor, "kl_weight": kl, "latent_shape": list(codec.latent_shape),
            "latent_scale": round(codec.scale, 4), **run, **res}


def autoencoder_picture(codec, dataset: str, path: Path, title: str = "") -> Path:
    """Held-out test images (the first of those `evaluate_reconstructions` scores), their reconstructions (the
    posterior mean) and the latent channels."""
    x = split_dataset(dataset, "test").batch(held_out_test_indices(dataset, PICTURE_IMAGES))[0]
    with torch.no_grad():
        return viz.autoencoder_table(x, reconstruct(codec, x), codec.encode(x), path, title=title)


def format_recon(rows: list) -> str:
    head = (f"{'data':<13} {'f':>2} {'KL':>7} {'latent':>8} {'steps':>6} {'PSNR dB':>8} {'SSIM':>6} {'rFD':>7} "
            f"{'floor':>6} {'rFD/floor':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = "x".join(map(str, r["latent_shape"]))
        lines.append(f"{r['dataset']:<13} {r['factor']:>2} {r['kl_weight']:>7.0e} {lat:>8} {r['steps']:>6} "
                     f"{r['psnr']:>8.2f} {r['ssim']:>6.3f} {r['fd']:>7.2f} {r['fd_floor']:>6.2f} "
                     f"{r['fd_ratio']:>9.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- latent vs pixel
def sample_figures(ckpt: str, dataset: str, n: int, floor_draws: int, bootstrap: int, seed: int = 0) -> dict:
    """Samples as the run's preset samples them (decoded for a latent model), timed, scored with the matched
    floor."""
    den, cfg, meta = load_denoiser(ckpt)
    codec = codec_for(cfg, meta, ckpt)
    shape = tuple(meta["data_shape"])
    labels = requested_labels(n, cfg.sample.class_label, cfg.sample.guidance, den.num_classes)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = generate(den, shape, cfg.sample, n=n, labels=labels, seed=seed,
                     decode=codec.decode if codec is not None else None)
    ms = 1000 * (time.perf_counter() - t0) / n
    grid = viz.save_grid(x[:GRID_SAMPLES], Path(ckpt).parents[1] / "bench_samples.png", nrow=10)
    res = evaluate_samples(x, dataset, labels=labels, seed=seed, floor_draws=floor_draws, bootstrap=bootstrap)
    keys = ("fd", "fd_std", "fd_floor", "fd_floor_std", "fd_ratio", "fd_ratio_std", "accuracy")
    return {"samples": n, "ms_per_image": round(ms, 2), "nfe": cfg.sample.steps, "grid": str(grid),
            **{k: res[k] for k in keys}}


def versus_rows(dataset: str, *, vae_minutes: float, pixel_minutes, latent_minutes, samples: int, floor_draws: int,
                bootstrap: int, out_dir: str, reuse: bool, quick: bool, autoencoder: str | None, log,
                kinds=KINDS) -> list:
    rows = []
    vae_seconds = None
    if "latent" in kinds and autoencoder is None:
        cfg, info = timed_config(VAE_PRESET[dataset], [f"out_dir={out_dir}", f"name={dataset}-vae",
                                                       "train.sample_every=0"], vae_minutes, quick=quick)
        vae = train(cfg, info, reuse=reuse, log=log)
        autoencoder = vae["checkpoint"]
        vae_seconds = vae["train_seconds"]
    for kind, budgets in (("pixel", pixel_minutes), ("latent", latent_minutes)):
        if kind not in kinds:
            continue
        for m in budgets:
            over = [f"out_dir={out_dir}", f"name={dataset}-{kind}-{m:g}min", "train.sample_every=0"]
            if kind == "pixel":
                cfg, info = timed_config(PIXEL_RECIPE, over + [f"data.dataset={dataset}"], m, quick=quick)
            else:
                cfg, info = timed_config(LATENT_PRESET[dataset], over + [f"data.autoencoder={autoencoder}"], m,
                                         quick=quick)
            run = train(cfg, info, reuse=reuse, log=log)
            row = {"dataset": dataset, "kind": kind, "minutes": m, **run,
                   **sample_figures(run["checkpoint"], dataset, samples, floor_draws, bootstrap)}
            if kind == "latent":
                row.update(autoencoder=autoencoder, autoencoder_train_seconds=vae_seconds)
            rows.append(row)
    return rows


def format_versus(rows: list) -> str:
    head = (f"{'data':<13} {'model':<7} {'min':>5} {'params':>7} {'steps':>6} {'FD':>7} {'floor':>6} "
            f"{'FD/floor':>8} {'acc':>6} {'ms/img':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dataset']:<13} {r['kind']:<7} {r['minutes']:>5g} {r['params'] / 1e6:>6.2f}M "
                     f"{r['steps']:>6} {r['fd']:>7.2f} {r['fd_floor']:>6.2f} {r['fd_ratio']:>8.2f} "
                     f"{r['accuracy']:>6.3f} {r['ms_per_image']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/latent.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("recon", "versus", "all"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"from {', '.join(DATASETS)}")
    p.add_argument("--factors", nargs="+", type=int, default=[2, 4], help="autoencoder factors (recon)")
    p.add_argument("--kl", nargs="+", type=float, default=list(KL_WEIGHTS), help="KL weights (recon)")
    p.add_argument("--ae-minutes", type=float, default=4.0, help="training minutes per recon autoencoder")
    p.add_argument("--vae-minutes", type=float, default=10.0, help="minutes of the versus part's autoencoder")
    p.add_argument("--autoencoder", help="versus: an autoencoder checkpoint to use instead of training one")
    p.add_argument("--pixel-minutes", nargs="+", type=float, default=[10, 30])
    p.add_argument("--latent-minutes", nargs="+", type=float, default=[5, 10, 15, 30])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), help=f"versus: the models to train, from "
                                                                     f"{', '.join(KINDS)}")
    p.add_argument("--samples", type=int, default=1000, help="samples per versus row")
    p.add_argument("--recon-n", type=int, default=2000, help="held-out test images reconstructed per recon row")
    p.add_argument("--floor-draws", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reuse", action="store_true", help="take finished runs in --out-dir instead of retraining")
    p.add_argument("--quick", action="store_true", help="smoke setting: " + ", ".join(f"{k}={v}" for k, v in
                                                                                      QUICK.items()))
    p.add_argument("--out-dir", default="outputs/bench_latent")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for d in args.datasets:
        check_choice("dataset", d, DATASETS)
    for f in args.factors:
        check_choice("factor", f, CHANNEL_MULT)
    for k in args.kinds:
        check_choice("kind", k, KINDS)
    if args.autoencoder and len(args.datasets) != 1:
        p.error("--autoencoder belongs to one data set: name that one with --datasets")
    opts = {k: getattr(args, k) for k in ("ae_minutes", "vae_minutes", "pixel_minutes", "latent_minutes", "samples",
                                          "recon_n", "floor_draws", "bootstrap")}
    if args.quick:
        opts.update(QUICK)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}; {opts}")
    common = dict(floor_draws=opts["floor_draws"], bootstrap=opts["bootstrap"], out_dir=args.out_dir,
                  reuse=args.reuse, quick=args.quick, log=log)
    out = {**info, "options": opts}
    if args.part in ("recon", "all"):
        out["recon"] = [recon_row(d, f, kl, ae_minutes=opts["ae_minutes"], recon_n=opts["recon_n"], **common)
                        for d in args.datasets for f in args.factors for kl in args.kl]
        print(format_recon(out["recon"]))
    if args.part in ("versus", "all"):
        out["versus"] = [r for d in args.datasets for r in versus_rows(
            d, vae_minutes=opts["vae_minutes"], pixel_minutes=opts["pixel_minutes"],
            latent_minutes=opts["latent_minutes"], samples=opts["samples"], autoencoder=args.autoencoder,
            kinds=args.kinds, **common)]
        print(format_versus(out["versus"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
