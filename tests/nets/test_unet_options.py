"""The U-Net options: window attention, dynamic convolution, ConvNeXt blocks, cross-attention to a context."""
import pytest
import torch
import torch.nn.functional as F

from torchdiffusion.nets import UNet
from torchdiffusion.nets.unet import Attention, ConvNeXtBlock, DynamicConv2d, WindowAttention


def net(**kw):
    """A small U-Net whose blocks (and, unless zero_init_residual, output conv) are not zero-initialised, so the
    output depends on every layer."""
    torch.manual_seed(0)
    base = dict(image_size=8, channels=8, channel_mult=(1, 2), attn_resolutions=(8, 4), num_heads=2, norm_groups=4,
                num_classes=3, zero_init_residual=False)
    model = UNet(**{**base, **kw})
    if not model.config.zero_init_residual:
        torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    return model


def inputs(n=3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 999, torch.arange(n) % 3


# ------------------------------------------------------------------------------------------ window attention
@pytest.mark.parametrize("window", [8, 11])
def test_one_window_covering_the_map_is_full_attention(window):
    """The same weights with attention: window and a window of at least the map: the full-attention U-Net."""
    full = net()
    win = net(attention="window", window_size=window)
    win.load_state_dict(full.state_dict())  # same parameters, same keys
    assert any(isinstance(m, WindowAttention) for m in win.modules())
    x, t, y = inputs()
    torch.testing.assert_close(win(x, t, class_labels=y), full(x, t, class_labels=y), rtol=1e-5, atol=1e-6)


def _influence(layer, x, i, j):
    """Output positions of one attention layer that change when input position (i, j) changes."""
    x2 = x.clone()
    x2[:, :, i, j] += 1.0
    return ((layer(x2) - layer(x)).abs().amax(dim=(0, 1)) > 1e-6).nonzero().tolist()


def _square(rows, cols):
    return [[r, c] for r in rows for c in cols]


def test_windows_and_shifted_windows_are_local():
    """On an 8x8 map with 4x4 windows, a position reaches exactly its window; with the windows shifted by 2 (a
    cyclic roll and Swin's mask), exactly its shifted window, which does not wrap around the border. (The
    GroupNorm in front, whose statistics span the map, is taken out for this.)"""
    torch.manual_seed(0)
    plain = WindowAttention(4, 1, 1, zero_init=False, window_size=4)
    shifted = WindowAttention(4, 1, 1, zero_init=False, window_size=4, shift=True)
    shifted.load_state_dict(plain.state_dict())
    plain.norm = shifted.norm = torch.nn.Identity()
    x = torch.randn(1, 4, 8, 8)
    assert _influence(plain, x, 0, 0) == _square(range(4), range(4))
    assert _influence(plain, x, 5, 6) == _square(range(4, 8), range(4, 8))
    assert _influence(shifted, x, 0, 0) == _square(range(2), range(2))      # the wrapped window, split
    assert _influence(shifted, x, 3, 4) == _square(range(2, 6), range(2, 6))  # a shifted window inside
    assert _influence(shifted, x, 7, 3) == _square(range(6, 8), range(2, 6))


def test_padded_windows_ignore_the_padding():
    """A 6x6 map in 4x4 windows is padded to 8x8: each window's attention equals full attention over its real
    positions only (checked on the top-left window, 4x4, and the bottom-right one, 2x2)."""
    torch.manual_seed(0)
    win = WindowAttention(4, 2, 1, zero_init=False, window_size=4)
    full = Attention(4, 2, 1, zero_init=False)
    full.load_state_dict(win.state_dict())
    x = torch.randn(2, 4, 6, 6)
    out = win(x)
    h = win.norm(x)
    for rows, cols in ((slice(0, 4), slice(0, 4)), (slice(4, 6), slice(4, 6))):
        tokens = h[:, :, rows, cols].flatten(2).transpose(1, 2)
        ref = x[:, :, rows, cols] + full._attend(tokens).transpose(1, 2).reshape(x[:, :, rows, cols].shape)
        torch.testing.assert_close(out[:, :, rows, cols], ref, rtol=1e-5, atol=1e-6)


def test_window_layers_alternate_shifts():
    shifts = [m.shift for m in net(attention="window", window_size=4).modules() if isinstance(m, WindowAttention)]
    assert shifts == [i % 2 == 1 for i in range(len(shifts))] and len(shifts) >= 4
    assert not any(m.shift for m in net(attention="window", shift_windows=False).modules()
                   if isinstance(m, WindowAttention))


# --------------------------------------------------------------------------------------- dynamic convolution
def test_dynamic_convolution_with_one_kernel_is_a_plain_convolution():
    torch.manual_seed(0)
    dyn = DynamicConv2d(3, 5, 3, 1, emb_dim=7, padding=1)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(dyn.weight)
        conv.bias.copy_(dyn.bias[0])
    x, emb = torch.randn(4, 3, 6, 6), torch.randn(4, 7)
    torch.testing.assert_close(dyn(x, emb), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 3])
