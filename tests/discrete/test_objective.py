"""SUBS, MDLM's NELBO, the T-step ELBO and D3PM's hybrid loss against exact likelihoods (docs/text.md).

The data are a Markov chain on K = 3 tokens and L = 3 positions (conftest.py) whose exact denoiser is known by
enumeration; with it the continuous-time NELBO equals -log p(x0) for every sequence (the masked-diffusion ELBO is
the expectation over random orders of the chain rule), the T-step bound approaches it from above as T grows.
"""
import math

import pytest
import torch

from torchdiffusion.discrete import objective as O
from torchdiffusion.discrete.processes import get_mask_schedule

SE = 5  # Monte Carlo tolerance in standard errors (docs/theory.md)
K = 3


def test_subs_never_predicts_the_mask_and_copies_unmasked_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, K + 1, generator=g, dtype=torch.float64) * 3
    x_t = torch.randint(0, K + 1, (4, 6), generator=g)
    x_t[0, 0], x_t[0, 1] = K, 1
    logp = O.subs_logits(logits, x_t, K)
    assert torch.isneginf(logp[..., K]).all()  # the mask is never predicted
    masked = x_t == K
    torch.testing.assert_close(logp[masked][:, :K], logits[masked][:, :K].log_softmax(-1), rtol=1e-12, atol=1e-12)
    unmasked = logp[~masked]  # (M, K + 1): exactly 0 at the copied token, -inf elsewhere
    copied = torch.nn.functional.one_hot(x_t[~masked], K + 1).bool()
    assert (unmasked[copied] == 0).all() and torch.isneginf(unmasked[~copied]).all()
    with pytest.raises(ValueError, match=r"\(N, L, K \+ 1\) = \(4, 6, 4\)"):
        O.subs_logits(logits[..., :K], x_t, K)


def per_sequence(values, n_seq):
    """Mean and standard error per sequence of estimates laid out as [all sequences] * n repeats."""
    v = values.reshape(-1, n_seq)
    return v.mean(0), v.std(0) / math.sqrt(v.shape[0])


def weighted(mean, se, p):
    """E_p of per-sequence estimates and its standard error."""
    return (p * mean).sum().item(), (p**2 * se**2).sum().sqrt().item()


@pytest.mark.parametrize("name", ["log-linear", "cosine"])
def test_continuous_nelbo_of_the_exact_denoiser_is_the_nll(chain, name):
    """Per sequence within SE standard errors (12000 draws each), on average over p within 3%; a denoiser that
    ignores the unmasked tokens is far above."""
    seqs, p = chain.outcomes()
    x0 = seqs.repeat(12000, 1)  # (324000, 3)
    sch = get_mask_schedule(name, 0.0)
    g = torch.Generator().manual_seed(1)
    mean, se = per_sequence(O.mdlm_nelbo(chain.denoiser(), x0, sch, mask_id=K, generator=g), len(seqs))
    nll = -p.log()
    assert ((mean - nll).abs() <= SE * se).all(), (mean - nll) / se
    h = (p * nll).sum().item()
    avg, avg_se = weighted(mean, se, p)
    assert abs(avg - h) <= SE * avg_se and abs(avg - h) < 0.03 * h
    wrong = O.mdlm_nelbo(chain.denoiser(context=False), x0[:81000], sch, mask_id=K, generator=g)
    w_mean, w_se = weighted(*per_sequence(wrong, len(seqs)), p)
    assert w_mean > h + SE * w_se and w_mean > 1.05 * h


def test_antithetic_times_are_stratified_and_the_default_eps_is_within_three_percent(chain):
    g = torch.Generator().manual_seed(2)
    t = O.draw_times(1000, generator=g, antithetic=True)
    assert torch.equal(((1 - t) * 1000).floor().long(), torch.arange(1000))
    seqs, p = chain.outcomes()
    x0 = seqs.repeat(2000, 1)
    est = O.mdlm_nelbo(chain.denoiser(), x0, get_mask_schedule("log-linear"), mask_id=K, generator=g,
                       antithetic=True)
    h = -(p * p.log()).sum().item()
    mean, _ = weighted(*per_sequence(est, len(seqs)), p)
    assert abs(mean - h) < 0.03 * h


