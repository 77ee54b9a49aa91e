"""Backbones at equal CPU-minutes: class-conditional MNIST and Fashion-MNIST, each network at about the parameter
count of the mnist-10min U-Net (1.19 M), trained for the same wall time with the mnist-10min recipe otherwise
(batch 64, AdamW lr 2e-3, 50 warm-up steps, cosine, EMA 0.995, eps-prediction with min-SNR-5, labels dropped with
p = 0.1, fp32 channels-last), then sampled as that preset samples (DPM-Solver++(2M) SDE, Karras, 20 NFE, sample i
asks for class i mod 10).

Per (data set, backbone) it reports: parameters; the training steps done in the budget; images/s of the whole run
(checkpoints and validation included) and of the bare training step (``bench/train_speed.py``'s timing); model
GFLOP per image of forward + backward (``FlopCounterMode``, 2 FLOPs per multiply-accumulate, attention counted as
its two matmuls) and the achieved fraction of the fp32 matmul peak measured in the same run; FD against the test
split beside the matched real-vs-real floor and their ratio (``evaluate.evaluate_samples``); the feature network's
class accuracy against the requested classes.

    python bench/backbones.py --json outputs/backbones.json             # every backbone, both data sets, 10 min each
    python bench/backbones.py --minutes 2 --backbones unet dit --datasets mnist
    python bench/backbones.py --quick --datasets mnist                  # a smoke run: seconds per row, 64 samples

The number of steps is set per backbone from its timed step so that the cosine decay (nearly) completes inside the
budget (0.95 x minutes x 60 x img/s / batch, the rule of the mnist-10min preset). The data set needs its feature
network in the cache (``torchdiffusion train-feature-net --dataset NAME``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from torchdiffusion.app.cli import load_bench
from torchdiffusion.build import load_denoiser
from torchdiffusion.config import load_config
from torchdiffusion.evaluate import evaluate_samples
from torchdiffusion.evaluate.features import feature_net_path
from torchdiffusion.guidance import requested_labels
from torchdiffusion.nets import count_parameters
from torchdiffusion.sampling import generate
from torchdiffusion.training import Trainer
from torchdiffusion.utils import check_choice

RECIPE = "mnist-10min"
DATASETS = ("mnist", "fashion-mnist")
_DIT = ["model.kind=dit", "model.dit.image_size=28", "model.dit.patch_size=2", "model.dit.depth=4",
        "model.dit.hidden_size=128", "model.dit.num_heads=4", "model.dit.num_classes=10"]
_MASKDIT = ["model.dit.decoder_depth=1", "model.dit.decoder_hidden_size=64", "diffusion.objective.mask_ratio=0.5",
            "diffusion.objective.mae_weight=0.1"]  # MaskDiT at r = 0.5 with the paper's lambda = 0.1
_P4 = ["model.dit.patch_size=4", "model.dit.embed_init=torch"]  # the CPU-budget DiT (docs/backbones.md)
BACKBONES = {  # name -> overrides of the recipe (about 1.1-1.4 M parameters each)
    "unet": [],                                                      # the recipe's U-Net, 1.19 M
    "unet-convnext": ["model.unet.block=convnext", "model.unet.channels=36"],                         # 1.10 M
    "unet-window": ["model.unet.attention=window", "model.unet.window_size=7",
                    "model.unet.attn_resolutions=[14, 7]"],          # 7x7 windows at 14x14, full at 7x7; 1.24 M
    "unet-dynamic": ["model.unet.dynamic_conv_kernels=4", "model.unet.channels=20"],                  # 1.40 M
    "dit": _DIT,                                                     # DiT, 4 blocks of width 128, patch 2; 1.27 M
    "dit-maskdit": _DIT + _MASKDIT,                                  # + a 1-block decoder of width 64; 1.40 M
    "dit-p4": _DIT + _P4,                                            # 49 tokens instead of 196; 1.28 M
    "dit-p4-maskdit": _DIT + _P4 + _MASKDIT,                         # 1.41 M
    "uvit": ["model.kind=uvit", "model.uvit.image_size=28", "model.uvit.patch_size=2", "model.uvit.depth=7",
             "model.uvit.hidden_size=112", "model.uvit.num_heads=4", "model.uvit.num_classes=10"],   # 1.16 M
}
QUICK = dict(minutes=0.1, samples=64, floor_draws=2, bootstrap=10, timed_steps=2, short_warmup=True)
BUDGET_FILL = 0.95  # --clock wall: fraction of the budget the step count aims at (the cosine nearly completes)
STEP_CAP = 1.1      # --clock cpu: train.steps as a cap, this multiple of the steps the timed rate fits in the budget
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}  # --clock -> the clock of the budget and the timing


BENCH = Path(__file__).parent  # this folder: the benchmarks used here
speed = load_bench("train_speed", BENCH)


def _attention_as_matmuls(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """softmax(q k^T / sqrt(d)) v written as two matmuls, so that FlopCounterMode counts attention on the CPU
    (its CPU flash-attention kernel has no FLOP formula and counts as 0)."""
    scores = (q * (scale or q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kw) -> int:
    """Each gradient of a convolution (input, weight) costs what the forward convolution costs. torch's own formula
    counts the weight gradient of a grouped convolution as if it were ungrouped: a depthwise 7x7's backward came out
    66x its forward instead of 2x (ConvNeXt; the dynamic convolution is grouped by sample)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


