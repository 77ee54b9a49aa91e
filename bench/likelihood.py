"""Likelihood at equal CPU-minutes: four ways to train for bits/dim on MNIST and Fashion-MNIST, each budget a
separate run, then test bits/dim by the variational bound and by the probability-flow ODE, and sample quality.

The objectives (``diffusion.objective.kind``, docs/likelihood.md), all on the same U-Net (the mnist-10min one:
channels 32, mult [1, 2, 2], one residual block per level, attention at 7x7, class-conditional with null-class
dropout 0.1, 1.19 M parameters) with the same batch 64, AdamW lr 2e-3 and EMA 0.995:

* simple: the mnist-hybrid / fashion-hybrid preset with ``kind=simple`` and no variance channels: the eps loss of
  Ho et al. 2020 with fixed variances on Improved DDPM's cosine schedule (T = 1000), i.e. the baseline of
  Nichol & Dhariwal 2021 on their own schedule (fairer than mnist-10min, whose linear schedule and min-SNR
  weighting would change two things at once).
* hybrid: the preset as it is, L_simple + 0.001 L_vlb with learned variances (their eq. 16).
* vlb: the preset with ``kind=vlb``, L_vlb alone with importance-sampled t (their Sec. 3.3).
* vdm: the mnist-vdm / fashion-vdm preset, VDM's continuous-time ELBO with a learned noise schedule (Kingma et al.
  2021); the same U-Net without variance channels.

Parameters: 1,192,641 for simple; hybrid and vlb add 289 (the variance channels of the last convolution), vdm
3,076 (its learned schedule, trained with the network).

The budget of a row is ``--minutes`` of the process's CPU time (``train.lr_schedule_over=time``, ``train.clock=cpu``,
``train.max_minutes``: the learning rate decays over it and other jobs do not shorten it); ``train.steps`` is only a
cap, STEP_CAP = 2 x the steps a timed step fits in the budget: the learning rate follows the time, so the cap only
has to stay out of the way (a step timed while another job shared the core once capped a row at 77 % of its time).

Per row, on the first ``--eval-images`` images of the test split's likelihood permutation (the one
``torchdiffusion evaluate --likelihood`` uses, seed ``LIKELIHOOD_SEED``), it reports, unconditionally (the null class):

* bound: bits/dim by the variational bound ``vlb_bits_per_dim`` on the full T = 1000 grid (or ``--vlb-steps``
  respaced). simple: the DDPM bound with the fixed variance beta_t; hybrid, vlb: with the learned variance;
  vdm: its own ELBO (continuous time, or ``--vlb-steps`` steps). It bounds the discrete NLL of the 8-bit images
  (the decoder is a probability mass), so no dequantisation enters. Standard error over images.
* ODE: bits/dim of the probability-flow ODE (``ode_bits_per_dim``, Hutchinson trace, ``--ode-rtol``) on the first
  ``--ode-images`` of the same images, each dequantised uniformly once (``dequantize``), plus log2(127.5): a bound
  on the same discrete NLL in expectation. It applies to every objective. Standard error over images.
* FD of ``--samples`` samples (class i mod 10) drawn with the preset's sampler, beside the matched real-vs-real
  floor and their ratio (``evaluate.evaluate_samples``); the presets sample ancestrally (``ddpm``) on 50 respaced
  steps, with the learned variance for hybrid and vlb (Improved DDPM, Sec. 4), beta_tilde for simple, and 50 levels
  uniform in the learned t for vdm. The simple model is also sampled by DDPM at ``--reference-steps`` (1000, every
  level of its T): the fixed-variance reference that learned-variance ancestral sampling at 50 steps should match.

Anchors (not measured here): dequantised MNIST, RealNVP 1.06, Glow 1.05, FFJORD 0.99 bits/dim (Grathwohl et al.
2019, Table 2); CIFAR-10, Improved DDPM 2.94 (Nichol & Dhariwal 2021), VDM 2.65 (Kingma et al. 2021). Goal: MNIST
below 1.0 bits/dim within 60 CPU-minutes.

    python bench/likelihood.py --json outputs/bench_likelihood.json       # both data sets, 4 objectives, 30 and 60 min
    python bench/likelihood.py --datasets mnist --objectives hybrid vdm --minutes 30
    python bench/likelihood.py --reuse --json outputs/bench_likelihood.json   # re-measure the runs already trained
    python bench/likelihood.py --quick --datasets mnist                    # a smoke run: seconds per row

The data set needs its feature network in the cache (``torchdiffusion train-feature-net --dataset NAME``).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchdiffusion.app.cli import load_bench
from torchdiffusion.build import load_denoiser
from torchdiffusion.config import load_config
from torchdiffusion.evaluate import evaluate_samples
from torchdiffusion.evaluate.likelihood import ode_bits_per_dim, vlb_bits_per_dim
from torchdiffusion.evaluate.quality import real_images
from torchdiffusion.evaluate.report import LIKELIHOOD_SEED
from torchdiffusion.guidance import requested_labels
from torchdiffusion.nets import count_parameters
from torchdiffusion.sampling import generate
from torchdiffusion.training import Trainer
from torchdiffusion.utils import check_choice, hash_seed

DATASETS = ("mnist", "fashion-mnist")
PRESETS = {  # objective -> the preset per data set
    "simple": {"mnist": "mnist-hybrid", "fashion-mnist": "fashion-hybrid"},
    "hybrid": {"mnist": "mnist-hybrid", "fashion-mnist": "fashion-hybrid"},
    "vlb": {"mnist": "mnist-hybrid", "fashion-mnist": "fashion-hybrid"},
    "vdm": {"mnist": "mnist-vdm", "fashion-mnist": "fashion-vdm"},
}
OBJECTIVES = {  # objective -> overrides of its preset
    "simple": ["diffusion.objective.kind=simple", "model.unet.learn_sigma=false"],  # fixed variances, 1 channel
    "hybrid": [],                                                                     # the preset: L_simple + L_vlb
    "vlb": ["diffusion.objective.kind=vlb"],                                          # L_vlb, importance-sampled t
    "vdm": [],                                                                        # the preset: VDM's ELBO
}
STEP_CAP = 2.0              # train.steps = STEP_CAP x the timed steps in the budget: a cap that never binds
REFERENCE = "simple"        # the fixed-variance model that is also sampled at --reference-steps
BOUND_SEED = 0xB1D          # the generator of the bound's and the ODE's noise, as the likelihood report seeds it
ANCHORS = ("anchors (not measured here): dequantised MNIST bits/dim RealNVP 1.06, Glow 1.05, FFJORD 0.99 "
           "(Grathwohl et al. 2019); CIFAR-10 Improved DDPM 2.94, VDM 2.65")
GOAL = ("goals: MNIST below 1.0 bits/dim within 60 CPU-minutes; learned-variance ancestral sampling at 50 steps "
        "at the FD of fixed-variance DDPM at 1000 steps")
DEFAULTS = dict(minutes=(30.0, 60.0), eval_images=1000, ode_images=200, samples=1000, reference_steps=1000,
                vlb_steps=0, ode_rtol=1e-3, floor_draws=5, bootstrap=200, timed_steps=5, short_warmup=False)
QUICK = dict(minutes=(0.05,), eval_images=8, ode_images=2, samples=64, reference_steps=100, vlb_steps=50,
             ode_rtol=1e-2, floor_draws=2, bootstrap=10, timed_steps=2, short_warmup=True)

BENCH = Path(__file__).parent  # this folder: the benchmarks used here
backbones = load_bench("backbones", BENCH)
speed = backbones.speed


def run_name(dataset: str, objective: str, minutes: float) -> str:
    """The run's folder name under --out-dir: one per (data set, objective, budget), so --reuse finds it."""
    return f"{dataset}-{objective}-{minutes:g}min"


