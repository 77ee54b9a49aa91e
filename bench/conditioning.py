"""Conditionals of a joint (x, y) Gaussian by inpainting, against the exact Schur-complement conditional.

One model of z = (x, y) (data.joint.random_joint_gaussian(2, 2), its exact denoiser); p(y | x) and p(x | y) by
:func:`torchdiffusion.edit.impute` (replacement, and RePaint's resampling) for one drawn value. Per method, the
largest |mean error| in Monte Carlo standard errors and the range of the variance ratios (drawn / exact) over the
free coordinates. Run ``python bench/conditioning.py`` (about 20 s on 2 cores; ``--json PATH``).
"""
from __future__ import annotations

import argparse
import json

import torch

from torchdiffusion.data.joint import random_joint_gaussian
from torchdiffusion.edit import impute
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.schedules import EDMSchedule

METHODS = {  # label -> (steps, sampler, resample, jump_length)
    "replacement, Heun 40": (40, "heun", 1, 1),
    "replacement, Heun 160": (160, "heun", 1, 1),
    "replacement, DDPM 200": (200, "ddpm", 1, 1),
    "RePaint, DDPM 20, resample 10, jump 1": (20, "ddpm", 10, 1),
}


def measure(samples: int = 2000, seed: int = 0):
    j = random_joint_gaussian(2, 2, seed=seed)
    value = j.sample(1, generator=torch.Generator().manual_seed(seed + 1))
    sch = EDMSchedule(sigma_min=0.002, sigma_max=80.0)
    rows = []
    for given in ("x", "y"):
        mean, cov = j.conditional(value, given)
        free = j.mask(given)[0] == 0
        for label, (steps, sampler, resample, jump) in METHODS.items():
            out = impute(j, value, j.mask(given), get_sigmas(sch, steps, "karras").double(), samples=samples,
                         seed=seed, sampler=sampler, batch_size=samples, resample=resample, jump_length=jump)[:, 0]
            f = out[:, free]
            z = ((f.mean(0) - mean[0]) / (cov.diagonal() / samples).sqrt()).abs()
            ratio = f.var(0) / cov.diagonal()
            rows.append({"given": given, "method": label, "max_mean_err_se": float(z.max()),
                         "var_ratio_min": float(ratio.min()), "var_ratio_max": float(ratio.max()),
                         "known_exact": bool(torch.equal(out[:, ~free], value[:, ~free].expand(samples, -1)))})
    return {"samples": samples, "seed": seed, "rows": rows}


def format_table(res):
    lines = [f"| given | method | max mean error (SE, {res['samples']} draws) | variance ratio | known part exact |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['given']} | {r['method']} | {r['max_mean_err_se']:.1f} | "
                     f"{r['var_ratio_min']:.2f}-{r['var_ratio_max']:.2f} | {r['known_exact']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = measure(args.samples)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
