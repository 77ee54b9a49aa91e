"""The token transformer: its three modes, the causal mask, adaLN-Zero's identity start, sizes and compute in closed
form, and the errors that name the fix."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.nets import (NETS, PRESETS, TEXT_SIZES, TextTransformer, TextTransformerConfig, build_net,
                                 count_parameters, macs_per_sequence, shift_for_next_token)
from torchdiffusion.nets import text as text_module
from torchdiffusion.nets.transformer import Attention, Block, causal_mask

K, L = 7, 12  # vocabulary and length of the tiny networks
MODES = {  # name -> (config fields, V_in, V_out)
    "absorbing": (dict(mask_token=True), K + 1, K + 1),
    "absorbing-time": (dict(mask_token=True, time_cond=True), K + 1, K + 1),
    "uniform": (dict(mask_token=False), K, K),
    "uniform-time-tied": (dict(mask_token=False, time_cond=True, tie_weights=True), K, K),
    "autoregressive": (dict(mask_token=False, causal=True), K + 1, K),
    "autoregressive-tied": (dict(mask_token=False, causal=True, tie_weights=True), K + 1, K),
}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return TextTransformer(**{**dict(vocab_size=K, seq_len=L, size="tiny"), **kw})


def randomize(net, scale=0.3, only=None):
    """Give the zero-initialised parameters (of `only`, default all) random values, so every layer acts."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (only or net).parameters():
            if p.abs().sum() == 0:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return net


def tokens(n=3, length=L, high=K, seed=2):
    return torch.randint(0, high, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- shapes and modes
@pytest.mark.parametrize("mode", list(MODES))
def test_output_shapes_and_uniform_start_of_every_mode(mode):
    """(N, L, V_out) for the full and a shorter length, with every input id 0..V_in-1 accepted (the mask or BOS id
    K included); an untied head starts at exactly 0, every position predicting the uniform distribution."""
    fields, v_in, v_out = MODES[mode]
    net = tiny(**fields)
    assert (net.vocab_in, net.vocab_out) == (v_in, v_out)
    t = torch.rand(3)
    for length in (L, 5):
        out = net(tokens(3, length, high=v_in), t)
        assert out.shape == (3, length, v_out)
    out = net(torch.arange(v_in).repeat(2, 1), torch.rand(2))  # every id once
    assert torch.equal(out, torch.zeros_like(out)) != fields.get("tie_weights", False)


def test_registry_presets_and_config_round_trip():
    assert NETS["text_transformer"] == (TextTransformer, TextTransformerConfig)
    assert set(PRESETS["text_transformer"]) == set(TEXT_SIZES) == {"tiny", "S", "M"}
    net = build_net("text_transformer", preset="tiny", vocab_size=5, seq_len=8, causal=True, mask_token=False)
    assert isinstance(net, TextTransformer) and len(net.blocks) == 2 and net.width == 64 and net.bos_id == 5
    assert TextTransformer.from_config(net.config).config == net.config


# ---------------------------------------------------------------------------------------------- the causal mask
def reference_attention(attn, x, visible):
    """softmax(q_i k_j / sqrt(d)) over the pairs with visible[n, i, j], written out per head, then the projection."""
    n, t, d = x.shape
    q, k, v = (u.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for u in attn.qkv(x).chunk(3, -1))
    scores = (q @ k.transpose(-1, -2)) / (d // attn.num_heads) ** 0.5  # (N, heads, T, T)
    weights = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).flatten(2))  # (N, T, D)


def test_causal_attention_is_attention_over_the_earlier_positions():
    """Attention with causal_mask sees the keys j <= i; with a key mask as well, the visible ones among them;
    and a causal Block differs from the bidirectional one."""
    torch.manual_seed(0)
    attn, block = Attention(16, 2), Block(16, 2)
    x = torch.randn(2, 6, 16)
    tril = torch.ones(6, 6).tril().bool().expand(2, 6, 6)
    torch.testing.assert_close(attn(x, attn_mask=causal_mask(6)), reference_attention(attn, x, tril),
                               rtol=1e-5, atol=1e-6)
    keys = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(attn(x, key_mask=keys, attn_mask=causal_mask(6)),
                               reference_attention(attn, x, tril & keys[:, None, :]), rtol=1e-5, atol=1e-6)
    assert (block(x, attn_mask=causal_mask(6)) - block(x)).abs().max() > 1e-3


def test_causal_model_never_sees_later_tokens_and_the_bidirectional_model_does():
    """Changing the tokens after position i leaves the autoregressive logits at positions <= i unchanged, and
    changes the bidirectional model's."""
    causal = randomize(tiny(mask_token=False, causal=True))
    bidirectional = randomize(tiny(mask_token=False))
    x = tokens(4)
    for i in (0, 4, L - 2):
        y = x.clone()
        y[:, i + 1:] = (y[:, i + 1:] + 1 + tokens(4, L - i - 1, high=K - 1, seed=i)) % K  # every later token differs
        a, b = causal(x), causal(y)
        torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1], rtol=1e-5, atol=1e-5)
        assert (a[:, i + 1:] - b[:, i + 1:]).abs().max() > 1e-2
        c, d = bidirectional(x), bidirectional(y)
        assert (c[:, :i + 1] - d[:, :i + 1]).abs().amax(-1).min() > 1e-3  # every earlier position changes


