"""Guidance benchmark on MNIST: per guidance scale, how often the evaluation classifier reads a generated digit as
the requested class, next to the Frechet distance to real digits and the diversity of the samples.

    python bench/guidance.py --model outputs/mnist-cond/checkpoints/best.safetensors \
        --classifier outputs/classifier-mnist/checkpoints/best.safetensors --per-class 50 --json out.json

For each method (cfg, classifier) and scale, sample i asks for class i mod 10 (the same starting noise at every
scale). Scale 0 is the unconditional model for both methods (CFG: the null class; classifier guidance: the
null-class model with no gradient), so it is drawn once. FD is against the 10,000 MNIST test digits, beside the
matched floor (`evaluate.evaluate_samples`: real training digits with the samples' class counts, mean +- std over 5
draws) and the ratio to it; the FD spread is the bootstrap over the sample set. Diversity is the mean pairwise
distance of the evaluation classifier's features between samples of the same requested class (real test digits of
one class give the reference value `real`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from torchdiffusion.build import load_denoiser, load_noisy_classifier
from torchdiffusion.evaluate import evaluate_samples, extract_features, real_images
from torchdiffusion.guidance import class_labels_for
from torchdiffusion.sampling import SampleConfig, generate
from torchdiffusion.viz import image_table

SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)
METHODS = ("cfg", "classifier")
NUM_CLASSES = 10


def within_class_diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between features (N, D) of one class."""
    vals = []
    for k in labels.unique():
        f = feats[labels == k]
        if len(f) > 1:
            d = torch.cdist(f, f)  # (n_k, n_k)
            vals.append(float(d.sum() / (len(f) * (len(f) - 1))))
    return sum(vals) / len(vals)


def run(model: str, classifier: str, *, per_class: int = 50, scales=SCALES, methods=METHODS, sampler: str = "dpmpp_2m",
        steps: int = 20, spacing: str = "karras", seed: int = 0, batch_size: int = 250, img_dir: str | None = None):
    denoiser, cfg, meta = load_denoiser(model)
    clf = load_noisy_classifier(classifier)[0] if "classifier" in methods else None
    n = per_class * NUM_CLASSES
    labels = class_labels_for(n, -1, NUM_CLASSES)  # (n,) sample i asks for class i mod 10
    real, real_y = real_images("mnist", "test", n, seed)  # real digits of each class, for the diversity reference
    real_div = within_class_diversity(extract_features(real), real_y)
    rows, grids, cache = [], {}, {}
    for method in methods:
        for s in scales:
            key = "unguided" if s == 0 else (method, s)
            t0 = time.time()
            if key not in cache:
                spec = SampleConfig(sampler=sampler, steps=steps, spacing=spacing, seed=seed, batch_size=batch_size,
                                    clip_x0=True, guidance=method, guidance_scale=s)
                cache[key] = generate(denoiser, (1, 28, 28), spec, n=n, labels=labels, classifier=clf, progress=True)
            x = cache[key]
            m = evaluate_samples(x, "mnist", labels=labels, seed=seed)
            div = within_class_diversity(extract_features(x), labels)
            rows.append({"method": method, "scale": s, "accuracy": m["accuracy"], "fd": m["fd"], "fd_std": m["fd_std"],
                         "fd_floor": m["fd_floor"], "fd_floor_std": m["fd_floor_std"], "fd_ratio_floor": m["fd_ratio"],
                         "fd_ratio_floor_std": m["fd_ratio_std"], "precision": m["precision"],
                         "recall": m["recall"], "diversity": div, "diversity_real": real_div,
                         "seconds": time.time() - t0})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            grids.setdefault(method, []).append(x[:NUM_CLASSES])  # classes 0..9, one each
    base = {r["method"]: r["fd"] for r in rows if r["scale"] == 0}
    for r in rows:
        r["fd_ratio"] = r["fd"] / base[r["method"]] if r["method"] in base else None
    if img_dir is not None:
        for method, cols in grids.items():
            table = [[cols[j][k] for j in range(len(cols))] for k in range(NUM_CLASSES)]
            image_table(table, Path(img_dir) / f"guidance_{method}.png", col_titles=[f"s={s:g}" for s in scales],
                        row_titles=[str(k) for k in range(NUM_CLASSES)],
                        title=f"{'classifier-free' if method == 'cfg' else 'classifier'} guidance")
    return {"model": model, "classifier": classifier, "checkpoint_step": meta.get("step"), "n": n,
            "sampler": sampler, "steps": steps, "spacing": spacing, "seed": seed, "rows": rows}


def table(result: dict) -> str:
    head = ("| method | scale | accuracy | FD | FD / floor | FD / FD(s=0) | precision | recall | diversity |\n"
            + "|---" * 9 + "|\n")
    ratio = lambda r: "-" if r["fd_ratio"] is None else f"{r['fd_ratio']:.2f}"  # noqa: E731 (no s = 0 row)
    body = "".join(f"| {r['method']} | {r['scale']:g} | {r['accuracy']:.3f} | {r['fd']:.2f} +- {r['fd_std']:.2f} | "
                   f"{r['fd_ratio_floor']:.2f} +- {r['fd_ratio_floor_std']:.2f} | {ratio(r)} | "
                   f"{r['precision']:.3f} | {r['recall']:.3f} | {r['diversity']:.2f} |\n" for r in result["rows"])
    r0 = result["rows"][0]
    return head + body + (f"\nFD floor ({result['n']} real training digits with the samples' class counts against "
                          f"the 10,000 test digits, 5 draws): {r0['fd_floor']:.2f} +- {r0['fd_floor_std']:.2f}; "
                          f"diversity of real digits: {r0['diversity_real']:.2f}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="outputs/mnist-cond/checkpoints/best.safetensors",
                   help="class-conditional diffusion checkpoint")
    p.add_argument("--classifier", default="outputs/classifier-mnist/checkpoints/best.safetensors",
                   help="noise-conditional classifier checkpoint")
    p.add_argument("--per-class", type=int, default=50, help="samples per class and scale")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--spacing", default="karras")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--img-dir", default=None, help="write guidance_<method>.png grids here (e.g. docs/img)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    res = run(a.model, a.classifier, per_class=a.per_class, scales=a.scales, methods=a.methods, sampler=a.sampler,
              steps=a.steps, spacing=a.spacing, seed=a.seed, img_dir=a.img_dir)
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
