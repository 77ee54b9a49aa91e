"""The evaluation feature network: a small MNIST classifier trained by the project itself, whose penultimate
features serve Frechet distance, KID and precision/recall offline, and whose predictions judge class coverage and
class-conditional accuracy. (Not to be confused with the noise-conditional classifier of classifier guidance,
:class:`torchdiffusion.nets.NoisyClassifier`: this network only ever sees clean images, and no model is trained
against it, so it stays an independent judge.)

Architecture (LeCun-style CNN): conv3x3(1->32) ReLU maxpool2 -> conv3x3(32->64) ReLU maxpool2 -> linear
(64*7*7 -> 128) ReLU [features] -> dropout -> linear(128 -> 10). Trained with Adam and a cosine learning rate on
the MNIST train split with random shifts of up to ``shift`` pixels; reaches > 99 % test accuracy in 3 epochs.
Weights live in ``<cache>/feature_nets/mnist.safetensors`` (safetensors + JSON metadata, never pickle; a file at
the earlier location ``<cache>/classifiers/mnist.safetensors`` is still found).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..data import cache_dir, load_mnist
from ..utils import check_choice, hash_seed

FEATURE_DATASETS = ("mnist",)
FEATURE_NET_FORMAT = "torchdiffusion-feature-net"
LEGACY_FORMATS = ("torchdiffusion-classifier",)  # files written before the rename are read as well


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
    """``<data.cache_dir()>/feature_nets/<dataset>.safetensors`` (or the earlier ``classifiers/`` location when only
    that file exists)."""
    check_choice("feature-network dataset", dataset, FEATURE_DATASETS)
    path = cache_dir() / "feature_nets" / f"{dataset}.safetensors"
    legacy = cache_dir() / "classifiers" / f"{dataset}.safetensors"
    return legacy if not path.exists() and legacy.exists() else path


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


def _mnist_float(split: str):
    images, labels = load_mnist(split)
    return images.float().div_(127.5).sub_(1.0), labels        # (N, 1, 28, 28) in [-1, 1]


def train_feature_net(dataset: str = "mnist", *, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3,
                      shift: int = 2, seed: int = 0, path=None, progress: bool = True) -> Path:
    """Train :class:`FeatureNet` on the train split (Adam, cosine decay, random shifts) and save it with its
    test accuracy in the metadata, atomically, to ``path`` (default :func:`feature_net_path`). Returns the path."""
    check_choice("feature-network dataset", dataset, FEATURE_DATASETS)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    path = Path(path) if path is not None else cache_dir() / "feature_nets" / f"{dataset}.safetensors"
    x, y = _mnist_float("train")
    xt, yt = _mnist_float("test")
    torch.manual_seed(hash_seed(seed, 1))  # dropout masks and initialisation
    g = torch.Generator().manual_seed(hash_seed(seed, 2))
    model = FeatureNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(y) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    bar = None
    if progress:
        bar = tqdm(total=total, desc=f"train-feature-net ({dataset})", unit="step")
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], shift, generator=g)), y[idx])
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
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "shift": shift, "seed": seed,
            "train_seconds": round(time.time() - t0, 1)}
    return save_checkpoint(path, meta=meta, model=model.state_dict())


def feature_net_metadata(dataset: str = "mnist", path=None) -> dict:
    """The JSON metadata saved with the feature network (test accuracy, training settings)."""
    return _load(dataset, path)[1]


def _load(dataset: str, path):
    path = Path(path) if path is not None else feature_net_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no {dataset} feature network at {path}; run `torchdiffusion train-feature-net` "
                                f"(a few minutes on a CPU)")
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
