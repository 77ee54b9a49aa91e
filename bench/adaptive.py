"""Adaptive per-sample step allocation against fixed-step sampling on the exact mixtures (docs/samplers.md).

For each mixture (bench/samplers.py's ring2d and random64d, and held-out test families) and each NFE, the SW2
excess over the floor of two data draws for
* fixed: the library's best deterministic setting (DPM-Solver++(3M), heun0 final step, the optimized spacing),
  `nfe` steps for every sample;
* probe: :func:`~torchdiffusion.sampling.adaptive.sample_adaptive_steps` with the same solver and spacing at
  mean NFE `nfe` (a separate coarse probe; its calls included, counted row by row);
* prefix: :func:`~torchdiffusion.sampling.adaptive.sample_adaptive_prefix` on fixed's grid, the first PREFIX
  levels shared (they are the probe), the rest reallocated at the same mean NFE;
and, per fixed NFE, the smallest mean NFE of each variant whose excess is at most fixed's (the goal: 25 %
fewer). Run ``python bench/adaptive.py --quick`` (a small run) or ``--json PATH``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from samplers import SIGMA_MAX, SIGMA_MIN, family_members, mixtures  # noqa: E402

from torchdiffusion.evaluate.metrics import SlicedW2  # noqa: E402
from torchdiffusion.sampling.adaptive import (PROBE_SIGMAS, sample_adaptive_prefix, sample_adaptive_steps,  # noqa: E402
                                              step_grid)
from torchdiffusion.sampling.dpm_solver import sample_dpmpp_3m  # noqa: E402

NFES = (5, 6, 8, 10, 12, 15, 20)
QUICK_NFES = (5, 6, 8, 10, 12)
QUICK_FAMILIES = ("d2-close-dirichlet", "d8-far-dirichlet")
GOAL = 0.75  # adaptive should reach fixed's quality at <= 75 % of its NFE
PREFIX = 4  # levels of the shared prefix (the probe that is the solve's own start)
METHODS = ("probe", "prefix")  # the adaptive variants: a separate coarse probe; the solve's first levels


class RowCount(torch.nn.Module):
    """Counts rows evaluated (sum of call batch sizes): rows / N is the exact mean NFE."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x, sigma, **cond):
        self.rows += x.shape[0]
        return self.inner(x, sigma, **cond)


def run_mixture(mix, n, nfes, seed=0, n_dirs=1000):
    """Rows {nfe, method, mean_nfe, sw2_excess} for fixed and adaptive sampling of one mixture."""
    g = torch.Generator().manual_seed(seed)
    sw2 = SlicedW2(mix.sample(n, generator=g).double(), n_dirs)
    floor = sw2(mix.sample(n, generator=g).double())
    x_T = torch.randn(n, mix.dim, generator=g, dtype=torch.float64) * SIGMA_MAX
    sig = torch.tensor([SIGMA_MAX, SIGMA_MIN, 0.0])
    s_max, s_min = float(sig[0]), float(sig[1])
    rows, m = [], len(PROBE_SIGMAS)
    for nfe in sorted(set(nfes) | {k - m for k in nfes if k - m >= 2}):  # fixed also at the solve's own NFE
        den = RowCount(mix)
        out = sample_dpmpp_3m(den, x_T.clone(), step_grid(nfe, s_max, s_min), final="heun0")
        rows.append({"nfe": nfe, "method": "fixed", "mean_nfe": den.rows / n, "sw2_excess": sw2(out) - floor})
        if nfe in nfes and nfe - m >= 2:
            den = RowCount(mix)
            out = sample_adaptive_steps(den, x_T.clone(), sig, mean_nfe=nfe)
            rows.append({"nfe": nfe, "method": "probe", "mean_nfe": den.rows / n, "sw2_excess": sw2(out) - floor})
        if nfe in nfes and nfe > PREFIX:
            den = RowCount(mix)
            out = sample_adaptive_prefix(den, x_T.clone(), step_grid(nfe, s_max, s_min), prefix=PREFIX)
            rows.append({"nfe": nfe, "method": "prefix", "mean_nfe": den.rows / n, "sw2_excess": sw2(out) - floor})
    return {"floor": floor, "rows": rows, "reach": {k: reach(rows, k) for k in METHODS}}


def reach(rows, method="prefix"):
    """Per fixed NFE run: the smallest mean NFE of `method` measured with excess <= fixed's, and its ratio (None
    if no run of it reached it)."""
    ad = sorted((r for r in rows if r["method"] == method), key=lambda r: r["mean_nfe"])
    out = []
    for f in (r for r in rows if r["method"] == "fixed"):
        hit = next((r["mean_nfe"] for r in ad if r["sw2_excess"] <= f["sw2_excess"]), None)
        out.append({"nfe": f["nfe"], "adaptive_nfe": hit, "ratio": None if hit is None else hit / f["nfe"]})
    return out


def format_table(name, res, nfes):
    """Per NFE: fixed; adaptive with a separate probe (its calls counted) and with the probe as the solve's
    first PREFIX levels; fixed with the probe's calls removed (the probe variant's own solve, spread uniformly);
    and the mean NFE at which each variant reaches fixed's excess."""
    by = {(r["method"], r["nfe"]): r for r in res["rows"]}
    m = len(PROBE_SIGMAS)

    def cell(method, k):
        r = by.get((method, k))
        return "-" if r is None else f"{r['sw2_excess']:.4f}"

    def hit(method, k):
        q = next(q for q in res["reach"][method] if q["nfe"] == k)
        return "not reached" if q["adaptive_nfe"] is None else f"{q['adaptive_nfe']:g} ({q['ratio']:.2f})"

    lines = [f"### {name}: SW2 excess over the floor ({res['floor']:.4f})",
             f"| NFE | fixed | probe | prefix | fixed at NFE - {m} | probe reaches fixed at (ratio) | "
             "prefix reaches fixed at (ratio; goal <= 0.75) |", "|---|---|---|---|---|---|---|"]
    for k in nfes:
        lines.append(f"| {k} | {cell('fixed', k)} | {cell('probe', k)} | {cell('prefix', k)} | {cell('fixed', k - m)} "
                     f"| {hit('probe', k)} | {hit('prefix', k)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 2000, NFE up to 12, two test families")
    p.add_argument("--n", type=int, default=None, help="samples per mixture (default 20000; quick: 2000)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    n = args.n or (2000 if args.quick else 20000)
    nfes = QUICK_NFES if args.quick else NFES
    mixes = {**mixtures(), **family_members(QUICK_FAMILIES if args.quick else None)}
    results = {"n": n, "nfes": list(nfes), "probe_sigmas": list(PROBE_SIGMAS), "prefix": PREFIX, "goal": GOAL,
               "mixtures": {}}
    for name, mix in mixes.items():
        results["mixtures"][name] = run_mixture(mix, n, nfes, n_dirs=256 if args.quick else 1000)
        print(format_table(name, results["mixtures"][name], nfes) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
