"""Data: the cache folder, MNIST, image folders and .npz arrays, 2-D toy sets, in-memory datasets and a
deterministic, resumable batch sampler.

Data sets never live in the repository; downloads go to :func:`cache_dir`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..utils import hash_seed


def cache_dir() -> Path:
    """$TORCHDIFFUSION_CACHE, else $XDG_CACHE_HOME/torchdiffusion, else ~/.cache/torchdiffusion."""
    env = os.environ.get("TORCHDIFFUSION_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "torchdiffusion"
    return Path.home() / ".cache" / "torchdiffusion"


from .images import (IMAGE_EXTENSIONS, TensorImageDataset, convert_channels, find_image_files,  # noqa: E402
                     load_image_folder, load_npz, resize_images, to_uint8_nchw)
from .mnist import RestrictedUnpickler, load_mnist, mnist_path, prepare_mnist, read_idx  # noqa: E402
from .toy import (TOY_DATASETS, GaussianMixture, ToyDataset, gaussian, make_toy, random_mixture,  # noqa: E402
                  ring_mixture)

MNIST_NAMES = ("mnist", "mnist-test")
NPZ_SUFFIXES = (".npz", ".npy")


def dataset_names() -> tuple:
    """The built-in names accepted by :func:`make_dataset` (besides folder and .npz paths)."""
    return MNIST_NAMES + TOY_DATASETS


def _npz_keys(path: Path) -> tuple:
    if path.suffix.lower() != ".npz":
        return ()
    try:
        with np.load(path, allow_pickle=False) as f:
            return tuple(f.files)
    except Exception:
        return ()  # load_npz reports the error


def _subset_indices(n: int, subset: int, seed: int) -> torch.Tensor:
    if int(subset) <= 0:
        raise ValueError(f"subset must be a positive number of examples, got {subset}")
    if subset >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(hash_seed(seed, 0x5B5E7))
    return torch.randperm(n, generator=g)[:subset].sort().values


def make_dataset(name_or_path, split: str = "train", image_size=None, subset: int | None = None, *,
                 channels: int | None = None, root=None, seed: int = 0, toy_size: int = 10_000):
    """An in-memory dataset with ``.labels``, ``.num_classes``, ``len()`` and ``batch(indices, generator=,
    flip=)`` -> (float32 in [-1, 1], labels or None).

    name_or_path: 'mnist' (split 'train' or 'test'), 'mnist-test', a 2-D toy name (see ``TOY_DATASETS``;
    returns a :class:`ToyDataset` of ``toy_size`` points, or ``subset`` points), a folder of images (a
    ``<folder>/<split>`` subfolder is used when it exists) or a .npz/.npy file (keys x_<split>/y_<split> are
    used when present). image_size resizes images (int: center crop to a square; or (H, W)), channels
    converts them to 1 or 3 channels, subset keeps a fixed random subset of that many examples (seeded by
    ``seed``), root is the cache root for MNIST.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; allowed values: 'train', 'test'")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    name = str(name_or_path)
    key = name.lower()
    if key in TOY_DATASETS:
        n = int(subset) if subset is not None else int(toy_size)
        if n <= 0:
            raise ValueError(f"a toy dataset needs a positive size, got {n}")
        g = torch.Generator().manual_seed(hash_seed(seed, 0 if split == "train" else 1))
        return ToyDataset(make_toy(key, n, generator=g), name=key)

    classes = None
    if key in MNIST_NAMES:
        images, labels = load_mnist("test" if key == "mnist-test" else split, root)
        num_classes = 10
        label = key if key == "mnist-test" or split == "train" else "mnist-test"
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            folder = path / split if (path / split).is_dir() else path
            if folder == path and split != "train":
                raise ValueError(f"image folder {path} has no {split!r} subfolder")
            images, labels, classes = load_image_folder(folder, size=image_size, channels=channels,
                                                        return_classes=True)
            num_classes = 0 if classes is None else len(classes)
        elif path.suffix.lower() in NPZ_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"array file {path} does not exist")
            split_key = f"x_{split}" if f"x_{split}" in _npz_keys(path) else None
            if split_key is None and split != "train":
                raise ValueError(f"{path} has no 'x_{split}' array for split {split!r}")
            images, labels = load_npz(path, key=split_key)
            num_classes = None
        else:
            if os.sep in name or "/" in name or path.suffix:
                raise FileNotFoundError(f"dataset path {path} does not exist (or is not a folder or .npz file)")
            accepted = ", ".join(repr(n) for n in dataset_names())
            raise ValueError(f"unknown dataset {name!r}; accepted: {accepted}, a folder of images, "
                             f"or a .npz file")
        label = name
    if subset is not None:
        idx = _subset_indices(images.shape[0], int(subset), seed)
        images = images[idx]
        labels = None if labels is None else labels[idx]
    if image_size is not None:
        images = resize_images(images, image_size)
    images = convert_channels(images, channels)
    return TensorImageDataset(images.contiguous(), labels, num_classes, name=label, classes=classes)


class EpochSampler:
    """Deterministic, resumable batches of indices into a dataset of size n.

    Epoch e uses the permutation drawn from (seed, e) alone, cut into global batches of ``batch_size``
    (the last, smaller one dropped when drop_last). Iterating yields int64 index tensors forever, moving
    on to the next epoch at the end of each one; ``state_dict()`` records (epoch, position) so that
    ``load_state_dict`` continues with exactly the same sequence. With ``world_size`` > 1, rank r gets
    the r-th of world_size disjoint slices of every global batch (batch_size must be divisible by
    world_size; a last partial batch is split as evenly as possible).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True, *, rank: int = 0,
                 world_size: int = 1):
        n, batch_size, world_size, rank = int(n), int(batch_size), int(world_size), int(rank)
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n}) and drop_last is set, "
                             f"so an epoch would have no batches")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, int(seed), bool(drop_last)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # global batches already yielded in the current epoch
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_batch(self, epoch: int, position: int) -> torch.Tensor:
        """The full (all ranks) batch number `position` of `epoch`."""
        if not 0 <= position < len(self):
            raise IndexError(f"batch {position} out of range for {len(self)} batches per epoch")
        return self.permutation(epoch)[position * self.batch_size:(position + 1) * self.batch_size]

    def _shard(self, batch: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return batch
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._shard(self.global_batch(self.epoch, self.position))
        self.position += 1
        return batch.clone()

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch of indices (same as ``next(sampler)``)."""
        return next(self)

    def epoch_batches(self, epoch: int) -> list:
        """All of this rank's batches of one epoch (does not move the sampler)."""
        return [self._shard(self.global_batch(epoch, i)).clone() for i in range(len(self))]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, position); the data order must be the same (n, batch_size, seed, drop_last), the
        sharding (rank, world_size) may differ."""
        for k in ("n", "batch_size", "seed", "drop_last"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]!r} but this sampler has {getattr(self, k)!r}; "
                                 f"resuming would change the data order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


__all__ = [
    "cache_dir", "make_dataset", "dataset_names", "EpochSampler", "TensorImageDataset", "ToyDataset",
    "load_mnist", "prepare_mnist", "mnist_path", "read_idx", "RestrictedUnpickler",
    "load_image_folder", "find_image_files", "load_npz", "to_uint8_nchw", "resize_images", "convert_channels",
    "IMAGE_EXTENSIONS", "TOY_DATASETS", "GaussianMixture", "gaussian", "make_toy", "random_mixture",
    "ring_mixture",
]
