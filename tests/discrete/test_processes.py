"""Masking schedules, q(x_t | x_0) and the posteriors of the absorbing and uniform processes (docs/text.md)."""
import math

import pytest
import torch

from torchdiffusion.discrete import processes as P

K = 3
SE = 5  # Monte Carlo tolerance in standard errors (docs/theory.md)


def closed_alpha(name, t, eps):
    """alpha(t) written from the papers: MDLM's log-linear 1 - (1 - eps) t and eps + (1 - eps) cos(pi t / 2)."""
    if name == "log-linear":
        return 1 - (1 - eps) * t
    return eps + (1 - eps) * torch.cos(math.pi * t / 2)


@pytest.mark.parametrize("name", sorted(P.MASK_SCHEDULES))
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_schedule_endpoints_monotone_and_derivative(name, eps):
    sch = P.get_mask_schedule(name, eps)
    t = torch.linspace(0, 1, 401, dtype=torch.float64)
    a = sch.alpha(t)
    torch.testing.assert_close(a, closed_alpha(name, t, eps), rtol=1e-12, atol=1e-12)
    assert a[0] == 1 and abs(a[-1].item() - eps) < 1e-12
    assert (a[1:] < a[:-1]).all()
    h = 1e-6
    tt = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    fd = (sch.alpha(tt + h) - sch.alpha(tt - h)) / (2 * h)
    torch.testing.assert_close(sch.dalpha(tt), fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sch.weight(tt), -fd / (1 - sch.alpha(tt)), rtol=1e-6, atol=0)
    tiny = torch.tensor([1e-30], dtype=torch.float64)  # 1 - alpha without cancellation near t = 0
    assert sch.mask_rate(tiny).item() > 0 and math.isfinite(sch.weight(tiny).item())


def test_unknown_schedule_and_bad_eps_are_refused():
    with pytest.raises(ValueError, match="allowed values: 'log-linear', 'cosine'"):
        P.get_mask_schedule("linear")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        P.get_mask_schedule("cosine", eps=1.0)


def frequencies_match(samples, probs, categories):
    """Per (position, category) frequency of samples (n, L) vs probs (L, C), within SE standard errors."""
    n = samples.shape[0]
    freq = torch.nn.functional.one_hot(samples, categories).double().mean(0)  # (L, C)
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= SE * se + 1e-12).all(), (freq, probs)


def test_absorbing_marginal_samples_match_closed_form():
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0, 2, 1, 1]]).repeat(20000, 1)
    probs = P.absorbing_probs(x0[:1], 0.3, mask_id=K)[0]  # (L, K + 1)
    expect = torch.zeros(4, K + 1, dtype=torch.float64)
    expect[torch.arange(4), x0[0]] = 0.3
    expect[:, K] = 0.7
    torch.testing.assert_close(probs, expect, rtol=1e-12, atol=1e-12)
    frequencies_match(P.absorbing_sample(x0, 0.3, mask_id=K, generator=g), probs, K + 1)
    alpha = torch.tensor([0.9, 0.1]).repeat(10000)  # one alpha per sequence
    x_t = P.absorbing_sample(x0, alpha, mask_id=K, generator=g)
    for row, a in ((0, 0.9), (1, 0.1)):
        frequencies_match(x_t[row::2], P.absorbing_probs(x0[:1], a, mask_id=K)[0], K + 1)


def test_uniform_marginal_samples_match_closed_form():
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([[0, 2, 1]]).repeat(20000, 1)
    probs = P.uniform_probs(x0[:1], 0.4, num_tokens=K)[0]
    expect = torch.full((3, K), 0.6 / K, dtype=torch.float64)
    expect[torch.arange(3), x0[0]] += 0.4
    torch.testing.assert_close(probs, expect, rtol=1e-12, atol=1e-12)
    frequencies_match(P.uniform_sample(x0, 0.4, num_tokens=K, generator=g), probs, K)


def absorbing_matrices(a_s, a_t):
    """D3PM's absorbing matrices over K + 1 states: Qbar_s (x0 -> x_s) and Q_{t|s} (x_s -> x_t)."""
    def qbar(a):
        q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
        q[:K, :K] = a * torch.eye(K, dtype=torch.float64)
        q[:, K] = 1 - a
        q[K, K] = 1.0
        return q
    return qbar(a_s), qbar(a_t / a_s), qbar(a_t)


