"""Sample quality against a fixed real reference, beside the real-vs-real floor of the same composition, every
figure with its spread.

The rule (docs/evaluation.md, "How the floor is drawn"):

* **Reference** R: the data set's whole *test* split (10,000 images), or with ``n_ref`` the first ``n_ref`` of one
  fixed permutation of it (REFERENCE_SEED). It does not move with the seed.
* **Floor**: ``floor_draws`` (default 5) sets of real images from the *training* split (disjoint from R), as many
  as there are samples. With ``labels`` (the classes the samples were asked to be) each draw has exactly their
  class counts: the floor is what a perfect generator of the same composition scores. Unconditional samples
  (no labels) get random draws; where the data set has no labels the draws are random too, and the output says
  so (``floor_composition``). ``*_floor`` is the mean over the draws and ``*_floor_std`` their standard deviation.
  Draw d uses the generator ``hash_seed(seed, FLOOR_SALT, d)``, so the floor is a deterministic function of the
  seed and of the class counts.
* **The samples' spread**: a bootstrap over the sample set (``bootstrap`` resamples; Efron 1979): ``fd_std`` and
  ``kid_std`` are the standard deviations of FD and KID over the resamples (or, from
  :func:`~torchdiffusion.evaluate.report.evaluate_checkpoint` with several seeds, over independent sample sets).
  ``fd_ratio = fd / fd_floor`` with ``fd_ratio_std = fd_ratio sqrt((fd_std / fd)^2 + (fd_floor_std /
  fd_floor)^2)``.
* Figures that do not depend on the number of samples: **KID**, the unbiased MMD^2 between all samples and all of R
  (Binkowski et al. 2018), and **FD-infinity** (Chong & Forsyth 2020), FD extrapolated to 1/N = 0 from subsets of
  several sizes; both with the same matched floors. Precision/recall (Kynkaanniemi et al. 2019, k = PR_K) against R,
  with matched floors.

Features: ``"feature_net"`` (the project's own feature network of the data set, :mod:`.features`) or
``"inception"`` (the standard FID InceptionV3, needs the user-supplied weights file, :mod:`.inception`). Features of
the test and training splits are computed once and cached (:func:`~.features.split_features`); the reference's
statistics, kernel mean and k-NN radii once per process.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ..data import cache_dir
from ..guidance import net_num_classes, requested_labels
from ..sampling import generate
from ..utils import check_choice, hash_seed
from .features import (FEATURE_DATASETS, FEATURES, classify, extract_features, feature_net_path, file_hash,
                       network_path, split_dataset, split_features)
from .metrics import (BOOTSTRAP, FrechetReference, KernelReference, bootstrap_weights, cross_figures, fd_infinity,
                      knn_radii, weighted_stats)

EVAL_DATASETS = FEATURE_DATASETS
TEST_NAMES = {f"{d}-test": d for d in EVAL_DATASETS}  # make_dataset names of the test splits
PR_K = 3                  # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
FLOOR_DRAWS = 5           # real floor sets drawn per evaluation
REFERENCE_SEED = 0        # the fixed permutation of the test split that n_ref takes its first images from
FLOOR_SALT, BOOT_SALT, FD_INF_SALT, ORDER_SALT = 0xF1002, 0xB0075, 0xFD1F, 0xE7A1
FD_INF_MIN_PER_DIM = 4    # FD-infinity is reported for at least this many samples per feature dimension


def eval_dataset(name) -> str | None:
    """The evaluation data set of a data set name ('mnist', 'mnist-test' -> 'mnist'), or None when it has none."""
    key = str(name).lower()
    return key if key in EVAL_DATASETS else TEST_NAMES.get(key)


def num_classes(dataset: str) -> int:
    """The number of classes of an evaluation data set."""
    return split_dataset(_check_dataset(dataset), "test").num_classes


def _check_dataset(dataset: str) -> str:
    return check_choice("evaluation dataset", eval_dataset(dataset) or dataset, EVAL_DATASETS)


_REAL: dict = {}


def _order(dataset: str, split: str, seed: int) -> torch.Tensor:
    key = ("order", dataset, split, seed, str(cache_dir()))
    if key not in _REAL:
        g = torch.Generator().manual_seed(hash_seed(seed, ORDER_SALT))
        _REAL[key] = torch.randperm(len(split_dataset(dataset, split)), generator=g)
    return _REAL[key]


def _perm_slice(dataset: str, split: str, n: int, seed: int, offset: int) -> torch.Tensor:
    """perm[offset:offset + n] of the split's permutation drawn from `seed`, checked against the split's size."""
    perm = _order(dataset, split, seed)
    if offset < 0 or n < 1 or offset + n > len(perm):
        raise ValueError(f"asked for real images {offset}..{offset + n} of the {len(perm)} in {dataset} {split}")
    return perm[offset:offset + n]


def real_images(dataset: str = "mnist", split: str = "test", n: int = 1000, seed: int = 0, *,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images perm[offset:offset + n] of `split` (perm drawn from `seed`): (x in [-1, 1], labels)."""
    dataset = _check_dataset(dataset)
    return split_dataset(dataset, split).batch(_perm_slice(dataset, split, n, seed, offset))


