"""The real-vs-real floor of the evaluation rule (docs/evaluation.md), measured on real images only:

    python bench/floor.py --datasets mnist fashion-mnist --json outputs/bench_floor/floor.json

Table 1 (composition): FD of `--n` real training images against the whole test split, `--draws` draws each, for
random sets and for sets of n/10 of each class (`evaluate.real_floor`). Table 2 (a perfect generator): for each of
`--seeds`, `--n` real training images drawn with that seed (n/10 of each class, independent of the floor draws),
evaluated by `evaluate.evaluate_samples` with their labels (the floor drawn with the same class counts), and the
same for a random composition evaluated as unconditional samples (random floor draws). Table 3 (`--spread`): how
well the bootstrap spread `fd_std` of one set of n estimates the spread of FD across `--sets` independent sets, for
a perfect generator, one that replaces the last class by the others, and real images blurred by a 3x3 box filter.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchdiffusion.evaluate import evaluate_samples, extract_features, real_floor, reference_set
from torchdiffusion.evaluate.features import split_dataset
from torchdiffusion.evaluate.metrics import BOOTSTRAP, bootstrap_weights, weighted_stats
from torchdiffusion.utils import hash_seed

PERFECT_SALT = 0x9E7F  # the perfect generator's draws are independent of the floor's


def perfect_generator(dataset: str, n: int, seed: int, *, balanced: bool):
    """n real training images: n/10 of each class (balanced), or n at random; (images, labels)."""
    train = split_dataset(dataset, "train")
    g = torch.Generator().manual_seed(hash_seed(seed, PERFECT_SALT, int(balanced)))
    if not balanced:
        return train.batch(torch.randperm(len(train), generator=g)[:n])
    k = train.num_classes
    pools = [torch.nonzero(train.labels == c).flatten() for c in range(k)]
    return train.batch(torch.cat([p[torch.randperm(len(p), generator=g)[:n // k]] for p in pools]))


def _generator_sets(dataset: str, n: int, kind: str, seed: int) -> torch.Tensor:
    """Features of one set of n images of a generator of known quality (see `spread_rows`)."""
    train = split_dataset(dataset, "train")
    k = train.num_classes
    g = torch.Generator().manual_seed(hash_seed(seed, PERFECT_SALT, 7))
    pools = [torch.nonzero(train.labels == c).flatten() for c in range(k)]
    per = [n // k] * k if kind != "drop" else [n // (k - 1)] * (k - 2) + [n - (n // (k - 1)) * (k - 2), 0]
    x, _ = train.batch(torch.cat([p[torch.randperm(len(p), generator=g)[:c]] for p, c in zip(pools, per)]))
    if kind == "blur":
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    return extract_features(x, dataset=dataset)


def spread_rows(dataset: str, n: int, sets: int) -> list:
    """FD of `sets` independent sets per generator: its mean, its std across the sets, and the mean bootstrap
    std of one set (evaluate_samples' fd_std)."""
    ref = reference_set(dataset)
    rows = []
    for kind in ("perfect", "drop", "blur"):
        fds, boots = [], []
        for s in range(sets):
            f = _generator_sets(dataset, n, kind, s)
            fds.append(ref.frechet(f))
            boots.append(float(ref.frechet.batch(*weighted_stats(f, bootstrap_weights(
                n, BOOTSTRAP, generator=torch.Generator().manual_seed(s)))).std()))
        rows.append({"dataset": dataset, "generator": kind, "fd": float(np.mean(fds)),
                     "std_across_sets": float(np.std(fds, ddof=1)), "bootstrap_std": float(np.mean(boots))})
    return rows


def composition(dataset: str, n: int, draws: int, seed: int) -> dict:
    """Table 1: the floor (mean, std over `draws`) of random sets and of sets of n/10 of each class."""
    ref = reference_set(dataset)
    k = split_dataset(dataset, "train").num_classes
    labels = torch.arange(n) % k
    rand = real_floor(ref, None, n, draws=draws, seed=seed, fd_inf=False)
    matched = real_floor(ref, labels, n, draws=draws, seed=seed, fd_inf=False)
    return {"dataset": dataset, "n": n, "draws": draws, "random": [rand["fd_floor"], rand["fd_floor_std"]],
            "balanced": [matched["fd_floor"], matched["fd_floor_std"]]}


def perfect_rows(dataset: str, n: int, draws: int, seeds) -> list:
    """Table 2: a perfect generator per seed, balanced (matched floor) and random (random floor)."""
    rows = []
    for seed in seeds:
        x, y = perfect_generator(dataset, n, seed, balanced=True)
        r = evaluate_samples(x, dataset, labels=y, seed=seed, floor_draws=draws, fd_inf=False)
        xr, _ = perfect_generator(dataset, n, seed, balanced=False)
        u = evaluate_samples(xr, dataset, seed=seed, floor_draws=draws, fd_inf=False)
        rows.append({"dataset": dataset, "seed": seed, "floor": [r["fd_floor"], r["fd_floor_std"]],
                     "fd": [r["fd"], r["fd_std"]], "ratio": [r["fd_ratio"], r["fd_ratio_std"]],
                     "random_floor": [u["fd_floor"], u["fd_floor_std"]], "random_fd": u["fd"],
                     "random_ratio": [u["fd_ratio"], u["fd_ratio_std"]]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def tables(result: dict) -> str:
    """The tables as markdown."""
    pm = lambda v, f=".2f": f"{v[0]:{f}} +- {v[1]:{f}}"  # noqa: E731
    out = ["| data | random | n/10 of each class |", "|---|---|---|"]
    out += [f"| {c['dataset']} | {pm(c['random'])} | {pm(c['balanced'])} |" for c in result["composition"]]
    out += ["", "| data | seed | floor (matched) | FD of the perfect generator | ratio | same, random composition: "
            "floor (random) | FD | ratio |", "|---" * 8 + "|"]
    out += [f"| {r['dataset']} | {r['seed']} | {pm(r['floor'])} | {pm(r['fd'])} | {pm(r['ratio'])} | "
            f"{pm(r['random_floor'])} | {r['random_fd']:.2f} | {pm(r['random_ratio'])} |" for r in result["perfect"]]
    if result.get("spread"):
        out += ["", "| data | generator | FD | std across sets | bootstrap fd_std |", "|---" * 5 + "|"]
        out += [f"| {r['dataset']} | {r['generator']} | {r['fd']:.2f} | {r['std_across_sets']:.2f} | "
                f"{r['bootstrap_std']:.2f} |" for r in result["spread"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--n", type=int, default=1000, help="real images per set (default: 1000)")
    p.add_argument("--draws", type=int, default=5, help="floor draws (default: 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--spread", action="store_true", help="also table 3: bootstrap spread against independent sets")
    p.add_argument("--sets", type=int, default=8, help="independent sets per generator in table 3 (default: 8)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    result = {"composition": [composition(d, a.n, a.draws, a.seeds[0]) for d in a.datasets],
              "perfect": [r for d in a.datasets for r in perfect_rows(d, a.n, a.draws, a.seeds)],
              "spread": [r for d in a.datasets for r in spread_rows(d, a.n, a.sets)] if a.spread else []}
    print(tables(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
