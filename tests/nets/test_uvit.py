"""U-ViT: the paper's sizes, the long skips, tokens for time, class and context."""
import pytest
import torch

from torchdiffusion.nets import UVIT_PRESETS, UViT, build_net, count_parameters

# U-ViT, Table 1 (Bao et al. 2023): parameters of U-ViT-S, S (Deep), M, L, H
PAPER_PARAMS = {"S": 44e6, "S-deep": 58e6, "M": 131e6, "L": 287e6, "H": 501e6}
PAPER_LAYERS = {"S": 13, "S-deep": 17, "M": 17, "L": 21, "H": 29}


def tiny(**kw):
    torch.manual_seed(0)
    base = dict(image_size=8, patch_size=2, depth=3, hidden_size=32, num_heads=2, num_classes=3)
    return build_net("uvit", **{**base, **kw})


def inputs(n=3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 999, torch.arange(n) % 3


@pytest.mark.parametrize("name", list(UVIT_PRESETS))
def test_registered_sizes_match_the_papers_table(name):
    with torch.device("meta"):
        net = UViT.from_preset(name)
    assert len(net.in_blocks) + 1 + len(net.out_blocks) == PAPER_LAYERS[name]
    params = count_parameters(net)
    assert abs(params / PAPER_PARAMS[name] - 1) < 0.01, params


def test_long_skips_join_each_in_block_to_its_mirror():
    """Out-block i receives in-block (k + 1 - i)'s output as its skip: recorded by hooks on a 5-block net."""
    net = tiny(depth=5)
    outs, skips = {}, []
    for i, b in enumerate(net.in_blocks):
        b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
    for b in net.out_blocks:
        b.register_forward_hook(lambda m, a, o: skips.append(a[1]))
    net(*inputs())
    assert len(skips) == 2 and skips[0] is outs[1] and skips[1] is outs[0]


def test_class_token_and_null_class():
    net = tiny().eval()
    x, t, y = inputs()
    a, b = net(x, t, class_labels=y), net(x, t, class_labels=(y + 1) % 3)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert torch.equal(net(x, t), net(x, t, class_labels=torch.full((3,), 3)))


def test_all_masked_context_is_the_unconditional_path():
    net = tiny(context_dim=5).eval()
    x, t, y = inputs()
    ctx = torch.randn(3, 4, 5)
    none = net(x, t, class_labels=y)
    masked = net(x, t, class_labels=y, context=ctx, context_mask=torch.zeros(3, 4, dtype=torch.bool))
    torch.testing.assert_close(masked, none, rtol=1e-4, atol=1e-5)
    visible = net(x, t, class_labels=y, context=ctx)
    assert (visible - none).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"patch_size=3 does not divide the image size 8x8"):
        tiny(patch_size=3)
    with pytest.raises(ValueError, match=r"unknown model.uvit.size 'XL'; allowed values: 'S', 'S-deep', 'M'"):
        build_net("uvit", size="XL")
    with pytest.raises(ValueError, match="must be odd, got 4: use 5"):
        tiny(depth=4)
    with pytest.raises(ValueError, match=r"context_dim=5: set model.uvit.context_dim=6"):
        tiny(context_dim=5)(*inputs()[:2], context=torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="masked-patch training .* model.kind=dit"):
        tiny()(*inputs()[:2], token_mask=torch.zeros(3, 16, dtype=torch.bool))