def real_features(dataset: str = "mnist", split: str = "test", n: int = 1000, seed: int = 0, *,
                  offset: int = 0, features: str = "feature_net") -> torch.Tensor:
    """Features (n, D) of :func:`real_images` (from the split's feature cache)."""
    dataset = _check_dataset(dataset)
    return split_features(dataset, split, _perm_slice(dataset, split, n, seed, offset), features=features)


class Reference:
    """The fixed reference set R of an evaluation: features, labels, and what comparing with it costs once (the
    Gaussian statistics and covariance square root, the kernel mean of KID, the k-NN radii)."""

    def __init__(self, dataset: str, n_ref: int | None, features: str):
        ds = split_dataset(dataset, "test")
        if n_ref is not None and not 2 <= int(n_ref) <= len(ds):
            raise ValueError(f"n_ref must lie in 2..{len(ds)} (the {dataset} test split), got {n_ref}")
        idx = torch.arange(len(ds)) if n_ref is None else _order(dataset, "test", REFERENCE_SEED)[:int(n_ref)]
        self.dataset, self.features, self.n = dataset, features, len(idx)
        self.feats = split_features(dataset, "test", idx, features=features)           # (m, D)
        self.labels = None if ds.labels is None else ds.labels[idx]
        self.frechet = FrechetReference(self.feats)
        self._kernel, self._radii = None, {}
        self.key = (dataset, n_ref, features)       # reference_set adds the network file's hash

    @property
    def kernel(self) -> KernelReference:
        """KID against R (its kernel mean computed on first use)."""
        if self._kernel is None:
            self._kernel = KernelReference(self.feats)
        return self._kernel

    def radii(self, k: int) -> torch.Tensor:
        """(m,) distance of each reference image to its k-th nearest neighbour in R (computed once per k)."""
        if k not in self._radii:
            self._radii[k] = knn_radii(self.feats, k)
        return self._radii[k]

    def describe(self) -> str:
        """What the reference is, in words (the output's ``reference``)."""
        return f"the {self.n} images of the {self.dataset} test split" if self.n == len(
            split_dataset(self.dataset, "test")) else f"{self.n} fixed images of the {self.dataset} test split"


_REFS: dict = {}


def reference_set(dataset: str = "mnist", n_ref: int | None = None, features: str = "feature_net") -> Reference:
    """The :class:`Reference` of an evaluation (the whole test split, or n_ref fixed images of it), built once per
    process and network file."""
    dataset = _check_dataset(dataset)
    key = (dataset, n_ref, features, file_hash(network_path(features, dataset)), str(cache_dir()))
    if key not in _REFS:
        _REFS[key] = Reference(dataset, n_ref, features)
        _REFS[key].key = key
    return _REFS[key]


