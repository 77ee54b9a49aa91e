"""The exact sampler benchmark: Gaussian mixtures, whose exact denoiser makes discretization the only error.

For each sampler configuration and NFE target it counts denoiser calls, and reports
* the sliced 2-Wasserstein distance (SW2) between its samples and fresh data samples, beside the floor of two
  independent data draws of the same size;
* for deterministic samplers, the RMS distance of each sample to the exact probability-flow ODE endpoint from
  the same x_T (:func:`~torchdiffusion.sampling.ode.sample_ode_reference`).

Run ``python bench/samplers.py --out outputs/bench_samplers`` (or ``torchdiffusion bench samplers``).
:func:`tune_schedule` (below) is how the 'optimized' spacing's ramps were tuned.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from scipy.optimize import minimize

from torchdiffusion.data.toy import random_mixture, ring_mixture
from torchdiffusion.evaluate.metrics import SlicedW2
from torchdiffusion.precond import CountCalls
from torchdiffusion.sampling import SAMPLERS, get_sigmas
from torchdiffusion.sampling.sigmas import OPTIMIZED_RAMPS, OPTIMIZED_SAMPLER
from torchdiffusion.schedules import EDMSchedule

NFES = (3, 5, 8, 10, 15, 20, 50)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def mixtures():
    return {"ring2d": ring_mixture(8, 1.0, 0.05), "random64d": random_mixture(64, 16, seed=0)}


# ------------------------------------------------------------------------------------- configurations
# label -> (sampler, options, spacing, nfe(steps)). `steps` counts entries of get_sigmas (final step included).
def _n1(s):
    return s


CONFIGS = {
    "euler/karras": ("euler", {}, "karras", _n1),
    "heun/karras": ("heun", {}, "karras", lambda s: 2 * s - 1),
    "dpm_solver_3/logsnr": ("dpm_solver_3", {}, "logsnr", lambda s: 3 * s - 2),
    "dpmpp_2s/logsnr": ("dpmpp_2s", {}, "logsnr", lambda s: 2 * s - 1),
    "dpmpp_2m/logsnr": ("dpmpp_2m", {}, "logsnr", _n1),
    "dpmpp_2m/karras": ("dpmpp_2m", {}, "karras", _n1),
    "dpmpp_3m/logsnr": ("dpmpp_3m", {}, "logsnr", _n1),
    "dpmpp_3m/karras": ("dpmpp_3m", {}, "karras", _n1),
    "unipc3/logsnr": ("unipc", {"order": 3}, "logsnr", _n1),
    "unipc3/karras": ("unipc", {"order": 3}, "karras", _n1),
    "euler_ancestral/karras": ("euler_ancestral", {}, "karras", _n1),
    "dpmpp_2m_sde/karras": ("dpmpp_2m_sde", {}, "karras", _n1),
    "euler_maruyama/karras": ("euler_maruyama", {}, "karras", _n1),
}
STOCHASTIC = {"euler_ancestral", "dpmpp_2m_sde", "euler_maruyama", "pc", "ddpm"}


def _optimized_config():
    """The tuned configuration (see :data:`~torchdiffusion.sampling.sigmas.OPTIMIZED_RAMPS`), if present."""
    name, opts = OPTIMIZED_SAMPLER
    return {f"{name}+heun0/optimized": (name, opts, "optimized", _n1)} if OPTIMIZED_RAMPS else {}


def steps_for(nfe_fn, target):
    """Largest step count whose NFE does not exceed `target` (None if even 1 step does)."""
    best = None
    for s in range(1, target + 2):
        if nfe_fn(s) <= target:
            best = s
    return best


def run_one(mix, name, opts, sigmas, x_T, seed):
    den = CountCalls(mix)
    gens = torch.Generator().manual_seed(seed)
    out = SAMPLERS[name](den, x_T.clone(), sigmas, generator=gens, **opts)
    return out, den.calls


def run_benchmark(n: int = 20000, nfes=NFES, configs=None, mixture_names=None, seed: int = 0, n_dirs: int = 1000,
                  log=print):
    """Run every configuration at every NFE on every mixture; returns a JSON-able dict of results."""
    configs = dict(configs or {**CONFIGS, **_optimized_config()})
    sch = EDMSchedule(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    results = {"n": n, "nfes": list(nfes), "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "mixtures": {}}
    for mname, mix in mixtures().items():
        if mixture_names and mname not in mixture_names:
            continue
        g = torch.Generator().manual_seed(seed)
        data_a = mix.sample(n, generator=g).double()
        data_b = mix.sample(n, generator=g).double()
        sw2_data = SlicedW2(data_a, n_dirs)
        floor = sw2_data(data_b)
        x_T = torch.randn(n, mix.dim, generator=g, dtype=torch.float64) * SIGMA_MAX
        t0 = time.time()
        ref = SAMPLERS["ode_reference"](mix, x_T, torch.tensor([SIGMA_MAX, 0.0]), rtol=1e-9, atol=1e-9)
        log(f"[{mname}] reference ODE solve {time.time() - t0:.0f}s; SW2 floor {floor:.4f}; "
            f"reference SW2 {sw2_data(ref):.4f}")
        rows = []
        for label, (name, opts, spacing, nfe_fn) in configs.items():
            for target in nfes:
                steps = steps_for(nfe_fn, target)
                if steps is None:
                    continue
                try:
                    sig = get_sigmas(sch, steps, spacing)
                except ValueError:  # a spacing that cannot give this step count (optimized: 1 step)
                    continue
                out, calls = run_one(mix, name, opts, sig, x_T, seed + 1)
                sw2 = sw2_data(out)
                row = {"config": label, "sampler": name, "spacing": spacing, "target_nfe": target, "nfe": calls,
                       "steps": steps, "sw2": sw2, "sw2_excess": sw2 - floor,
                       "rms_to_ode": None if name in STOCHASTIC else (out - ref).pow(2).sum(1).mean().sqrt().item()}
                rows.append(row)
        results["mixtures"][mname] = {"floor": floor, "reference_sw2": sw2_data(ref), "rows": rows}
        log(format_table(mname, results["mixtures"][mname], nfes))
    return results


def format_table(mname, res, nfes):
    """Markdown tables: SW2 excess over the floor, and RMS to the exact ODE endpoint, per config and NFE."""
    rows = res["rows"]
    labels = list(dict.fromkeys(r["config"] for r in rows))
    head = "| config | " + " | ".join(f"NFE {k}" for k in nfes) + " |\n|---|" + "---|" * len(nfes)
    out = [f"### {mname}: SW2 excess over the floor ({res['floor']:.4f}); actual NFE in brackets where it differs",
           head]
    for key, fmt in (("sw2_excess", "{:.4f}"), ("rms_to_ode", "{:.2e}")):
        if key == "rms_to_ode":
            out += ["", f"### {mname}: RMS distance to the exact PF-ODE endpoint (deterministic samplers)", head]
        for lab in labels:
            cells = []
            for k in nfes:
                r = next((r for r in rows if r["config"] == lab and r["target_nfe"] == k), None)
                if r is None or r[key] is None:
                    cells.append("-")
                else:
                    c = fmt.format(r[key])
                    cells.append(c if r["nfe"] == k else f"{c} [{r['nfe']}]")
            if key == "rms_to_ode" and all(c == "-" for c in cells):
                continue
            out.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

    paths = []
    for mname, res in results["mixtures"].items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = list(dict.fromkeys(r["config"] for r in res["rows"]))
        for lab in labels:
            rs = [r for r in res["rows"] if r["config"] == lab]
            axes[0].plot([r["nfe"] for r in rs], [max(r["sw2_excess"], 1e-5) for r in rs], "o-", ms=3, label=lab)
            if rs[0]["rms_to_ode"] is not None:
                axes[1].plot([r["nfe"] for r in rs], [r["rms_to_ode"] for r in rs], "o-", ms=3, label=lab)
        axes[0].set_title(f"{mname}: SW2 - floor ({res['floor']:.3f})")
        axes[1].set_title(f"{mname}: RMS to exact ODE endpoint")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE (counted)")
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        p = os.path.join(out_dir, f"samplers_{mname}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description="Exact sampler benchmark on Gaussian mixtures.")
    ap.add_argument("--out", default="outputs/bench_samplers")
    ap.add_argument("--n", type=int, default=20000, help="samples per run (and per data draw)")
    ap.add_argument("--quick", action="store_true", help="4000 samples, NFE 5, 10, 20")
    ap.add_argument("--nfes", type=int, nargs="*", default=None)
    ap.add_argument("--mixtures", nargs="*", default=None, help="ring2d, random64d")
    ap.add_argument("--configs", nargs="*", default=None, help="subset of config labels")
    ap.add_argument("--exclude", nargs="*", default=(), help="config labels to leave out")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="instead of running: merge these results.json files (same n, mixtures) into --out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return _merge(args.merge, args.out)
    n = 4000 if args.quick else args.n
    nfes = args.nfes or ((5, 10, 20) if args.quick else NFES)
    all_cfg = {**CONFIGS, **_optimized_config()}
    cfg = {k: all_cfg[k] for k in args.configs} if args.configs else all_cfg
    cfg = {k: v for k, v in cfg.items() if k not in args.exclude}
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = run_benchmark(n=n, nfes=nfes, configs=cfg, mixture_names=args.mixtures)
    res["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    paths = plot(res, args.out)
    print(f"wrote {os.path.join(args.out, 'results.json')} and {', '.join(paths)} in {res['seconds']:.0f}s")
    return res


def _merge(paths, out_dir):
    """Concatenate the rows of several runs (same n, seed and mixtures: the floor and reference are identical)."""
    runs = [json.load(open(p)) for p in paths]
    res = runs[0]
    for r in runs[1:]:
        if r["n"] != res["n"]:
            raise ValueError(f"cannot merge runs with different n: {res['n']} and {r['n']}")
        for m, v in r["mixtures"].items():
            if m in res["mixtures"]:
                res["mixtures"][m]["rows"] += v["rows"]
            else:
                res["mixtures"][m] = v
    res["nfes"] = sorted({k for r in runs for k in r["nfes"]})
    res["seconds"] = sum(r.get("seconds", 0) for r in runs)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    for m, v in res["mixtures"].items():
        print(format_table(m, v, res["nfes"]))
    paths = plot(res, out_dir)
    print(f"wrote {os.path.join(out_dir, 'results.json')} and {', '.join(paths)}")
    return res


# ------------------------------------------------------------------------------------- schedule tuning
def heldout_mixtures():
    """Mixtures used to tune step placement; none of them is a benchmark mixture (other sizes and seeds): two
    rings (6 and 12 modes, std 0.05) and random mixtures in 16, 32, 48 and 96 dimensions."""
    return [ring_mixture(6, 1.0, 0.05), ring_mixture(12, 1.0, 0.05), random_mixture(16, 8, seed=1),
            random_mixture(48, 12, seed=3), random_mixture(96, 24, seed=5), random_mixture(32, 16, seed=2)]


def tune_schedule(name, opts, steps, mixes=None, n=1000, seed=123, maxiter=600, init=None, n_dirs=256,
                  eps=2e-3):
    """Nelder-Mead (adaptive) on the ramp positions t_1..t_{steps-1} of the 'optimized' spacing (parametrized by
    the logs of their increments, so they stay increasing), minimizing the mean over `mixes` of
    log(eps + SW2(samples, exact PF-ODE endpoints from the same x_T)): a distribution-level error that weighs
    the families equally (per-sample RMS is dominated by mode swaps in high dimension, which need not bias the
    distribution). Starts from `init` (ramp positions, t_0 = 0 first; default the logsnr spacing). Returns (ramp,
    final loss, initial loss)."""
    mixes = mixes or heldout_mixtures()
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    probs = []
    for k, mix in enumerate(mixes):
        g = torch.Generator().manual_seed(seed + k)
        x = torch.randn(n, mix.dim, generator=g, dtype=torch.float64) * SIGMA_MAX
        ref = SAMPLERS["ode_reference"](mix, x, torch.tensor([SIGMA_MAX, 0.0]), rtol=1e-8, atol=1e-8)
        probs.append((mix, x, SlicedW2(ref, n_dirs, generator=g)))

    def loss(u):
        t = np.concatenate([[0.0], np.cumsum(np.exp(u))])
        if t[-1] > 1.0:
            return 10.0 + t[-1]
        sig = torch.tensor(np.append((hi + t * (lo - hi)) ** 7, 0.0))
        total = 0.0
        for mix, x, sw2_ref in probs:
            out = SAMPLERS[name](mix, x.clone(), sig, **opts)
            total += math.log(eps + sw2_ref(out))
        return total / len(probs)

    if init is None:
        s0 = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), steps, dtype=torch.float64).exp()
        init = ((hi - s0 ** (1 / 7)) / (hi - lo)).clamp(max=0.999).tolist()
    t0 = np.asarray(init, dtype=np.float64)
    u0 = np.log(np.diff(t0))
    res = minimize(loss, u0, method="Nelder-Mead",
                   options={"maxiter": maxiter, "xatol": 1e-4, "fatol": 1e-5, "adaptive": True})
    t = np.concatenate([[0.0], np.cumsum(np.exp(res.x))])
    return [round(float(v), 5) for v in t], float(res.fun), loss(u0)


if __name__ == "__main__":
    main()
