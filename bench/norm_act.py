"""GroupNorm + FiLM + SiLU, the elementwise core of a U-Net residual block, forward + backward on channels-last
fp32/bf16 CPU input at the demo U-Net's feature-map sizes: our path (GroupNorm through the contiguous kernel with
two layout copies), PyTorch's native channels-last GroupNorm, and the same function fused by torch.compile.

    python bench/norm_act.py [--batch 64] [--threads 2] [--dtype fp32] [--json out.json]

Prints ms per forward + backward, the effective memory traffic (the input, output and their gradients, 4
tensors, over the time), which shows how far the step is from the machine's memory bandwidth, and the largest
difference of each path's output from ours.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchdiffusion.nets.unet import GroupNorm

SHAPES = ((32, 28), (64, 14), (64, 7))  # (channels, side) of the demo U-Net's levels
GROUPS = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def film_silu(norm):
    def fn(x, scale, shift):
        return F.silu(torch.addcmul(shift, norm(x), 1 + scale))  # (N, C, H, W)
    return fn


def time_fwd_bwd(fn, x, scale, shift, grad, *, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn(x, scale, shift).backward(grad)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x, scale, shift).backward(grad)
    return (time.perf_counter() - t) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="batch size (default: 64, the demo's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="input dtype (default: fp32)")
    p.add_argument("--reps", type=int, default=30, help="timed forward + backward passes per row (default: 30)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    rows = []
    print(f"{'C x H x W':>12} {'path':>26} {'ms fwd+bwd':>11} {'GB/s':>6} {'max diff':>9}")
    for c, side in SHAPES:
        g = torch.Generator().manual_seed(0)
        cl = dict(memory_format=torch.channels_last)
        x = torch.randn(args.batch, c, side, side, generator=g).to(dtype).contiguous(**cl).requires_grad_()
        scale = torch.randn(args.batch, c, 1, 1, generator=g).to(dtype).requires_grad_()
        shift = torch.randn(args.batch, c, 1, 1, generator=g).to(dtype).requires_grad_()
        grad = torch.randn(x.shape, generator=g).to(dtype).contiguous(**cl)
        ours = GroupNorm(GROUPS, c, eps=1e-6).to(dtype)
        native = torch.nn.GroupNorm(GROUPS, c, eps=1e-6).to(dtype)
        paths = {"ours (contiguous kernel)": film_silu(ours), "native channels-last": film_silu(native)}
        t0 = time.perf_counter()
        compiled = torch.compile(film_silu(native), dynamic=False, fullgraph=True)
        try:
            compiled(x, scale, shift).backward(grad)
            paths["torch.compile fused"] = compiled
        except Exception as e:  # no C++ compiler, or an inductor limitation on this machine
            print(f"torch.compile unavailable: {type(e).__name__}: {e}".splitlines()[0])
        compile_s = time.perf_counter() - t0
        nbytes = 4 * x.numel() * x.element_size()
        with torch.no_grad():
            ref = paths["ours (contiguous kernel)"](x, scale, shift).float()
        for name, fn in paths.items():
            with torch.no_grad():
                diff = float((fn(x, scale, shift).float() - ref).abs().max())
            dt = time_fwd_bwd(fn, x, scale, shift, grad, reps=args.reps)
            rows.append({"channels": c, "side": side, "batch": args.batch, "dtype": args.dtype, "path": name,
                         "ms": 1e3 * dt, "gb_per_s": nbytes / dt / 1e9, "max_abs_diff_vs_ours": diff,
                         **({"compile_s": compile_s} if name.startswith("torch.compile") else {})})
            print(f"{f'{c}x{side}x{side}':>12} {name:>26} {1e3 * dt:>11.3f} {nbytes / dt / 1e9:>6.1f} {diff:>9.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