def test_dynamic_convolution_mixes_kernels_per_sample(groups):
    """Sample n is convolved with sum_k softmax(router(e_n))_k W_k (and the mixed bias), computed here sample by
    sample: the batched grouped convolution must match, for plain and depthwise kernels."""
    torch.manual_seed(0)
    dyn = DynamicConv2d(3, 6 if groups == 1 else 3, 3, 4, emb_dim=7, padding=1, groups=groups)
    x, emb = torch.randn(3, 3, 5, 5), torch.randn(3, 7)
    out = dyn(x, emb)
    kernels = dyn.weight.reshape(4, -1, *dyn.weight.shape[1:])  # (K, out, in / groups, 3, 3)
    for i in range(3):
        pi = torch.softmax(dyn.router(emb[i]), -1)
        w = (pi[:, None, None, None, None] * kernels).sum(0)
        ref = F.conv2d(x[i:i + 1], w, (pi[:, None] * dyn.bias).sum(0), padding=1, groups=groups)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    assert (out[0] - dyn(x[:1], emb[1:2])[0]).abs().max() > 1e-4  # the embedding changes the kernel


def test_dynamic_unet_with_one_kernel_equals_the_plain_unet():
    plain, dyn = net(), net(dynamic_conv_kernels=1)
    state = {k: (v[None] if k.endswith(("conv1.bias", "conv2.bias")) else v) for k, v in plain.state_dict().items()}
    missing, unexpected = dyn.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("router.weight") or k.endswith("router.bias") for k in missing)
    x, t, y = inputs()
    torch.testing.assert_close(dyn(x, t, class_labels=y), plain(x, t, class_labels=y), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------- ConvNeXt
def test_convnext_block_is_the_formula():
    """Depthwise 7x7, LayerNorm over channels, FiLM, Linear -> GELU -> Linear, plus the 1x1 skip, written out."""
    torch.manual_seed(0)
    blk = ConvNeXtBlock(4, 6, emb_dim=5, zero_init=False)
    x, emb = torch.randn(2, 4, 9, 9), torch.randn(2, 5)
    h = F.conv2d(x, blk.dwconv.weight, blk.dwconv.bias, padding=3, groups=4).permute(0, 2, 3, 1)
    h = F.layer_norm(h, (4,), blk.norm.weight, blk.norm.bias, eps=1e-6)
    scale, shift = blk.emb(emb).chunk(2, dim=-1)
    h = h * (1 + scale[:, None, None]) + shift[:, None, None]
    h = F.linear(F.gelu(F.linear(h, blk.pw1.weight, blk.pw1.bias)), blk.pw2.weight, blk.pw2.bias)
    ref = blk.skip(x) + h.permute(0, 3, 1, 2)
    torch.testing.assert_close(blk(x, emb), ref, rtol=1e-5, atol=1e-5)
    assert blk.dwconv.weight.shape == (4, 1, 7, 7) and blk.pw1.out_features == 4 * 6


def test_convnext_unet_starts_as_identity_blocks_and_zero_output():
    model = net(block="convnext", zero_init_residual=True)
    kinds = [type(m).__name__ for m in model.modules() if type(m).__name__ in ("ConvNeXtBlock", "ResBlock")]
    assert kinds == ["ConvNeXtBlock"] * 8  # 2 levels x (1 down + 2 up) + 2 in the middle
    seen = []
    for m in model.modules():
        if isinstance(m, ConvNeXtBlock) and isinstance(m.skip, torch.nn.Identity):
            m.register_forward_hook(lambda mod, a, o: seen.append(torch.equal(a[0], o)))
    x, t, y = inputs()
    out = model(x, t, class_labels=y)
    assert seen and all(seen) and torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------ cross-attention
@pytest.mark.parametrize("context_global", [False, True])
def test_cross_attention_with_an_all_masked_context_is_unconditional(context_global):
    model = net(context_dim=5, cross_attn_resolutions=(4,), context_global=context_global).eval()
    x, t, y = inputs()
    ctx = torch.randn(3, 6, 5)
    none = model(x, t, class_labels=y)
    masked = model(x, t, class_labels=y, context=ctx, context_mask=torch.zeros(3, 6, dtype=torch.bool))
    torch.testing.assert_close(masked, none, rtol=1e-4, atol=1e-5)
    visible = model(x, t, class_labels=y, context=ctx)
    assert (visible - none).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_global_context_is_the_visible_mean_projected_into_the_embedding():
    """context_global adds W mean(visible entries, null included) + b to the embedding: the same output as the net
    without it given that vector as an extra embedding; padded entries do not count, and the path alone (no
    cross-attention can see the context when its projection is the only change) moves the output."""
    from torchdiffusion.nets.transformer import visible_mean
    model = net(context_dim=5, cross_attn_resolutions=(4,), context_global=True).eval()
    x, t, y = inputs()
    ctx = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    null = model.context_in.null.detach()
    mean = torch.stack([torch.cat([null[None], ctx[i][mask[i]]]).mean(0) for i in range(3)])  # (3, 5)
    full, m = model.context_in(3, ctx, mask)
    torch.testing.assert_close(visible_mean(full, m), mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(visible_mean(*model.context_in(3, None, None)), null.expand(3, -1))  # no context: the null
    # changing the padded entries changes nothing; zeroing the projection changes the output
    junk = torch.where(mask[..., None], ctx, torch.randn_like(ctx) * 100)
    out = model(x, t, class_labels=y, context=ctx, context_mask=mask)
    torch.testing.assert_close(model(x, t, class_labels=y, context=junk, context_mask=mask), out, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.context_global.weight.zero_()
        model.context_global.bias.zero_()
    assert (model(x, t, class_labels=y, context=ctx, context_mask=mask) - out).abs().amax() > 1e-4


def test_option_errors_name_the_fix():
    with pytest.raises(ValueError, match="context_global adds the context's mean to the embedding: it needs"):
        net(context_global=True)
    with pytest.raises(ValueError, match="cross-attention needs both model.unet.context_dim"):
        net(context_dim=5)
    with pytest.raises(ValueError, match=r"cross_attn_resolutions \(7,\) match no level.*heights are \(8, 4\)"):
        net(context_dim=5, cross_attn_resolutions=(7,))
    with pytest.raises(ValueError, match=r"context_dim=5: set model.unet.context_dim=4"):
        net(context_dim=5, cross_attn_resolutions=(4,))(*inputs()[:2], context=torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="no cross-attention: build it with model.unet.context_dim"):
        net()(*inputs()[:2], context=torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match=r"unknown model.unet.block 'vit'; allowed values: 'resnet', 'convnext'"):
        net(block="vit")
    with pytest.raises(ValueError, match=r"allowed values: 'full', 'window'"):
        net(attention="local")
