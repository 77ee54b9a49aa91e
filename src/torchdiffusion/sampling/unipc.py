"""UniPC (Zhao et al. 2023): unified predictor-corrector multistep solver, data prediction, in VE coordinates.

With h = lambda_t - lambda_s (lambda = -log sigma), hh = -h, h phi_1 = e^{hh} - 1 and B(h) = hh ('bh1') or
e^{hh} - 1 ('bh2'), the predictor UniP-p (Zhao et al. 2023, eq. 9 / Algorithm 2) is

    x_t = (sigma_t / sigma_s) x_s - h phi_1 D_s - B(h) sum_m a_m (D_{s_m} - D_s) / r_m,   r_m = (lambda_{s_m} - lambda_s)/h

with a solving R_p(h) a = phi_p(h) / B(h) (eq. 8); the corrector UniC-p (eq. 7) repeats the step with the new
evaluation D_t at the predicted x_t included (r = 1), raising the order by one at no extra evaluation.
"""
from __future__ import annotations

import math

import torch

from ..utils import check_choice
from .core import _report, expand_sigma, levels
from .ode import check_final, final_step

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(rks, h, variant="bh2"):
    """The UniPC linear system: R[i, m] = r_m^i, b[i] = i! phi_{i+1}(hh) / B(h) (hh = -h); returns (R, b, h phi_1, B)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B = hh if variant == "bh1" else math.expm1(hh)
    R, b, fact = [], [], 1
    for i in range(1, len(rks) + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fact / B)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, B


def unipc_update(x, d0, hist, lam0, lams, sigma, sigma_next, order, variant="bh2", d_new=None):
    """One UniP (d_new None) or UniC (d_new = D at the predicted x_t) update of the given order.

    `hist` are earlier D values, newest first, at half log-SNRs `lams`; d0 the D at x (level sigma, lam0).
    """
    h = math.log(sigma / sigma_next)
    rks = [(lam - lam0) / h for lam in lams[: order - 1]]
    D1s = [(m - d0) / r for m, r in zip(hist[: order - 1], rks)]
    R, b, h_phi_1, B = unipc_coefficients(rks + [1.0], h, variant)
    x_base = (sigma_next / sigma) * x - h_phi_1 * d0
    if d_new is None:  # predictor: uses order - 1 differences
        if not D1s:
            return x_base
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_base - B * sum(rho * d for rho, d in zip(rhos, D1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    res = sum((rho * d for rho, d in zip(rhos[:-1], D1s)), torch.zeros_like(x))
    return x_base - B * (res + rhos[-1] * (d_new - d0))


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, order=3, variant="bh2",
                 lower_order_final=True, corrector=True, final="denoise"):
    """UniPC (Zhao et al. 2023, Algorithm 3): UniP-p predictor then UniC corrector (reusing the next
    evaluation); warm-up with lower orders, optionally lower orders on the last steps (as the reference code)."""
    check_choice("order", order, (1, 2, 3))
    check_choice("variant", variant, VARIANTS)
    check_final(final)
    sig = levels(sigmas)
    n = len(sig) - 1
    hist, lams = [], []           # D values and their lambdas, newest first (local multistep state)
    x_prev = d_prev_hist = None   # state for the corrector of the last predictor step
    this_order = 1
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        lam = -math.log(sigma)
        denoised = denoiser(x, expand_sigma(sigma, x))
        if corrector and x_prev is not None:  # UniC with the fresh evaluation at the predicted point
            s_prev = sig[i - 1]
            x = unipc_update(x_prev, d_prev_hist[0], d_prev_hist[1:], -math.log(s_prev), lams[1:], s_prev, sigma,
                             this_order, variant, d_new=denoised)
        _report(callback, i, x, sigma, sigma_next, denoised)
        hist, lams = [denoised] + hist[:2], [lam] + lams[:2]
        if sigma_next == 0:
            x = final_step(x, denoised, final)
            continue
        this_order = min(order, len(hist))
        if lower_order_final:
            this_order = min(this_order, n - i)  # steps left, the final one included
        x_prev, d_prev_hist = x, hist
        x = unipc_update(x, denoised, hist[1:], lam, lams[1:], sigma, sigma_next, this_order, variant)
    return x
