"""The evaluation feature networks: a small classifier per data set (MNIST, Fashion-MNIST) trained by the project
itself, whose penultimate features serve Frechet distance, KID and precision/recall offline, and whose predictions
judge class coverage and class-conditional accuracy. (Not to be confused with the noise-conditional classifier
of classifier guidance, :class:`torchdiffusion.nets.NoisyClassifier`: this network only ever sees clean images, and
no model is trained against it, so it stays an independent judge.)

Architecture (LeCun-style CNN): conv3x3(1->32) ReLU maxpool2 -> conv3x3(32->64) ReLU maxpool2 -> linear
(64*7*7 -> 128) ReLU [features] -> dropout -> linear(128 -> 10). Trained with Adam and a cosine learning rate on
the data set's train split with the recipe of :data:`FEATURE_RECIPES` (MNIST: random shifts of up to 2 pixels,
3 epochs, > 99 % test accuracy; Fashion-MNIST: see the table). Weights live in
``<cache>/feature_nets/<dataset>.safetensors`` (safetensors + JSON metadata with the test accuracy, never pickle; an
MNIST file at the earlier location ``<cache>/classifiers/mnist.safetensors`` is still found).

Features of whole data splits are computed once and kept: :func:`split_features` holds them in memory and in
``<cache>/features/<dataset>-<split>-<features>-<hash>.safetensors``, keyed by the SHA-256 of the network's file, so
a retrained network never reuses stale features. Images are computed when first asked for (a reference set of the
10k test images, the training images of a floor draw) and saved with the rest.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..data import cache_dir, load_fashion_mnist, load_mnist, make_dataset
from ..utils import cached_file_sha256, check_choice, hash_seed
from .inception import inception_weights_path, load_inception

FEATURE_DATASETS = ("mnist", "fashion-mnist")
LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
# the training recipe per data set: epochs, random shifts (pixels), random horizontal flips
FEATURE_RECIPES = {
    "mnist": {"epochs": 3, "shift": 2, "flip": False},
    "fashion-mnist": {"epochs": 6, "shift": 0, "flip": False},
}
FEATURE_NET_FORMAT = "torchdiffusion-feature-net"
FEATURE_CACHE_FORMAT = "torchdiffusion-split-features"
LEGACY_FORMATS = ("torchdiffusion-classifier",)  # files written before the rename are read as well
FEATURES = ("feature_net", "inception")
FEATURE_BATCH = 500       # images per feature-network batch


class FeatureNet(nn.Module):
    """x in [-1, 1], (N, 1, 28, 28) -> logits (N, 10); ``features(x)`` -> (N, hidden) penultimate activations."""

    def __init__(self, channels: tuple = (32, 64), hidden: int = 128, num_classes: int = 10,
                 dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": [c1, c2], "hidden": hidden, "num_classes": num_classes, "dropout": dropout}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc1.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"FeatureNet expects (N, 1, 28, 28) images in [-1, 1], got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)           # (N, c1, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)           # (N, c2, 7, 7)
        return F.relu(self.fc1(h.flatten(1)))                # (N, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(x)))         # (N, num_classes)


def feature_net_path(dataset: str = "mnist") -> Path:
    """``<data.cache_dir()>/feature_nets/<dataset>.safetensors`` (for MNIST, the earlier ``classifiers/`` location
    when only that file exists)."""
    check_choice("feature-network dataset", dataset, FEATURE_DATASETS)
    path = cache_dir() / "feature_nets" / f"{dataset}.safetensors"
    legacy = cache_dir() / "classifiers" / f"{dataset}.safetensors"
    return legacy if dataset == "mnist" and not path.exists() and legacy.exists() else path


def random_shift(x: torch.Tensor, max_shift: int, *, generator=None) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with the background -1."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)                             # (N, C, H+2s, W+2s)
    off = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (off[0][:, None] + torch.arange(h))[:, None, :, None]           # (N, 1, H, 1)
    cols = (off[1][:, None] + torch.arange(w))[:, None, None, :]           # (N, 1, 1, W)
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def feature_net_accuracy(model: FeatureNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of (x in [-1, 1], labels y) classified correctly."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def _float_split(dataset: str, split: str):
    images, labels = LOADERS[dataset](split)
    return images.float().div_(127.5).sub_(1.0), labels        # (N, 1, 28, 28) in [-1, 1]


def _augment(x: torch.Tensor, shift: int, flip: bool, generator) -> torch.Tensor:
    """Random shifts of up to `shift` pixels and, with `flip`, random horizontal flips (p = 1/2)."""
    if flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return random_shift(x, shift, generator=generator)


def train_feature_net(dataset: str = "mnist", *, epochs: int | None = None, batch_size: int = 128, lr: float = 2e-3,
                      shift: int | None = None, flip: bool | None = None, seed: int = 0, path=None,
                      progress: bool = True) -> Path:
    """Train :class:`FeatureNet` on the train split (Adam, cosine decay; epochs, shifts and flips from the data
    set's :data:`FEATURE_RECIPES` unless given) and save it with its test accuracy in the metadata, atomically, to
    ``path`` (default :func:`feature_net_path`). Returns the path."""
    check_choice("feature-network dataset", dataset, FEATURE_DATASETS)
    recipe = FEATURE_RECIPES[dataset]
    epochs = recipe["epochs"] if epochs is None else int(epochs)
    shift = recipe["shift"] if shift is None else int(shift)
    flip = recipe["flip"] if flip is None else bool(flip)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    path = Path(path) if path is not None else cache_dir() / "feature_nets" / f"{dataset}.safetensors"
    x, y = _float_split(dataset, "train")
    xt, yt = _float_split(dataset, "test")
    torch.manual_seed(hash_seed(seed, 1))  # dropout masks and initialisation
    g = torch.Generator().manual_seed(hash_seed(seed, 2))
    model = FeatureNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(y) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    bar = tqdm(total=total, desc=f"train-feature-net ({dataset})", unit="step") if progress else None
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], shift, flip, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                if i % 50 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    acc = feature_net_accuracy(model, xt, yt)
    meta = {"kind": FEATURE_NET_FORMAT, "dataset": dataset, "arch": model.config, "test_accuracy": acc,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "shift": shift, "flip": flip, "seed": seed,
            "train_seconds": round(time.time() - t0, 1)}
    return save_checkpoint(path, meta=meta, model=model.state_dict())


def feature_net_metadata(dataset: str = "mnist", path=None) -> dict:
    """The JSON metadata saved with the feature network (test accuracy, training settings)."""
    return _load(dataset, path)[1]


def _load(dataset: str, path):
    path = Path(path) if path is not None else feature_net_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no {dataset} feature network at {path}; run `torchdiffusion train-feature-net "
                                f"--dataset {dataset}` (a few minutes on a CPU)")
    meta, groups = load_checkpoint(path)
    if meta.get("kind") not in (FEATURE_NET_FORMAT, *LEGACY_FORMATS):
        raise CheckpointError(f"{path} is not a torchdiffusion feature network")
    arch = meta["arch"]
    model = FeatureNet(tuple(arch["channels"]), arch["hidden"], arch["num_classes"], arch["dropout"])
    model.load_state_dict(groups["model"])
    return model.eval(), meta


_CACHE: dict = {}


def load_feature_net(dataset: str = "mnist", path=None) -> FeatureNet:
    """The trained feature network in eval mode (cached in memory per file and modification time)."""
    check_choice("feature-network dataset", dataset, FEATURE_DATASETS)
    p = Path(path) if path is not None else feature_net_path(dataset)
    key = (str(p), p.stat().st_mtime_ns if p.exists() else None)
    if key not in _CACHE:
        model, _ = _load(dataset, p)
        for prm in model.parameters():
            prm.requires_grad_(False)
        _CACHE.clear()
        _CACHE[key] = model
    return _CACHE[key]


# ------------------------------------------------------------------------------------- features of images

def network_path(features: str = "feature_net", dataset: str = "mnist") -> Path:
    """The weights file behind `features` (the data set's feature network, or the InceptionV3 FID weights)."""
    check_choice("features", features, FEATURES)
    return feature_net_path(dataset) if features == "feature_net" else inception_weights_path()


@torch.no_grad()
def extract_features(images: torch.Tensor, features: str = "feature_net", dataset: str = "mnist") -> torch.Tensor:
    """Features (N, D) float64 of images in [-1, 1] (N, C, H, W) under the chosen network."""
    check_choice("features", features, FEATURES)
    fn = load_feature_net(dataset).features if features == "feature_net" else load_inception()
    return torch.cat([fn(b.float()).double() for b in images.split(FEATURE_BATCH)])


@torch.no_grad()
def classify(images: torch.Tensor, dataset: str = "mnist") -> torch.Tensor:
    """The feature network's argmax class (N,) of images in [-1, 1]."""
    net = load_feature_net(dataset)
    return torch.cat([net(b.float()).argmax(1) for b in images.split(FEATURE_BATCH)])


file_hash = cached_file_sha256  # the feature network's file, hashed once per version


_DATASETS: dict = {}
_SPLITS: dict = {}


def split_dataset(dataset: str, split: str):
    """The data set's split (``make_dataset``), loaded once per process and cache folder."""
    key = (dataset, split, str(cache_dir()))
    if key not in _DATASETS:
        _DATASETS[key] = make_dataset(dataset, split=split)
    return _DATASETS[key]


def split_cache_path(dataset: str, split: str, features: str, digest: str) -> Path:
    """``<cache>/features/<dataset>-<split>-<features>-<first 16 hex digits of the network file's SHA-256>``."""
    return cache_dir() / "features" / f"{dataset}-{split}-{features}-{digest[:16]}.safetensors"


def _read_split_cache(path: Path, meta_want: dict, n: int):
    """(pos int64 (n,), rows float32 (M, D)) from a cache file (pos[i]: the row of image i, -1 when not computed),
    or None when the file is missing or does not match."""
    if not path.exists():
        return None
    try:
        meta, groups = load_checkpoint(path)
        pos, rows = groups["features"]["pos"].long(), groups["features"]["rows"].float()
    except (CheckpointError, KeyError, OSError) as e:
        print(f"[torchdiffusion.evaluate] ignoring the feature cache {path} ({e}); computing afresh",
              file=sys.stderr, flush=True)
        return None
    if any(meta.get(k) != v for k, v in meta_want.items()) or pos.shape != (n,) or int(pos.max()) >= len(rows):
        return None
    return pos, rows


def _split_entry(dataset: str, split: str, features: str) -> dict:
    digest = file_hash(network_path(features, dataset))
    key = (dataset, split, features, digest, str(cache_dir()))
    if key not in _SPLITS:
        n = len(split_dataset(dataset, split))
        path = split_cache_path(dataset, split, features, digest)
        meta = {"kind": FEATURE_CACHE_FORMAT, "dataset": dataset, "split": split, "features": features,
                "network_sha256": digest}
        got = _read_split_cache(path, meta, n)
        pos, rows = got if got is not None else (torch.full((n,), -1, dtype=torch.int64), None)
        _SPLITS[key] = {"pos": pos, "rows": rows, "path": path, "meta": meta}
    return _SPLITS[key]


def split_features(dataset: str, split: str, idx=None, *, features: str = "feature_net") -> torch.Tensor:
    """Features (len(idx), D) float64 of images `idx` (default: all) of a data split, each computed once: kept in
    memory and in :func:`split_cache_path` (keyed by the network file's SHA-256; only the images computed so far
    are stored), new ones added as asked for."""
    entry = _split_entry(dataset, split, features)
    n = len(entry["pos"])
    idx = torch.arange(n) if idx is None else torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"image indices must lie in 0..{n - 1} for {dataset} {split}")
    missing = idx[entry["pos"][idx] < 0].unique()
    if len(missing):
        x, _ = split_dataset(dataset, split).batch(missing)
        new = extract_features(x, features, dataset).float()                     # (M, D)
        start = 0 if entry["rows"] is None else len(entry["rows"])
        entry["rows"] = new if entry["rows"] is None else torch.cat([entry["rows"], new])
        entry["pos"][missing] = torch.arange(start, start + len(missing))
        save_checkpoint(entry["path"], meta=entry["meta"], features={"pos": entry["pos"], "rows": entry["rows"]})
    return entry["rows"][entry["pos"][idx]].double()
