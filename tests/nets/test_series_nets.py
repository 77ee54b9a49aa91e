"""The 1-D networks over (N, C, L): output shape, gradients to every parameter, clear errors for bad shapes."""
import pytest
import torch

from torchdiffusion.nets import build_net

CASES = {
    "unet1d": dict(length=16, in_channels=2, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
                   num_heads=2, norm_groups=4, time_freq_dim=16),
    "dit1d": dict(length=16, in_channels=2, patch_len=4, depth=2, hidden_size=32, num_heads=2, time_freq_dim=16),
}


def randomize_zeros(net):
    """Small random values for the zero-initialised parameters (adaLN-Zero, zero output convolutions), which block
    the gradient of everything before them at initialisation."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", CASES)
def test_shape_and_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    net = build_net(kind, **CASES[kind])
    randomize_zeros(net)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 2, 16, generator=g), torch.rand(3, generator=g) * 10
    out = net(x, t)
    assert out.shape == x.shape
    out.square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("kind", CASES)
def test_output_depends_on_time_and_starts_at_zero(kind):
    """Zero-initialised outputs at the start (the denoiser starts as its skip connection); after randomising them
    the output changes with t."""
    torch.manual_seed(0)
    net = build_net(kind, **CASES[kind])
    x = torch.randn(2, 2, 16)
    assert not net(x, torch.ones(2)).any()
    randomize_zeros(net)
    assert not torch.allclose(net(x, torch.ones(2)), net(x, torch.full((2,), 5.0)))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible by 2"):
        build_net("unet1d", **{**CASES["unet1d"], "length": 15})
    with pytest.raises(ValueError, match="patch_len=5 must divide"):
        build_net("dit1d", **{**CASES["dit1d"], "patch_len": 5})
    net = build_net("dit1d", **CASES["dit1d"])
    with pytest.raises(ValueError, match=r"expects \(N, 2, 16\)"):
        net(torch.zeros(1, 2, 8), torch.zeros(1))
