"""Preconditioning: exact parameter conversions, the denoiser wrapper and what it passes to the network."""
import itertools
import math

import pytest
import torch
from torch import nn

from torchdiffusion.precond import PREDICTIONS, Precond, convert, denoiser_from_eps, x0_from, x0_to
from torchdiffusion.schedules import get_schedule

SIGMA_DATA = 0.5
SCHEDULE_NAMES = ["linear", "vp", "edm", "rf"]


def make_schedule(name):
    return get_schedule(name, 1000) if name == "linear" else get_schedule(name)


def true_targets(x0, n, sigma, sigma_data=SIGMA_DATA):
    """Independent definitions of every prediction target for x = x0 + sigma n (sigma shaped to broadcast)."""
    alpha, s = 1 / torch.sqrt(1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)   # VP: x_vp = alpha x0 + s n
    x = x0 + sigma * n
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    return {
        "eps": n,
        "x0": x0,
        "v": alpha * n - s * x0,                 # Salimans & Ho 2022
        "velocity": n - x0,                      # rectified flow: d/dt ((1 - t) x0 + t n)
        "edm": (x0 - c_skip * x) / c_out,        # EDM eq. 7: F's target
    }


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-3, 2.5, 64, dtype=torch.float64)
    x0 = torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    n = torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    return x0, n, sigma


def test_x0_to_matches_independent_targets(batch):
    x0, n, sigma = batch
    x = x0 + sigma[:, None, None] * n
    targets = true_targets(x0, n, sigma[:, None, None])
    for p in PREDICTIONS:
        torch.testing.assert_close(x0_to(p, x0, x, sigma), targets[p], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0_from(p, targets[p], x, sigma), x0, rtol=1e-9, atol=1e-9)


def test_conversions_exact_inverses(batch):
    x0, n, sigma = batch
    x = x0 + sigma[:, None, None] * n
    targets = true_targets(x0, n, sigma[:, None, None])
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        out = convert(targets[src], src, dst, x, sigma)
        torch.testing.assert_close(out, targets[dst], rtol=1e-8, atol=1e-8)
        back = convert(out, dst, src, x, sigma)
        torch.testing.assert_close(back, targets[src], rtol=1e-8, atol=1e-8)


def test_convert_arbitrary_output_roundtrip(batch):
    """Not only true targets: any tensor survives src -> dst -> src."""
    x0, n, sigma = batch
    x = x0 + sigma[:, None, None] * n
    out = torch.randn_like(x0)
    for src, dst in itertools.permutations(PREDICTIONS, 2):
        torch.testing.assert_close(convert(convert(out, src, dst, x, sigma), dst, src, x, sigma), out,
                                   rtol=1e-8, atol=1e-8)


class OracleNet(nn.Module):
    """Returns the true target of a known x0: recovers x from x_in = c_in x, then eps = (x - x0) / sigma."""

    def __init__(self, x0, sigma, schedule, prediction):
        super().__init__()
        self.x0, self.sigma, self.schedule, self.prediction = x0.double(), sigma.double(), schedule, prediction

    def forward(self, x_in, t):
        s = self.sigma[:, None]
        x = x_in.double() / self.schedule.input_scale(s)
        n = (x - self.x0) / s
        return true_targets(self.x0, n, s, getattr(self.schedule, "sigma_data", 0.5))[self.prediction].float()


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_precond_with_true_target_returns_x0(name, prediction):
    sch = make_schedule(name)
    g = torch.Generator().manual_seed(1)
    N = 48
    sigma = torch.logspace(math.log10(sch.sigma_min), math.log10(min(sch.sigma_max, 80.0)), N)
    x0 = torch.randn(N, 6, generator=g)
    x = x0 + sigma[:, None] * torch.randn(N, 6, generator=g)
    D = Precond(OracleNet(x0, sigma, sch, prediction), sch, prediction)(x, sigma)
    assert D.dtype == torch.float32 and D.shape == x.shape
    # float32 throughout: eps/velocity/v reconstruct x0 as x - sigma * (...), so the error scales with sigma
    tol = 1e-5 * (1 + sigma[:, None])
    assert ((D - x0).abs() <= tol).all(), (D - x0).abs().max()


class RecordingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_in, t, **cond):
        self.calls.append((x_in.clone(), t.clone(), cond))
        return torch.zeros_like(x_in)


def expected_c_in_c_noise(name, sigma):
    s = sigma.double()
    if name == "linear":
        return 1 / torch.sqrt(1 + s**2), None
    if name == "vp":  # Song et al.: sigma^2 = exp(beta_min t + (beta_max - beta_min) t^2 / 2) - 1
        t = (-0.1 + torch.sqrt(0.1**2 + 2 * 19.9 * torch.log1p(s**2))) / 19.9
        return 1 / torch.sqrt(1 + s**2), 1000 * t
    if name == "edm":
        return 1 / torch.sqrt(s**2 + 0.25), torch.log(s) / 4
    return 1 / (1 + s), 1000 * s / (1 + s)  # rf: t = sigma / (1 + sigma)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_precond_passes_c_in_x_and_net_time(name):
    sch = make_schedule(name)
    net = RecordingNet()
    if name == "linear":
        idx = torch.tensor([0, 1, 17, 500, 998, 999])
        sigma = sch.sigmas[idx].float()      # table values
    else:
        sigma = torch.logspace(math.log10(sch.sigma_min), math.log10(min(sch.sigma_max, 80.0)), 6)
    x = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(2))
    D = Precond(net, sch, "eps")(x, sigma, class_labels=torch.arange(6))
    torch.testing.assert_close(D, x)         # zero eps: D = x
    (x_in, t, cond), = net.calls
    c_in, c_noise = expected_c_in_c_noise(name, sigma)
    torch.testing.assert_close(x_in.double(), c_in[:, None, None] * x.double(), rtol=1e-6, atol=1e-6)
    assert t.shape == (6,) and t.dtype == torch.float32
    assert "class_labels" in cond
    if name == "linear":
        # a table sigma (rounded to float32) maps to its own timestep index
        assert torch.equal(t.round().long(), idx)
        assert (t.double() - idx).abs().max() < 1e-3
    else:
        torch.testing.assert_close(t.double(), c_noise, rtol=1e-5, atol=1e-5)


def test_vp_input_is_q_sample():
    """x / sqrt(1 + sigma^2) with x = x0 + sigma eps equals sqrt(ab) x0 + sqrt(1 - ab) eps (DDPM eq. 4)."""
    sch = get_schedule("cosine", 1000)
    net = RecordingNet()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 10, 250, 600, 900, 999])
    x0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 5, generator=g, dtype=torch.float64)
    sigma = sch.sigmas[t]
    x = x0 + sigma[:, None] * eps
    Precond(net, sch, "eps")(x, sigma)
    x_in = net.calls[0][0].double()
    torch.testing.assert_close(x_in, sch.q_sample(x0, t, eps), rtol=1e-5, atol=1e-5)


def test_shape_validation():
    sch = get_schedule("edm")
    pre = Precond(RecordingNet(), sch, "x0")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"sigma must have shape \(4,\)"):
        pre(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"sigma must have shape"):
        pre(x, torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"sigma must have shape"):
        pre(x, torch.tensor(1.0))

    class Bad(nn.Module):
        def forward(self, x_in, t):
            return x_in[:, :2]

    with pytest.raises(ValueError, match="network returned shape"):
        Precond(Bad(), sch, "eps")(x, torch.ones(4))
    with pytest.raises(ValueError) as e:
        Precond(RecordingNet(), sch, "score")
    for p in PREDICTIONS:
        assert repr(p) in str(e.value)


def test_denoiser_from_eps():
    sch = get_schedule("linear", 1000)
    D = denoiser_from_eps(lambda x_in, t: torch.ones_like(x_in), sch)
    x = torch.randn(3, 2)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(D(x, sigma), x - sigma[:, None])
