"""Training-step throughput of the U-Net presets on this CPU.

One step = forward + MSE loss + backward + AdamW step, on random data with random time values. For each
preset, batch size, precision (fp32 / bf16 autocast) and memory format (contiguous / channels_last) it reports
images per second (median over the timed steps), and the forward FLOPs per image.

    python bench/net_speed.py                                   # default presets, batch 64 and 128
    python bench/net_speed.py --presets mnist mnist-wide --batch 64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.nets import UNET_PRESETS, UNet, count_parameters


def forward_flops(preset: str) -> int:
    cfg = UNET_PRESETS[preset]
    net = UNet.from_config(cfg)
    h, w = net.image_size
    x = torch.randn(1, cfg.in_channels, h, w)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, torch.tensor([500.0]))
    return counter.get_total_flops()


def time_steps(preset: str, batch: int, bf16: bool, channels_last: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    net = UNet.from_preset(preset)
    h, w = net.image_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, net.in_channels, h, w).contiguous(memory_format=fmt)
    target = torch.randn_like(x)
    t = torch.rand(batch) * 1000
    labels = torch.randint(0, net.num_classes, (batch,)) if net.num_classes else None
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x, t, class_labels=labels) if labels is not None else net(x, t)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "mnist-small", "mnist", "mnist-wide"],
                   help=f"presets to time; available: {', '.join(UNET_PRESETS)}")
    p.add_argument("--batch", nargs="+", type=int, default=[64, 128], help="batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    header = f"{'preset':<12} {'params':>8} {'GFLOP/img':>9} {'batch':>5} {'dtype':>5} {'format':>13} {'img/s':>8}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average before {os.getloadavg()[0]:.2f} (other processes on the cores slow every row)")
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        params = count_parameters(UNet.from_preset(preset))
        gflop = forward_flops(preset) / 1e9
        for batch in args.batch:
            for bf16 in ([False] if args.no_bf16 else [False, True]):
                for cl in (False, True):
                    ips = time_steps(preset, batch, bf16, cl, args.steps, args.warmup)
                    row = dict(preset=preset, params=params, fwd_gflop_per_image=round(gflop, 4), batch=batch,
                               dtype="bf16" if bf16 else "fp32", format="channels_last" if cl else "contiguous",
                               images_per_s=round(ips, 1))
                    rows.append(row)
                    print(f"{preset:<12} {params / 1e6:>7.2f}M {gflop:>9.3f} {batch:>5} {row['dtype']:>5} "
                          f"{row['format']:>13} {ips:>8.1f}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), loadavg=os.getloadavg()[0], rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
