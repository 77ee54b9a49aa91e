"""End-to-end evaluation of a checkpoint or of a file/folder of samples (what ``torchdiffusion evaluate`` runs)."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..build import load_denoiser, load_noisy_classifier
from ..guidance import net_num_classes, requested_labels
from ..sampling import generate
from ..utils import check_choice, hash_seed
from .likelihood import ode_bits_per_dim, vlb_bits_per_dim
from .quality import evaluate_samples, real_images

LIKELIHOODS = ("vlb", "ode")
LIKELIHOOD_SEED = 1       # the held-out test images for likelihood are drawn with this permutation seed


def likelihood_report(denoiser, which, *, n: int = 256, rtol: float = 1e-3, seed: int = 0,
                      progress: bool = False) -> dict:
    """Bits/dim on `n` held-out MNIST test images (permutation seed LIKELIHOOD_SEED) with the requested estimators."""
    x0, _ = real_images("mnist", "test", n, LIKELIHOOD_SEED)
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


def evaluate_checkpoint(path, *, n: int = 1000, likelihood=(), likelihood_n: int = 256, rtol: float = 1e-3,
                        progress: bool = False, **sample_overrides) -> dict:
    """Draw `n` samples with the run's sample configuration (fields of SampleConfig overridable; class_label=None
    means unconditional), evaluate them with :func:`evaluate_samples` (with class accuracy against the classes
    asked for), and add the requested likelihood estimates."""
    denoiser, cfg, meta = load_denoiser(path, use_ema=sample_overrides.pop("use_ema", None) is not False)
    s = dataclasses.replace(cfg.sample, n=n, **sample_overrides)
    shape = tuple(meta["data_shape"])
    classifier = load_noisy_classifier(s.classifier)[0] if s.guidance == "classifier" and s.classifier else None
    k = classifier.num_classes if classifier is not None else net_num_classes(denoiser)
    labels = requested_labels(n, s.class_label, s.guidance, k)  # (n,) or None
    t0 = time.time()
    with torch.no_grad():
        x = generate(denoiser, shape, s, classifier=classifier, labels=labels, progress=progress)
    result = {"checkpoint": str(path), "step": meta.get("step"), "sampler": s.sampler, "steps": s.steps,
              "spacing": s.spacing, "final": s.final or "default", "sampler_options": s.sampler_options,
              "clip_x0": s.clip_x0, "seed": s.seed, "class_label": s.class_label, "guidance": s.guidance,
              "guidance_scale": s.guidance_scale, "sample_seconds": round(time.time() - t0, 1)}
    result.update(evaluate_samples(x, labels=labels, seed=s.seed))
    if likelihood:
        result.update(likelihood_report(denoiser, likelihood, n=likelihood_n, rtol=rtol, seed=s.seed,
                                        progress=progress))
    return result


def format_table(result: dict) -> str:
    """A short human-readable table of the main numbers."""
    rows = [("n samples", result.get("n")), ("features", result.get("features"))]
    for k in ("fd", "kid", "precision", "recall"):
        if k in result:
            rows.append((k, f"{result[k]:.4g}" + (f"   (real-vs-real floor {result[k + '_floor']:.4g})"
                                                  if k + "_floor" in result else "")))
    for k in ("class_coverage", "class_entropy", "accuracy"):
        if k in result:
            rows.append((k, f"{result[k]:.4g}"))
    if "class_counts" in result:
        rows.append(("class_counts", " ".join(map(str, result["class_counts"]))))
    for w in LIKELIHOODS:
        r = result.get(f"bpd_{w}")
        if r:
            extra = f", NFE {r['nfe']}" if "nfe" in r else ""
            rows.append((f"bits/dim ({w})", f"{r['mean']:.4f} +- {1.96 * r['stderr']:.4f} (95% CI, n={r['n']}{extra})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
