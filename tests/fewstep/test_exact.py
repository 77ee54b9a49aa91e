"""Few-step methods against exact answers: Gaussian data N(m, s^2) has a linear probability-flow ODE map in closed
form (x - m) / sqrt(s^2 + sigma^2) = const, so every method's target is known."""
import math

import pytest
import torch
from torch import nn

from torchdiffusion.data.toy import gaussian
from torchdiffusion.fewstep import (ConsistencyDistillation, ConsistencyFunction, ConsistencyTraining,
                                    ConsistencyTuning, CouplingDataset, OneStepDistillation, ProgressiveDistillation,
                                    ReflowObjective, halve_grid, make_coupling, pseudo_huber, straightness)
from torchdiffusion.fewstep.consistency import ict_levels, karras_grid, lognormal_level_probs, teacher_step
from torchdiffusion.nets import UNet
from torchdiffusion.precond import PREDICTIONS, Precond
from torchdiffusion.sampling import SAMPLERS, get_sigmas
from torchdiffusion.utils import append_dims, sample_generators
from torchdiffusion.schedules import get_schedule

M, S = 0.5, 0.3  # the data: N(M, S^2) in every dimension


def ode_map(x, sigma, sigma_to):
    """The exact PF-ODE map of N(M, S^2) data from level sigma to sigma_to."""
    return M + (x - M) * math.sqrt(S**2 + sigma_to**2) / torch.sqrt(S**2 + torch.as_tensor(sigma) ** 2)


class LinearInX(nn.Module):
    """F(x_in, t) = a(t) x_in + b(t), a and b a small MLP of the network time t / time_scale: every Gaussian target
    is in reach, for any time."""

    def __init__(self, time_scale: float = 1.0, hidden: int = 64):
        super().__init__()
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(5, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x, t, **cond):
        u = t.float()[:, None] / self.time_scale
        feats = [u] + [f(k * math.pi * u) for k in (1, 2) for f in (torch.sin, torch.cos)]
        ab = self.mlp(torch.cat(feats, 1))  # (N, 2)
        return ab[:, :1] * x + ab[:, 1:]


class TabularLinear(nn.Module):
    """F(x_in, t) = a_k x_in + b_k with k the grid level nearest to t: one free pair per level, for objectives
    that only ever evaluate the student on a fixed grid (CD, PD)."""

    def __init__(self, times: torch.Tensor):
        super().__init__()
        self.register_buffer("times", times.float().flatten())
        self.a = nn.Parameter(torch.ones(len(self.times)))
        self.b = nn.Parameter(torch.zeros(len(self.times)))

    def forward(self, x, t, **cond):
        k = (t.float()[:, None] - self.times[None]).abs().argmin(1)  # (N,)
        return self.a[k][:, None] * x + self.b[k][:, None]


