import pytest
import torch

from torchdiffusion.nets import (NETS, UNET_PRESETS, TimeEmbedding, UNet, UNetConfig, build_net, count_parameters,
                                 timestep_embedding)



def tiny(**overrides):
    torch.manual_seed(0)
    return UNet.from_preset("tiny", **overrides)


def randomize_zero_init(net):
    """Give the zero-initialised layers small random weights so the output depends on the whole net."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


# ----------------------------------------------------------------------------------------- time embedding
def test_timestep_embedding_shape_deterministic_distinct():
    t = torch.tensor([0.0, 1.0, 2.0, 999.0, -1.2, 0.3])
    e1 = timestep_embedding(t, 64)
    e2 = timestep_embedding(t.clone(), 64)
    assert e1.shape == (6, 64) and e1.dtype == torch.float32
    assert torch.equal(e1, e2)
    d = torch.cdist(e1, e1) + torch.eye(6) * 1e3
    assert d.min() > 1e-2  # all pairs distinct
    assert timestep_embedding(t, 7).shape == (6, 7)


def test_time_embedding_module_distinct():
    torch.manual_seed(0)
    emb = TimeEmbedding(32, 64)
    t = torch.tensor([0.0, 0.5, 10.0, 500.0])
    out = emb(t)
    assert out.shape == (4, 64)
    assert torch.equal(out, emb(t))
    assert (torch.cdist(out, out) + torch.eye(4)).min() > 1e-4


# ------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("c,size,attn", [(1, 28, (14,)), (3, 32, (16,)), (1, 14, (7,))])
def test_output_shape(c, size, attn):
    net = tiny(in_channels=c, image_size=size, attn_resolutions=attn)
    x = torch.randn(3, c, size, size)
    assert net(x, torch.tensor([0.0, 500.0, 999.0])).shape == x.shape


def test_odd_sizes_round_trip():
    # 28 -> 14 -> 7 -> 4 and back up to 7 -> 14 -> 28
    net = tiny(channel_mult=(1, 1, 2, 2), attn_resolutions=(7, 4))
    assert [s[0] for s in net.level_sizes] == [28, 14, 7, 4]
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.rand(2)).shape == x.shape


def test_bad_input_raises():
    net = tiny()
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        net(torch.randn(2, 3, 28, 28), torch.rand(2))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        net(torch.randn(2, 1, 32, 32), torch.rand(2))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        net(torch.randn(2, 1, 28, 28), torch.rand(3))


def test_bad_attn_resolution_raises():
    with pytest.raises(ValueError, match=r"heights are \(32, 16\)"):
        tiny(image_size=32, attn_resolutions=(7,))


# -------------------------------------------------------------------------------------- class conditioning
def test_class_conditioning():
    net = randomize_zero_init(tiny(num_classes=10)).eval()
    x, t = torch.randn(4, 1, 28, 28), torch.full((4,), 300.0)
    out_a = net(x, t, class_labels=torch.tensor([0, 1, 2, 3]))
    out_b = net(x, t, class_labels=torch.tensor([4, 5, 6, 7]))
    assert (out_a - out_b).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    out_null = net(x, t, class_labels=torch.full((4,), 10))
    assert torch.equal(net(x, t), out_null)
    assert torch.equal(net(x, t, class_labels=None), out_null)
    with pytest.raises(ValueError, match="num_classes=None"):
        tiny()(x, t, class_labels=torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ presets
def test_cifar_ddpm_param_count():
    with torch.device("meta"):
        net = UNet.from_preset("cifar-ddpm")
    n = count_parameters(net)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


def test_presets_and_config_round_trip():
    assert {"tiny", "mnist-small", "mnist", "cifar-ddpm"} <= set(UNET_PRESETS)
    cfg = UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=())
    net = UNet.from_config(cfg)
    assert net.config == cfg
    assert count_parameters(UNet.from_config(net.config)) == count_parameters(net)
    with pytest.raises(ValueError, match="allowed"):
        UNet.from_preset("huge")


def test_build_net_registry():
    from torchdiffusion.nets import PRESETS, DiT, UViT

    assert set(NETS) == {"unet", "dit", "uvit", "mlp", "noisy_classifier", "autoencoder", "text_transformer", "unet1d",
                         "dit1d"}
    assert isinstance(build_net("unet", preset="tiny"), UNet)
    assert isinstance(build_net("unet", channels=8, attn_resolutions=()), UNet)
    assert isinstance(build_net("dit", image_size=8, depth=1, hidden_size=16, num_heads=2), DiT)
    assert isinstance(build_net("uvit", image_size=8, depth=1, hidden_size=16, num_heads=2), UViT)
    assert set(PRESETS) == {"unet", "dit", "uvit", "text_transformer", "unet1d", "dit1d"} and len(PRESETS["dit"]) == 12 and len(PRESETS["uvit"]) == 5
    with pytest.raises(ValueError, match="allowed values: 'unet', 'dit', 'uvit', 'mlp', 'noisy_classifier', 'autoencoder'"):
        build_net("transformer")


def test_final_conv_zero_init():
    net = tiny()
    assert net.conv_out.weight.abs().sum() == 0 and net.conv_out.bias.abs().sum() == 0
    assert net(torch.randn(2, 1, 28, 28), torch.rand(2)).abs().max() == 0


# ------------------------------------------------------------------------------------ speed-related paths
def test_channels_last_bf16_close_to_fp32():
    net = randomize_zero_init(tiny(num_classes=3)).eval()
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([1.0, 10.0, 100.0, 900.0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = net(x, t, class_labels=y)
        net_cl = net.to(memory_format=torch.channels_last)
        out_cl = net_cl(x.contiguous(memory_format=torch.channels_last), t, class_labels=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = net_cl(x.contiguous(memory_format=torch.channels_last), t, class_labels=y)
    assert out_cl.shape == out_bf.shape == x.shape
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    rel = (out_bf.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel  # bf16 has an 8-bit mantissa: ~0.4% per op; 5% bounds the accumulated error


def test_gradients_reach_every_parameter():
    net = tiny(num_classes=2, dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 0])
    # the zero-initialised output conv (and the zero-initialised block outputs behind it) block the gradient
    # at step 0; after two steps every layer is non-zero and every parameter must receive a gradient
    for step in range(3):
        opt.zero_grad()
        loss = (net(x, t, class_labels=y) - x).pow(2).mean()
        loss.backward()
        if step == 0:
            assert net.conv_out.weight.grad.abs().sum() > 0
        if step == 2:
            missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert not missing, missing
        opt.step()
