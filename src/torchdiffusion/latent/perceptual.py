"""Perceptual distances for the autoencoder's objective.

* ``own``: a small VGG-style classifier trained on the run's data set for this purpose only (it is never the
  evaluation feature network, whose features must stay an independent judge of the autoencoder and of the models
  trained on its latents). The distance is LPIPS's form without learned channel weights (Zhang et al. 2018, eq. 1
  with w = 1): at each of its feature layers, unit-normalise the channels, square the difference, average over
  positions and sum over channels; then average the layers.
* an LPIPS folder: the published LPIPS-VGG (Zhang et al. 2018) from two files the user supplies (it cannot be
  fetched here): ``vgg16.pth`` (torchvision's ImageNet VGG-16, key names ``features.<i>.weight``) and ``vgg.pth``
  (LPIPS v0.1's linear layers, ``lin<k>.model.1.weight``). Both are read with ``torch.load(weights_only=True)``.
  Grey images are repeated to three channels.
"""
from __future__ import annotations

import hashlib

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..data import FASHION_NAMES, MNIST_NAMES, cache_dir, make_dataset
from ..utils import hash_seed

PERCEPTUAL_FORMAT = "torchdiffusion-perceptual-net"
LPIPS_SHIFT = (-0.030, -0.088, -0.188)   # LPIPS's ScalingLayer: (x - shift) / scale on [-1, 1] RGB input
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)          # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features
EPS = 1e-10                              # LPIPS's normalisation guard


