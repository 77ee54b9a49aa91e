"""A known joint for the discrete-diffusion tests: a Markov chain on K = 3 tokens, and its exact denoisers."""
import itertools

import pytest
import torch

INIT = [0.5, 0.3, 0.2]  # p(x^0)
TRANS = [[0.8, 0.1, 0.1],  # p(x^{l+1} | x^l): strongly dependent, so a denoiser that ignores context is far off
         [0.1, 0.1, 0.8],
         [0.3, 0.4, 0.3]]


class MarkovChain:
    """Sequences of `length` tokens: x^0 ~ INIT, x^{l+1} | x^l ~ TRANS[x^l]. Every prefix is the chain itself."""

    def __init__(self, length=3):
        self.init = torch.tensor(INIT, dtype=torch.float64)
        self.trans = torch.tensor(TRANS, dtype=torch.float64)
        self.K, self.L = len(INIT), length
        self.mask_id = self.K
        self._tables = {}

    def outcomes(self, length=None):
        """All K^l sequences (M, l) and their probabilities (M,)."""
        length = length or self.L
        seqs = torch.tensor(list(itertools.product(range(self.K), repeat=length)), dtype=torch.long)
        return seqs, self.prob(seqs)

    def prob(self, x):
        p = self.init[x[:, 0]]
        for j in range(1, x.shape[1]):
            p = p * self.trans[x[:, j - 1], x[:, j]]
        return p

    def sample(self, n, generator):
        cols = [torch.multinomial(self.init, n, replacement=True, generator=generator)]
        for _ in range(1, self.L):
            cols.append(torch.multinomial(self.trans[cols[-1]], 1, generator=generator)[:, 0])
        return torch.stack(cols, 1)

    def index(self, x):
        """Outcome index of sequences of data tokens (base K)."""
        powers = self.K ** torch.arange(x.shape[1] - 1, -1, -1)
        return (x * powers).sum(1)

    def conditionals(self, length):
        """p(x^j = k | the unmasked positions of x_t) for every x_t in (K + 1)^length: (S, length, K)."""
        if length not in self._tables:
            seqs, p = self.outcomes(length)
            states = torch.tensor(list(itertools.product(range(self.K + 1), repeat=length)), dtype=torch.long)
            agree = ((states[:, None, :] == seqs[None]) | (states[:, None, :] == self.mask_id)).all(-1)  # (S, M)
            w = agree.double() * p
            onehot = torch.nn.functional.one_hot(seqs, self.K).double()  # (M, l, K)
            self._tables[length] = torch.einsum("sm,mlk->slk", w, onehot) / w.sum(1)[:, None, None]
        return self._tables[length]

    def denoiser(self, context=True):
        """model(x_t, t) -> logits (N, l, K + 1): log p(x^j | unmasked x_t) (context=False: the marginal of x^j,
        a wrong denoiser that ignores the unmasked tokens). Works for any length l <= L; ignores t."""
        def model(x_t, t):
            n, length = x_t.shape
            table = self.conditionals(length)
            if context:
                powers = (self.K + 1) ** torch.arange(length - 1, -1, -1)
                probs = table[(x_t * powers).sum(1)]  # (N, l, K)
            else:
                probs = table[-1].expand(n, length, self.K)  # the all-mask state: the marginals
            logits = probs.log()
            return torch.cat([logits, torch.zeros(n, length, 1, dtype=logits.dtype)], -1)
        return model


@pytest.fixture(scope="session")
def chain():
    return MarkovChain(3)