def class_counts(labels: torch.Tensor, k: int, dataset: str) -> list:
    """[count of class c for c < k] of labels (n,), which must be classes 0..k-1."""
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be classes 0..{k - 1} of {dataset}, "
                         f"got {int(labels.min())}..{int(labels.max())}")
    return torch.bincount(labels, minlength=k).tolist()


def floor_draws(dataset: str, labels: torch.Tensor | None, n: int, draws: int = FLOOR_DRAWS,
                seed: int = 0) -> tuple[list, str]:
    """Indices into the training split of `draws` floor sets of n images, and how they were drawn: with exactly
    the class counts of `labels` (n,), else at random. Draw d uses the generator hash_seed(seed, FLOOR_SALT, d)."""
    train = split_dataset(dataset, "train")
    if int(draws) < 2:
        raise ValueError(f"floor_draws must be at least 2 (the floor's spread needs two draws), got {draws}")
    gens = [torch.Generator().manual_seed(hash_seed(seed, FLOOR_SALT, d)) for d in range(int(draws))]
    if labels is None or train.labels is None:
        if n > len(train):
            raise ValueError(f"a floor of {n} images needs more than the {len(train)} {dataset} training images")
        note = "random (unconditional samples)" if labels is None else "random (the data set has no labels)"
        return [torch.randperm(len(train), generator=g)[:n] for g in gens], note
    k = train.num_classes
    counts = class_counts(labels, k, dataset)
    pools = [torch.nonzero(train.labels == c).flatten() for c in range(k)]
    short = [c for c in range(k) if counts[c] > len(pools[c])]
    if short:
        raise ValueError(f"the labels ask for more images of classes {short} than the {dataset} training split holds")
    out = [torch.cat([p[torch.randperm(len(p), generator=g)[:c]] for p, c in zip(pools, counts) if c]) for g in gens]
    return out, "the samples' class counts (" + " ".join(map(str, counts)) + ")"


def _fd_inf_ok(n: int, dim: int) -> bool:
    return n >= FD_INF_MIN_PER_DIM * dim


def _set_figures(feats: torch.Tensor, ref: Reference, k: int, *, fd_inf: bool, generator, bootstrap: int = 0,
                 boot_generator=None) -> dict:
    """FD, KID, precision, recall (and FD-infinity) of one feature set (N, D) against the reference; with
    `bootstrap` resamples also their spreads fd_std and kid_std (and fd_inf_std includes fd_std)."""
    out = {"fd": ref.frechet(feats)}
    out["precision"], out["recall"], kxy = cross_figures(feats, ref.feats, ref.radii(k), k=k)
    out["kid"] = ref.kernel(feats, kxy=kxy)
    if bootstrap:
        out.update(_bootstrap_spread(feats, ref, bootstrap, boot_generator, kxy))
    fd_std = out.get("fd_std", 0.0)
    if fd_inf:
        r = fd_infinity(feats, ref.frechet, generator=generator, fd_std=fd_std)
        out.update(fd_inf=r["fd_inf"], fd_inf_std=r["fd_inf_err"], fd_inf_sizes=r["sizes"])
    return out


def _bootstrap_spread(feats: torch.Tensor, ref: Reference, resamples: int, generator, kxy) -> dict:
    """fd_std and kid_std: standard deviations over bootstrap resamples of the sample set."""
    w = bootstrap_weights(len(feats), resamples, generator=generator)                 # (B, N)
    fds = ref.frechet.batch(*weighted_stats(feats, w))
    kids = ref.kernel.bootstrap(feats, w, kxy=kxy)
    return {"fd_std": float(fds.std()), "kid_std": float(kids.std())}


FLOOR_KEYS = ("fd", "kid", "precision", "recall", "fd_inf")
_FLOORS: dict = {}


