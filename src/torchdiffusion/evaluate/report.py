"""End-to-end evaluation of a checkpoint or of a file/folder of samples (what ``torchdiffusion evaluate`` runs)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..build import codec_for, load_denoiser, load_noisy_classifier
from ..guidance import net_num_classes, requested_labels
from ..sampling import generate
from ..utils import check_choice, hash_seed
from .likelihood import ode_bits_per_dim, vlb_bits_per_dim
from .quality import EVAL_DATASETS, FLOOR_DRAWS, add_ratio, eval_dataset, evaluate_samples, real_images

LIKELIHOODS = ("vlb", "ode")
LIKELIHOOD_SEED = 1       # the held-out test images for likelihood are drawn with this permutation seed


def likelihood_report(denoiser, which, *, n: int = 256, rtol: float = 1e-3, seed: int = 0, progress: bool = False,
                      dataset: str = "mnist") -> dict:
    """Bits/dim on `n` held-out test images of `dataset` (permutation seed LIKELIHOOD_SEED) with the requested
    estimators."""
    x0, _ = real_images(dataset, "test", n, LIKELIHOOD_SEED)
    out = {}
    for w in which:
        check_choice("likelihood", w, LIKELIHOODS)
        g = torch.Generator().manual_seed(hash_seed(seed, 0xB1D))
        t0 = time.time()
        if w == "vlb":
            r = vlb_bits_per_dim(denoiser, x0, generator=g, batch_size=256, progress=progress)
            r["terms_mean"] = {"L_0": float(r["terms_mean"][0]), "L_1..L_T-1": float(r["terms_mean"][1:-1].sum()),
                               "L_T": float(r["terms_mean"][-1])}
        else:
            r = ode_bits_per_dim(denoiser, x0, rtol=rtol, generator=g, batch_size=n, progress=progress)
            r["rtol"] = rtol
        r.pop("per_sample")
        r["seconds"] = round(time.time() - t0, 1)
        out[f"bpd_{w}"] = r
    return out


SEED_KEYS = ("fd", "kid", "fd_inf", "precision", "recall", "accuracy", "class_coverage", "class_entropy")


def combine_seeds(results: list, seeds: list) -> dict:
    """One result from evaluations of independent sample sets (one per sampling seed, the same floor): each figure
    of SEED_KEYS is the mean over the sets, its ``_std`` the standard deviation across them; per_seed keeps them."""
    out = dict(results[0])
    for key in SEED_KEYS:
        if key in out:
            vals = np.array([r[key] for r in results], dtype=float)
            out[key] = float(vals.mean())
            if key in ("fd", "kid", "fd_inf"):
                out[f"{key}_std"] = float(vals.std(ddof=1))
    out["class_counts"] = [int(sum(c)) for c in zip(*(r["class_counts"] for r in results))]
    out["n"] = sum(r["n"] for r in results) // len(results)
    out["spread"] = f"std over {len(seeds)} sampling seeds ({', '.join(map(str, seeds))}) of {out['n']} samples each"
    out["per_seed"] = [{"seed": s, **{k: r[k] for k in SEED_KEYS if k in r}} for s, r in zip(seeds, results)]
    return add_ratio(out)


def _dataset_of(cfg) -> str:
    dataset = eval_dataset(cfg.data.dataset)
    if dataset is None:
        raise ValueError(f"evaluate needs a data set with a feature network ({', '.join(EVAL_DATASETS)}); this run "
                         f"trained on {cfg.data.dataset!r}")
    return dataset


def evaluate_checkpoint(path, *, n: int = 1000, likelihood=(), likelihood_n: int = 256, rtol: float = 1e-3,
                        progress: bool = False, seeds=None, floor_draws: int = FLOOR_DRAWS,
                        n_ref: int | None = None, **sample_overrides) -> dict:
    """Draw `n` samples with the run's sample configuration (fields of SampleConfig overridable; class_label=None
    means unconditional), evaluate them with :func:`evaluate_samples` against the run's data set (the floor matched
    to the classes asked for; class accuracy against them), and add the requested likelihood estimates.
    `seeds` (two or more): one sample set per sampling seed, and the spreads are across them
    (:func:`combine_seeds`) instead of the bootstrap; the floor is drawn with the first seed. A model trained on
    latents (data.autoencoder) samples latents that its own autoencoder decodes to images before any feature is
    computed (a different autoencoder file is refused, see :func:`~torchdiffusion.build.codec_for`)."""
    denoiser, cfg, meta = load_denoiser(path, use_ema=sample_overrides.pop("use_ema", None) is not False)
    dataset = _dataset_of(cfg)
    codec = codec_for(cfg, meta, path)  # None for a pixel model
    if codec is not None and likelihood:
        raise ValueError("likelihood (bits/dim) is not defined for a model on latents: its density is over the "
                         "autoencoder's latents, not over pixels; evaluate it without --likelihood")
    s = dataclasses.replace(cfg.sample, n=n, **sample_overrides)
    seeds = [s.seed] if not seeds else [int(v) for v in seeds]
    shape = tuple(meta["data_shape"])
    classifier = load_noisy_classifier(s.classifier)[0] if s.guidance == "classifier" and s.classifier else None
    k = classifier.num_classes if classifier is not None else net_num_classes(denoiser)
    labels = requested_labels(n, s.class_label, s.guidance, k)  # (n,) or None
    t0 = time.time()
    results = []
    for seed in seeds:
        with torch.no_grad():
            x = generate(denoiser, shape, dataclasses.replace(s, seed=seed), classifier=classifier, labels=labels,
                         progress=progress, decode=codec.decode if codec is not None else None)  # images
        results.append(evaluate_samples(x, dataset, labels=labels, seed=seeds[0], floor_draws=floor_draws,
                                        n_ref=n_ref))
    result = {"checkpoint": str(path), "step": meta.get("step"), "dataset": dataset, "sampler": s.sampler,
              "steps": s.steps, "spacing": s.spacing, "final": s.final or "default",
              "sampler_options": s.sampler_options, "clip_x0": s.clip_x0, "seed": seeds[0], "seeds": seeds,
              "class_label": s.class_label, "guidance": s.guidance, "guidance_scale": s.guidance_scale,
              "sample_seconds": round(time.time() - t0, 1)}
    result.update(results[0] if len(results) == 1 else combine_seeds(results, seeds))
    if likelihood:
        result.update(likelihood_report(denoiser, likelihood, n=likelihood_n, rtol=rtol, seed=seeds[0],
                                        progress=progress, dataset=dataset))
    return result


def _pm(result: dict, key: str, fmt: str = ".4g") -> str:
    """'value +- std' (or 'value' without a std)."""
    std = result.get(f"{key}_std")
    return f"{result[key]:{fmt}}" + (f" +- {std:{fmt}}" if std is not None else "")


def _figure_row(result: dict, key: str) -> str:
    text = f"{_pm(result, key):<20}"
    if f"{key}_floor" in result:
        text += f"  floor {_pm(result, key + '_floor'):<20}"
    if key == "fd" and "fd_ratio" in result:
        text += f"  ratio {result['fd_ratio']:.2f} +- {result['fd_ratio_std']:.2f}"
    return text.rstrip()


def format_table(result: dict) -> str:
    """A short human-readable table of the main numbers: each figure +- its spread, beside its matched real floor
    (mean +- std over the draws) and, for FD, the ratio to the floor."""
    rows = [("n samples", result.get("n")), ("reference", result.get("reference")),
            ("features", f"{result.get('features')} ({result.get('feature_dim')}-d)")]
    if "floor_draws" in result:
        rows.append(("floor", f"{result['floor_draws']} draws of {result['n']} images of the "
                              f"{result['floor_source']}, {result['floor_composition']}"))
    rows.append(("spread", result.get("spread")))
    for k in ("fd", "fd_inf", "kid", "precision", "recall"):
        if k in result:
            rows.append((k, _figure_row(result, k)))
    if "fd_inf_note" in result:
        rows.append(("fd_inf", result["fd_inf_note"]))
    for k in ("class_coverage", "class_entropy", "accuracy"):
        if k in result:
            rows.append((k, f"{result[k]:.4g}"))
    if "class_counts" in result:
        sets = f"   (summed over the {len(result['per_seed'])} sample sets)" if "per_seed" in result else ""
        rows.append(("class_counts", " ".join(map(str, result["class_counts"])) + sets))
    for w in LIKELIHOODS:
        r = result.get(f"bpd_{w}")
        if r:
            extra = f", NFE {r['nfe']}" if "nfe" in r else ""
            rows.append((f"bits/dim ({w})", f"{r['mean']:.4f} +- {1.96 * r['stderr']:.4f} (95% CI, n={r['n']}{extra})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
