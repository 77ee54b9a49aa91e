"""Evaluation: Frechet distance, KID and precision/recall in the features of a chosen network, class coverage
under the feature network, and likelihood in bits/dim (variational bound and probability-flow ODE).

Features: ``"feature_net"`` (the project's own MNIST feature network, penultimate layer; works offline, see
:mod:`.features`) or ``"inception"`` (the standard FID InceptionV3 pool3, needs the user-supplied weights file,
see :mod:`.inception`). Reference images come from the MNIST *test* split, permuted once by ``seed``: the first
``n_real`` are the reference set R1 the samples are compared with, the next ``n_real`` a second, disjoint real set
R2; the floor (fd_floor, kid_floor, precision_floor, recall_floor) compares R2 with R1, i.e. what a perfect
generator of ``n_real`` samples would score. ``n_real`` defaults to the number of samples (at most 5000).
"""
from __future__ import annotations

import sys

import torch

from ..data import MNIST_NAMES, make_dataset
from ..sampling import generate
from ..utils import check_choice, hash_seed
from .features import feature_net_path, load_feature_net
from .inception import inception_weights_path, load_inception
from .metrics import frechet_distance, kernel_inception_distance, precision_recall

FEATURES = ("feature_net", "inception")
EVAL_DATASETS = ("mnist",)
PR_K = 3                  # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
KID_SUBSETS = 100         # random subsets averaged by KID
KID_SUBSET_SIZE = 1000    # subset size of KID (smaller sets use their full size)
FEATURE_BATCH = 500       # images per feature-network batch


@torch.no_grad()
def extract_features(images: torch.Tensor, features: str = "feature_net", dataset: str = "mnist") -> torch.Tensor:
    """Features (N, D) float64 of images in [-1, 1] (N, C, H, W) under the chosen network."""
    check_choice("features", features, FEATURES)
    if features == "feature_net":
        fn = load_feature_net(dataset).features
    else:
        fn = load_inception()
    return torch.cat([fn(b.float()).double() for b in images.split(FEATURE_BATCH)])


@torch.no_grad()
def classify(images: torch.Tensor, dataset: str = "mnist") -> torch.Tensor:
    """The feature network's argmax class (N,) of images in [-1, 1]."""
    net = load_feature_net(dataset)
    return torch.cat([net(b.float()).argmax(1) for b in images.split(FEATURE_BATCH)])


_REAL: dict = {}


def _real_order(dataset: str, split: str, seed: int) -> torch.Tensor:
    key = ("order", dataset, split, seed)
    if key not in _REAL:
        ds = make_dataset(dataset, split=split)
        g = torch.Generator().manual_seed(hash_seed(seed, 0xE7A1))
        _REAL[key] = (ds, torch.randperm(len(ds), generator=g))
    return _REAL[key]