def real_floor(ref: Reference, labels: torch.Tensor | None, n: int, *, draws: int = FLOOR_DRAWS, seed: int = 0,
               k: int = PR_K, fd_inf: bool = True) -> dict:
    """The matched floor: mean and std (over `draws` draws of :func:`floor_draws`) of FD, KID, precision, recall
    and FD-infinity of real training images against the reference; cached per arguments."""
    comp = None if labels is None else tuple(class_counts(labels, num_classes(ref.dataset), ref.dataset))
    key = (ref.key, comp, n, draws, seed, k, fd_inf)
    if key not in _FLOORS:
        sets, note = floor_draws(ref.dataset, labels, n, draws, seed)
        split_features(ref.dataset, "train", torch.cat(sets), features=ref.features)  # computes new ones at once
        g = torch.Generator().manual_seed(hash_seed(seed, FD_INF_SALT, 1))
        rows = [_set_figures(split_features(ref.dataset, "train", idx, features=ref.features), ref, k,
                             fd_inf=fd_inf, generator=g) for idx in sets]
        out = {"floor_draws": len(sets), "floor_composition": note, "floor_source": f"{ref.dataset} training split"}
        for name in (m for m in FLOOR_KEYS if m in rows[0]):
            vals = np.array([r[name] for r in rows])
            out[f"{name}_floor"], out[f"{name}_floor_std"] = float(vals.mean()), float(vals.std(ddof=1))
            out[f"{name}_floor_values"] = [float(v) for v in vals]
        _FLOORS[key] = out
    return dict(_FLOORS[key])


def add_ratio(out: dict) -> dict:
    """fd_ratio = fd / fd_floor and its spread fd_ratio sqrt((fd_std/fd)^2 + (fd_floor_std/fd_floor)^2)."""
    if "fd_floor" in out and out["fd_floor"] > 0:
        ratio = out["fd"] / out["fd_floor"]
        rel = np.hypot(out.get("fd_std", 0.0) / max(out["fd"], 1e-300), out["fd_floor_std"] / out["fd_floor"])
        out["fd_ratio"], out["fd_ratio_std"] = float(ratio), float(ratio * rel)
    return out


def class_figures(samples: torch.Tensor, dataset: str, labels: torch.Tensor | None) -> dict:
    """class_counts (feature-network argmax), class_coverage, class_entropy (bits) and, with labels, accuracy."""
    pred = classify(samples, dataset)
    counts = torch.bincount(pred, minlength=num_classes(dataset))
    p = counts.double() / len(pred)
    out = {"class_counts": [int(c) for c in counts], "class_coverage": float((counts > 0).double().mean()),
           "class_entropy": float(-(p[p > 0] * p[p > 0].log2()).sum())}
    if labels is not None:
        out["accuracy"] = float((pred == labels).double().mean())
    return out


