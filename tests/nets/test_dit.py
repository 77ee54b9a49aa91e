"""DiT: the paper's sizes and compute, adaLN-Zero's identity start, the conditioning variants, MaskDiT's masking."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.nets import DIT_PRESETS, DiT, build_net, count_parameters

# Parameter counts published for the DiT backbones at patch 2 (ImageNet 256, 32x32x4 latents, learned sigma):
# DiT-XL/2 675M (Peebles & Xie 2023), S/B/L 33M/130M/458M (the same backbones in SiT, Ma et al. 2024, Table 1).
# The patch size changes only the patch embedding and the final linear layer (< 1% of the parameters).
PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
# Gflops of one forward pass at 32x32x4 (the Gflops column of DiT's table of all twelve models). The paper counts a multiply-accumulate as one
# flop; torch's FlopCounterMode counts it as two, so the test compares FlopCounterMode's total / 2.
PAPER_GFLOPS = {
    "S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
    "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64,
}


def tiny(**kw):
    torch.manual_seed(0)
    base = dict(image_size=8, patch_size=2, depth=2, hidden_size=32, num_heads=2, num_classes=3)
    return build_net("dit", **{**base, **kw})


def randomize_zeros(net):
    """Give the zero-initialised parameters small random values so the output depends on every layer."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


def inputs(n=3, size=8):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, size, size, generator=g), torch.rand(n, generator=g) * 999, torch.arange(n) % 3


# ---------------------------------------------------------------------------------------------- the paper
@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_registered_sizes_match_the_papers_parameters_and_gflops(name):
    """Built on the meta device (no memory, no compute): parameters within 1% of the published counts, forward
    multiply-accumulates within 2% of the Gflops column (XL/2: 675M parameters, 118.6 Gflops)."""
    with torch.device("meta"):
        net = DiT.from_preset(name)
        x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            net(x, t, class_labels=y)
    params = count_parameters(net)
    assert abs(params / PAPER_PARAMS[name.split("/")[0]] - 1) < 0.01, params
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert abs(gmacs / PAPER_GFLOPS[name] - 1) < 0.02, gmacs


def test_xl2_is_the_reference_network():
    """DiT-XL/2 has exactly the reference code's 675,129,632 parameters once its fixed position table
    (256 x 1152, a buffer here, a frozen parameter there) is counted."""
    with torch.device("meta"):
        net = DiT.from_preset("XL/2")
    assert count_parameters(net) + net.pos_embed.numel() == 675_129_632


# ---------------------------------------------------------------------------------------------- adaLN-Zero
def test_adaln_zero_blocks_start_as_the_identity_and_the_output_at_zero():
    net = tiny(context_dim=5, decoder_depth=1)
    seen = []
    for block in list(net.blocks) + list(net.decoder_blocks):
        block.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out)))
    x, t, y = inputs()
    out = net(x, t, class_labels=y, context=torch.randn(3, 4, 5))
    assert seen == [True, True, True] and torch.equal(out, torch.zeros_like(out))
    # and not by accident: with non-zero modulations the same blocks are no longer the identity
    randomize_zeros(net)
    seen.clear()
    net(x, t, class_labels=y)
    assert seen == [False, False, False]


