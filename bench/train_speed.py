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
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.build import net_input_shape, num_classes
from torchdiffusion.config import RunConfig, load_config, presets
from torchdiffusion.data import TensorImageDataset
from torchdiffusion.nets import UNET_PRESETS, count_parameters, unet
from torchdiffusion.training import Trainer, trainer
from torchdiffusion.utils import check_choice

DTYPES = ("fp32", "bf16")
LAYOUTS = ("channels_last", "contiguous")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CIFAR_BATCH = 32  # keeps a CIFAR step at a few seconds on a small CPU; --batch overrides
MIN_TIMED = 2     # timed steps per row and round at least, whatever --max-seconds says


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
    """n random uint8 images of the configured shape, with random labels for a class-conditional model (the
    step's cost does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *net_input_shape(cfg)), dtype=torch.uint8, generator=g)
    k = num_classes(cfg)
    labels = None if k is None else torch.randint(0, k, (n,), generator=g)
    return TensorImageDataset(images, labels, k, name="random")


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


@contextlib.contextmanager
def stock_kernels():
    """The 'before' of the speed work: PyTorch's own GroupNorm and scaled-dot-product attention kernels in every
    layout and dtype, and AdamW with its per-parameter loop (no fused or foreach kernel)."""
    saved = unet.GroupNorm.forward, unet.attention, trainer._adamw
    unet.GroupNorm.forward = torch.nn.GroupNorm.forward
    unet.attention = torch.nn.functional.scaled_dot_product_attention
    trainer._adamw = lambda params, **kw: torch.optim.AdamW(list(params), foreach=False, fused=False, **kw)
    try:
        yield
    finally:
        unet.GroupNorm.forward, unet.attention, trainer._adamw = saved


def make_trainer(cfg: RunConfig, out_dir: str, device="cpu"):
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


def time_steps(tr, steps: int, warmup: int, max_seconds: float = float("inf"), clock=time.perf_counter) -> list[float]:
    """Seconds of each of `steps` timed Trainer.train_step calls after `warmup` untimed ones (fewer, but at least
    MIN_TIMED, once the timed steps pass `max_seconds`), by `clock` (wall seconds; time.process_time: CPU seconds)."""
    times = []
    for i in range(warmup + steps):
        if len(times) >= MIN_TIMED and sum(times) > max_seconds:
            break
        idx = tr.sampler.next_batch()
        _sync(tr.device)
        start = clock()
        tr.train_step(idx)
        _sync(tr.device)
        if i >= warmup:
            times.append(clock() - start)
    return times


def run(configs, dtypes, layouts, *, batch=None, steps=10, warmup=2, max_seconds=20.0, threads=None,
        compile=False, matmul_n=2048, device="cpu", stock=False, rounds=3, log=print) -> dict:
    """Time every (config, dtype, layout) with its kernel variants ('stock' and 'ours' with `stock`) interleaved
    over `rounds` rounds, so that a slow phase of the machine touches before and after alike; the matmul peak is
    measured at the start of every round and the highest of all is used, so a ratio is never flattered by a slow
    peak measurement."""
    for d in dtypes:
        check_choice("dtype", d, DTYPES)
    for lay in layouts:
        check_choice("layout", lay, LAYOUTS)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if threads:
        torch.set_num_threads(threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "loadavg_before": os.getloadavg()[0]}
    kernels = ("stock", "ours") if stock else ("ours",)
    peaks = {d: [] for d in dtypes}
    rows, times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            base = bench_config(name)
            if batch:
                base = replace(base, train=replace(base.train, batch_size=batch))
            flops = step_flops(base, tmp)
            for dtype in dtypes:
                for layout in layouts:
                    # one group: the kernel variants of one (config, dtype, layout), interleaved round by round;
                    # groups run one after another, as a training run would. Interleaving all rows in one loop
                    # slowed rows by their position in it (demo fp32 contiguous: 110 img/s there, 147 alone)
                    group = []
                    for kern in kernels:
                        cfg = replace(base, train=replace(base.train, precision=dtype, threads=threads or 0,
                                                          channels_last=layout == "channels_last", compile=compile))
                        with stock_kernels() if kern == "stock" else contextlib.nullcontext():
                            tr = make_trainer(cfg, tmp, device)
                        rows.append(dict(config=name, params=count_parameters(tr.net), dtype=dtype, layout=layout,
                                         kernels=kern, batch=cfg.train.batch_size, compile=compile, flops=flops))
                        times.append([])
                        group.append((kern, tr, times[-1]))
                    for r in range(rounds):
                        peaks[dtype].append(matmul_peak(dtype, matmul_n, device=device))
                        for kern, tr, ts in group:
                            with stock_kernels() if kern == "stock" else contextlib.nullcontext():
                                ts += time_steps(tr, steps, warmup if r == 0 else 0, max_seconds / rounds)
                    log(f"{name} {dtype} {layout}: done; matmul peak in its rounds "
                        + ", ".join(f"{p / 1e9:.0f}" for p in peaks[dtype][-rounds:]) + " GFLOP/s")
                    del group, tr
    header = (f"{'config':<12} {'params':>7} {'dtype':>5} {'layout':>13} {'kernels':>7} {'batch':>5} {'img/s':>8} "
              f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'peak':>8} {'ratio':>6}")
    log(f"torch {info['torch']}, {info['threads']} threads, {device}, cpu capability {info['cpu_capability']}, "
        f"load average {info['loadavg_before']:.2f} before; {rounds} rounds; peak = the highest "
        + "round's: " + ", ".join(f"{d} {max(p) / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    log(header)
    log("-" * len(header))
    for row, ts in zip(rows, times):
        flops = row.pop("flops")
        ips = row["batch"] / statistics.median(ts)
        peak = max(peaks[row["dtype"]])
        achieved = ips * flops
        row.update(images_per_s=round(ips, 2), timed_steps=len(ts), gflop_per_image=round(flops / 1e9, 4),
                   achieved_gflops=round(achieved / 1e9, 1), peak_gflops=round(peak / 1e9, 1),
                   ratio=round(achieved / peak, 3))
        log(f"{row['config']:<12} {row['params'] / 1e6:>6.2f}M {row['dtype']:>5} {row['layout']:>13} "
            f"{row['kernels']:>7} {row['batch']:>5} {ips:>8.1f} {flops / 1e9:>9.3f} {achieved / 1e9:>8.1f} "
            f"{peak / 1e9:>8.1f} {row['ratio']:>6.1%}")
    info["peak_gflops"] = {d: [round(x / 1e9, 1) for x in p] for d, p in peaks.items()}
    info["loadavg_after"] = os.getloadavg()[0]
    log(f"load average {info['loadavg_after']:.2f} after (other processes on the cores lower every figure)")
    return {**info, "matmul_n": matmul_n, "steps": steps, "warmup": warmup, "max_seconds": max_seconds,
            "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchdiffusion bench train-speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["demo", "cifar"], help="configs to time (default: demo cifar)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"precisions: {', '.join(DTYPES)}")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=f"memory formats: {', '.join(LAYOUTS)}")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size of every config (default: the config's; cifar {CIFAR_BATCH})")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row and round (the median over all "
                   "rounds is reported)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all rows")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help=f"time budget of a row over all rounds (at least {MIN_TIMED} timed steps a round)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="train.compile=true in every row")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul that measures the peak")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--stock", action="store_true",
                   help="also time every row with PyTorch's stock GroupNorm, attention and per-parameter AdamW "
                        "(the 'before' of the table)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    result = run(args.configs, args.dtypes, args.layouts, batch=args.batch, steps=args.steps, warmup=args.warmup, max_seconds=args.max_seconds,
                 threads=args.threads, compile=args.compile, matmul_n=args.matmul_n, device=args.device,
                 stock=args.stock, rounds=args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