def test_the_next_token_chain_rule_is_a_normalised_distribution(monkeypatch):
    """With shift_for_next_token, sum_i log softmax(logits_i)[x_i] is log p(x) of a proper distribution over all
    K^L sequences: the probabilities of the 27 sequences (K = L = 3) sum to 1. A model that saw x_i while predicting
    it (no shift, or no causal mask) would not sum to 1."""
    k, length = 3, 3
    torch.manual_seed(3)
    net = randomize(TextTransformer(vocab_size=k, seq_len=length, size="tiny", mask_token=False, causal=True))
    with torch.no_grad():  # strong token embeddings: the predictions depend on the context, a wrong chain rule
        net.token_embed.weight.mul_(10.0)  # is far from 1 (1.93 without the shift, 0.70 without the mask)
    x = torch.tensor(list(itertools.product(range(k), repeat=length)))  # (27, 3)
    inputs, targets = shift_for_next_token(x, net.bos_id)
    assert torch.equal(inputs[:, 0], torch.full((27,), k)) and torch.equal(inputs[:, 1:], x[:, :-1])
    assert targets is x

    def total(logits, target):
        return logits.double().log_softmax(-1).gather(-1, target[..., None]).sum((1, 2)).exp().sum()

    with torch.no_grad():
        assert abs(float(total(net(inputs), targets)) - 1) < 1e-5
        assert abs(float(total(net(x), x)) - 1) > 0.05  # no shift: the model sees the token it predicts
        assert net(inputs).softmax(-1).amax() > 0.6  # sharp predictions: the test has something to check
        monkeypatch.setattr(text_module, "causal_mask", lambda n, device=None: torch.ones(n, n, dtype=torch.bool))
        assert abs(float(total(net(inputs), targets)) - 1) > 0.05  # no causal mask: x_i seen from position i - 1


# ---------------------------------------------------------------------------------------------- time
def test_time_conditioned_blocks_start_as_the_identity_and_t_acts_after_a_perturbation():
    """adaLN-Zero: at initialisation every block's output equals its input exactly and the logits (head made
    non-zero) do not depend on t; once the modulations are non-zero, neither holds."""
    net = tiny(time_cond=True)
    randomize(net, only=net.final_layer.linear)
    seen = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out)))
    x = tokens(3, high=K + 1)
    a, b = net(x, torch.full((3,), 0.05)), net(x, torch.full((3,), 0.95))
    assert seen == [True] * 4 and torch.equal(a, b) and a.abs().max() > 0
    randomize(net)
    seen.clear()
    a, b = net(x, torch.full((3,), 0.05)), net(x, torch.full((3,), 0.95))
    assert seen == [False] * 4 and (a - b).abs().max() > 1e-3


def test_a_time_independent_model_ignores_t():
    """MDLM's time-independent denoiser: the same logits for t = None, 0.01 and 0.99, and no time parameters."""
    net = randomize(tiny())
    x = tokens(3, high=K + 1)
    out = net(x)
    assert out.abs().max() > 0
    for t in (torch.full((3,), 0.01), torch.full((3,), 0.99), 0.5):
        assert torch.equal(net(x, t), out)
    assert net.time_embed is None and not any("time" in name for name, _ in net.named_parameters())


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_reach_every_parameter(mode):
    fields, v_in, v_out = MODES[mode]
    net = randomize(tiny(**fields))
    x = tokens(4, high=K)
    inputs = shift_for_next_token(x, net.bos_id)[0] if net.bos_id is not None else x
    if net.mask_id is not None:
        inputs = inputs.masked_fill(tokens(4, high=2, seed=5).bool(), net.mask_id)
    loss = F.cross_entropy(net(inputs, torch.rand(4)).flatten(0, 1), x.flatten())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tied_head_is_the_token_embedding():
    tied, untied = tiny(mask_token=False, causal=True, tie_weights=True), tiny(mask_token=False, causal=True)
    assert tied.final_layer.linear.weight is tied.token_embed.weight
    assert count_parameters(untied) - count_parameters(tied) == K * tied.width
    h = []
    tied.final_layer.norm.register_forward_hook(lambda m, args, out: h.append(out))
    logits = tied(tokens(2, high=K))
    torch.testing.assert_close(logits, F.linear(h[0], tied.token_embed.weight, tied.final_layer.linear.bias))
    assert logits.abs().max() > 0  # a tied head is not zero-initialised


