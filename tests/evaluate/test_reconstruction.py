"""Reconstruction figures: PSNR and SSIM against closed forms and a direct computation, and the rFD rule (held-out
images, a floor that sees the reference no more than they do)."""
import math

import numpy as np
import pytest
import torch

from torchdiffusion.evaluate.quality import REFERENCE_SEED, _order
from torchdiffusion.evaluate.reconstruction import (SSIM_K1, SSIM_K2, evaluate_reconstructions,
                                                    held_out_test_indices, psnr, ssim)
from torchdiffusion.latent import LatentCodec
from torchdiffusion.nets.autoencoder import AutoencoderConfig, KLAutoencoder


def test_psnr_closed_form():
    a = torch.zeros(3, 1, 8, 8)
    b = a + 0.25                     # 1/8 apart on the [0, 1] scale: MSE 1/64, PSNR 10 log10(64) dB
    assert torch.allclose(psnr(a, b), torch.full((3,), 10 * math.log10(64), dtype=torch.float64), rtol=1e-9)
    assert torch.isinf(psnr(a, a)).all()
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, b[:2])


def test_ssim_of_flat_images_is_the_luminance_term():
    """Flat images have zero variance: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) exactly."""
    m1, m2 = 0.25, 0.75               # exact in float32
    a, b = torch.full((1, 1, 16, 16), 2 * m1 - 1), torch.full((1, 1, 16, 16), 2 * m2 - 1)
    want = (2 * m1 * m2 + SSIM_K1 ** 2) / (m1 ** 2 + m2 ** 2 + SSIM_K1 ** 2)
    assert ssim(a, b).item() == pytest.approx(want, rel=1e-9)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), rtol=1e-9)


def test_ssim_matches_a_direct_window_loop():
    """The convolution form equals the definition evaluated window by window."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 13, 14, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    x, y = ((a.double() + 1) / 2)[0, 0].numpy(), ((b.double() + 1) / 2)[0, 0].numpy()
    r = np.arange(11) - 5.0
    w1 = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / w1.sum() ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + SSIM_K1 ** 2) * (2 * cxy + SSIM_K2 ** 2)
                        / ((mx ** 2 + my ** 2 + SSIM_K1 ** 2) * (vx + vy + SSIM_K2 ** 2)))
    assert ssim(a, b).item() == pytest.approx(float(np.mean(vals)), rel=1e-9)
    assert ssim(a, b).item() == pytest.approx(ssim(b, a).item(), rel=1e-12)
    assert ssim(a, b).item() < 0.99
    with pytest.raises(ValueError, match="window"):
        ssim(a[..., :8, :8], b[..., :8, :8])


def test_held_out_images_are_outside_the_reference(mnist_path):
    idx = held_out_test_indices("mnist", 2000, 5000)
    ref = _order("mnist", "test", REFERENCE_SEED)[:5000]
    assert len(idx) == 2000 and not set(idx.tolist()) & set(ref.tolist())
    with pytest.raises(ValueError, match="outside"):
        held_out_test_indices("mnist", 6000, 5000)


class IdentityCodec(LatentCodec):
    """A perfect autoencoder: decode(encode(x)) = x."""

    def encode(self, x, *, sample=False, generator=None):
        return x

    def decode(self, z):
        return z


def test_a_perfect_reconstruction_sits_at_the_floor(feature_net):
    """Reconstructions equal to the held-out originals: PSNR inf, SSIM 1, and rFD of real test images, which the
    floor of training images of the same classes matches (ratio near 1)."""
    ae = KLAutoencoder(AutoencoderConfig(image_size=28, in_channels=1, latent_channels=1, factor=2, channels=8,
                                         channel_mult=[1, 2], num_res_blocks=1, norm_groups=4))
    res = evaluate_reconstructions(IdentityCodec(ae, 1.0), "mnist", n=1000, floor_draws=3, bootstrap=20)
    assert math.isinf(res["psnr"]) and res["ssim"] == pytest.approx(1.0, rel=1e-9) and res["mse"] == 0
    assert 0.6 < res["fd_ratio"] < 1.6, res
    blurred = evaluate_reconstructions(BlurCodec(ae, 1.0), "mnist", n=1000, floor_draws=3, bootstrap=20)
    assert blurred["psnr"] < 30 and blurred["ssim"] < 0.95 and blurred["fd_ratio"] > 2 * res["fd_ratio"], blurred


class BlurCodec(IdentityCodec):
    """A lossy one: 2x average-pool and nearest upsampling."""

    def decode(self, z):
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z, 2), scale_factor=2)
