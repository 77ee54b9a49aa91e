"""One joint (image, label) diffusion used both ways (docs/conditioning.md, "The image version"): p(y | x) as a
classifier and p(x | y) as a class-conditional generator, both by inpainting with one unconditional model.

Trains (or takes with --checkpoint) the preset mnist-joint for a CPU-time budget, the learning rate decayed over
it, on MNIST or Fashion-MNIST. Then:

* p(y | x) on the first N test images: the accuracy of the argmax, per method (app.joint.classify): the one-shot
  read at level sigma (1 NFE), replacement inpainting of the label block and RePaint's resampling (their NFE per
  image counted with precond.CountCalls, draws per image averaged as votes);
* p(x | y): one sample per class index i mod 10 by inpainting the image given the label block (replacement, and
  RePaint's resampling), scored by the data set's evaluation feature network: the share read as the class asked
  (accuracy), FD against the test split and its matched floor (evaluate.evaluate_samples).

    python bench/joint.py --minutes 10 --json outputs/bench_joint.json
    python bench/joint.py --checkpoint outputs/bench_joint/mnist-joint-10min/checkpoints/last.safetensors
    python bench/joint.py --quick          # smoke setting (seconds of training; its figures mean nothing)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from torchdiffusion.app.cli import load_bench
from torchdiffusion.app.joint import classify, generate_given_labels, joint_layout, load_joint
from torchdiffusion.config import load_config
from torchdiffusion.data import make_dataset
from torchdiffusion.evaluate import evaluate_samples
from torchdiffusion.evaluate.features import feature_net_path
from torchdiffusion.precond import CountCalls
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.training import Trainer

BENCH = Path(__file__).parent  # this folder: the benchmarks used here
backbones = load_bench("backbones", BENCH)  # its machine() describes the run

PRESET = "mnist-joint"
UNBOUNDED_STEPS = 1_000_000     # the budget, not a step count, ends the run (lr decays over the time)
ONESHOT_SIGMAS = (0.5, 1.0, 1.5, 2.0)
QUICK = {"minutes": 0.15, "n_test": 40, "draws": 1, "gen": 100, "steps": 8, "resample": 2, "floor_draws": 2,
         "bootstrap": 10, "subset": 2048}
KEYS = ("accuracy", "fd", "fd_floor", "fd_ratio", "fd_ratio_std")


def run_config(dataset: str, minutes: float, out_dir: str, subset: int | None, overrides=()):
    """The preset on `dataset` for `minutes` of CPU time (train.clock=cpu), the learning rate over that time, the
    preset's warm-up share kept; `overrides` (key=value) last."""
    base = load_config(PRESET).train
    warmup = round(base.warmup_steps / base.steps * UNBOUNDED_STEPS)
    over = [f"data.dataset={dataset}", f"train.max_minutes={minutes}", f"train.steps={UNBOUNDED_STEPS}",
            f"train.warmup_steps={warmup}", "train.lr_schedule_over=time", "train.clock=cpu", f"out_dir={out_dir}",
            f"name={PRESET}-{dataset}-{minutes:g}min"]
    return load_config(PRESET, over + ([f"data.subset={subset}"] if subset else []) + list(overrides))


def train_model(dataset: str, minutes: float, out_dir: str, subset, log=print, overrides=()) -> tuple[Path, dict]:
    cfg = run_config(dataset, minutes, out_dir, subset, overrides)
    log(f"training {cfg.name} for {minutes} min")
    fit = Trainer(cfg, progress=False, log_lines=True, resume=False).fit()
    return cfg.run_dir / "checkpoints" / "last.safetensors", {"steps": fit["steps"],
                                                             "train_seconds": round(fit["seconds"], 1)}


def classification_rows(den, cfg, images, labels, opts) -> list:
    """Accuracy of p(y | x) per method, with NFE per image and seconds."""
    _, classes, scale = joint_layout(cfg)
    sigmas = get_sigmas(den.schedule, opts["steps"], "karras")
    methods = [(f"one-shot, sigma {s:g}", dict(method="oneshot", sigma=s)) for s in ONESHOT_SIGMAS]
    methods += [(f"replacement, DDPM {opts['steps']}, {opts['draws']} draws",
                 dict(method="replacement", samples=opts["draws"])),
                (f"RePaint, DDPM {opts['steps']}, resample {opts['resample']}, {opts['draws']} draws",
                 dict(method="repaint", samples=opts["draws"], resample=opts["resample"]))]
    rows = []
    for label, kw in methods:
        counted, t0 = CountCalls(den), time.time()
        with torch.no_grad():
            p = classify(counted, images, sigmas, classes=classes, scale=scale, batch_size=len(images), **kw)
        rows.append({"task": "p(y|x)", "method": label, "n": len(images),
                     "accuracy": float((p.argmax(1) == labels).float().mean()),
                     "nfe_per_image": counted.calls,  # one batch of all N images per draw: calls = NFE per image
                     "seconds": round(time.time() - t0, 1)})
    return rows