def unit_channels(f: torch.Tensor) -> torch.Tensor:
    """f / ||f|| over channels at every position (LPIPS's normalize_tensor)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS)


class PerceptualNet(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv, pool -> linear (N, num_classes); `taps(x)` returns the three
    post-activation feature maps the distance compares."""

    def __init__(self, in_channels: int = 1, widths: tuple = (32, 64, 128), num_classes: int = 10):
        super().__init__()
        a, b, c = widths
        self.config = {"in_channels": in_channels, "widths": list(widths), "num_classes": num_classes}
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, a, 3, padding=1),
                                    nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.Conv2d(b, b, 3, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(b, c, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(c, num_classes)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.stage1(x)                         # (N, a, H, W)
        f2 = self.stage2(F.max_pool2d(f1, 2))       # (N, b, H/2, W/2)
        f3 = self.stage3(F.max_pool2d(f2, 2))       # (N, c, H/4, W/4)
        return [f1, f2, f3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.taps(x)[-1].mean((2, 3)))


class OwnDistance(nn.Module):
    """P(x, y) (N,) in the features of a PerceptualNet (frozen)."""

    def __init__(self, net: PerceptualNet):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net.taps(x), self.net.taps(y)
        terms = [(unit_channels(a) - unit_channels(b)).pow(2).sum(1).mean((1, 2)) for a, b in zip(fx, fy)]
        return torch.stack(terms).mean(0)  # (N,)


PERCEPTUAL_MIN_IMAGES = 64  # labelled training images the own perceptual network needs at the least


def perceptual_path(dataset: str, image_size=None) -> Path:
    """Where the own perceptual network of `dataset` is cached: a named data set by its name; a folder or file by
    its name and a hash of its absolute path (two folders of one name do not share a network, and the file stays
    inside the cache); the image size joins the name when images are resized."""
    name = str(dataset)
    if name.lower() not in MNIST_NAMES + FASHION_NAMES:
        full = str(Path(name).expanduser().resolve())
        name = f"{Path(full).name.replace('.', '_')}-{hashlib.sha256(full.encode()).hexdigest()[:12]}"
    size = f"-{image_size}px" if image_size else ""
    return cache_dir() / "perceptual" / f"{name}{size}.safetensors"


def train_perceptual_net(dataset: str, *, image_size=None, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3,
                         seed: int = 0, path=None, progress: bool = True) -> Path:
    """Train a PerceptualNet to classify `dataset` (its train split resized to `image_size` as the run resizes it;
    Adam with cosine decay) and save it. A set smaller than `batch_size` is one batch per step."""
    data = make_dataset(dataset, split="train", image_size=image_size)
    if data.labels is None:
        raise ValueError(f"the perceptual network is trained to classify, and {dataset!r} has no labels; pass an "
                         "LPIPS folder as autoencoder.perceptual, or set autoencoder.perceptual_weight=0")
    if len(data) < PERCEPTUAL_MIN_IMAGES:
        raise ValueError(f"the own perceptual network needs at least {PERCEPTUAL_MIN_IMAGES} labelled training "
                         f"images, and {dataset!r} has {len(data)}: set autoencoder_loss.perceptual_weight=0 or pass "
                         "an LPIPS folder as autoencoder_loss.perceptual")
    batch_size = min(batch_size, len(data))
    torch.manual_seed(hash_seed(seed, 0xBE))
    g = torch.Generator().manual_seed(hash_seed(seed, 0xBF))
    net = PerceptualNet(data.sample_shape[0], num_classes=int(data.labels.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(data) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = tqdm(total=steps, desc=f"perceptual network ({dataset})", unit="step", disable=not progress)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(len(data) // batch_size):
            x, y = data.batch(perm[i * batch_size:(i + 1) * batch_size])
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    meta = {"kind": PERCEPTUAL_FORMAT, "dataset": dataset, "arch": net.config, "epochs": epochs, "seed": seed,
            "train_seconds": round(time.time() - t0, 1)}
    return save_checkpoint(Path(path) if path else perceptual_path(dataset, image_size), meta=meta,
                           model=net.state_dict())


def load_own_distance(dataset: str, *, image_size=None, progress: bool = True) -> OwnDistance:
    """The 'own' distance for `dataset`, training its network first (a minute or two) when the cache lacks it."""
    path = perceptual_path(dataset, image_size)
    if not path.exists():
        train_perceptual_net(dataset, image_size=image_size, progress=progress)
    meta, groups = load_checkpoint(path)
    if meta.get("kind") != PERCEPTUAL_FORMAT:
        raise CheckpointError(f"{path} is not a perceptual network; delete it to retrain")
    arch = meta["arch"]
    net = PerceptualNet(arch["in_channels"], tuple(arch["widths"]), arch["num_classes"])
    net.load_state_dict(groups["model"])
    return OwnDistance(net)


# -------------------------------------------------------------------------------------------------- LPIPS
def vgg16_features() -> nn.Sequential:
    """torchvision's VGG-16 `features` (13 convolutions with ReLU, 4 max-pools), same indices and key names."""
    layers, ch = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
            ch = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 (Zhang et al. 2018): P(x, y) = sum_l mean_hw || w_l * (u_l(x) - u_l(y)) ||^2, u_l the
    unit-normalised VGG features at relu1_2 ... relu5_3, w_l the learned 1x1 channel weights."""

    def __init__(self, folder):
        super().__init__()
        folder = Path(folder)
        vgg_file, lin_file = folder / "vgg16.pth", folder / "vgg.pth"
        for f in (vgg_file, lin_file):
            if not f.is_file():
                raise FileNotFoundError(f"LPIPS needs {f.name} in {folder} (torchvision's VGG-16 weights and LPIPS "
                                        "v0.1's vgg.pth); or use autoencoder.perceptual=own")
        vgg = {k[len("features."):]: v for k, v in torch.load(vgg_file, map_location="cpu", weights_only=True).items()
               if k.startswith("features.")}
        self.features = vgg16_features()
        self.features.load_state_dict(vgg)
        lin = torch.load(lin_file, map_location="cpu", weights_only=True)
        self.lins = nn.ParameterList([nn.Parameter(lin[f"lin{k}.model.1.weight"]) for k in range(len(VGG16_TAPS))])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
            if i == VGG16_TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fx, fy, w in zip(self.taps(x), self.taps(y), self.lins):
            d = (unit_channels(fx) - unit_channels(fy)) ** 2  # (N, C_l, h, w)
            total = total + F.conv2d(d, w).mean((1, 2, 3))
        return total  # (N,)


def perceptual_distance(spec: str, dataset: str, *, image_size=None, progress: bool = True) -> nn.Module:
    """'own' -> :func:`load_own_distance` for `dataset` (at the run's `image_size`); a folder -> :class:`LPIPS`."""
    return load_own_distance(dataset, image_size=image_size, progress=progress) if spec == "own" else LPIPS(spec)