def test_embed_init_torch_gives_pytorchs_embedding_scales_and_keeps_the_zero_start():
    """model.dit.embed_init: dit draws the class table and time MLP from N(0, 0.02) (the paper's); torch leaves
    PyTorch's defaults (N(0, 1) rows; Kaiming-uniform, bound 1/sqrt(fan_in)); the rest of the init and the zero output
    at the start are the same."""
    torch.manual_seed(0)
    big = dict(image_size=8, patch_size=2, depth=1, hidden_size=256, num_heads=2, num_classes=100)
    paper, ours = build_net("dit", **big), build_net("dit", **big, embed_init="torch")
    assert float(paper.class_embed.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert float(ours.class_embed.weight.std()) == pytest.approx(1.0, rel=0.05)
    w = ours.time_embed.mlp[0].weight.detach()
    bound = w.shape[1] ** -0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert float(paper.time_embed.mlp[0].weight.std()) == pytest.approx(0.02, rel=0.05)
    x, t, y = inputs()
    net = tiny(embed_init="torch")
    assert torch.equal(net(x, t, class_labels=y), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"model\.dit\.embed_init 'normal'; allowed values: 'dit', 'torch'"):
        tiny(embed_init="normal")


@pytest.mark.parametrize("conditioning", ["adaln", "in_context", "cross_attention"])
def test_other_conditionings_start_at_zero_output_and_follow_the_class(conditioning):
    net = tiny(conditioning=conditioning)
    x, t, y = inputs()
    assert torch.equal(net(x, t, class_labels=y), torch.zeros_like(x))  # zero-initialised final layer
    randomize_zeros(net)
    a, b = net(x, t, class_labels=y), net(x, t, class_labels=(y + 1) % 3)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert torch.equal(net(x, t), net(x, t, class_labels=torch.full((3,), 3)))  # None is the null class


def test_conditionings_have_the_papers_relative_cost():
    """In-context adds tokens, cross-attention adds a layer (the paper: ~15% more Gflops than adaLN-Zero), adaLN
    regresses 4 instead of 6 vectors: the ordering of their Gflops on DiT-S/2."""
    flops = {}
    for cond in ("adaln_zero", "adaln", "in_context", "cross_attention"):
        with torch.device("meta"):
            net = DiT.from_preset("S/2", conditioning=cond)
            with FlopCounterMode(display=False) as c:
                net(torch.randn(1, 4, 32, 32), torch.rand(1), class_labels=torch.zeros(1, dtype=torch.long))
        flops[cond] = c.get_total_flops()
    assert flops["adaln"] < flops["adaln_zero"] < flops["in_context"] < flops["cross_attention"]
    assert 1.10 < flops["cross_attention"] / flops["adaln_zero"] < 1.20


# ---------------------------------------------------------------------------------------------- context
@pytest.mark.parametrize("conditioning", ["adaln_zero", "in_context", "cross_attention"])
def test_all_masked_context_is_the_unconditional_path(conditioning):
    net = randomize_zeros(tiny(conditioning=conditioning, context_dim=5)).eval()
    x, t, y = inputs()
    ctx = torch.randn(3, 4, 5)
    none = net(x, t, class_labels=y)
    masked = net(x, t, class_labels=y, context=ctx, context_mask=torch.zeros(3, 4, dtype=torch.bool))
    torch.testing.assert_close(masked, none, rtol=1e-4, atol=1e-5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    partly = net(x, t, class_labels=y, context=ctx, context_mask=mask)
    assert (partly[:2] - none[:2]).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # visible entries matter
    torch.testing.assert_close(partly[2], none[2], rtol=1e-4, atol=1e-5)
    ctx2 = ctx.clone()
    ctx2[~mask] = 100.0  # masked entries do not
    torch.testing.assert_close(net(x, t, class_labels=y, context=ctx2, context_mask=mask), partly, rtol=1e-4,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------- MaskDiT
def test_a_mask_that_keeps_every_token_is_the_plain_network():
    for decoder_depth in (0, 1):
        net = randomize_zeros(tiny(decoder_depth=decoder_depth))
        x, t, y = inputs()
        keep_all = torch.zeros(3, 16, dtype=torch.bool)
        torch.testing.assert_close(net(x, t, class_labels=y, token_mask=keep_all), net(x, t, class_labels=y),
                                   rtol=1e-5, atol=1e-6)


def test_dropped_patches_never_reach_the_output():
    """With a token mask the blocks see only the kept patches: changing the pixels of the dropped ones changes
    nothing (with and without the decoder); without the decoder the dropped positions of the output are 0."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 16, generator=g).argsort(1).argsort(1) >= 8  # 8 of 16 dropped per example
    pix = mask.reshape(3, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]  # (3, 1, 8, 8)
    for decoder_depth in (0, 2):
        net = randomize_zeros(tiny(decoder_depth=decoder_depth))
        x, t, y = inputs()
        out = net(x, t, class_labels=y, token_mask=mask)
        x2 = torch.where(pix, torch.randn(x.shape, generator=g), x)
        torch.testing.assert_close(net(x2, t, class_labels=y, token_mask=mask), out, rtol=1e-5, atol=1e-6)
        if decoder_depth == 0:
            assert torch.equal(out[pix], torch.zeros_like(out[pix])) and out[~pix].abs().min() > 0
        else:
            assert out[pix].abs().min() > 0  # the decoder fills them in from the mask token


def test_token_mask_errors():
    net = tiny()
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"token_mask must be a bool tensor of shape \(3, 16\)"):
        net(x, t, token_mask=torch.zeros(3, 15, dtype=torch.bool))
    uneven = torch.zeros(3, 16, dtype=torch.bool)
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        net(x, t, token_mask=uneven)


# ---------------------------------------------------------------------------------------------- the rest
def test_learned_sigma_channels():
    net = randomize_zeros(tiny(learn_sigma=True))
    x, t, y = inputs()
    mean, var = net(x, t, class_labels=y, return_variance=True)
    assert mean.shape == var.shape == x.shape and torch.equal(net(x, t, class_labels=y), mean)
    assert net.final_layer.linear.out_features == 2 * 2 * 2


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"patch_size=8 does not divide the image size 28x28: choose a patch size "
                                         r"in \[1, 2, 4, 7, 14, 28\]"):
        build_net("dit", image_size=28, patch_size=8)
    with pytest.raises(ValueError, match=r"unknown model.dit.size 'XXL'; allowed values: 'S', 'B', 'L', 'XL'"):
        build_net("dit", size="XXL")
    with pytest.raises(ValueError, match=r"unknown dit preset 'XL/3'"):
        build_net("dit", preset="XL/3")
    with pytest.raises(ValueError, match=r"context_dim=5: set model.dit.context_dim=7"):
        tiny(context_dim=5)(*inputs()[:2], context=torch.randn(3, 2, 7))
    with pytest.raises(ValueError, match=r"no cross-attention: build it with model.dit.context_dim"):
        tiny()(*inputs()[:2], context=torch.randn(3, 2, 7))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 8, 8\)"):
        tiny()(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="conditioning"):
        tiny(conditioning="film")


def test_overrides_of_a_size_and_rectangular_images():
    net = build_net("dit", size="B", depth=3, image_size=(8, 12), patch_size=4)
    assert len(net.blocks) == 3 and net.hidden_size == 768 and net.grid == (2, 3)
    assert net(torch.randn(2, 1, 8, 12), torch.rand(2)).shape == (2, 1, 8, 12)
