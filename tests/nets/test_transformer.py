"""The shared transformer parts: 2-D sin-cos positions, masked attention, the null context, patchify."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchdiffusion.nets.embeddings import sincos_position_embedding_2d
from torchdiffusion.nets.transformer import (CrossAttention, NullContext, attention, check_patch_grid, patchify,
                                             unpatchify)


def test_sincos_2d_entries_are_the_closed_form():
    """Entry by entry against the formula written out: first half the column, second half the row, each
    [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (D/4)), k < D/4."""
    dim, h, w = 16, 3, 5
    emb = sincos_position_embedding_2d(dim, (h, w)).double()
    q = dim // 4
    for r in range(h):
        for c in range(w):
            row = emb[r * w + c]
            for k in range(q):
                om = 10000.0 ** (-k / q)
                want = [math.sin(c * om), math.cos(c * om), math.sin(r * om), math.cos(r * om)]
                got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
                assert all(abs(float(a) - b) < 1e-6 for a, b in zip(got, want)), (r, c, k)


def test_sincos_2d_inner_products_depend_only_on_the_offset():
    """<e(r, c), e(r', c')> = sum_k cos(w_k (c - c')) + cos(w_k (r - r')): a translation-invariant kernel."""
    dim, h, w = 32, 6, 7
    emb = sincos_position_embedding_2d(dim, (h, w)).double()
    om = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.arange(h).repeat_interleave(w).double(), torch.arange(w).repeat(h).double()
    dr, dc = rows[:, None] - rows[None], cols[:, None] - cols[None]
    want = torch.cos(dc[..., None] * om).sum(-1) + torch.cos(dr[..., None] * om).sum(-1)
    torch.testing.assert_close(emb @ emb.T, want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding_2d(18, (2, 2))


def test_masked_attention_equals_attention_over_the_visible_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    out = attention(q, k, v, mask[:, None, None, :])
    for i in range(2):
        keep = mask[i]
        ref = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, keep], v[i:i + 1, :, keep])
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-6)
    bf = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask[:, None, None, :]).float()  # the bf16 CPU path
    assert (bf - out).abs().max() < 0.03


def test_null_context_makes_an_all_masked_context_equal_no_context():
    torch.manual_seed(0)
    null, cross = NullContext(6, "model.x"), CrossAttention(16, 6, 2)
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 5, 6)
    none = cross(x, *null(3, None, None))
    masked = cross(x, *null(3, ctx, torch.zeros(3, 5, dtype=torch.bool)))
    torch.testing.assert_close(masked, none, rtol=1e-5, atol=1e-6)
    used = cross(x, *null(3, ctx, torch.ones(3, 5, dtype=torch.bool)))
    assert (used - none).abs().max() > 1e-3  # a visible context changes the output


def test_null_context_errors_name_the_fix():
    null = NullContext(6, "model.dit")
    with pytest.raises(ValueError, match=r"width 4 .*context_dim=6: set model.dit.context_dim=4"):
        null(2, torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match=r"context must have shape \(N=2, L, C=6\)"):
        null(2, torch.randn(3, 3, 6), None)
    with pytest.raises(ValueError, match="context_mask must be a bool tensor of shape"):
        null(2, torch.randn(2, 3, 6), torch.ones(2, 3))


def test_patchify_round_trip_and_token_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)  # (2, 6, 12)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, (2, 3)), x)
    # token 4 is patch (row 1, col 1); its first feature is pixel (2, 2) of channel 0, then (2, 2) of channel 1
    assert tokens[0, 4, 0] == x[0, 0, 2, 2] and tokens[0, 4, 1] == x[0, 1, 2, 2]
    conv = torch.nn.Conv2d(3, 5, 2, stride=2)  # the patch embedding is a linear map of these tokens
    w = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (out, p, p, C) ordering
    torch.testing.assert_close(conv(x).flatten(2).transpose(1, 2), tokens @ w.T + conv.bias, rtol=1e-5, atol=1e-4)


def test_patch_grid_error_lists_the_divisors():
    assert check_patch_grid((28, 28), 4, "model.dit") == (7, 7)
    with pytest.raises(ValueError, match=r"patch_size=8 does not divide the image size 28x28: choose a patch size "
                                         r"in \[1, 2, 4, 7, 14, 28\]"):
        check_patch_grid((28, 28), 8, "model.dit")