def row_config(dataset: str, objective: str, out_dir: str, minutes: float, steps: int | None = None):
    """The run configuration of one row: the objective's preset for the data set and its overrides, the budget of
    `minutes` CPU-minutes (the learning-rate schedule over it, train.clock=cpu), and `steps` as a cap."""
    check_choice("dataset", dataset, DATASETS)
    check_choice("objective", objective, OBJECTIVES)
    over = [f"data.dataset={dataset}", f"out_dir={out_dir}", f"name={run_name(dataset, objective, minutes)}",
            *OBJECTIVES[objective], f"train.max_minutes={minutes}", "train.lr_schedule_over=time",
            "train.clock=cpu", "train.sample_every=0", "train.eval_every=0"]
    if steps is not None:
        over.append(f"train.steps={steps}")
    return load_config(PRESETS[objective][dataset], over)


def planned_steps(cfg, minutes: float, timed_steps: int) -> tuple[int, dict]:
    """train.steps as a cap: STEP_CAP x the steps that the median timed step (CPU seconds, random data) fits in
    `minutes`. Returns (steps, {params, step_images_per_s})."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = speed.make_trainer(cfg, tmp)
        times = speed.time_steps(tr, timed_steps, warmup=1, clock=time.process_time)
    ips = cfg.train.batch_size / statistics.median(times)
    steps = max(1, int(STEP_CAP * minutes * 60 * ips / cfg.train.batch_size))
    return steps, {"params": count_parameters(tr.net), "step_images_per_s": round(ips, 1)}


def train_row(dataset: str, objective: str, out_dir: str, minutes: float, *, timed_steps: int,
              short_warmup: bool = False, reuse: bool = False, log=print) -> tuple[Path, dict]:
    """Train one row (or, with `reuse`, take the run's last checkpoint when it exists). Returns (checkpoint, info)."""
    cfg = row_config(dataset, objective, out_dir, minutes)
    ckpt = cfg.run_dir / "checkpoints" / "last.safetensors"
    if reuse and ckpt.exists():
        _, _, meta = load_denoiser(ckpt)
        log(f"{dataset} {objective} {minutes:g} min: reusing {ckpt} (step {meta['step']})")
        return ckpt, {"reused": True, "steps": meta["step"], "budget_seconds": round(meta.get("train_seconds", 0), 1)}
    steps, cost = planned_steps(cfg, minutes, timed_steps)
    cfg = row_config(dataset, objective, out_dir, minutes, steps)
    if short_warmup:
        cfg = replace(cfg, train=replace(cfg.train, warmup_steps=min(cfg.train.warmup_steps, max(1, steps // 10))))
    log(f"{dataset} {objective} {minutes:g} min: {cost['params'] / 1e6:.2f} M parameters, "
        f"{cost['step_images_per_s']} img/s per CPU-second -> train.steps={steps}")
    fit = Trainer(cfg, progress=False, log_lines=True, resume=False).fit()
    return ckpt, {"reused": False, **cost, "planned_steps": steps, "steps": fit["steps"],
                  "budget_seconds": round(fit["train_seconds"], 1), "train_seconds": round(fit["seconds"], 1),
                  "images_per_s": round(fit["images_per_s"], 1)}


def _figures(r: dict, key: str) -> dict:
    return {key: r["mean"], f"{key}_se": r["stderr"], f"{key}_n": r["n"]}


def likelihoods(den, dataset: str, *, eval_images: int, ode_images: int, vlb_steps: int = 0,
                ode_rtol: float = 1e-3, seed: int = 0) -> dict:
    """Test bits/dim by the bound (`eval_images` images; `vlb_steps` 0: the full grid, VDM: continuous time) and
    by the probability-flow ODE (the first `ode_images` of them, dequantised; 0: skipped), with standard errors
    over images."""
    x0, _ = real_images(dataset, "test", max(eval_images, ode_images), LIKELIHOOD_SEED)
    out = {}
    t0 = time.time()
    g = torch.Generator().manual_seed(hash_seed(seed, BOUND_SEED))
    r = vlb_bits_per_dim(den, x0[:eval_images], T=vlb_steps or None, generator=g, batch_size=256)
    terms = r["terms_mean"]
    out.update(_figures(r, "bpd_bound"), bound_T=r["T"], bound_seconds=round(time.time() - t0, 1),
               bound_terms={"first": float(terms[0]), "middle": float(terms[1:-1].sum()), "last": float(terms[-1])})
    if ode_images > 0:
        t0 = time.time()
        g = torch.Generator().manual_seed(hash_seed(seed, BOUND_SEED))
        r = ode_bits_per_dim(den, x0[:ode_images], rtol=ode_rtol, generator=g, batch_size=ode_images)
        out.update(_figures(r, "bpd_ode"), ode_nfe=r["nfe"], ode_rtol=ode_rtol,
                   ode_seconds=round(time.time() - t0, 1))
    return out


def sample_quality(den, cfg, meta, dataset: str, n: int, floor_draws: int, bootstrap: int, seed: int = 0,
                   **changes) -> dict:
    """FD of `n` samples (class i mod 10) drawn with the run's sample configuration, fields replaced by `changes`,
    against the test split, beside the matched floor."""
    spec = replace(cfg.sample, **changes)
    labels = requested_labels(n, spec.class_label, spec.guidance, den.num_classes)
    t0 = time.time()
    with torch.no_grad():
        x = generate(den, tuple(meta["data_shape"]), spec, n=n, labels=labels, seed=seed)
    res = evaluate_samples(x, dataset, labels=labels, seed=seed, floor_draws=floor_draws, bootstrap=bootstrap)
    keys = ("fd", "fd_std", "fd_floor", "fd_floor_std", "fd_ratio", "fd_ratio_std", "accuracy")
    return {"sampler": spec.sampler, "steps": spec.steps, "spacing": spec.spacing,
            "learned_variance": bool(getattr(den, "learns_variance", False)), "samples": n,
            "sample_seconds": round(time.time() - t0, 1), **{k: res[k] for k in keys if k in res}}


def samplings(objective: str, reference_steps: int) -> list[dict]:
    """The sample configurations scored for `objective`: its preset's ({}), and for the fixed-variance reference
    model also DDPM at `reference_steps` (0: none)."""
    extra = [{"sampler": "ddpm", "steps": reference_steps, "spacing": "uniform"}]
    return [{}] + (extra if objective == REFERENCE and reference_steps > 0 else [])


def run_row(dataset: str, objective: str, out_dir: str, *, minutes: float, eval_images: int, ode_images: int,
            samples: int, reference_steps: int, vlb_steps: int, ode_rtol: float, floor_draws: int, bootstrap: int,
            timed_steps: int, short_warmup: bool = False, reuse: bool = False, log=print) -> dict:
    """Train (or reuse) one row, then measure its bits/dim and its samples."""
    ckpt, info = train_row(dataset, objective, out_dir, minutes, timed_steps=timed_steps, short_warmup=short_warmup,
                           reuse=reuse, log=log)
    den, cfg, meta = load_denoiser(ckpt)
    info.setdefault("params", count_parameters(den))
    row = {"dataset": dataset, "objective": objective, "kind": cfg.diffusion.objective.kind, "minutes": minutes,
           "preset": PRESETS[objective][dataset], "overrides": OBJECTIVES[objective], "checkpoint": str(ckpt),
           **info}
    name = f"{dataset} {objective} {minutes:g} min"
    log(f"{name}: bits/dim by the bound on {eval_images} images and by the ODE on {ode_images}")
    row.update(likelihoods(den, dataset, eval_images=eval_images, ode_images=ode_images, vlb_steps=vlb_steps,
                           ode_rtol=ode_rtol))
    ode = f", ODE {row['bpd_ode']:.3f} +- {row['bpd_ode_se']:.3f}" if "bpd_ode" in row else ""
    log(f"{name}: bound {row['bpd_bound']:.3f} +- {row['bpd_bound_se']:.3f}{ode} bits/dim "
        f"({row['bound_seconds'] + row.get('ode_seconds', 0):.0f} s)")
    row["quality"] = []
    for changes in samplings(objective, reference_steps):
        log(f"{name}: {samples} samples, {changes or 'the preset sampler'}")
        q = sample_quality(den, cfg, meta, dataset, samples, floor_draws, bootstrap, **changes)
        log(f"{name}: {q['sampler']}/{q['steps']} FD {q['fd']:.2f}, floor {q['fd_floor']:.2f} "
            f"({q['sample_seconds']:.0f} s)")
        row["quality"].append(q)
    return row


def _pm(value, se, width: int) -> str:
    """'value +- se' in `width` characters ('-' when absent)."""
    if value is None:
        return f"{'-':>{width}}"
    return f"{f'{value:.3f} +- {se:.3f}' if se is not None and math.isfinite(se) else f'{value:.3f}':>{width}}"


def format_table(rows: list) -> str:
    """One line per (row, sampling); the bits/dim on the row's first line."""
    head = (f"{'data':<13} {'objective':<9} {'min':>5} {'params':>7} {'steps':>6} {'bound bits/dim':>16} "
            f"{'ODE bits/dim':>16} {'sampler':<13} {'FD':>8} {'floor':>7} {'FD/floor':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for i, q in enumerate(r["quality"]):
            left = (f"{r['dataset']:<13} {r['objective']:<9} {r['minutes']:>5g} {r['params'] / 1e6:>6.2f}M "
                    f"{r['steps']:>6} {_pm(r['bpd_bound'], r['bpd_bound_se'], 16)} "
                    f"{_pm(r.get('bpd_ode'), r.get('bpd_ode_se'), 16)}")
            left = left if i == 0 else " " * len(left)
            sampler = f"{q['sampler']}/{q['steps']}" + ("+v" if q["learned_variance"] else "")
            lines.append(f"{left} {sampler:<13} {q['fd']:>8.2f} {q.get('fd_floor', float('nan')):>7.2f} "
                         f"{q.get('fd_ratio', float('nan')):>8.2f}")
    lines += ["", "bits/dim +- standard error over test images; sampler/steps, +v: the learned variance",
              ANCHORS, GOAL]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/likelihood.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"from {', '.join(DATASETS)}")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), help=f"from {', '.join(OBJECTIVES)}")
    p.add_argument("--minutes", nargs="+", type=float, help="CPU-minute budgets, one run each (default 30 60)")
    p.add_argument("--eval-images", type=int, help="test images for the bound (default 1000)")
    p.add_argument("--ode-images", type=int, help="test images for the ODE, the first of the bound's (default 200)")
    p.add_argument("--ode-rtol", type=float, help="tolerance of the ODE solver (default 1e-3)")
    p.add_argument("--vlb-steps", type=int, help="0 (default): the bound on the full grid, VDM's continuous-time "
                                                 "ELBO; T: the T-step respaced bound, VDM's T-step ELBO")
    p.add_argument("--samples", type=int, help="samples per sampler for FD (default 1000)")
    p.add_argument("--reference-steps", type=int, help="DDPM steps of the simple model's reference samples "
                                                       "(default 1000; 0: none)")
    p.add_argument("--floor-draws", type=int, help="real floor sets per evaluation (default 5)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the FD spread (default 200)")
    p.add_argument("--timed-steps", type=int, help="timed training steps that set the step cap (default 5)")
    p.add_argument("--reuse", action="store_true", help="skip training where the run's last checkpoint exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke setting (explicit options win): " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--out-dir", default="outputs/bench_likelihood", help="where the runs go")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> dict:
    """The run options: the defaults, the quick setting over them, explicit options over both."""
    opts = {**DEFAULTS, **(QUICK if args.quick else {})}
    opts.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    opts["minutes"] = tuple(opts["minutes"])
    for d in args.datasets:
        check_choice("dataset", d, DATASETS)
    for o in args.objectives:
        check_choice("objective", o, OBJECTIVES)
    if opts["eval_images"] < 2 or opts["ode_images"] < 0 or opts["samples"] < 2:
        raise ValueError("--eval-images and --samples must be at least 2 (a standard error), --ode-images at least 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones.check_feature_nets(args.datasets)
    info = backbones.machine()
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}; {opts}", file=sys.stderr)
    rows = []
    for d in args.datasets:
        for m in opts["minutes"]:
            for o in args.objectives:
                rows.append(run_row(d, o, args.out_dir, reuse=args.reuse, log=lambda s: print(s, file=sys.stderr),
                                    **{**opts, "minutes": m}))
                if args.json:  # after every row, so a stopped run keeps what it measured
                    backbones.write_json(args.json, {**info, "options": opts, "anchors": ANCHORS, "goal": GOAL,
                                                     "rows": rows})
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