def uniform_matrices(a_s, a_t):
    qbar = lambda a: a * torch.eye(K, dtype=torch.float64) + (1 - a) / K
    return qbar(a_s), qbar(a_t / a_s), qbar(a_t)


def bayes(qs, qts, qt, x0, x_t):
    """q(x_s | x_t, x0) = Q_{t|s}[x_s, x_t] Qbar_s[x0, x_s] / Qbar_t[x0, x_t] (D3PM eq. 3), brute force."""
    return qts[:, x_t] * qs[x0, :] / qt[x0, x_t]


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_posteriors_equal_bayes_rule_from_the_transition_matrices(process):
    a_s, a_t = 0.7, 0.25
    qs, qts, qt = (absorbing_matrices if process == "absorbing" else uniform_matrices)(a_s, a_t)
    torch.testing.assert_close(qs @ qts, qt, rtol=1e-12, atol=1e-12)  # the chain composes
    n_states = K + 1 if process == "absorbing" else K
    pairs = [(x0, xt) for x0 in range(K) for xt in range(n_states) if qt[x0, xt] > 0]
    x0 = torch.tensor([[p[0]] for p in pairs])
    x_t = torch.tensor([[p[1]] for p in pairs])
    if process == "absorbing":
        got = P.absorbing_posterior(x_t, x0, a_s, a_t, mask_id=K)[:, 0]
    else:
        got = P.uniform_posterior(x_t, x0, a_s, a_t, num_tokens=K)[:, 0]
    want = torch.stack([bayes(qs, qts, qt, a, b) for a, b in pairs])[:, :n_states]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # a distribution over x0: D3PM's eq. 4, p(x_s | x_t) ~ sum_x0 q(x_s, x_t | x0) p(x0)
    p0 = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x_t_all = torch.arange(n_states).reshape(-1, 1)
    joint = torch.stack([(qts[:, xt] * (p0 @ qs[:K])) for xt in range(n_states)])[:, :n_states]
    want = joint / joint.sum(1, keepdim=True)
    p0s = p0.expand(n_states, 1, K)
    if process == "absorbing":
        got = P.absorbing_posterior(x_t_all, p0s, a_s, a_t, mask_id=K)[:, 0]
    else:
        got = P.uniform_posterior(x_t_all, p0s, a_s, a_t, num_tokens=K)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_categorical_draws_match_and_never_pick_a_zero():
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    draws = P.sample_categorical(probs.expand(30000, 1, 6), generator=g)
    assert not torch.isin(draws, torch.tensor([0, 2, 5])).any()
    frequencies_match(draws, probs.unsqueeze(0), 6)


def test_bad_tokens_shapes_and_times_are_refused():
    x0 = torch.tensor([[0, 1, 3]])
    with pytest.raises(ValueError, match=r"token id 3; allowed values: 0\.\.2"):
        P.absorbing_sample(x0, 0.5, mask_id=K)
    with pytest.raises(ValueError, match=r"allowed values: 0\.\.2"):
        P.uniform_probs(torch.tensor([[-1, 0]]), 0.5, num_tokens=K)
    with pytest.raises(ValueError, match=r"LongTensor of token ids of shape \(N, L\)"):
        P.absorbing_probs(torch.zeros(2, 3), 0.5, mask_id=K)
    with pytest.raises(ValueError, match=r"LongTensor of token ids of shape \(N, L\)"):
        P.absorbing_probs(torch.zeros(6, dtype=torch.long), 0.5, mask_id=K)
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        P.absorbing_probs(x0.clamp_max(2), torch.tensor([0.5, 0.4]), mask_id=K)
    with pytest.raises(ValueError, match="s < t"):
        P.absorbing_posterior(torch.tensor([[K]]), torch.tensor([[0]]), 0.2, 0.5, mask_id=K)
    with pytest.raises(ValueError, match="probabilities of shape"):
        P.uniform_posterior(torch.tensor([[0]]), torch.ones(1, 1, 2), 0.5, 0.2, num_tokens=K)
