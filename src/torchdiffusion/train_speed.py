"""Training speed against the machine's own limit: images/s of the real Trainer step, model FLOPs, matmul peak.

One timed step is ``Trainer.train_step``: data batch (in memory, augmented on the fly), objective, backward,
gradient clipping, AdamW, EMA update, exactly what `torchdiffusion train` runs. FLOPs per image are counted
with ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward of the objective (matmuls,
convolutions, attention; elementwise work is not counted, as in MFU accounting, Chowdhery et al. 2022,
app. B). The peak is a large square matmul in the same dtype and thread count, measured in the same run;
the ratio is achieved FLOP/s over that peak.

    python bench/train_speed.py                                  # demo and cifar, fp32 and bf16, both layouts
    torchdiffusion bench train-speed --configs demo --dtypes bf16 --layouts channels_last --threads 2
    python bench/train_speed.py --configs mnist-10min mnist-wide --json outputs/train_speed.json

Configs: ``cifar`` (the DDPM CIFAR-10 U-Net, 35.7M parameters, 3x32x32), a preset name (``demo``, ...) or
YAML file, or a U-Net preset name (``mnist-wide``, ...) trained with the demo recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import RunConfig, load_config, presets
from .data import TensorImageDataset
from .nets import UNET_PRESETS, count_parameters
from .pipeline import net_input_shape
from .utils import check_choice

DTYPES = ("fp32", "bf16")
LAYOUTS = ("channels_last", "contiguous")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CIFAR_BATCH = 32  # keeps a CIFAR step at a few seconds on a small CPU; --batch overrides
MIN_TIMED = 3     # timed steps per row at least, whatever --max-seconds says


def bench_config(name: str) -> RunConfig:
    """The run configuration a benchmark row trains (see the module docstring for the names)."""
    if name == "cifar":
        cfg = load_config("demo", [f"train.batch_size={CIFAR_BATCH}", "train.lr=2e-4", "train.ema_decay=0.9999"])
        cfg.model.unet = UNET_PRESETS["cifar-ddpm"]
        return cfg
    if name in presets() or name.endswith((".yaml", ".yml")):
        return load_config(name)
    if name in UNET_PRESETS:
        cfg = load_config("demo")
        cfg.model.unet = UNET_PRESETS[name]
        return cfg
    raise ValueError(f"unknown config {name!r}; allowed: 'cifar', a preset ({', '.join(presets())}), a YAML file, "
                     f"or a U-Net preset ({', '.join(UNET_PRESETS)})")


def random_images(cfg: RunConfig, n: int) -> TensorImageDataset:
    """n random uint8 images of the configured shape (the step's cost does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.randint(0, 256, (n, *net_input_shape(cfg)), dtype=torch.uint8, generator=g),
                              name="random")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: str, n: int = 2048, reps: int = 10, device="cpu") -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (2 n^3 FLOPs), the best of `reps` after one warm-up."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(TORCH_DTYPES[dtype]) for _ in range(2))
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_trainer(cfg: RunConfig, out_dir: str, device="cpu"):
    from .train import Trainer

    cfg = replace(cfg, out_dir=out_dir, name="bench")
    return Trainer(cfg, dataset=random_images(cfg, max(256, 2 * cfg.train.batch_size)), progress=False,
                   device=device)


def step_flops(cfg: RunConfig, out_dir: str, n: int = 2) -> float:
    """Model FLOPs per image of forward + backward of the training objective (fp32, n images, divided by n)."""
    cfg = replace(cfg, train=replace(cfg.train, precision="fp32", channels_last=False, compile=False, batch_size=n,
                                     grad_accum=1))
    tr = make_trainer(cfg, out_dir)
    with FlopCounterMode(display=False) as counter:
        tr._gradients(torch.arange(n))
    return counter.get_total_flops() / n


