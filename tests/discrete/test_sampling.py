"""The discrete samplers on the Markov chain of conftest.py, whose exact denoiser is known (docs/text.md).

Distributions are compared with a chi-square test over all outcomes at the 1e-4 level (seeds fixed); each test
also runs a wrong model or sampler through the same test and checks that it fails.
"""
import pytest
import torch
from scipy.stats import chi2

from torchdiffusion.discrete import sampling as S
from torchdiffusion.discrete.processes import get_mask_schedule
from torchdiffusion.utils import sample_generators

K = 3
LEVEL = 1e-4  # chi-square tests reject at this p-value


def chi_square(index, probs):
    """(statistic, threshold) of observed outcome indices against the probabilities of all outcomes."""
    counts = torch.bincount(index, minlength=len(probs)).double()
    expected = probs * len(index)
    return ((counts - expected) ** 2 / expected).sum().item(), chi2.ppf(1 - LEVEL, len(probs) - 1)


def masks(n, length=3):
    return torch.full((n, length), K)


def test_ancestral_sampler_with_the_exact_denoiser_reproduces_the_joint(chain):
    """128 steps of MDLM's sampler draw the chain's joint (27 outcomes, 20000 samples); the same sampler with a
    denoiser that ignores the unmasked tokens (the product of the marginals) fails the same test."""
    _, p = chain.outcomes()
    for context, should_pass in ((True, True), (False, False)):
        out = S.sample_mdlm(chain.denoiser(context), masks(20000), S.time_grid(128), mask_id=K,
                            generator=torch.Generator().manual_seed(0))
        stat, threshold = chi_square(chain.index(out.tokens), p)
        assert (stat < threshold) == should_pass, (context, stat, threshold)


@pytest.mark.parametrize("context", S.CONTEXTS)
@pytest.mark.parametrize("sampler", S.BLOCK_SAMPLERS)
def test_blocks_of_one_token_are_exact_autoregressive_sampling(chain, context, sampler):
    """B = 1: each token is drawn from p(x^b | x^{<b}) by one step of either inner sampler (temperature 1)."""
    _, p = chain.outcomes()
    options = {"temperature": 1.0} if sampler == "remask" else {}
    out = S.sample_blocks(chain.denoiser(), masks(20000), block_size=1, steps=1, mask_id=K, sampler=sampler,
                          context=context, generator=torch.Generator().manual_seed(1), **options)
    stat, threshold = chi_square(chain.index(out.tokens), p)
    assert stat < threshold and out.model_calls == 3


def test_infilling_draws_the_conditional_of_the_given_tokens(chain):
    """x^1 = 2 given: the ancestral sampler and full-context blocks of one draw p(x^0, x^2 | x^1 = 2); prefix
    context (BD3-LM, causal) cannot see x^1 when it draws x^0 and fails."""
    seqs, p = chain.outcomes()
    keep = seqs[:, 1] == 2
    cond = p[keep] / p[keep].sum()  # over the 9 outcomes (x^0, x^2)
    x = masks(20000)
    x[:, 1] = 2
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, 1] = True
    runs = {
        "ancestral": S.sample_mdlm(chain.denoiser(), x, S.time_grid(64), mask_id=K, fixed=fixed,
                                   generator=torch.Generator().manual_seed(2)),
        "full": S.sample_blocks(chain.denoiser(), x, block_size=1, steps=1, mask_id=K, context="full", fixed=fixed,
                                generator=torch.Generator().manual_seed(3)),
        "prefix": S.sample_blocks(chain.denoiser(), x, block_size=1, steps=1, mask_id=K, context="prefix",
                                  fixed=fixed, generator=torch.Generator().manual_seed(4)),
    }
    for name, out in runs.items():
        assert (out.tokens[:, 1] == 2).all()
        stat, threshold = chi_square(out.tokens[:, 0] * K + out.tokens[:, 2], cond)
        assert (stat < threshold) == (name != "prefix"), (name, stat, threshold)


def counting(model):
    calls = []
    def counted(x_t, t):
        calls.append(x_t.clone())
        return model(x_t, t)
    return counted, calls


def test_caching_saves_model_calls_and_gives_the_same_samples(chain):
    """64 steps for 4 sequences of 3 tokens: at most 4 * 3 steps change a token, so at most 12 calls (plus the
    first) with the cache, 64 without; the samples are the same for the same generator."""
    runs = {}
    for cache in (True, False):
        model, calls = counting(chain.denoiser())
        out = S.sample_mdlm(model, masks(4), S.time_grid(64), mask_id=K, cache=cache,
                            generator=torch.Generator().manual_seed(5))
        assert out.model_calls == len(calls)
        runs[cache] = out
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert runs[False].model_calls == 64 and runs[True].model_calls <= 13