def fit(objective, student, steps, *, lr=3e-3, n=512, seed=0, after=None):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)  # to 0: the noise of the last steps
    data = gaussian(M, S, dim=1)
    g = torch.Generator().manual_seed(seed + 1)
    for k in range(steps):
        x0 = data.sample(n, generator=g).float()
        kw = {"step": k} if getattr(objective, "takes_step", False) else {}
        loss = objective(student, x0, generator=g, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if after is not None:
            after(student)
    return student


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_boundary_condition_holds_exactly_for_every_parameterization(prediction):
    net = UNet(image_size=8, channels=8, channel_mult=(1,), attn_resolutions=(), mid_attention=False, norm_groups=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    schedule = get_schedule("edm") if prediction == "edm" else get_schedule("cosine")
    f = ConsistencyFunction(Precond(net, schedule, prediction), sigma_min=0.002)
    x = torch.randn(3, 1, 8, 8) * 0.01
    sigma = torch.full((3,), 0.002)
    assert torch.equal(f(x, sigma), x)
    assert not torch.allclose(f(x, torch.full((3,), 1.0)), x)


def test_pseudo_huber_and_curriculum_match_the_paper():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    c = 0.00054 * math.sqrt(48)
    torch.testing.assert_close(pseudo_huber(a, b), torch.full((2,), math.sqrt(48 + c**2) - c))
    # Song & Dhariwal 2023, sec. 3.4: s0 = 10, s1 = 1280, K = 400k -> K' = 50k, N doubles every 50k steps
    assert [ict_levels(k, 400_000) for k in (0, 49_999, 50_000, 349_999, 350_000, 399_999)] == \
        [11, 11, 21, 641, 1281, 1281]
    t = karras_grid(41, 0.002, 80.0)
    p = lognormal_level_probs(t)
    assert abs(float(p.sum()) - 1) < 1e-6 and (t[1:] > t[:-1]).all()
    mass = torch.distributions.Normal(-1.1, 2.0)  # the lognormal's mass between each pair of levels
    ref = mass.cdf(t[1:].double().log()) - mass.cdf(t[:-1].double().log())
    torch.testing.assert_close(p.double(), ref / ref.sum(), rtol=1e-5, atol=1e-7)


def test_ect_mapping_shrinks_to_t():
    ect = ConsistencyTuning(stage_steps=100, q=2.0, k=8.0, b=1.0)
    t = torch.tensor([0.01, 0.5, 5.0, 80.0])
    gaps = [(t - ect.r_of(t, step)) / t for step in (0, 100, 200, 700)]
    torch.testing.assert_close(gaps[0], (0.5 * (1 + 8 * torch.sigmoid(-t))).clamp(max=1.0))
    assert all((g1 <= g0 + 1e-7).all() for g0, g1 in zip(gaps, gaps[1:]))  # r -> t as the stages go on
    assert (ect.r_of(t, 0) >= 0).all() and float(gaps[-1].max()) < 0.04


def test_progressive_target_makes_one_student_step_equal_two_teacher_steps():
    """With the target itself as the student's prediction, one student DDIM step lands where two teacher steps do."""
    teacher = gaussian(M, S, dim=1)
    grid = get_sigmas(get_schedule("cosine"), 8, "trailing")
    pd = ProgressiveDistillation(teacher, grid)
    assert pd.student_steps == 4 and torch.equal(pd.student_sigmas, grid[::2])
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for i in range(pd.student_steps):
        idx = torch.full((64,), i)
        s, s2 = grid[2 * i].double(), grid[2 * i + 2].double()
        target = pd.target(x, idx, {})
        one = target + (s2 / s) * (x - target) if s2 > 0 else target
        two = SAMPLERS["ddim"](teacher, x.clone(), grid[2 * i:2 * i + 3])
        torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be halved"):
        halve_grid(grid[:4])


def test_progressive_round_reproduces_the_teachers_two_step_map():
    teacher = gaussian(M, S, dim=1)
    sch = get_schedule("cosine")
    grid = get_sigmas(sch, 4, "trailing")
    pd = ProgressiveDistillation(teacher, grid)
    student = fit(pd, Precond(TabularLinear(sch.net_time(pd.student_sigmas[:-1])), sch, "x0"), 600, lr=3e-2)
    x = torch.randn(512, 1, generator=torch.Generator().manual_seed(5)) * float(grid[0])
    with torch.no_grad():
        mine = SAMPLERS["ddim"](student, x.clone(), pd.student_sigmas)
        theirs = SAMPLERS["ddim"](teacher, x.double(), grid).float()
    err = (mine - theirs).abs()
    assert err.max() < 0.01 * S, float(err.max())


def heun_chain(teacher, x, grid, to: int = 0):
    """The teacher's discretised ODE map from the top of the increasing grid down to grid[to] (Heun steps)."""
    y = x.clone()
    for i in range(len(grid) - 1, to, -1):
        y = teacher_step(teacher, y, grid[i].expand(len(y)), grid[i - 1].expand(len(y)), "heun")
    return y


def test_consistency_distillation_with_the_exact_teacher_learns_the_ode_map():
    """CD learns the teacher's discretised ODE map (here to 1% of the data's scale), and that map converges to the
    exact one as the grid is refined (Heun's second order: 28% at 12 levels, 2% at 40, from sigma = 20)."""
    teacher = gaussian(M, S, dim=1)
    cd = ConsistencyDistillation(teacher, levels=12, sigma_min=0.002, sigma_max=20.0, mu=0.5, sigma_data=S)
    sch = get_schedule("edm", sigma_data=S)
    student = Precond(TabularLinear(sch.net_time(cd.t)), sch, "edm")
    fit(cd, student, 1500, lr=3e-2, after=cd.after_step)
    f = ConsistencyFunction(student, 0.002, S)
    grid = cd.t.double()
    for k in (11, 6, 2):
        sigma = float(grid[k])
        x = M + torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * math.sqrt(S**2 + sigma**2)
        with torch.no_grad():
            got = f(x.float(), torch.full((7,), sigma)).double()
        want = heun_chain(teacher, x, grid[: k + 1])
        assert (got - want).abs().max() < 0.01 * S, (sigma, float((got - want).abs().max()))
    for n, tol in ((12, 0.3), (40, 0.025)):
        grid = karras_grid(n, 0.002, 20.0).double()
        x = M + torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * math.sqrt(S**2 + 400)
        err = (heun_chain(teacher, x, grid) - ode_map(x, 20.0, 0.002)).abs().max()
        assert err < tol * S, (n, float(err))
    assert not any(p.grad is None for p in student.parameters())


def test_consistency_training_pairs_average_to_the_exact_euler_step():
    """Given x_hi, the CT target's input x0 + t_lo z (x0 from the posterior, z = (x_hi - x0) / t_hi) averages to the
    Euler / DDIM step of the exact denoiser: the teacher CT does without (Song et al. 2023, Theorem 2)."""
    teacher, t_lo, t_hi = gaussian(M, S, dim=1), 0.7, 2.0
    x_hi = torch.full((200_000, 1), 1.3, dtype=torch.float64)
    d = teacher(x_hi, torch.full((len(x_hi),), t_hi, dtype=torch.float64))            # E[x0 | x_hi]
    post_sd = S * t_hi / math.sqrt(S**2 + t_hi**2)
    x0 = d + post_sd * torch.randn(x_hi.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (x_hi - x0) / t_hi
    hi, lo = ConsistencyTraining.points(x0, z, torch.full((len(x0),), t_lo, dtype=torch.float64),
                                        torch.full((len(x0),), t_hi, dtype=torch.float64))
    assert torch.allclose(hi, x_hi)
    euler = teacher_step(teacher, x_hi[:1], torch.tensor([t_hi], dtype=torch.float64),
                         torch.tensor([t_lo], dtype=torch.float64), "euler")
    se = float(lo.std()) / math.sqrt(len(lo))
    assert abs(float(lo.mean()) - float(euler)) < 5 * se


@pytest.mark.parametrize("dist", ["l2", "pseudo_huber"])
def test_consistency_training_learns_the_exact_teachers_euler_map(dist):
    """On a fixed grid CT's fixed point is CD's with the exact denoiser as an Euler teacher."""
    ct = ConsistencyTraining(total_steps=3000, s0=11, s1=11, sigma_max=20.0, sigma_data=S, distance=dist)
    assert len(ct.grid(0)) == 12 and len(ConsistencyTraining(total_steps=300, s0=4, s1=32).grid(299)) == 33
    sch = get_schedule("edm", sigma_data=S)
    grid = ct.grid(0)
    student = Precond(TabularLinear(sch.net_time(grid)), sch, "edm")
    fit(ct, student, 3000, lr=3e-2)
    f, teacher, g = ConsistencyFunction(student, 0.002, S), gaussian(M, S, dim=1), grid.double()
    for k in (11, 6, 2):
        x = M + torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * math.sqrt(S**2 + float(g[k]) ** 2)
        with torch.no_grad():
            got = f(x.float(), torch.full((7,), float(g[k]))).double()
        want = x.clone()
        for i in range(k, 0, -1):
            want = teacher_step(teacher, want, g[i].expand(7), g[i - 1].expand(7), "euler")
        assert (got - want).abs().max() < 0.04 * S, (k, float((got - want).abs().max()))


def test_reflow_of_a_gaussian_coupling_straightens_the_flow():
    """1-RF of independent pairs is curved for S != 1; the reflowed (2-RF) flow of its own ODE pairs is straight,
    and one Euler step from noise then lands on the data law."""
    rf = get_schedule("rf", logit_std=0.0)
    flow1 = gaussian(M, S, dim=1)  # the exact denoiser of the independent coupling
    sig = get_sigmas(rf, 64, "logsnr")
    noise, samples = make_coupling(flow1, (1,), 2048, sig, sampler=SAMPLERS["heun"], seed=0)
    assert abs(float(samples.mean()) - M) < 0.03  # Monte Carlo: 2048 draws of std S
    data = CouplingDataset(samples, noise)
    x0, _, extra = data.batch(torch.arange(4))
    assert torch.equal(extra["coupled_noise"], noise[:4])
    obj = ReflowObjective(rf, prediction="velocity")
    student = Precond(LinearInX(time_scale=1000.0), rf, "velocity")
    torch.manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        idx = torch.randint(0, len(data), (512,), generator=g)
        x0, _, extra = data.batch(idx)
        loss = obj(student, x0, extra, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(4))
    s1, s2 = straightness(flow1, z, steps=50), straightness(student, z, steps=50)
    assert s2 < 0.1 * s1, (s1, s2)
    one = lambda d: SAMPLERS["euler"](d, z * float(sig[0]), torch.tensor([float(sig[0]), 0.0]))  # noqa: E731
    with torch.no_grad():
        e1, e2 = (one(d).std() / S - 1 for d in (flow1, student))
    assert abs(float(e2)) < 0.1 < abs(float(e1)), (float(e1), float(e2))
    with pytest.raises(ValueError, match="coupled pairs"):
        obj(student, x0)


def test_one_step_distillation_learns_the_pairing():
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0))
    samples = M + S * noise  # a straight, exact pairing
    data = CouplingDataset(samples, noise)
    rf = get_schedule("rf")
    obj = OneStepDistillation(rf.sigma_max)
    student = Precond(LinearInX(time_scale=1000.0), rf, "x0")
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        x0, _, extra = data.batch(torch.randint(0, 4096, (256,), generator=g))
        loss = obj(student, x0, extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 1e-3 * S**2


class TwoGaussians(nn.Module):
    """A class-conditional oracle: class 0 is N(M, S^2), the null class 1 is N(0, 1): the guided denoiser
    D_w = D_u + w (D_c - D_u) is linear in x, so the guided probability-flow ODE's map is too."""

    def __init__(self):
        super().__init__()
        self.c, self.u = gaussian(M, S, dim=1), gaussian(0.0, 1.0, dim=1)

    def forward(self, x, sigma, class_labels=None, **_):
        null = (class_labels == 1)[:, None]
        return torch.where(null, self.u(x, sigma), self.c(x, sigma))


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_latent_consistency_learns_the_guided_teachers_map(w):
    """LCM with scale w learns the map of the guided teacher's one-step-per-interval (skipping-step) Euler chain:
    one student call replaces the guided teacher's 2 x 11 calls."""
    from torchdiffusion.fewstep import LatentConsistencyDistillation

    teacher = TwoGaussians()
    grid = karras_grid(12, 0.002, 20.0)
    lcm = LatentConsistencyDistillation(teacher, grid, null_label=1, guidance_range=(w, w), mu=0.5, sigma_data=S,
                                        distance="l2")
    sch = get_schedule("edm", sigma_data=S)
    student = Precond(TabularLinear(sch.net_time(grid)), sch, "edm")
    labels = {"class_labels": torch.zeros(512, dtype=torch.long)}
    torch.manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / 1500)
    g, data = torch.Generator().manual_seed(1), gaussian(M, S, dim=1)
    for k in range(1500):
        loss = lcm(student, data.sample(512, generator=g).float(), labels, generator=g, step=k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        lcm.after_step(student)
    f, gd = ConsistencyFunction(student, float(grid[0]), S), grid.double()
    guided = lcm.guided(torch.full((7,), w, dtype=torch.float64))
    x = M + torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * 20.0
    want = x.clone()
    for i in range(len(gd) - 1, 0, -1):
        want = teacher_step(guided, want, gd[i].expand(7), gd[i - 1].expand(7), "euler",
                            class_labels=torch.zeros(7, dtype=torch.long))
    with torch.no_grad():
        got = f(x.float(), torch.full((7,), 20.0), guidance_scale=torch.full((7,), w)).double()
    assert (got - want).abs().max() < 0.03 * S, float((got - want).abs().max())


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2s", 2)])
def test_teacher_step_has_its_order_on_the_exact_gaussian_flow(solver, order):
    """Gaussian data N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2) and the probability-flow ODE maps x at sigma to
    x sqrt((s^2 + sigma_next^2) / (s^2 + sigma^2)). A step's local error falls as h^(order + 1): halving the
    log-sigma step divides it by about 2^(order + 1)."""
    s2 = 0.25
    teacher = lambda x, sigma, **c: x * s2 / (s2 + append_dims(sigma, x.ndim) ** 2)  # noqa: E731
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    errs = []
    for h in (0.4, 0.2, 0.1):
        sigma = torch.full((7,), 1.0, dtype=torch.float64)
        sigma_next = sigma * math.exp(-h)
        exact = x * torch.sqrt((s2 + sigma_next[:, None] ** 2) / (s2 + sigma[:, None] ** 2))
        errs.append(float((teacher_step(teacher, x, sigma, sigma_next, solver) - exact).abs().max()))
    for big, small in zip(errs, errs[1:]):
        assert 2 ** (order + 1) * 0.7 < big / small < 2 ** (order + 1) * 1.4
    zero = teacher_step(teacher, x, torch.full((7,), 1.0, dtype=torch.float64), torch.zeros(7, dtype=torch.float64),
                        solver)
    torch.testing.assert_close(zero, teacher(x, torch.ones(7, dtype=torch.float64)))  # to sigma 0: the denoiser