def time_steps(tr, steps: int, warmup: int, max_seconds: float = float("inf")) -> float:
    """Median seconds of a Trainer.train_step over `steps` timed steps after `warmup` untimed ones (fewer, but
    at least MIN_TIMED, when the timed steps pass `max_seconds`)."""
    times = []
    for i in range(warmup + steps):
        if len(times) >= MIN_TIMED and sum(times) > max_seconds:
            break
        idx = tr.sampler.next_batch()
        _sync(tr.device)
        start = time.perf_counter()
        tr.train_step(idx)
        _sync(tr.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(configs, dtypes, layouts, *, batch=None, steps=10, warmup=2, max_seconds=20.0, threads=None,
        compile=False, matmul_n=2048, device="cpu", log=print) -> dict:
    for d in dtypes:
        check_choice("dtype", d, DTYPES)
    for lay in layouts:
        check_choice("layout", lay, LAYOUTS)
    if threads:
        torch.set_num_threads(threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "loadavg_before": os.getloadavg()[0]}
    peaks = {d: matmul_peak(d, matmul_n, device=device) for d in dtypes}
    header = (f"{'config':<12} {'params':>7} {'dtype':>5} {'layout':>13} {'batch':>5} {'img/s':>8} {'GFLOP/img':>9} "
              f"{'GFLOP/s':>8} {'peak':>8} {'ratio':>6}")
    log(f"torch {info['torch']}, {info['threads']} threads, {device}, cpu capability {info['cpu_capability']}, "
        f"load average {info['loadavg_before']:.2f}; matmul {matmul_n}^3 peak: "
        + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    log(header)
    log("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            base = bench_config(name)
            if batch:
                base = replace(base, train=replace(base.train, batch_size=batch))
            flops = step_flops(base, tmp)
            for dtype in dtypes:
                for layout in layouts:
                    cfg = replace(base, train=replace(base.train, precision=dtype, threads=threads or 0,
                                                      channels_last=layout == "channels_last", compile=compile))
                    tr = make_trainer(cfg, tmp, device)
                    ips = cfg.train.batch_size / time_steps(tr, steps, warmup, max_seconds)
                    achieved = ips * flops
                    row = dict(config=name, params=count_parameters(tr.net), dtype=dtype, layout=layout,
                               batch=cfg.train.batch_size, compile=compile, images_per_s=round(ips, 2),
                               gflop_per_image=round(flops / 1e9, 4), achieved_gflops=round(achieved / 1e9, 1),
                               peak_gflops=round(peaks[dtype] / 1e9, 1), ratio=round(achieved / peaks[dtype], 3))
                    rows.append(row)
                    log(f"{name:<12} {row['params'] / 1e6:>6.2f}M {dtype:>5} {layout:>13} {row['batch']:>5} "
                        f"{ips:>8.1f} {flops / 1e9:>9.3f} {achieved / 1e9:>8.1f} {peaks[dtype] / 1e9:>8.1f} "
                        f"{row['ratio']:>6.1%}")
    # the peak again after the rows (the ratios use the first): a drop means other work shared the machine
    for d in dtypes:
        info[f"peak_gflops_{d}"] = [round(peaks[d] / 1e9, 1), round(matmul_peak(d, matmul_n, device=device) / 1e9, 1)]
    info["loadavg_after"] = os.getloadavg()[0]
    log(f"matmul peak again after the rows: "
        + ", ".join(f"{d} {info[f'peak_gflops_{d}'][1]:.0f} GFLOP/s" for d in dtypes)
        + f"; load average {info['loadavg_after']:.2f} (other processes on the cores lower every figure)")
    return {**info, "matmul_n": matmul_n, "steps": steps, "warmup": warmup, "max_seconds": max_seconds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchdiffusion bench train-speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["demo", "cifar"], help="configs to time (default: demo cifar)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"precisions: {', '.join(DTYPES)}")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=f"memory formats: {', '.join(LAYOUTS)}")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size of every config (default: the config's; cifar {CIFAR_BATCH})")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help=f"stop timing a row after this many seconds (at least {MIN_TIMED} timed steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="train.compile=true in every row")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul that measures the peak")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    result = run(args.configs, args.dtypes, args.layouts, batch=args.batch, steps=args.steps, warmup=args.warmup, max_seconds=args.max_seconds,
                 threads=args.threads, compile=args.compile, matmul_n=args.matmul_n, device=args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