@contextlib.contextmanager
def counted_attention():
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _attention_as_matmuls
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


def step_flops(cfg, tmp: str, n: int = 2) -> float:
    """Model FLOPs per image of forward + backward of the training objective, as ``bench/train_speed.py`` counts
    them, with attention counted as its matmuls and grouped-convolution gradients at their true cost."""
    cfg = replace(cfg, train=replace(cfg.train, precision="fp32", channels_last=False, batch_size=n, grad_accum=1))
    tr = speed.make_trainer(cfg, tmp)
    with counted_attention(), FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten.convolution_backward: _conv_backward_flop}) as counter:
        tr._gradients(torch.arange(n))
    return counter.get_total_flops() / n


def row_config(dataset: str, backbone: str, out_dir: str, minutes: float, steps: int | None = None,
               extra: tuple = (), clock: str = "cpu"):
    """The run configuration of one row: the recipe, the data set, the backbone, the time budget (clock cpu: the
    learning-rate schedule over `minutes` of the process's CPU time; wall: the recipe's step schedule, stopped at
    `minutes` of wall time), then `extra` overrides (``--set``) on top."""
    check_choice("clock", clock, CLOCKS)
    check_choice("dataset", dataset, DATASETS)
    check_choice("backbone", backbone, BACKBONES)
    over = [f"data.dataset={dataset}", f"out_dir={out_dir}", f"name={dataset}-{backbone}",
            f"train.max_minutes={minutes}", "train.sample_every=0", *BACKBONES[backbone],
            *(["train.lr_schedule_over=time", "train.clock=cpu"] if clock == "cpu" else []), *extra]
    if steps is not None:
        over.append(f"train.steps={steps}")
    return load_config(RECIPE, over)


def step_cost(cfg, tmp: str, timed_steps: int, peak: float, clock: str = "cpu") -> dict:
    """Images/s of the bare training step (random data of the same shape; per CPU second with clock cpu), model
    GFLOP/img of forward + backward, and the fraction of the matmul peak they achieve."""
    tr = speed.make_trainer(cfg, tmp)
    times = speed.time_steps(tr, timed_steps, warmup=1, clock=CLOCKS[clock])
    ips = cfg.train.batch_size / statistics.median(times)
    flops = step_flops(cfg, tmp)
    return {"params": count_parameters(tr.net), "step_images_per_s": round(ips, 1),
            "gflop_per_image": round(flops / 1e9, 4), "peak_fraction": round(ips * flops / peak, 4)}


def sample_quality(ckpt: Path, dataset: str, n: int, floor_draws: int, bootstrap: int, seed: int = 0) -> dict:
    """Samples with the run's sample configuration (class i mod 10), scored against the data set's test split with
    the matched floor."""
    den, cfg, meta = load_denoiser(ckpt)
    labels = requested_labels(n, cfg.sample.class_label, cfg.sample.guidance, den.num_classes)
    t0 = time.time()
    with torch.no_grad():
        x = generate(den, tuple(meta["data_shape"]), cfg.sample, n=n, labels=labels, seed=seed)
    res = evaluate_samples(x, dataset, labels=labels, seed=seed, floor_draws=floor_draws, bootstrap=bootstrap)
    keys = ("fd", "fd_std", "fd_floor", "fd_floor_std", "fd_ratio", "fd_ratio_std", "kid", "precision", "recall",
            "accuracy")
    return {"samples": n, "sample_seconds": round(time.time() - t0, 1), **{k: res[k] for k in keys if k in res}}


