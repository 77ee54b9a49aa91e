"""What the command line reads: images and masks for the editing commands, sample sets for `evaluate`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import NPZ_SUFFIXES, load_image_folder, load_npz, make_dataset

MASKS = ("left", "right", "top", "bottom", "center", "outside")  # the named region is the one to fill


def _parse_indices(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"bad index list {text!r}; use e.g. 0,3,5 or 0-7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(lo, hi + 1))
    return out


def load_images(spec: str, shape: tuple) -> torch.Tensor:
    """Images in [-1, 1] of the model's `shape` (C, H, W) from `spec`: an image file (PNG, JPG, ...), a .npz/.npy
    file (all its images), or DATASET:INDICES with a dataset name or path `make_dataset` accepts and indices
    like 0,3,5 or 0-7 (e.g. mnist-test:0-7; resized to H x W). Returns (N, C, H, W) float32."""
    c, h, w = shape
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in NPZ_SUFFIXES:
        x = load_npz(path)[0]
    elif path.is_file():
        with Image.open(path) as im:
            arr = np.array(im.convert("L" if c == 1 else "RGB"))  # a writable copy for torch.from_numpy
        x = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1)[None]
    elif ":" in spec:
        name, idx = spec.rsplit(":", 1)
        data = make_dataset(name, split="test" if name.lower() == "mnist" else "train", image_size=(h, w))
        ids = _parse_indices(idx)
        if max(ids) >= len(data):
            raise ValueError(f"index {max(ids)} is out of range for {name!r} ({len(data)} images)")
        return _check_shape(data.batch(torch.tensor(ids))[0], shape, spec)
    else:
        raise FileNotFoundError(f"images {spec!r}: no such file; give an image, a .npz file or DATASET:INDICES "
                                f"(e.g. mnist-test:0-7)")
    return _check_shape(x.float() / 127.5 - 1, shape, spec)


def _check_shape(x: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"images from {what!r} have shape {tuple(x.shape[1:])} but the model expects "
                         f"{tuple(shape)}")
    return x.float()


def make_mask(spec: str, shape: tuple) -> torch.Tensor:
    """A mask (1 = known, 0 = to fill) of shape (1, H, W) for images of `shape` (C, H, W): a named region to fill
    (MASKS: left, right, top, bottom half, center square, outside = all but the center square) or an image /
    .npz file whose nonzero pixels are the known ones."""
    _, h, w = shape
    if spec in MASKS:
        m = torch.ones(1, h, w)
        ch, cw = slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)
        region = {"left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, w)),
                  "top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, h), slice(None)),
                  "center": (ch, cw), "outside": (ch, cw)}[spec]
        m[(slice(None), *region)] = 0
        return 1 - m if spec == "outside" else m
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"mask {spec!r} is neither a file nor a named mask; named masks: {', '.join(MASKS)}")
    if path.suffix.lower() in NPZ_SUFFIXES:
        arr = load_npz(path)[0][0]  # (C, H, W) uint8
    else:
        with Image.open(path) as im:
            arr = torch.from_numpy(np.asarray(im.convert("L")).copy())[None]
    if tuple(arr.shape[-2:]) != (h, w):
        raise ValueError(f"mask {spec!r} has shape {tuple(arr.shape[-2:])} but the images are {h}x{w}")
    return (arr[:1] > 0).float()


def load_samples(path) -> tuple[torch.Tensor, str]:
    """Samples from an .npz (key 'samples', else the first of 'images', 'x', 'arr_0') or a folder of PNGs, as float
    (N, C, H, W) in [-1, 1], and a note saying how the values were read (uint8 0..255 or floats in [-1, 1])."""
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
