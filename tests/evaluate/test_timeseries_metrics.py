"""CRPS from samples against the closed form of a Gaussian predictive (Monte Carlo within standard errors), the
sorted-sample form against the pairwise definition, and interval coverage of the true predictive near nominal."""
import math

import pytest
import torch

from torchdiffusion.evaluate.timeseries import crps_samples, forecast_scores, gaussian_crps, interval_coverage


def test_sorted_form_equals_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 5, generator=g).double(), torch.randn(5, generator=g).double()
    pairwise = (x - y).abs().mean(0) - 0.5 * (x[:, None] - x[None]).abs().mean((0, 1))
    torch.testing.assert_close(crps_samples(x, y), pairwise, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mu,sd,y", [(0.0, 1.0, 0.3), (2.0, 0.5, -1.0), (-1.0, 3.0, 4.0)])
def test_crps_matches_the_gaussian_closed_form(mu, sd, y):
    """The unbiased estimate from S = 64 draws, over R = 2000 replicates: its mean is within 4 standard errors of
    s [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)]."""
    g = torch.Generator().manual_seed(1)
    r = 2000
    x = mu + sd * torch.randn(64, r, generator=g, dtype=torch.float64)
    est = crps_samples(x, torch.full((r,), y, dtype=torch.float64), unbiased=True)  # (R,)
    se = float(est.std()) / math.sqrt(r)
    exact = float(gaussian_crps(mu, sd, y))
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)


def test_gaussian_closed_form_at_the_mean():
    """At y = mu: CRPS = s (2 phi(0) - 1/sqrt(pi)) = s (sqrt(2) - 1) / sqrt(pi)."""
    assert float(gaussian_crps(0.0, 2.0, 0.0)) == pytest.approx(2 * (math.sqrt(2) - 1) / math.sqrt(math.pi),
                                                                rel=1e-12)


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_coverage_of_the_true_predictive_is_nominal(level):
    """Outcomes and S = 200 samples from the same N(0, 1): coverage within 4 binomial standard errors (plus
    2 / S for the empirical quantiles) of the level; a predictive twice too narrow covers far less."""
    g = torch.Generator().manual_seed(2)
    n, s = 4000, 200
    y, x = torch.randn(n, generator=g), torch.randn(s, n, generator=g)
    tol = 4 * math.sqrt(level * (1 - level) / n) + 2 / s
    assert abs(interval_coverage(x, y, level) - level) < tol
    assert interval_coverage(0.5 * x, y, level) < level - 0.1


def test_scores_and_shape_errors():
    x, y = torch.zeros(10, 3, 4), torch.ones(3, 4)
    out = forecast_scores(x, y)
    assert out == {"crps": pytest.approx(1.0), "coverage50": 0.0, "coverage90": 0.0}
    with pytest.raises(ValueError, match=r"samples must be \(S, \*y.shape\)"):
        crps_samples(x, torch.ones(4, 3))