def _check_samples(samples: torch.Tensor, dataset: str, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = split_dataset(dataset, "test").sample_shape
    if samples.ndim != 4 or tuple(samples.shape[1:]) != tuple(shape) or samples.shape[0] < 2:
        raise ValueError(f"samples must have shape (N >= 2, {', '.join(map(str, shape))}) for {dataset}, "
                         f"got {tuple(samples.shape)}")
    s = samples.float()
    if s.min() < -1 - 1e-3 or s.max() > 1 + 1e-3:
        raise ValueError(f"samples must lie in [-1, 1], got [{float(s.min()):.3g}, {float(s.max()):.3g}]")
    if labels is None:
        return s.clamp(-1, 1), None
    lab = torch.as_tensor(labels).long().reshape(-1)
    if lab.shape != (s.shape[0],):
        raise ValueError(f"labels must have one class per sample ({s.shape[0]}), got shape {tuple(lab.shape)}")
    return s.clamp(-1, 1), lab


def evaluate_samples(samples: torch.Tensor, dataset: str = "mnist", *, labels=None, n_ref: int | None = None,
                     floor_draws: int = FLOOR_DRAWS, seed: int = 0, features: str = "feature_net", k: int = PR_K,
                     floor: bool = True, bootstrap: int = BOOTSTRAP, fd_inf: bool = True) -> dict:
    """Sample-quality figures of `samples` (float in [-1, 1], (N, C, H, W)) by the rule of the module docstring.

    labels: the class asked for per sample (N,) (None: unconditional); the floor draws have their class counts and
    ``accuracy`` is the share the feature network reads as asked. Returns n, n_ref, reference, features,
    feature_dim; fd, fd_std, kid, kid_std, precision, recall, fd_inf, fd_inf_std (the extrapolation's error with the
    sample set's own spread; for at least FD_INF_MIN_PER_DIM samples per feature dimension); with `floor`: the same
    with suffix ``_floor`` and ``_floor_std`` (mean and std over the draws), floor_draws, floor_composition, and
    fd_ratio, fd_ratio_std; class_counts, class_coverage, class_entropy (bits); spread (how the spreads were got).
    """
    dataset = _check_dataset(dataset)
    s, lab = _check_samples(samples, dataset, labels)
    ref = reference_set(dataset, n_ref, features)
    fake = extract_features(s, features, dataset)                                     # (N, D)
    n, dim = fake.shape
    use_inf = fd_inf and _fd_inf_ok(n, dim)
    out: dict = {"n": n, "n_ref": ref.n, "reference": ref.describe(), "features": features, "feature_dim": dim}
    out["spread"] = f"bootstrap ({bootstrap} resamples of the {n} samples)"
    g = torch.Generator().manual_seed(hash_seed(seed, FD_INF_SALT, 0))
    out.update(_set_figures(fake, ref, k, fd_inf=use_inf, generator=g, bootstrap=bootstrap,
                            boot_generator=torch.Generator().manual_seed(hash_seed(seed, BOOT_SALT))))
    if fd_inf and not use_inf:
        out["fd_inf_note"] = f"not computed: needs at least {FD_INF_MIN_PER_DIM * dim} samples"
    if floor:
        out.update(real_floor(ref, lab, n, draws=floor_draws, seed=seed, k=k, fd_inf=use_inf))
        add_ratio(out)
    out.update(class_figures(s, dataset, lab))
    return out


PERIODIC_KEYS = ("fd", "fd_std", "fd_floor", "fd_floor_std", "fd_ratio", "kid", "precision", "recall",
                 "class_coverage")
_NOTICES: set = set()


def _notice_once(msg: str) -> None:
    if msg not in _NOTICES:
        _NOTICES.add(msg)
        print(f"[torchdiffusion.evaluate] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def periodic_evaluation(denoiser, cfg, shape: tuple, *, device="cpu", decode=None) -> dict | None:
    """The training-time check (``train.eval_every``): draw ``train.eval_samples`` samples with the run's sample
    configuration and return {fd, fd_std, fd_floor, fd_floor_std, fd_ratio, kid, precision, recall,
    class_coverage} by :func:`evaluate_samples` (the floor matched to the classes asked for); `decode`: for a
    model on latents (`shape` is the latent's), its autoencoder's decoder, so that images are evaluated. Only for data sets
    with a feature network (MNIST, Fashion-MNIST) once it is trained; otherwise prints a one-line notice (once) and
    returns None."""
    dataset = eval_dataset(cfg.data.dataset)
    if dataset is None:
        _notice_once(f"train.eval_every: skipped, periodic evaluation needs {' or '.join(EVAL_DATASETS)}, "
                     f"not {cfg.data.dataset}")
        return None
    if not feature_net_path(dataset).exists():
        _notice_once(f"train.eval_every: skipped, no feature network; run `torchdiffusion train-feature-net "
                     f"--dataset {dataset}` first")
        return None
    n, spec = int(cfg.train.eval_samples), cfg.sample
    labels = requested_labels(n, spec.class_label, spec.guidance, net_num_classes(denoiser))
    x = generate(denoiser, tuple(shape), spec, n=n, labels=labels, device=device, decode=decode)
    r = evaluate_samples(x.clamp(-1, 1), dataset, labels=labels, seed=spec.seed, fd_inf=False)
    return {k: float(r[k]) for k in PERIODIC_KEYS}