# ---------------------------------------------------------------------------------------------- sizes and compute
def closed_form_parameters(cfg: TextTransformerConfig) -> int:
    """Parameters written out: embeddings V_in D + L D; a pre-norm block 4D^2 + 2DH + 9D + H (LN 2D twice, qkv
    3D^2 + 3D, proj D^2 + D, MLP 2DH + H + D); an adaLN-Zero block 10D^2 + 2DH + 11D + H (no LN parameters, the
    modulation 6D^2 + 6D); the time MLP F D + D + D^2 + D; the final norm 2D (LN) or 2D^2 + 2D (adaLN); the head
    V_out D (untied) + V_out."""
    depth, d, _ = TEXT_SIZES[cfg.size]
    h, f = int(d * cfg.mlp_ratio), cfg.time_freq_dim
    v_in = cfg.vocab_size + (cfg.mask_token or cfg.causal)
    v_out = cfg.vocab_size + cfg.mask_token
    total = v_in * d + cfg.seq_len * d + v_out * (0 if cfg.tie_weights else d) + v_out
    if cfg.time_cond:
        return total + f * d + 2 * d + d * d + depth * (10 * d * d + 2 * d * h + 11 * d + h) + 2 * d * d + 2 * d
    return total + depth * (4 * d * d + 2 * d * h + 9 * d + h) + 2 * d


@pytest.mark.parametrize("size", list(TEXT_SIZES))
@pytest.mark.parametrize("mode", list(MODES))
def test_parameters_and_macs_of_every_size_equal_the_closed_form(size, mode):
    """Built on the meta device: parameters equal the closed form exactly, and torch's FLOP counter / 2 (it counts
    a multiply-accumulate as 2) equals N macs_per_sequence at the full and a shorter length."""
    cfg = PRESETS["text_transformer"][size].replace(**MODES[mode][0])
    with torch.device("meta"):
        net = TextTransformer.from_config(cfg)
        assert count_parameters(net) == closed_form_parameters(cfg)
        for length in (cfg.seq_len, 16):
            with FlopCounterMode(display=False) as counter:
                net(torch.zeros(2, length, dtype=torch.long), torch.rand(2))
            assert counter.get_total_flops() == 2 * 2 * macs_per_sequence(cfg, length)


def test_the_autoregressive_m_size_is_gpt2_small():
    """Size M, causal, tied, K = 50256 tokens + BOS (GPT-2's 50257 ids), 1024 positions: GPT-2 small's
    124,439,808 parameters (Radford et al. 2019) plus the head's bias (K)."""
    with torch.device("meta"):
        net = TextTransformer(vocab_size=50256, mask_token=False, causal=True, seq_len=1024, size="M",
                              tie_weights=True)
    assert count_parameters(net) == 124_439_808 + 50256


# ---------------------------------------------------------------------------------------------- errors
def test_errors_name_the_fix():
    net, uniform, ar = tiny(), tiny(mask_token=False), tiny(mask_token=False, causal=True)
    with pytest.raises(ValueError, match=r"exceeds model.text_transformer.seq_len=12: build the net with seq_len >= 1"):
        net(tokens(2, L + 1))
    with pytest.raises(ValueError, match=r"0\.\.7 \(the data tokens 0\.\.6 and the mask id 7\)"):
        net(tokens(2).index_fill(1, torch.tensor([3]), K + 1))
    with pytest.raises(ValueError, match=r"0\.\.7"):
        net(tokens(2).index_fill(1, torch.tensor([0]), -1))
    with pytest.raises(ValueError, match=r"mask_token=true"):
        uniform(tokens(2).index_fill(1, torch.tensor([0]), K))
    with pytest.raises(ValueError, match=r"BOS = 7; make the inputs with shift_for_next_token"):
        ar(tokens(2).index_fill(1, torch.tensor([0]), K + 1))
    with pytest.raises(ValueError, match=r"LongTensor \(N, L\)"):
        net(torch.rand(2, L))
    with pytest.raises(ValueError, match=r"unknown model.text_transformer.size 'XL'; allowed values: 'tiny', 'S', 'M'"):
        tiny(size="XL")
    with pytest.raises(ValueError, match=r"width=64 is not divisible by heads=3: choose heads in \[1, 2, 4, 8, 16, 32"):
        tiny(heads=3)
    with pytest.raises(ValueError, match=r"set model.text_transformer.time_cond=false"):
        tiny(mask_token=False, causal=True, time_cond=True)
    with pytest.raises(ValueError, match=r"set model.text_transformer.mask_token=false"):
        tiny(causal=True)
    with pytest.raises(ValueError, match=r"time_cond=true\): pass t"):
        tiny(time_cond=True)(tokens(2))
    with pytest.raises(ValueError, match=r"no conditioning inputs, got \['class_labels'\]"):
        net(tokens(2), class_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"allowed values: tiny, S, M"):
        TextTransformer.from_preset("huge")
    with pytest.raises(ValueError, match=r"unless it is built with model.text_transformer.causal=true"):
        shift_for_next_token(tokens(2), net.bos_id)