def test_one_generator_per_sequence_makes_a_sample_independent_of_its_batch(chain):
    run = lambda n: S.sample_mdlm(chain.denoiser(), masks(n), S.time_grid(16), mask_id=K,
                                  generator=sample_generators(7, n)).tokens
    alone, batched = run(2), run(5)
    assert torch.equal(alone, batched[:2])
    assert not torch.equal(batched[:2], S.sample_mdlm(chain.denoiser(), masks(2), S.time_grid(16), mask_id=K,
                                                      generator=sample_generators(8, 2)).tokens)


def random_model(seed, vocab=K):
    """Random logits (N, L, vocab + 1), a fresh draw each call: a model whose predictions are arbitrary."""
    g = torch.Generator().manual_seed(seed)
    return lambda x_t, t: torch.randn(*x_t.shape, vocab + 1, generator=g) * 2


def test_low_confidence_remasking_keeps_the_most_confident_and_follows_the_schedule():
    n, length, steps = 6, 10, 4
    x = masks(n, length)
    fixed = torch.rand(n, length, generator=torch.Generator().manual_seed(6)) < 0.3
    x[fixed] = 1
    free = (~fixed).sum(1)
    counts = S.transfer_counts(free, steps)
    assert (counts.sum(1) == free).all() and (counts.max(1).values - counts.min(1).values <= 1).all()
    log = []
    out = S.sample_remask(random_model(7), x, steps, mask_id=K, fixed=fixed, callback=log.append)
    for i, info in enumerate(log):
        was, now = info["x_t"] == K, info["x"] == K
        assert torch.equal(now.sum(1), free - counts[:, : i + 1].sum(1))
        new = was & ~now
        assert torch.equal(info["x"][new], info["x0"][new])  # the prediction (argmax) is what is kept
        conf = info["confidence"]
        for row in range(n):
            if new[row].any() and now[row].any():
                assert conf[row][new[row]].min() >= conf[row][now[row]].max()
    assert (out.tokens != K).all() and torch.equal(out.tokens[fixed], x[fixed])


def test_random_remasking_follows_the_same_schedule():
    log = []
    S.sample_remask(random_model(8), masks(3, 9), 3, mask_id=K, remasking="random", temperature=0.5,
                    generator=torch.Generator().manual_seed(8), callback=log.append)
    assert [int((info["x"] == K).sum()) for info in log] == [18, 9, 0]


@pytest.mark.parametrize("which", ["ancestral", "remask", "blocks-prefix", "blocks-full", "d3pm"])
def test_fixed_positions_are_never_changed_and_are_seen_by_the_model(which):
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, K, (5, 8), generator=g)
    fixed = torch.rand(5, 8, generator=g) < 0.4
    fixed[:, :2] = True  # a prompt and scattered given tokens
    vocab_out = K if which == "d3pm" else K + 1
    inner = random_model(10)
    seen = []
    def model(x_t, t):
        seen.append(x_t.clone())
        return inner(x_t, t)[..., :vocab_out]
    gen = torch.Generator().manual_seed(11)
    if which == "ancestral":
        out = S.sample_mdlm(model, x, S.time_grid(6), mask_id=K, fixed=fixed, generator=gen)
    elif which == "remask":
        out = S.sample_remask(model, x, 4, mask_id=K, fixed=fixed, temperature=1.0, generator=gen)
    elif which == "d3pm":
        out = S.sample_d3pm(model, x, S.time_grid(6), num_tokens=K, fixed=fixed, generator=gen)
    else:
        out = S.sample_blocks(model, x, block_size=3, steps=3, mask_id=K, context=which.split("-")[1],
                              fixed=fixed, generator=gen)
    assert torch.equal(out.tokens[fixed], x[fixed]) and (out.tokens != K).all()
    for x_t in seen:
        assert torch.equal(x_t[fixed[:, : x_t.shape[1]]], x[:, : x_t.shape[1]][fixed[:, : x_t.shape[1]]])
    assert out.model_calls == len(seen)


def prior_model(p):
    """p~(x0 | x_t) = p: for a single token this makes every D3PM step the exact reverse q(x_s | x_t)."""
    return lambda x_t, t: p.log().float().expand(*x_t.shape, K)


