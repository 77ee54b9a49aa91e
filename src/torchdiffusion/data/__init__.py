"""Data: the cache folder, MNIST and Fashion-MNIST, image folders and .npz arrays, 2-D toy sets, in-memory datasets,
text (tokenisers, Shakespeare, token windows), time series windows (timeseries) and a deterministic, resumable
batch sampler.

Data sets never live in the repository; downloads go to :func:`cache_dir`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..utils import check_choice, hash_seed
from .cache import cache_dir
from .fashion import FASHION_CLASSES, fashion_path, load_fashion_mnist, prepare_fashion_mnist
from .images import (IMAGE_EXTENSIONS, TensorImageDataset, convert_channels, find_image_files, load_image_folder,
                     load_npz, resize_images, to_uint8_nchw)
from .mnist import RestrictedUnpickler, load_mnist, mnist_path, prepare_mnist, read_idx
from .sampler import EpochSampler
from .timeseries import SERIES, SeriesConfig, SeriesWindows, make_series_dataset
from .text import (TEXT_DATASETS, TEXT_SPLITS, TOKENIZERS, ByteTokenizer, CharTokenizer, TextWindows,
                   make_text_dataset, make_tokenizer, prepare_shakespeare, prepare_text, read_split,
                   tokenizer_from_dict)
from .toy import TOY_DATASETS, GaussianMixture, ToyDataset, gaussian, make_toy, random_mixture, ring_mixture

MNIST_NAMES = ("mnist", "mnist-test")
FASHION_NAMES = ("fashion-mnist", "fashion-mnist-test")
SPLITS = ("train", "test")
NPZ_SUFFIXES = (".npz", ".npy")


def dataset_names() -> tuple:
    """The built-in names accepted by :func:`make_dataset` (besides folder and .npz paths)."""
    return MNIST_NAMES + FASHION_NAMES + TOY_DATASETS


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

    name_or_path: 'mnist' (split 'train' or 'test'), 'mnist-test', 'fashion-mnist' (the same splits; class names in
    ``.classes``), 'fashion-mnist-test', a 2-D toy name (see ``TOY_DATASETS``;
    returns a :class:`ToyDataset` of ``toy_size`` points, or ``subset`` points), a folder of images (a
    ``<folder>/<split>`` subfolder is used when it exists) or a .npz/.npy file (keys x_<split>/y_<split> are
    used when present). image_size resizes images (int: center crop to a square; or (H, W)), channels
    converts them to 1 or 3 channels, subset keeps a fixed random subset of that many examples (seeded by
    ``seed``), root is the cache root for MNIST.
    """
    check_choice("split", split, SPLITS)
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
    if key in MNIST_NAMES + FASHION_NAMES:
        load = load_mnist if key in MNIST_NAMES else load_fashion_mnist
        images, labels = load("test" if key.endswith("-test") else split, root)
        num_classes = 10
        classes = FASHION_CLASSES if key in FASHION_NAMES else None
        label = key if key.endswith("-test") or split == "train" else f"{key}-test"
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


__all__ = [
    "cache_dir", "make_dataset", "dataset_names", "EpochSampler", "TensorImageDataset", "ToyDataset",
    "load_mnist", "prepare_mnist", "mnist_path", "read_idx", "RestrictedUnpickler",
    "load_fashion_mnist", "prepare_fashion_mnist", "fashion_path", "FASHION_CLASSES", "MNIST_NAMES", "FASHION_NAMES",
    "load_image_folder", "find_image_files", "load_npz", "to_uint8_nchw", "resize_images", "convert_channels",
    "IMAGE_EXTENSIONS", "TOY_DATASETS", "GaussianMixture", "gaussian", "make_toy", "random_mixture",
    "ring_mixture", "TEXT_DATASETS", "TEXT_SPLITS", "TOKENIZERS", "ByteTokenizer", "CharTokenizer", "TextWindows",
    "make_text_dataset", "make_tokenizer", "prepare_shakespeare", "prepare_text", "read_split", "tokenizer_from_dict",
    "SERIES", "SeriesConfig", "SeriesWindows", "make_series_dataset",
]
