"""Classifier-free guidance against the empty context (text conditioning), on a denoiser whose output says which
context entries it saw."""
import torch

from torchdiffusion.guidance import ContextFreeGuidance


class SeesContext(torch.nn.Module):
    """D(x, sigma, context, context_mask) = x * (1 + sum of the visible context values): the null half (all masked)
    gives x itself; records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, context=None, context_mask=None):
        self.calls.append(x.shape[0])
        if context is None:
            return x
        mask = torch.ones(context.shape[:2], dtype=torch.bool) if context_mask is None else context_mask
        seen = (context.sum(-1) * mask).sum(1)  # (N,)
        return x * (1 + seen)[:, None]


def test_context_guidance_is_the_cfg_combination_in_one_call():
    den = SeesContext()
    x, sigma = torch.randn(3, 4), torch.tensor([0.5, 1.0, 2.0])
    ctx = torch.rand(3, 2, 5)
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    out = ContextFreeGuidance(den, 4.0)(x, sigma, context=ctx, context_mask=mask)
    d_c = den(x, sigma, context=ctx, context_mask=mask)
    torch.testing.assert_close(out, x + 4.0 * (d_c - x))  # D_u = x: the null half saw no entry
    assert den.calls[0] == 6  # conditional and unconditional halves in one batched call
    torch.testing.assert_close(out[2], x[2])  # an all-masked context is unconditional at any scale


def test_context_guidance_interval_scale_one_and_no_context():
    den = SeesContext()
    x, sigma, ctx = torch.randn(2, 4), torch.tensor([0.5, 5.0]), torch.rand(2, 3, 5)
    d_c = den(x, sigma, context=ctx)
    out = ContextFreeGuidance(den, 3.0, interval=(1.0, 10.0))(x, sigma, context=ctx)
    torch.testing.assert_close(out[0], d_c[0])  # outside the interval: the conditional denoiser
    torch.testing.assert_close(out[1], x[1] + 3.0 * (d_c[1] - x[1]))
    den.calls.clear()
    assert torch.equal(ContextFreeGuidance(den, 1.0)(x, sigma, context=ctx), d_c) and den.calls == [2]
    assert torch.equal(ContextFreeGuidance(den, 3.0)(x, sigma), x)  # no context: unconditional
