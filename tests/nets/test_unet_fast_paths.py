"""The CPU fast paths of the U-Net compute what the plain PyTorch modules compute."""
import torch
import torch.nn.functional as F
from torch import nn

from torchdiffusion.nets.unet import GroupNorm, UNet, attention


def test_channels_last_group_norm_equals_nn_group_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 5, 7, generator=g)
    ref, fast = nn.GroupNorm(4, 16), GroupNorm(4, 16)
    for m in (ref, fast):
        nn.init.normal_(m.weight, generator=torch.Generator().manual_seed(1))
    fast.load_state_dict(ref.state_dict())  # same keys
    xr = x.clone().requires_grad_()
    xf = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    yr, yf = ref(xr), fast(xf)
    assert yf.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yf, yr, atol=1e-6, rtol=1e-5)  # outputs up to ~8: relative, a few float32 ulp
    w = torch.randn(yr.shape, generator=g)
    (yr * w).sum().backward()
    (yf * w).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_bf16_attention_path_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 49, 16, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), ref)  # fp32: SDPA itself
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()  # the explicit bf16 path
    assert (out - ref).abs().max() < 0.03  # a few bf16 roundoffs (2^-9) of values of size ~1


def test_unet_channels_last_equals_contiguous():
    torch.manual_seed(0)
    net = UNet(image_size=8, channels=8, channel_mult=(1, 2), attn_resolutions=(4,), num_heads=2, norm_groups=4,
               zero_init_residual=False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    ref = net(x, t)
    out = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
