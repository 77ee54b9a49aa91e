"""Small helpers: broadcasting, per-sample random numbers, validation messages, slerp."""
import math

import pytest
import torch

from torchdiffusion.utils import (append_dims, as_sigma, check_choice, hash_seed, rand, randn, randn_like,
                                  sample_generators, slerp)


def test_append_dims():
    x = torch.arange(3.0)
    y = append_dims(x, 4)
    assert y.shape == (3, 1, 1, 1)
    assert torch.equal(y.flatten(), x)
    assert append_dims(x, 1).shape == (3,)
    with pytest.raises(ValueError, match="smaller"):
        append_dims(torch.zeros(2, 2), 1)
    # broadcasting: scale each sample of a (3, 2, 2) tensor by its own factor
    z = append_dims(x, 3) * torch.ones(3, 2, 2)
    assert torch.equal(z[:, 1, 1], x)


def test_check_choice_lists_allowed_values():
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError) as e:
        check_choice("mode", "c", ("a", "bb", "ccc"))
    msg = str(e.value)
    assert "mode" in msg and "'c'" in msg
    for v in ("'a'", "'bb'", "'ccc'"):
        assert v in msg


def test_randn_per_sample_generators_reproducible_and_batch_independent():
    full = randn((5, 3, 2), generator=sample_generators(7, 5))
    again = randn((5, 3, 2), generator=sample_generators(7, 5))
    assert torch.equal(full, again)
    for i in range(5):
        alone = randn((1, 3, 2), generator=sample_generators(7, 1, offset=i))
        assert torch.equal(alone[0], full[i])
    # a sub-batch starting at offset 2 sees the same noise as samples 2..4 of the full batch
    assert torch.equal(randn((3, 3, 2), generator=sample_generators(7, 3, offset=2)), full[2:])
    # different seeds give different noise
    assert not torch.equal(randn((5, 3, 2), generator=sample_generators(8, 5)), full)
    with pytest.raises(ValueError, match="one per sample"):
        randn((4, 2), generator=sample_generators(7, 3))


def test_rand_and_randn_statistics():
    """Per-sample draws are still standard: mean and variance within 5 standard errors."""
    n = 2000
    z = randn((n, 50), generator=sample_generators(1, n), dtype=torch.float64)
    m = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(m)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / (m - 1))
    u = rand((n, 50), generator=sample_generators(2, n), dtype=torch.float64)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 5 / math.sqrt(12 * m)


def test_single_generator_and_like():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.zeros(4, 2, dtype=torch.float64)
    a = randn_like(x, generator=g1)
    b = randn((4, 2), generator=g2, dtype=torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, b)


def test_hash_seed_deterministic_and_in_range():
    assert hash_seed(1, 2) == hash_seed(1, 2)
    assert hash_seed(1, 2) != hash_seed(2, 1)
    assert 0 <= hash_seed(2**70, -1) < 2**63


def test_as_sigma():
    assert torch.equal(as_sigma(0.5, 3), torch.full((3,), 0.5))
    assert torch.equal(as_sigma(torch.tensor([1.0, 2.0]), 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        as_sigma(torch.ones(3), 2)


def test_slerp():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    au = a / a.flatten(1).norm(dim=1)[:, None, None]
    bu = b / b.flatten(1).norm(dim=1)[:, None, None]
    for t in (0.1, 0.37, 0.5, 0.9):
        norms = slerp(au, bu, t).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(6, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    # orthogonal unit vectors: the midpoint is (a + b) / sqrt(2)
    e1, e2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(slerp(e1, e2, 0.5), (e1 + e2) / math.sqrt(2))
    # the angle to a grows linearly in t
    torch.testing.assert_close(slerp(e1, e2, 1 / 3), torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]],
                                                                   dtype=torch.float64))
