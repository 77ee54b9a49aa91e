"""The frozen all-MiniLM-L6-v2: deterministic, the published pooling, and a sentence geometry that makes sense."""
import pytest
import torch

from torchdiffusion.text_encoder import SentenceEncoder, mean_pool

# cosine of the two sentences below, computed once with the package's weights (float32, x86 CPU)
REFERENCE_PAIR = ("A man is eating food.", "A man is eating a piece of bread.")
REFERENCE_COSINE = 0.755337
COSINE_TOL = 1e-4


def test_embeddings_are_deterministic_and_pooled_as_published(sentence_encoder):
    texts = ["a thick slanted seven", "", "the digit one, thin"]
    a = sentence_encoder.encode(texts)
    sentence_encoder.clear_cache()
    b = sentence_encoder.encode(texts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
    assert a.tokens.shape == (3, a.mask.sum(1).max(), 384) and a.pooled.shape == (3, 384)
    assert not a.mask[1].any() and torch.equal(a.pooled[1], torch.zeros(384))  # the empty caption: no tokens
    torch.testing.assert_close(a.pooled[[0, 2]].norm(dim=1), torch.ones(2))
    # the pooled vector is the L2-normalised masked mean of the returned tokens
    torch.testing.assert_close(a.pooled, mean_pool(a.tokens, a.mask))


def test_reference_cosine(sentence_encoder):
    assert abs(sentence_encoder.similarity(*REFERENCE_PAIR) - REFERENCE_COSINE) < COSINE_TOL


def test_a_caption_does_not_depend_on_its_batch(sentence_encoder):
    """Padding to a longer companion changes nothing (padding tokens are masked out of the mean)."""
    sentence_encoder.clear_cache()
    alone = sentence_encoder.encode(["a thin one"])
    sentence_encoder.clear_cache()
    padded = sentence_encoder.encode(["a thin one", "a picture showing the thick slanted large numeral seven today"])
    torch.testing.assert_close(padded.pooled[0], alone.pooled[0], rtol=1e-4, atol=1e-5)
    n = alone.mask[0].sum()
    torch.testing.assert_close(padded.tokens[0, :n], alone.tokens[0, :n], rtol=1e-4, atol=1e-4)


def test_paraphrases_are_closer_than_unrelated_sentences(sentence_encoder):
    sim = sentence_encoder.similarity
    for text, paraphrase, unrelated in [
        ("a thick slanted seven", "a bold tilted 7", "the stock market fell sharply today"),
        ("a thin upright one", "a narrow straight 1", "a recipe for tomato soup"),
        ("a small dark bag", "a little black handbag", "the train leaves at noon"),
    ]:
        assert sim(text, paraphrase) > sim(text, unrelated) + 0.2, (text, sim(text, paraphrase), sim(text, unrelated))


def test_truncation_and_bad_arguments(sentence_encoder):
    short = SentenceEncoder(max_tokens=4)
    assert short.encode(["one two three four five six"]).mask.sum() == 4  # [CLS] + 2 words + [SEP]
    with pytest.raises(ValueError, match="text encoder .*all-MiniLM-L6-v2"):
        SentenceEncoder("bert-huge")
    with pytest.raises(ValueError, match="max_tokens must be in 3..256"):
        SentenceEncoder(max_tokens=1000)
