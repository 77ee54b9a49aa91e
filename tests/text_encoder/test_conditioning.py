"""Captions as a denoiser's context: the empty caption is the network's unconditional path, and caption dropout draws
from each example's generator at the objective's rate."""
import math

import pytest
import torch

from torchdiffusion.data.captions import NULL_CAPTION
from torchdiffusion.guidance import ContextFreeGuidance
from torchdiffusion.nets import UNet
from torchdiffusion.precond import Precond
from torchdiffusion.schedules import get_schedule
from torchdiffusion.text_encoder import CaptionedDataset, context_of, prompt_condition
from torchdiffusion.data import TensorImageDataset
from torchdiffusion.utils import sample_generators


def text_unet(context_global=False):
    """A small U-Net whose cross-attention is not zero-initialised, so a context changes its output."""
    torch.manual_seed(0)
    net = UNet(channels=16, channel_mult=(1, 2), attn_resolutions=(), mid_attention=False, norm_groups=8,
               context_dim=384, cross_attn_resolutions=(14,), zero_init_residual=False, context_global=context_global)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # the output convolution starts at zero
    return net.eval()


@pytest.mark.parametrize("context_global", [False, True])
def test_the_empty_caption_is_the_unconditional_call(sentence_encoder, context_global):
    net = text_unet(context_global)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([10.0, 400.0, 900.0])
    cond = prompt_condition(sentence_encoder, ["", "a thick slanted seven", NULL_CAPTION])
    assert not cond["context_mask"][[0, 2]].any()  # the pooled entry of the empty caption is masked too
    with torch.no_grad():
        uncond = net(x, t)
        out = net(x, t, **cond)
    torch.testing.assert_close(out[[0, 2]], uncond[[0, 2]], rtol=1e-4, atol=1e-5)
    assert (out[1] - uncond[1]).abs().max() > 1e-3


def test_guidance_against_the_empty_caption_through_a_denoiser(sentence_encoder):
    """cfg with an empty prompt is the unconditional denoiser; with a prompt, D_u + s (D_c - D_u)."""
    den = Precond(text_unet(), get_schedule("linear"), "eps")
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0])
    cond = prompt_condition(sentence_encoder, ["", "a thin one"])
    with torch.no_grad():
        guided = ContextFreeGuidance(den, 3.0)(x, sigma, **cond)
        d_c, d_u = den(x, sigma, **cond), den(x, sigma)
    torch.testing.assert_close(guided[0], d_u[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[1], d_u[1] + 3.0 * (d_c[1] - d_u[1]), rtol=1e-4, atol=1e-4)


def synthetic_captioned(n: int, drop_prob: float) -> CaptionedDataset:
    images = TensorImageDataset(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8), torch.arange(n) % 10)
    distinct = ["", "a", "b"]
    context = torch.randn(3, 2, 5)
    mask = torch.tensor([[False, False], [True, True], [True, False]])
    captions = ["a" if i % 2 else "b" for i in range(n)]
    return CaptionedDataset(images, captions, context, mask, distinct, drop_prob=drop_prob)


def test_caption_dropout_rate_and_determinism():
    n, p = 4000, 0.3
    data = synthetic_captioned(n, p)
    idx = torch.arange(n)
    _, y, a = data.batch(idx, generator=sample_generators(7, n))
    _, _, b = data.batch(idx, generator=sample_generators(7, n))
    assert torch.equal(a["context"], b["context"]) and torch.equal(a["context_mask"], b["context_mask"])
    dropped = ~a["context_mask"].any(1)  # (n,)
    se = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 4 * se
    kept = ~dropped
    want = data.context[torch.where(idx % 2 == 1, 1, 2)]  # the example's own caption where it is kept
    assert torch.equal(a["context"][kept], want[kept]) and torch.equal(y, idx % 10)
    _, _, none = synthetic_captioned(n, 0.0).batch(idx, generator=sample_generators(7, n))
    assert none["context_mask"].any(1).all()


def test_context_of_puts_the_pooled_embedding_first(sentence_encoder):
    emb = sentence_encoder.encode(["a seven", ""])
    ctx, mask = context_of(emb, pooled_token=True)
    assert ctx.shape == (2, emb.tokens.shape[1] + 1, 384)
    assert torch.equal(ctx[:, 0], emb.pooled) and torch.equal(mask[:, 0], torch.tensor([True, False]))
    plain, plain_mask = context_of(emb, pooled_token=False)
    assert torch.equal(plain, emb.tokens) and torch.equal(plain_mask, emb.mask)