def test_d3pm_sampler_draws_the_forward_process_backwards(monkeypatch):
    """One token, eps = 0 (x_1 uniform), grid 1 -> 1/2 -> 0 with the exact reverse: x_0 ~ p and the pair
    (x_{1/2}, x_0) ~ p(x_0) q(x_{1/2} | x_0); a sampler that ignores x_t in the posterior (dropping q(x_t | x_s))
    still draws x_0 ~ p but fails the pair test."""
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    sch = get_mask_schedule("log-linear", 0.0)
    q_half = 0.5 * torch.eye(K, dtype=torch.float64) + 0.5 / K  # q(x_{1/2} | x_0), row x_0
    pair = (p[:, None] * q_half).reshape(-1)  # index x_0 * K + x_{1/2}
    for mutant in (False, True):
        if mutant:
            monkeypatch.setattr(S, "uniform_posterior_logprobs", lambda x_t, log_p0, a_s, a_t, *, num_tokens:
                                (torch.log(a_s * log_p0.double().exp() + (1 - a_s) / num_tokens)))
        mids = []
        out = S.sample_d3pm(prior_model(p), masks(20000, 1), [1.0, 0.5, 0.0], num_tokens=K, schedule=sch,
                            generator=torch.Generator().manual_seed(12),
                            callback=lambda info: mids.append(info["x"]) if info["i"] == 0 else None)
        x0 = out.tokens[:, 0]
        stat, threshold = chi_square(x0, p)
        assert stat < threshold
        stat, threshold = chi_square(x0 * K + mids[0][:, 0], pair)
        assert (stat < threshold) == (not mutant), (mutant, stat, threshold)


def test_bad_grids_masks_and_names_are_refused(chain):
    model = chain.denoiser()
    with pytest.raises(ValueError, match="decrease strictly"):
        S.sample_mdlm(model, masks(2), [1.0, 0.5, 0.6, 0.0], mask_id=K)
    with pytest.raises(ValueError, match="decrease strictly"):
        S.sample_mdlm(model, masks(2), [1.0, 0.5], mask_id=K)
    with pytest.raises(ValueError, match="bool tensor of x's shape"):
        S.sample_mdlm(model, masks(2), S.time_grid(3), mask_id=K, fixed=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask id 3 at a fixed position; allowed values there: 0\.\.2"):
        S.sample_remask(model, masks(2), 3, mask_id=K, fixed=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"token id 7; allowed values: 0\.\.3"):
        S.sample_mdlm(model, torch.full((2, 3), 7), S.time_grid(3), mask_id=K)
    with pytest.raises(ValueError, match="allowed values: 'low_confidence', 'random'"):
        S.sample_remask(model, masks(2), 3, mask_id=K, remasking="entropy")
    with pytest.raises(ValueError, match="allowed values: 'ancestral', 'remask'"):
        S.sample_blocks(model, masks(2), block_size=1, steps=1, mask_id=K, sampler="euler")
    with pytest.raises(ValueError, match="allowed values: 'prefix', 'full'"):
        S.sample_blocks(model, masks(2), block_size=1, steps=1, mask_id=K, context="causal")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        S.sample_blocks(model, masks(2), block_size=0, steps=1, mask_id=K)


def test_causal_sampler_with_the_exact_conditionals_reproduces_the_joint_and_keeps_the_prompt(chain):
    """Left-to-right sampling with the chain's exact p(x^i | x^<i) (from the BOS-shifted input) draws the joint
    (chi-square over 27 outcomes); a model that ignores the prefix (every position drawn from p(x^0)) fails the
    same test. With x^0 given as a prompt, the prompt is kept and x^1, x^2 follow p(. | x^0)."""
    bos = K

    def model(inp, t, context=True):
        n, length = inp.shape
        out = torch.empty(n, length, K, dtype=torch.float64)
        for i in range(length):
            prev = inp[:, i] if context else torch.full_like(inp[:, i], bos)
            out[:, i] = torch.where((prev == bos)[:, None], chain.init.log(), chain.trans[prev.clamp(max=K - 1)].log())
        return out

    _, p = chain.outcomes()
    none = torch.zeros(20000, 3, dtype=torch.bool)
    for context, should_pass in ((True, True), (False, False)):
        out = S.sample_causal(lambda x, t: model(x, t, context), masks(20000), none, bos_id=bos,
                              generator=torch.Generator().manual_seed(3))
        stat, threshold = chi_square(chain.index(out.tokens), p)
        assert (stat < threshold) == should_pass, (context, stat, threshold)
        assert out.model_calls == 3
    x = masks(20000)
    x[:, 0] = 1
    out = S.sample_causal(model, x, S.prefix_fixed(x, 1), bos_id=bos, generator=torch.Generator().manual_seed(4))
    assert (out.tokens[:, 0] == 1).all() and out.model_calls == 2
    seqs, q = chain.outcomes()
    given = seqs[:, 0] == 1
    stat, threshold = chi_square(chain.index(out.tokens[:, 1:]), q[given] / q[given].sum())
    assert stat < threshold
