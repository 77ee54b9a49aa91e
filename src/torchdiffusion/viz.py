"""Pictures: sample grids, forward-noising and denoising strips, an autoencoder's reconstructions and latent
channels, loss curves, 2-D scatter plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .utils import randn


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 array (H', W', C)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_image(arr: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    return save_image(make_grid(images, nrow), path, scale)


def save_samples(x: torch.Tensor, out_dir: str | Path, stem: str = "samples") -> dict:
    """A batch of samples in [-1, 1] as a grid PNG and an .npz of uint8 images (N x H x W x C), for images
    (N, C, H, W); as an .npz of the float values and a scatter plot for 2-D points (N, 2). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / f"{stem}.npz"
    if x.ndim == 4:
        png = save_grid(x, out_dir / f"{stem}.png", nrow=int(math.ceil(math.sqrt(x.shape[0]))), scale=3)
        np.savez_compressed(npz, images=to_uint8(x))
        return {"grid": str(png), "npz": str(npz)}
    np.savez_compressed(npz, samples=x.numpy())
    return {"npz": str(npz), "plot": str(scatter_2d(x, out_dir / f"{stem}.png"))}


def _to_view(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> an array imshow can draw (grey or RGB), clipped to the valid range."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def image_table(rows: Sequence[Sequence[torch.Tensor]], path: str | Path, *, col_titles=None, row_titles=None,
                title: str = "", cell: float = 0.9) -> Path:
    """A table of images with column and row captions (matplotlib), e.g. a noising or denoising strip."""
    plt = _plt()
    nr, nc = len(rows), len(rows[0])
    fig, axes = plt.subplots(nr, nc, figsize=(cell * nc + 0.8, cell * nr + 0.6), dpi=110, squeeze=False)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            ax = axes[i][j]
            ax.imshow(_to_view(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and col_titles is not None:
                ax.set_title(col_titles[j], fontsize=7)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_fig(plt, fig, path)


def forward_strip(x0: torch.Tensor, schedule, sigmas: Sequence[float], path: str | Path, *, generator=None,
                  col_titles=None) -> Path:
    """Rows: real images; columns: samples of q(x_t | x_0) at the given noise levels, shown as the network sees
    them (VP scaling: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps for a DDPM schedule)."""
    noise = randn(x0.shape, generator=generator)
    rows = []
    for i in range(x0.shape[0]):
        row = []
        for s in sigmas:
            s_t = torch.tensor(float(s))
            row.append(schedule.input_scale(s_t) * (x0[i] + s_t * noise[i]))
        rows.append(row)
    titles = col_titles or [f"sigma={float(s):.3g}" for s in sigmas]
    return image_table(rows, path, col_titles=titles, title="forward process q(x_t | x_0)")


def trajectory_strip(xs: Sequence[torch.Tensor], x0s: Sequence[torch.Tensor], sigmas: Sequence[float],
                     path: str | Path, *, schedule=None, col_titles=None) -> Path:
    """Two rows per sample: the state x_t (as the network sees it) and the predicted x0 along the reverse process."""
    rows, row_titles = [], []
    for i in range(xs[0].shape[0]):
        scale = [float(schedule.input_scale(torch.tensor(float(s)))) if schedule is not None
                 else 1 / math.sqrt(1 + float(s) ** 2) for s in sigmas]
        rows.append([x[i] * c for x, c in zip(xs, scale)])
        rows.append([x0[i] for x0 in x0s])
        row_titles += ["x_t", "predicted x0"]
    titles = col_titles or [f"sigma={float(s):.3g}" for s in sigmas]
    return image_table(rows, path, col_titles=titles, row_titles=row_titles, title="reverse process")


def latent_views(z: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, h, w) -> (N, C, 1, h, w) in [-1, 1]: each channel divided by its largest magnitude over the
    batch, so that 0 is mid-grey and the channels compare across images (not across channels)."""
    peak = z.detach().float().abs().amax(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)  # (1, C, 1, 1)
    return (z.detach().float() / peak).unsqueeze(2)


def autoencoder_table(x: torch.Tensor, rec: torch.Tensor, z: torch.Tensor, path: str | Path, *, title: str = "") \
        -> Path:
    """One column per image: the original x, its reconstruction rec, then each latent channel of z (shown by
    `latent_views`, at the latent's own resolution)."""
    if not (x.shape == rec.shape and x.shape[0] == z.shape[0]):
        raise ValueError(f"originals {tuple(x.shape)}, reconstructions {tuple(rec.shape)} and latents "
                         f"{tuple(z.shape)} must have the same number of images (and x, rec the same shape)")
    views = latent_views(z)  # (N, C, 1, h, w)
    rows = [list(x), list(rec)] + [list(views[:, c]) for c in range(z.shape[1])]
    names = ["original", "reconstruction"] + [f"latent {c}" for c in range(z.shape[1])]
    return image_table(rows, path, row_titles=names, title=title)


def _save_fig(plt, fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(metrics: list[dict], path: str | Path, key: str = "loss", log_scale: bool | None = None) -> Path:
    """Plot a logged scalar against the step (raw points and a running mean); a log axis when every value is
    positive (or as `log_scale` says)."""
    plt = _plt()
    steps = np.array([m["step"] for m in metrics if key in m])
    vals = np.array([m[key] for m in metrics if key in m], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if len(vals):
        ax.plot(steps, vals, lw=0.8, alpha=0.5, label=key)
        k = max(1, len(vals) // 20)
        if len(vals) > k:
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.8, label=f"running mean ({k})")
        if log_scale if log_scale is not None else bool((vals > 0).all()):
            ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3, which="both")
    return _save_fig(plt, fig, path)


def scatter_2d(samples: torch.Tensor, path: str | Path, data: torch.Tensor | None = None, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    if data is not None:
        ax.scatter(*data[:, :2].T.cpu().numpy(), s=1, alpha=0.3, label="data", c="gray")
    ax.scatter(*samples[:, :2].T.cpu().numpy(), s=1, alpha=0.5, label="samples", c="tab:blue")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(markerscale=8)
    return _save_fig(plt, fig, path)