def generation_rows(den, cfg, dataset: str, opts) -> list:
    """p(x | y): opts['gen'] samples asking for class i mod K, by replacement and by RePaint, scored by the feature
    network (accuracy, FD, floor)."""
    channels, classes, scale = joint_layout(cfg)
    size = (cfg.model.unet.image_size,) * 2
    sigmas = get_sigmas(den.schedule, opts["steps"], "karras")
    labels = torch.arange(opts["gen"]) % classes
    rows = []
    for label, resample in ((f"replacement, DDPM {opts['steps']}", 1),
                            (f"RePaint, DDPM {opts['steps']}, resample {opts['resample']}", opts["resample"])):
        counted, t0 = CountCalls(den), time.time()
        with torch.no_grad():
            x = generate_given_labels(counted, labels, sigmas, channels=channels, classes=classes, scale=scale,
                                      image_size=size, resample=resample, batch_size=len(labels))
        res = evaluate_samples(x.clamp(-1, 1), dataset, labels=labels, floor_draws=opts["floor_draws"],
                               bootstrap=opts["bootstrap"])
        rows.append({"task": "p(x|y)", "method": label, "n": len(labels), "nfe_per_image": counted.calls,
                     **{k: res[k] for k in KEYS if k in res}, "seconds": round(time.time() - t0, 1)})
    return rows


def format_table(rows: list) -> str:
    head = "| task | method | n | NFE / image | accuracy | FD | floor | FD / floor | seconds |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fd = (f"{r['fd']:.2f} | {r['fd_floor']:.2f} | {r['fd_ratio']:.2f}" if "fd" in r else "- | - | -")
        task = r["task"].replace("|", "\\|")  # a markdown table cell
        lines.append(f"| {task} | {r['method']} | {r['n']} | {r['nfe_per_image']} | {r['accuracy']:.3f} | {fd} "
                     f"| {r['seconds']} |")
    return "\n".join(lines)


def run(opts: dict, dataset: str, checkpoint: str, out_dir: str, log=print) -> tuple[list, dict]:
    info = {}
    if not checkpoint:
        checkpoint, info = train_model(dataset, opts["minutes"], out_dir, opts.get("subset"), log,
                                       opts.get("set", ()))
    den, cfg = load_joint(checkpoint)
    test = make_dataset(cfg.data.dataset, split="test")
    images, labels = test.batch(torch.arange(opts["n_test"]))
    rows = classification_rows(den, cfg, images, labels, opts) + generation_rows(den, cfg, cfg.data.dataset, opts)
    return rows, {**info, "checkpoint": str(checkpoint), "dataset": cfg.data.dataset}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/joint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"), help="the data (default mnist)")
    p.add_argument("--minutes", type=float, default=10.0, help="training CPU minutes (default 10)")
    p.add_argument("--checkpoint", default="", help="take this task-joint checkpoint instead of training one")
    p.add_argument("--n-test", type=int, default=1000, help="test images classified (the first N; default 1000)")
    p.add_argument("--draws", type=int, default=1, help="inpainting draws per test image, averaged as votes")
    p.add_argument("--gen", type=int, default=1000, help="p(x | y) samples, class i mod 10 (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="DDPM steps of the inpainting grid (karras; default 50)")
    p.add_argument("--resample", type=int, default=10, help="RePaint's passes per level (default 10)")
    p.add_argument("--floor-draws", type=int, default=5, help="real floor sets per evaluation")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FD spread")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the preset (e.g. joint.label_weight=10)")
    p.add_argument("--quick", action="store_true", help=f"smoke setting: {QUICK}")
    p.add_argument("--out-dir", default="outputs/bench_joint", help="where the run goes")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if not feature_net_path(args.dataset).exists():
        raise SystemExit(f"no {args.dataset} feature network in the cache: run torchdiffusion train-feature-net "
                         f"--dataset {args.dataset}")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {"minutes": args.minutes, "n_test": args.n_test, "draws": args.draws, "gen": args.gen,
            "steps": args.steps, "resample": args.resample, "floor_draws": args.floor_draws,
            "bootstrap": args.bootstrap, "subset": None, "set": list(args.set)}
    if args.quick:
        opts.update(QUICK)
    info = backbones.machine()
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}; {opts}", file=sys.stderr)
    rows, run_info = run(opts, args.dataset, args.checkpoint, args.out_dir, log=lambda m: print(m, file=sys.stderr))
    print(format_table(rows))
    if args.json:
        backbones.write_json(args.json, {**info, **run_info, "options": opts, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
