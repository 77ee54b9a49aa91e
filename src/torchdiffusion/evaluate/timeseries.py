"""Scores of probabilistic forecasts from samples (docs/timeseries.md): CRPS and the coverage of central intervals.

CRPS (Gneiting & Raftery 2007, eq. 20, the energy form): for a predictive F and an outcome y,
CRPS(F, y) = E|X - y| - 1/2 E|X - X'| with X, X' independent draws of F. From S samples x_1..x_S it is estimated
with the sorted-sample identity sum_{i,j} |x_i - x_j| = 2 sum_k (2k - S - 1) x_(k) (k = 1..S, ascending), so in
O(S log S). For a Gaussian predictive N(mu, s^2) it has the closed form
CRPS = s [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)], z = (y - mu) / s (Gneiting & Raftery 2007, eq. 21).
"""
from __future__ import annotations

import math

import torch

INTERVALS = (0.5, 0.9)  # the central intervals whose coverage is reported


def crps_samples(samples: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """The CRPS of the empirical predictive of `samples` (S, ...) at outcomes y (...), elementwise (...), float64:
    mean_i |x_i - y| - 1/(2 S^2) sum_{i,j} |x_i - x_j|. `unbiased` divides the second term by S (S - 1)
    instead of S^2 (the unbiased estimate of the predictive's CRPS; the default is the CRPS of the S-point
    distribution itself, what forecasts are scored with)."""
    if samples.ndim < 1 or samples.shape[1:] != y.shape:
        raise ValueError(f"samples must be (S, *y.shape) = (S, {', '.join(map(str, y.shape))}), got "
                         f"{tuple(samples.shape)}")
    s = samples.shape[0]
    x = samples.double()
    first = (x - y.double()).abs().mean(0)  # (...)
    k = torch.arange(1, s + 1, dtype=torch.float64, device=x.device).view(-1, *([1] * y.ndim))  # (S, 1, ...)
    pairs = 2 * ((2 * k - s - 1) * x.sort(0).values).sum(0)  # sum_{i,j} |x_i - x_j|
    denom = s * (s - 1) if unbiased and s > 1 else s * s
    return first - pairs / (2 * denom)


def gaussian_crps(mu, sd, y) -> torch.Tensor:
    """The closed-form CRPS of N(mu, sd^2) at y: sd [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)], z = (y - mu)/sd."""
    mu, sd, y = (torch.as_tensor(v, dtype=torch.float64) for v in (mu, sd, y))
    z = (y - mu) / sd
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return sd * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def interval_coverage(samples: torch.Tensor, y: torch.Tensor, level: float) -> float:
    """The fraction of outcomes y (...) inside the central `level` interval of their samples (S, ...): between
    the (1 - level)/2 and (1 + level)/2 empirical quantiles."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples.double(), q.to(samples.device), dim=0)  # (...) each
    y = y.double()
    return float(((y >= lo) & (y <= hi)).double().mean())


def forecast_scores(samples: torch.Tensor, y: torch.Tensor, levels=INTERVALS) -> dict:
    """The scores of forecasts `samples` (S, ...) of outcomes y (...): mean CRPS over every step and series, and
    the coverage of each central interval in `levels`."""
    out = {"crps": float(crps_samples(samples, y).mean())}
    out.update({f"coverage{round(100 * lv)}": interval_coverage(samples, y, lv) for lv in levels})
    return out
