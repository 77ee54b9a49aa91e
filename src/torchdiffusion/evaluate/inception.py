"""InceptionV3 pool3 features (2048-d) as the standard FID tools compute them (pytorch-fid; TTUR's TensorFlow
graph ``inception-2015-12-05`` that Heusel et al. 2017 used).

The network is the FID variant of InceptionV3: torchvision's layout with the four patches of pytorch-fid
(``FIDInceptionA``/``C``: average pools that exclude the zero padding; ``FIDInceptionE_1``: same; ``FIDInceptionE_2``:
a max pool in the pool branch), 1008 output classes, no auxiliary head. Its weights are never downloaded here: put
the pytorch-fid release file ``pt_inception-2015-12-05-6726825d.pth`` into ``<cache>/weights/`` (see
:func:`inception_weights_path`); its SHA-256 is checked before it is read with ``torch.load(weights_only=True)``
(no arbitrary unpickling). Preprocessing follows pytorch-fid exactly: images are quantized to uint8 as a PNG
would store them, scaled to [0, 1], resized to 299x299 with bilinear interpolation (align_corners=False, no
antialiasing), mapped to [-1, 1]; grayscale is repeated to 3 channels (PIL ``convert('RGB')``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import cache_dir
from ..utils import file_sha256

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# SHA-256 of the file above; torch.hub names release files by the first 8 hex digits of it ("6726825d").
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
FID_SIZE = 299          # input resolution of InceptionV3
FID_FEATURE_DIM = 2048  # pool3 features
BN_EPS = 1e-3           # the TensorFlow graph's batch-norm epsilon


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU, named as in torchvision so the state dict loads."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """TensorFlow's 3x3 average pool: the zero padding does not count in the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """InceptionE; ``pool='avg'`` (Mixed_7b: TF average pool) or ``'max'`` (Mixed_7c: the FID graph's max pool)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3; ``forward(x)`` takes images in [-1, 1] of any size with 1 or 3 channels and returns the
    2048-d pool3 features (N, 2048) after the pytorch-fid preprocessing (:func:`fid_preprocess`)."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, "avg")
        self.Mixed_7c = FIDInceptionE(2048, "max")
        self.fc = nn.Linear(FID_FEATURE_DIM, num_classes)  # unused for features; present so the weights load

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                           # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                          # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                           # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                              # ... -> (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                          # (N, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool3(fid_preprocess(x))


def fid_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C in {1, 3}, H, W) -> the pytorch-fid network input (N, 3, 299, 299) in [-1, 1]:
    quantize to uint8 as a saved PNG (round((x + 1) * 127.5)), ToTensor's /255, bilinear resize, 2 x - 1."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(x.shape)}")
    u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round()                       # uint8 values as floats
    x01 = (u8 / 255.0).expand(-1, 3, -1, -1)                                   # (N, 3, H, W) in [0, 1]
    x01 = F.interpolate(x01, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
    return 2 * x01 - 1                                                         # (N, 3, 299, 299)


def inception_weights_path() -> Path:
    """Where the FID weights file is expected: ``<data.cache_dir()>/weights/pt_inception-2015-12-05-6726825d.pth``."""
    return cache_dir() / "weights" / INCEPTION_WEIGHTS_FILE


sha256_file = file_sha256  # the weight file's checksum


_MODEL: dict = {}


def load_inception(path=None) -> FIDInceptionV3:
    """The FID InceptionV3 with the standard weights, in eval mode (cached in memory). Raises FileNotFoundError
    saying where to put the file, or ValueError when its SHA-256 differs from the published one."""
    path = Path(path) if path is not None else inception_weights_path()
    if str(path) in _MODEL:
        return _MODEL[str(path)]
    if not path.exists():
        raise FileNotFoundError(f"InceptionV3 FID weights not found at {path}. Download {INCEPTION_URL} on a machine "
                                f"with internet access and copy it there (SHA-256 {INCEPTION_SHA256}); or use "
                                f"features='classifier', which works offline")
    digest = sha256_file(path)
    if digest != INCEPTION_SHA256:
        raise ValueError(f"{path} has SHA-256 {digest}, expected {INCEPTION_SHA256}: not the standard FID weights")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the FID InceptionV3 (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for p in model.parameters():
        p.requires_grad_(False)
    _MODEL[str(path)] = model.eval()
    return _MODEL[str(path)]