def run_row(dataset: str, backbone: str, out_dir: str, *, minutes: float, samples: int, floor_draws: int,
            bootstrap: int, timed_steps: int, peak: float, short_warmup: bool = False, extra: tuple = (),
            clock: str = "cpu", log=print) -> dict:
    """Time the step, set the step count for the budget, train, sample, evaluate. `short_warmup` (the smoke
    setting's few steps): warm up over a tenth of the steps instead of the recipe's 50."""
    with tempfile.TemporaryDirectory() as tmp:
        cost = step_cost(row_config(dataset, backbone, out_dir, minutes, extra=extra, clock=clock), tmp, timed_steps,
                         peak, clock)
    base = row_config(dataset, backbone, out_dir, minutes, extra=extra, clock=clock)
    fill = STEP_CAP if clock == "cpu" else BUDGET_FILL
    steps = max(1, int(fill * minutes * 60 * cost["step_images_per_s"] / base.train.batch_size))
    cfg = row_config(dataset, backbone, out_dir, minutes, steps, extra=extra, clock=clock)
    if short_warmup:
        cfg = replace(cfg, train=replace(cfg.train, warmup_steps=min(cfg.train.warmup_steps, max(1, steps // 10))))
    log(f"{dataset} {backbone}: {cost['params'] / 1e6:.2f} M parameters, {cost['step_images_per_s']} img/s per "
        f"step -> train.steps={steps} in {minutes} min")
    fit = Trainer(cfg, progress=False, log_lines=True, resume=False).fit()
    quality = sample_quality(cfg.run_dir / "checkpoints" / "last.safetensors", dataset, samples, floor_draws,
                             bootstrap)
    return {"dataset": dataset, "backbone": backbone, "overrides": list(extra), "clock": clock, **cost,
            "steps": fit["steps"], "planned_steps": steps, "budget_seconds": round(fit["train_seconds"], 1),
            "train_seconds": round(fit["seconds"], 1), "images_per_s": round(fit["images_per_s"], 1), **quality}


def format_table(rows: list) -> str:
    head = (f"{'data':<13} {'backbone':<13} {'params':>7} {'steps':>6} {'img/s':>6} {'step':>6} {'GFLOP/img':>9} "
            f"{'peak':>6} {'FD':>8} {'floor':>7} {'FD/floor':>8} {'acc':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dataset']:<13} {r['backbone']:<13} {r['params'] / 1e6:>6.2f}M {r['steps']:>6} "
                     f"{r['images_per_s']:>6.1f} {r['step_images_per_s']:>6.1f} {r['gflop_per_image']:>9.3f} "
                     f"{r['peak_fraction']:>6.1%} {r['fd']:>8.2f} {r.get('fd_floor', float('nan')):>7.2f} "
                     f"{r.get('fd_ratio', float('nan')):>8.2f} {r.get('accuracy', float('nan')):>6.3f}")
    return "\n".join(lines)


def write_json(path, data: dict) -> None:
    """Write a benchmark's results to `path` as indented JSON, making its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


def machine() -> dict:
    model = platform.processor()
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     model)
    return {"cpu": model, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "loadavg_before": os.getloadavg()[0]}


def check_feature_nets(datasets) -> None:
    missing = [d for d in datasets if not feature_net_path(d).exists()]
    if missing:
        raise SystemExit(f"no feature network for {', '.join(missing)} in the cache: run "
                         + "; ".join(f"torchdiffusion train-feature-net --dataset {d}" for d in missing))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/backbones.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"from {', '.join(DATASETS)}")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), help=f"from {', '.join(BACKBONES)}")
    p.add_argument("--minutes", type=float, default=10.0, help="training time per row (default 10)")
    p.add_argument("--clock", default="cpu", choices=list(CLOCKS),
                   help="cpu (default): the budget is the process's CPU minutes of training steps (train.clock=cpu, "
                        "the learning rate decays over it), so other jobs on the machine do not shorten a row; wall: "
                        "the recipe's step schedule, stopped at the wall-time budget")
    p.add_argument("--samples", type=int, default=1000, help="samples drawn per row for FD and accuracy")
    p.add_argument("--floor-draws", type=int, default=5, help="real floor sets per evaluation")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FD spread")
    p.add_argument("--timed-steps", type=int, default=5, help="timed training steps per row (the step img/s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke setting: " + ", ".join(f"{k}={v}" for k, v in
                                                                                      QUICK.items()))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="extra",
                   help="config overrides applied to every row after the backbone's own (a recipe sweep)")
    p.add_argument("--out-dir", default="outputs/bench_backbones", help="where the runs go")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for d in args.datasets:
        check_choice("dataset", d, DATASETS)
    for b in args.backbones:
        check_choice("backbone", b, BACKBONES)
    opts = dict(minutes=args.minutes, samples=args.samples, floor_draws=args.floor_draws, bootstrap=args.bootstrap,
                timed_steps=args.timed_steps, short_warmup=False, extra=tuple(args.extra), clock=args.clock)
    if args.quick:
        opts.update(QUICK)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_feature_nets(args.datasets)
    info = machine()
    peak = max(speed.matmul_peak("fp32") for _ in range(2))
    info["fp32_matmul_peak_gflops"] = round(peak / 1e9, 1)
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, fp32 matmul peak "
          f"{info['fp32_matmul_peak_gflops']} GFLOP/s; {opts}", file=sys.stderr)
    rows = [run_row(d, b, args.out_dir, peak=peak, log=lambda m: print(m, file=sys.stderr), **opts)
            for d in args.datasets for b in args.backbones]
    print(format_table(rows))
    if args.json:
        write_json(args.json, {**info, "options": opts, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