def test_discrete_time_elbo_approaches_the_nll_from_above(chain):
    seqs, p = chain.outcomes()
    sch = get_mask_schedule("log-linear", 0.0)
    h = -(p * p.log()).sum().item()
    # T = 1 unmasks everything at once: the bound is the sum of the marginal cross-entropies, exactly
    one = O.absorbing_elbo_discrete(chain.denoiser(), seqs, sch, 1, mask_id=K)
    marg = chain.conditionals(3)[-1]  # (L, K): the marginals of the positions
    torch.testing.assert_close(one, -marg.log().gather(1, seqs.T).sum(0), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(3)
    x0 = seqs.repeat(3000, 1)
    bounds = {}
    for steps in (2, 1000):
        est = O.absorbing_elbo_discrete(chain.denoiser(), x0, sch, steps, mask_id=K, generator=g)
        bounds[steps] = weighted(*per_sequence(est, len(seqs)), p)
    (m2, se2), (m1000, se1000) = bounds[2], bounds[1000]
    assert m2 > h + SE * se2 and m2 > 1.05 * h  # a small T is visibly above the NLL
    assert m1000 > h - SE * se1000 and abs(m1000 - h) < 0.03 * h
    assert (p * one).sum().item() > m2 + SE * se2  # and T = 1 above T = 2


def single_token_model(p):
    """p~(x0 | x_t) = p for every x_t: for one token this makes D3PM's eq. 4 the exact reverse q(x_s | x_t)."""
    return lambda x_t, t: p.log().expand(*x_t.shape, len(p))


def test_d3pm_vb_of_the_exact_reverse_is_the_nll_plus_the_prior_gap():
    """One token, p~ = p: p_theta(x_{0:T}) = u(x_T) / q(x_T) q(x_{0:T}), so L_vb(x0) = -log p(x0) +
    E_{q(x_T | x0)} log(q(x_T) / u(x_T)), q(x_T) = alpha_1 p + (1 - alpha_1) / K, exactly."""
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    a1 = 0.5
    sch = get_mask_schedule("log-linear", a1)  # alpha(1) = 0.5: a visible prior term
    x0 = torch.arange(K).repeat(100000).unsqueeze(1)  # (300000, 1)
    g = torch.Generator().manual_seed(4)
    terms = O.d3pm_terms(single_token_model(p), x0, sch, 8, num_tokens=K, generator=g)
    mean, se = per_sequence(terms.vb, K)
    q_T = a1 * p + (1 - a1) / K
    q_T_given = a1 * torch.eye(K, dtype=torch.float64) + (1 - a1) / K  # row x0
    gap = (q_T_given * (q_T * K).log()).sum(1)
    want = -p.log() + gap
    assert ((mean - want).abs() <= SE * se).all(), (mean - want) / se
    assert (gap.abs() / se).max() > 2 * SE  # the prior term is resolved: leaving it out would fail
    torch.testing.assert_close(terms.ce, -p.log()[x0[:, 0]], rtol=1e-12, atol=0)
    prior = O.uniform_prior_kl(x0[:K], a1, num_tokens=K)
    torch.testing.assert_close(prior, (q_T_given * (q_T_given * K).log()).sum(1), rtol=1e-12, atol=0)
    # with the true posterior p(x0 | x_t) plugged into eq. 4 the chain is not the exact reverse: a looser bound
    def posterior_model(x_t, t):
        a = float(sch.alpha(t[0].double()))
        like = a * torch.nn.functional.one_hot(x_t, K).double() + (1 - a) / K  # q(x_t | x0) per x0
        return (like * p).log()
    loose = O.d3pm_terms(posterior_model, x0, sch, 8, num_tokens=K, generator=g)
    l_mean, l_se = weighted(*per_sequence(loose.vb, K), p)
    exact, _ = weighted(want, torch.zeros(K, dtype=torch.float64), p)
    assert l_mean > exact + SE * l_se


def test_hybrid_loss_adds_lambda_times_the_cross_entropy():
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x0 = torch.tensor([[0, 1, 2, 2]]).repeat(50, 1)
    sch = get_mask_schedule("cosine")
    terms = O.d3pm_terms(single_token_model(p), x0, sch, 20, num_tokens=K, generator=torch.Generator().manual_seed(5))
    hybrid = O.d3pm_hybrid_loss(single_token_model(p), x0, sch, 20, num_tokens=K, hybrid_weight=0.25,
                                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(hybrid, terms.vb + 0.25 * terms.ce, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="non-negative"):
        O.d3pm_hybrid_loss(single_token_model(p), x0, sch, 20, num_tokens=K, hybrid_weight=-1.0)


def test_the_objective_reports_nats_per_token_and_converts_to_bits(chain):
    seqs, _ = chain.outcomes()
    obj = O.DiscreteObjective(K, schedule="cosine", antithetic=False)
    loss = obj(chain.denoiser(), seqs, generator=torch.Generator().manual_seed(6))
    per = O.mdlm_nelbo(chain.denoiser(), seqs, obj.schedule, mask_id=K, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(loss, per.mean() / 3, rtol=1e-12, atol=0)
    assert O.bits_per_token(math.log(2) * 3.0) == pytest.approx(3.0, rel=1e-12)
    assert O.bits_per_character(math.log(2), tokens=3, characters=12) == pytest.approx(0.25, rel=1e-12)
    uniform = O.DiscreteObjective(K, process="uniform", steps=10, hybrid_weight=0.0)
    per_u = O.d3pm_terms(single_token_model(torch.full((K,), 1 / K, dtype=torch.float64)), seqs, uniform.schedule,
                         10, num_tokens=K, generator=torch.Generator().manual_seed(7)).vb
    got = uniform(single_token_model(torch.full((K,), 1 / K, dtype=torch.float64)), seqs,
                  generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, per_u.mean() / 3, rtol=1e-12, atol=0)


def test_bad_configurations_and_model_outputs_are_refused(chain):
    with pytest.raises(ValueError, match="allowed values: 'absorbing', 'uniform'"):
        O.DiscreteObjective(K, process="gaussian")
    with pytest.raises(ValueError, match="steps must be 0"):
        O.DiscreteObjective(K, process="uniform", steps=0)
    with pytest.raises(ValueError, match="allowed values: 'log-linear', 'cosine'"):
        O.DiscreteObjective(K, schedule="sqrt")
    seqs, _ = chain.outcomes()
    bad = lambda x_t, t: torch.zeros(*x_t.shape, K)  # K logits where the absorbing process needs K + 1
    with pytest.raises(ValueError, match=r"logits of shape \(27, 3, 4\)"):
        O.mdlm_nelbo(bad, seqs, get_mask_schedule("log-linear"), mask_id=K)
    with pytest.raises(ValueError, match=r"allowed values: 0\.\.2"):
        O.mdlm_nelbo(chain.denoiser(), seqs + 1, get_mask_schedule("log-linear"), mask_id=K)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        O.absorbing_elbo_discrete(chain.denoiser(), seqs, get_mask_schedule("log-linear"), 4, mask_id=K, i=5)
