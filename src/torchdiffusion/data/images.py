"""Image data held in memory as uint8 (N, C, H, W): folders of image files, .npz arrays, and a small dataset
class that turns index batches into float tensors in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..utils import rand

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABEL_KEYS = ("y", "labels")
IMAGE_KEYS = ("x", "images", "data", "arr_0")


# ------------------------------------------------------------------------------------------ folders


def find_image_files(path):
    """Sorted image files under `path` (recursive) and their class layout.

    Returns (files, labels, classes): when every image sits in an immediate subfolder of `path`
    (ImageFolder convention), classes are the sorted subfolder names and labels[i] the index of files[i]'s
    folder; otherwise labels and classes are None.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no images found under {root}; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}")
    rel = [p.relative_to(root).parts for p in files]
    if all(len(r) == 2 for r in rel):
        classes = sorted({r[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        return files, [index[r[0]] for r in rel], classes
    return files, None, None


def _open_image(file: Path):
    try:
        with Image.open(file) as im:
            im.load()
            return im.copy()
    except Exception as e:
        raise ValueError(f"cannot read image {file}: {type(e).__name__}: {e}") from e


def _is_gray(im) -> bool:
    return im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") or (
        im.mode == "P" and all(r == g == b for r, g, b in zip(*[iter(im.getpalette() or [])] * 3)))


def _to_mode(im, channels: int):
    """PIL image -> uint8 numpy (H, W, channels); transparency is composited onto black."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 / (65535.0 if a.max() > 255 else 255.0) if im.mode != "F" else 255.0
        im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _center_crop_resize(im, size):
    """Center-crop to the aspect ratio of `size` (int: square) then resize with bicubic (antialiased)."""
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    if w * th > h * tw:  # too wide
        cw, ch = round(h * tw / th), h
    else:
        cw, ch = w, round(w * th / tw)
    left, top = (w - cw) // 2, (h - ch) // 2
    im = im.crop((left, top, left + cw, top + ch))
    return im.resize((tw, th), Image.BICUBIC, reducing_gap=None)


def load_image_folder(path, size=None, channels: int | None = None, *, return_classes: bool = False):
    """Every PNG/JPG/BMP/WebP image under `path` as uint8 (N, C, H, W), with labels or None.

    size: None (all images must already share one size), an int (center-crop to a square and resize) or
    (H, W). channels: 1, 3, or None (1 when every image is grayscale, else 3). Labels follow the ImageFolder
    convention (see :func:`find_image_files`). With return_classes, also returns the class names (or None).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if size is not None and not isinstance(size, int) and len(size) != 2:
        raise ValueError(f"size must be an int or (H, W), got {size!r}")
    files, labels, classes = find_image_files(path)
    images = [_open_image(f) for f in files]
    if channels is None:
        channels = 1 if all(_is_gray(im) for im in images) else 3
    arrays = []
    for f, im in zip(files, images):
        if size is not None:
            im = _center_crop_resize(im, size)
        a = _to_mode(im, channels)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"images differ in size: {files[0].name} is {arrays[0].shape[1]}x{arrays[0].shape[0]} "
                             f"but {f} is {a.shape[1]}x{a.shape[0]}; pass size= to resize them")
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    return (x, y, classes) if return_classes else (x, y)


# ------------------------------------------------------------------------------------------ arrays


def to_uint8_nchw(a, *, what: str = "array") -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; uint8 (or integers in 0..255) or floats in
    [0, 1] or [-1, 1] -> uint8 tensor (N, C, H, W)."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
            pass
        elif a.shape[-1] in (1, 3):
            a = a.transpose(0, 3, 1, 2)
        else:
            raise ValueError(f"{what} has shape {a.shape}: cannot find a channel axis with 1 or 3 channels "
                             f"(expected (N, H, W), (N, H, W, C) or (N, C, H, W))")
    else:
        raise ValueError(f"{what} has shape {a.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if a.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype.kind in "ui":
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"{what} has integer dtype {a.dtype} with values outside 0..255")
        out = a.astype(np.uint8)
    elif a.dtype.kind == "f":
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f"{what} has float values in [{lo:g}, {hi:g}]; floats must lie in [0, 1] or [-1, 1] "
                             f"(convert other ranges to uint8 first)")
        f = a.astype(np.float64)
        f = (f + 1.0) * 0.5 if lo < 0 else f
        out = np.clip(np.rint(f * 255.0), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{what} has unsupported dtype {a.dtype}; expected uint8 or float")
    return torch.from_numpy(np.ascontiguousarray(out))


def load_npz(path, key: str | None = None, *, return_key: bool = False):
    """Images (and labels, from key 'y' or 'labels', when present) from a .npz (or .npy) file.

    key: the image array's name; by default the first of 'x', 'images', 'data', 'arr_0' present, or the
    only array. Returns (uint8 (N, C, H, W), int64 labels (N,) or None).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            arrays = {"arr_0": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"cannot read {path} as a numpy .npz/.npy file: {type(e).__name__}: {e}") from e
    keys = ", ".join(sorted(arrays)) or "(none)"
    if key is None:
        key = next((k for k in IMAGE_KEYS if k in arrays), None)
        if key is None:
            candidates = [k for k, v in arrays.items() if v.ndim in (3, 4)]
            if len(candidates) != 1:
                raise ValueError(f"{path}: cannot tell which array holds the images (keys: {keys}); pass key=")
            key = candidates[0]
    elif key not in arrays:
        raise ValueError(f"{path} has no array {key!r}; available keys: {keys}")
    x = to_uint8_nchw(arrays[key], what=f"{path.name}[{key!r}]")
    label_keys = list(LABEL_KEYS)
    if key.startswith("x_"):
        label_keys.insert(0, "y_" + key[2:])
    label_key = next((k for k in label_keys if k in arrays), None)
    y = None
    if label_key is not None:
        lab = arrays[label_key]
        if lab.shape != (x.shape[0],) or lab.dtype.kind not in "ui" or (lab.size and lab.min() < 0):
            raise ValueError(f"{path.name}[{label_key!r}]: labels must be non-negative integers of shape "
                             f"({x.shape[0]},), got {lab.dtype} {lab.shape}")
        y = torch.from_numpy(lab.astype(np.int64))
    return (x, y, key) if return_key else (x, y)


# ------------------------------------------------------------------------------------------ transforms


def resize_images(x: torch.Tensor, size) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to `size` (int: square, after a center crop; or (H, W)) with antialiased
    bicubic interpolation; returns uint8."""
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    if w * th > h * tw:
        cw, ch = round(h * tw / th), h
    else:
        cw, ch = w, round(w * th / tw)
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[..., top:top + ch, left:left + cw]
    out = []
    for chunk in x.split(4096):
        y = F.interpolate(chunk.float(), size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) to 1 channel (ITU-R 601 luma, as Pillow's "L") or 3 (grayscale repeated)."""
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and x.shape[1] == 3:
        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
        return ((x.to(torch.int32) * w).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)
    raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")


# ------------------------------------------------------------------------------------------ dataset


class TensorImageDataset:
    """In-memory images, uint8 (N, C, H, W), with optional int64 labels (N,).

    ``batch(indices)`` returns float32 images in [-1, 1] and the labels (or None), converted on the fly.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None,
                 *, name: str = "", classes=None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        if num_classes is None:
            num_classes = 0 if labels is None or len(labels) == 0 else int(labels.max()) + 1
        self.num_classes = int(num_classes)
        self.name = name
        self.classes = classes

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"TensorImageDataset(name={self.name!r}, n={len(self)}, shape={self.sample_shape}, "
                f"num_classes={self.num_classes})")

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        """(float32 (B, C, H, W) in [-1, 1], int64 labels (B,) or None); flip: random horizontal flips (p=1/2)
        drawn from `generator`."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx].to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)
        if flip:
            mask = rand((x.shape[0],), generator=generator) < 0.5
            x = torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)
        y = None if self.labels is None else self.labels[idx].to(device)
        return x, y

    def subset(self, indices) -> "TensorImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorImageDataset(self.images[idx], None if self.labels is None else self.labels[idx],
                                  self.num_classes, name=self.name, classes=self.classes)
