"""Measured order of convergence on an exact Gaussian mixture: error falls by ~2^k when steps double."""
import math

import pytest
import torch

from torchdiffusion.data.toy import GaussianMixture
from torchdiffusion.sampling import SAMPLERS

MIX = GaussianMixture(torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]]), [0.4])
X = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
S_HI, S_LO = 5.0, 0.2   # a segment inside the smooth range; no final step to 0


MULTISTEP = {"dpmpp_2m", "dpmpp_3m", "unipc"}


def grid(n, warm=False):
    """n uniform steps in lambda = -log sigma; with `warm`, two warm-up steps of size h^2 and h^1.5 first, so
    the lower-order start of a multistep method has local errors below the method's global order
    (a first-order start otherwise caps the global order at 2)."""
    lam0, lam1 = -math.log(S_HI), -math.log(S_LO)
    if not warm:
        lam = torch.linspace(lam0, lam1, n + 1, dtype=torch.float64)
    else:
        h = (lam1 - lam0) / n
        start = lam0 + h**2 + h**1.5
        lam = torch.cat([torch.tensor([lam0, lam0 + h**2], dtype=torch.float64),
                         torch.linspace(start, lam1, n + 1, dtype=torch.float64)])
    return (-lam).exp()


REF = SAMPLERS["ode_reference"](MIX, X, grid(1), rtol=1e-11, atol=1e-11)


def err(name, n, **opts):
    out = SAMPLERS[name](MIX, X.clone(), grid(n, warm=name in MULTISTEP), **opts)
    return (out - REF).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("name,opts,order", [
    ("euler", {}, 1), ("dpm_solver_1", {}, 1), ("dpmpp_2m", {}, 1 + 1), ("heun", {}, 2),
    ("dpm_solver_2", {}, 2), ("dpmpp_2s", {}, 2), ("dpm_solver_3", {}, 3), ("dpmpp_3m", {}, 3),
    # UniC raises the order by one; the last step has no corrector (no evaluation after it), so it must not
    # drop to a lower order for the gain to show: lower_order_final=False
    ("unipc", {"order": 1}, 2), ("unipc", {"order": 2, "lower_order_final": False}, 3),
    ("unipc", {"order": 2, "variant": "bh1", "lower_order_final": False}, 3),
    ("unipc", {"order": 3, "lower_order_final": False}, 4), ("unipc", {"order": 2, "corrector": False}, 2),
    ("unipc", {"order": 3}, 2),  # lower_order_final: the final UniP-1 step caps the global order at 2
])
def test_order_of_convergence(name, opts, order):
    n = 48 if opts.get("order") == 3 else 32
    e1, e2 = err(name, n, **opts), err(name, 2 * n, **opts)
    rate = math.log2(e1 / e2)
    assert abs(rate - order) < 0.35, (name, opts, e1, e2, rate)


def test_adaptive_meets_tolerance():
    loose = err("dpm_solver_adaptive", 1, rtol=1e-3, atol=1e-4)
    tight = err("dpm_solver_adaptive", 1, rtol=1e-6, atol=1e-7)
    assert tight < 1e-4 and tight < loose / 20
