"""End-to-end evaluation of a checkpoint or of a file/folder of samples (what ``torchdiffusion evaluate`` runs)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..utils import check_choice, hash_seed

LIKELIHOODS = ("vlb", "ode")
LIKELIHOOD_SEED = 1       # the held-out test images for likelihood are drawn with this permutation seed


def load_samples(path) -> tuple[torch.Tensor, str]:
    """Samples from an .npz (key 'samples', else the first of 'images', 'x', 'arr_0') or a folder of PNGs, as float
    (N, C, H, W) in [-1, 1], and a note saying how the values were read (uint8 0..255 or floats in [-1, 1])."""
    from ..data import load_image_folder

    path = Path(path).expanduser()
    if path.is_dir():
        u8, _ = load_image_folder(path)
        return u8.float() / 127.5 - 1, f"{len(u8)} images from folder {path} (uint8 0..255)"
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: expected a checkpoint (.safetensors), an .npz of samples or a folder of PNGs")
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        key = next((k for k in ("samples", "images", "x", "arr_0") if k in f.files), None)
        if key is None:
            raise ValueError(f"{path} has no array named 'samples' (found: {', '.join(f.files)})")
        a = f[key]
    if a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)                                           # (N, H, W, C) -> (N, C, H, W)
    elif a.ndim == 3:
        a = a[:, None]
    if a.dtype == np.uint8:
        return torch.from_numpy(a.astype(np.float32)) / 127.5 - 1, f"{path}[{key!r}]: uint8 0..255"
    if a.dtype.kind != "f":
        raise ValueError(f"{path}[{key!r}] has dtype {a.dtype}; expected uint8 or floats in [-1, 1]")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{path}[{key!r}] has floats in [{lo:.3g}, {hi:.3g}]; expected [-1, 1] (or uint8)")
    return torch.from_numpy(a.astype(np.float32)).clamp(-1, 1), f"{path}[{key!r}]: floats in [-1, 1]"


def likelihood_report(denoiser, which, *, n: int = 256, rtol: float = 1e-3, seed: int = 0,
                      progress: bool = False) -> dict:
    """Bits/dim on `n` held-out MNIST test images (permutation seed LIKELIHOOD_SEED) with the requested estimators."""
    from . import real_images
    from .likelihood import ode_bits_per_dim, vlb_bits_per_dim

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
    means unconditional), evaluate them with :func:`evaluate_samples` (with class accuracy when classes were
    requested), and add the requested likelihood estimates."""
    from ..guidance import net_num_classes
    from ..pipeline import generate, load_denoiser, requested_labels, sample_kwargs
    from . import evaluate_samples

    denoiser, cfg, meta = load_denoiser(path, use_ema=sample_overrides.pop("use_ema", None) is not False)
    s = dataclasses.replace(cfg.sample, n=n, **sample_overrides)
    shape = tuple(meta["data_shape"])
    kwargs = sample_kwargs(s, shape)
    t0 = time.time()
    with torch.no_grad():
        x = generate(denoiser, shape, n=n, progress=progress, **kwargs)
    result = {"checkpoint": str(path), "step": meta.get("step"), "sampler": s.sampler, "steps": s.steps,
              "spacing": s.spacing, "final": s.final or "default", "clip_x0": s.clip_x0, "seed": s.seed,
              "class_label": s.class_label, "guidance": kwargs["guidance"], "guidance_scale": s.guidance_scale,
              "sample_seconds": round(time.time() - t0, 1)}
    # the classes generate() asked for, so that the report includes class accuracy (classifier guidance takes its
    # classes from the classifier, not loaded here)
    labels = None if kwargs["guidance"] == "classifier" else \
        requested_labels(n, s.class_label, kwargs["guidance"], net_num_classes(denoiser))
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