def real_images(dataset: str = "mnist", split: str = "test", n: int = 1000, seed: int = 0, *,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images perm[offset:offset + n] of `split` (perm drawn from `seed`): (x in [-1, 1], labels)."""
    check_choice("evaluation dataset", dataset, EVAL_DATASETS)
    ds, perm = _real_order(dataset, split, seed)
    if offset < 0 or n < 1 or offset + n > len(perm):
        raise ValueError(f"asked for real images {offset}..{offset + n} of the {len(perm)} in {dataset} {split}")
    return ds.batch(perm[offset:offset + n])


def real_features(dataset: str = "mnist", split: str = "test", n: int = 1000, seed: int = 0, *,
                  offset: int = 0, features: str = "feature_net") -> torch.Tensor:
    """Features (n, D) of :func:`real_images`, cached in memory per (arguments, feature network file)."""
    check_choice("features", features, FEATURES)
    p = feature_net_path(dataset) if features == "feature_net" else inception_weights_path()
    key = ("feats", dataset, split, n, seed, offset, features, str(p), p.stat().st_mtime_ns if p.exists() else 0)
    if key not in _REAL:
        x, _ = real_images(dataset, split, n, seed, offset=offset)
        _REAL[key] = extract_features(x, features, dataset)
    return _REAL[key]


def evaluate_samples(samples: torch.Tensor, dataset: str = "mnist", *, labels=None, n_real: int | None = None,
                     seed: int = 0, features: str = "feature_net", k: int = PR_K, floor: bool = True) -> dict:
    """Sample-quality metrics of `samples` (float in [-1, 1], (N, 1, 28, 28)) against real test images.

    KID averages KID_SUBSETS random subsets of min(1000, N/2) of each set; kid_std is their spread.
    Returns fd, kid, kid_std, precision, recall (samples vs R1) and the same with suffix ``_floor`` (R2 vs R1,
    two disjoint real sets of n_real test images; see the module docstring), class_counts (10 ints: feature-network
    argmax of the samples), class_coverage (fraction of classes with at least one sample), class_entropy (bits;
    log2(10) = 3.32 when balanced), and with `labels` (the requested classes, (N,)) accuracy = fraction the
    feature network reads as the requested class.
    """
    check_choice("evaluation dataset", dataset, EVAL_DATASETS)
    if samples.ndim != 4 or samples.shape[1:] != (1, 28, 28):
        raise ValueError(f"samples must have shape (N, 1, 28, 28) for {dataset}, got {tuple(samples.shape)}")
    s = samples.float()
    if s.min() < -1 - 1e-3 or s.max() > 1 + 1e-3:
        raise ValueError(f"samples must lie in [-1, 1], got [{float(s.min()):.3g}, {float(s.max()):.3g}]")
    n = s.shape[0]
    n_real = int(n_real) if n_real is not None else min(n, 5000)
    fake = extract_features(s.clamp(-1, 1), features, dataset)
    r1 = real_features(dataset, "test", n_real, seed, features=features)
    # subsets of half the set (at most KID_SUBSET_SIZE) so that kid_std shows the spread of the estimate
    kid_kw = dict(subsets=KID_SUBSETS, subset_size=min(KID_SUBSET_SIZE, max(2, min(n, n_real) // 2)),
                  generator=torch.Generator().manual_seed(hash_seed(seed, 0x41D)))
    out: dict = {"n": n, "n_real": n_real, "features": features, "feature_dim": int(fake.shape[1])}
    out["fd"] = frechet_distance(fake, r1)
    out["kid"], out["kid_std"] = kernel_inception_distance(fake, r1, **kid_kw)
    out["precision"], out["recall"] = precision_recall(r1, fake, k=k)
    if floor:
        r2 = real_features(dataset, "test", n_real, seed, offset=n_real, features=features)
        out["fd_floor"] = frechet_distance(r2, r1)
        out["kid_floor"], out["kid_floor_std"] = kernel_inception_distance(r2, r1, **kid_kw)
        out["precision_floor"], out["recall_floor"] = precision_recall(r1, r2, k=k)
    pred = classify(s.clamp(-1, 1), dataset)
    counts = torch.bincount(pred, minlength=10)
    p = counts.double() / n
    out["class_counts"] = [int(c) for c in counts]
    out["class_coverage"] = float((counts > 0).double().mean())
    out["class_entropy"] = float(-(p[p > 0] * p[p > 0].log2()).sum())
    if labels is not None:
        lab = torch.as_tensor(labels).long().reshape(-1)
        if lab.shape != (n,):
            raise ValueError(f"labels must have one class per sample ({n}), got shape {tuple(lab.shape)}")
        out["accuracy"] = float((pred == lab).double().mean())
    return out


PERIODIC_KEYS = ("fd", "fd_floor", "kid", "precision", "recall", "class_coverage")
_NOTICES: set = set()


def _notice_once(msg: str) -> None:
    if msg not in _NOTICES:
        _NOTICES.add(msg)
        print(f"[torchdiffusion.evaluate] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def periodic_evaluation(denoiser, cfg, shape: tuple, *, device="cpu") -> dict | None:
    """The training-time check (``train.eval_every``): draw ``train.eval_samples`` samples with the run's sample
    configuration and return {fd, fd_floor, kid, precision, recall, class_coverage} (feature-network features, floor
    of as many real test images). Only for MNIST-like data (1 x 28 x 28) with the cached feature network; otherwise prints a
    one-line notice (once) and returns None."""
    if tuple(shape) != (1, 28, 28) or str(cfg.data.dataset).lower() not in MNIST_NAMES:
        _notice_once(f"train.eval_every: skipped, periodic evaluation needs MNIST (1x28x28), not {cfg.data.dataset}")
        return None
    if not feature_net_path("mnist").exists():
        _notice_once("train.eval_every: skipped, no feature network; run `torchdiffusion train-feature-net` first")
        return None
    n = int(cfg.train.eval_samples)
    x = generate(denoiser, tuple(shape), cfg.sample, n=n, device=device)
    r = evaluate_samples(x.clamp(-1, 1), seed=cfg.sample.seed)
    return {k: float(r[k]) for k in PERIODIC_KEYS}


