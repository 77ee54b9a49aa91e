"""The evaluation rule on the project's MNIST features: a reference that does not move with the seed, the real
floor drawn with the samples' class counts (mean and spread over several draws), the ratio to it, and the
generators that must score far above it."""
import math

import pytest
import torch

from torchdiffusion.checkpoint import save_checkpoint
from torchdiffusion.evaluate import evaluate_samples, features, quality, real_floor, reference_set
from torchdiffusion.evaluate.features import split_dataset, split_features

N = 500                                      # samples per test set
N_REF = 2000                                 # a stated reference size, to keep these tests fast
BALANCED = [50] * 10
SKEWED = [250] + [28] * 8 + [26]             # half of the set is one class
DRAWS = 10                                   # floor draws in the ratio test (a stable spread)
T_99 = 3.25                                  # two-sided 99 % quantile of Student's t with DRAWS - 1 = 9 dof


def _labels(counts) -> torch.Tensor:
    return torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])


def _real_set(counts, seed: int):
    """Real training images (held out from the test-split reference) with the given class counts."""
    train = split_dataset("mnist", "train")
    g = torch.Generator().manual_seed(seed)
    pools = [torch.nonzero(train.labels == k).flatten() for k in range(len(counts))]
    return train.batch(torch.cat([p[torch.randperm(len(p), generator=g)[:c]] for p, c in zip(pools, counts)]))


@pytest.mark.parametrize("counts", [BALANCED, SKEWED], ids=["balanced", "skewed"])
def test_real_images_with_the_samples_labels_score_a_ratio_of_one_within_the_floor_spread(feature_net, counts):
    """A perfect generator of the composition asked for: for every seed, FD / floor lies within the floor's spread
    of 1 (|ratio - 1| <= t_99 sqrt(1 + 1/draws) floor_std / floor: the floor's std comes from `draws` draws), and
    so does KID. The set with half of one class sits at its floor too, though its FD is 40 times a balanced one's."""
    for seed in range(3):
        x, y = _real_set(counts, 1000 + seed)
        r = evaluate_samples(x, labels=y, seed=seed, n_ref=N_REF, floor_draws=DRAWS, fd_inf=False)
        tol = T_99 * math.sqrt(1 + 1 / DRAWS)
        assert abs(r["fd_ratio"] - 1) <= tol * r["fd_floor_std"] / r["fd_floor"], (seed, r["fd_ratio"])
        assert abs(r["kid"] - r["kid_floor"]) <= tol * r["kid_floor_std"], (seed, r["kid"], r["kid_floor"])
        assert abs(r["precision"] - r["precision_floor"]) <= tol * r["precision_floor_std"] + 1 / N
        assert r["floor_composition"] == "the samples' class counts (" + " ".join(map(str, counts)) + ")"
        assert r["floor_draws"] == DRAWS and r["n_ref"] == N_REF and r["accuracy"] > 0.95


def test_a_generator_that_drops_a_class_or_repeats_one_image_per_class_scores_far_above(feature_net):
    """Asked for 50 of each digit: drawing no 9 (other digits instead) or one fixed image per class is many floor
    spreads above the matched floor (and the repeated images lose recall)."""
    y = _labels(BALANCED)
    x_drop, _ = _real_set([56] * 8 + [52, 0], 7)
    x_one, _ = _real_set([1] * 10, 8)
    for x, min_ratio, kid_spreads in ((x_drop, 2.0, 3), (x_one.repeat_interleave(50, 0), 10.0, 100)):
        r = evaluate_samples(x, labels=y, n_ref=N_REF, fd_inf=False)
        assert r["fd_ratio"] > min_ratio and r["fd"] > r["fd_floor"] + 10 * r["fd_floor_std"]
        assert r["kid"] > r["kid_floor"] + kid_spreads * r["kid_floor_std"]
    assert r["recall"] < 0.1 < r["recall_floor"] and r["class_coverage"] == 1.0


def test_the_floor_is_a_deterministic_function_of_the_seed(feature_net, monkeypatch):
    ref = reference_set("mnist", N_REF)
    y = _labels(SKEWED)
    a = real_floor(ref, y, N, seed=3, fd_inf=False)
    monkeypatch.setattr(quality, "_FLOORS", {})                          # drawn again, not from the cache
    b = real_floor(ref, y, N, seed=3, fd_inf=False)
    c = real_floor(ref, y, N, seed=4, fd_inf=False)
    assert a == b and a["fd_floor_values"] != c["fd_floor_values"]
    for s in (3, 4):
        sets, _ = quality.floor_draws("mnist", y, N, 5, s)
        again, _ = quality.floor_draws("mnist", y[torch.randperm(N)], N, 5, s)   # order of the labels: no matter
        assert all(torch.equal(u, v) for u, v in zip(sets, again))
        train = split_dataset("mnist", "train")
        assert all(torch.bincount(train.labels[i], minlength=10).tolist() == SKEWED for i in sets)
        assert all(len(i.unique()) == N for i in sets) and not torch.equal(sets[0], sets[1])


def test_the_reference_is_the_whole_test_split_and_does_not_move_with_the_seed(feature_net):
    x, y = _real_set(BALANCED, 11)
    a, b = (evaluate_samples(x, labels=y, seed=s, fd_inf=False) for s in (0, 1))
    assert a["n_ref"] == 10000 and a["reference"] == "the 10000 images of the mnist test split"
    assert a["fd"] == b["fd"] and a["kid"] == b["kid"] and a["precision"] == b["precision"]
    assert a["fd_floor_values"] != b["fd_floor_values"]
    ref = reference_set("mnist", N_REF)
    assert ref.n == N_REF and torch.equal(ref.feats, reference_set("mnist", N_REF).feats)


def test_matched_floor_of_a_balanced_set_is_lower_than_the_random_one(feature_net):
    """On the project's features (1000 real training digits against the 10k test digits, 10 draws each): a set of
    100 of each digit is closer to the test split than random sets of 1000, whose class counts vary, so holding a
    balanced sample set against a random floor flatters it."""
    ref = reference_set("mnist")
    matched = real_floor(ref, _labels([100] * 10), 1000, draws=10, fd_inf=False)
    random = real_floor(ref, None, 1000, draws=10, fd_inf=False)
    assert random["floor_composition"] == "random (unconditional samples)"
    assert matched["fd_floor"] < random["fd_floor"] and matched["fd_floor_std"] < random["fd_floor_std"]
    assert matched["fd_floor"] + matched["fd_floor_std"] < random["fd_floor"]


def test_a_data_set_without_labels_gets_random_floor_draws_and_says_so(feature_net, monkeypatch):
    with pytest.raises(ValueError, match="classes 0..9"):
        quality.floor_draws("mnist", torch.full((N,), 12), N, 3, 0)
    with pytest.raises(ValueError, match="at least 2"):
        quality.floor_draws("mnist", None, N, 1, 0)
    train = split_dataset("mnist", "train")
    unlabelled = train.subset(torch.arange(len(train)))
    unlabelled.labels = None
    monkeypatch.setattr(quality, "split_dataset", lambda d, s: unlabelled if s == "train" else split_dataset(d, s))
    sets, note = quality.floor_draws("mnist", _labels(BALANCED), N, 3, 0)
    assert note == "random (the data set has no labels)" and [len(s) for s in sets] == [N] * 3


def test_fd_infinity_of_a_perfect_generator_is_near_its_floor(feature_net):
    """FD-infinity is reported with its error for a set of 1000 (8 samples per feature dimension); a perfect
    balanced generator's FD-infinity lies within that error of its matched floor's, though the plain FD of the same
    sets is 5-6 (the finite-sample bias)."""
    x, y = _real_set([100] * 10, 21)
    r = evaluate_samples(x, labels=y)
    assert r["fd_floor"] > 4 and abs(r["fd_inf"] - r["fd_inf_floor"]) <= 3 * math.hypot(r["fd_inf_std"],
                                                                                        r["fd_inf_floor_std"])
    assert abs(r["fd_inf"]) < r["fd"] / 2 and r["fd_inf_std"] > 0
    small = evaluate_samples(x[:256], labels=y[:256], n_ref=N_REF, fd_inf=True)
    assert "fd_inf" not in small and "512" in small["fd_inf_note"]


def test_split_features_are_cached_on_disk_by_the_network_file_hash(tmp_cache, mnist_path, monkeypatch):
    (tmp_cache / "mnist").mkdir(parents=True)
    (tmp_cache / "mnist" / "mnist.npz").symlink_to(mnist_path)          # real data, throwaway networks
    torch.manual_seed(0)

    def save_net():
        m = features.FeatureNet()
        save_checkpoint(features.feature_net_path("mnist"), meta={"kind": features.FEATURE_NET_FORMAT,
                        "dataset": "mnist", "arch": m.config, "test_accuracy": 0.1}, model=m.state_dict())
        return features.file_hash(features.feature_net_path("mnist"))

    digest = save_net()
    idx = torch.tensor([5, 3, 5, 9])
    first = split_features("mnist", "test", idx)
    path = features.split_cache_path("mnist", "test", "feature_net", digest)
    assert path.is_file() and first.shape == (4, 128) and torch.equal(first[0], first[2])
    x, _ = split_dataset("mnist", "test").batch(idx)
    assert torch.allclose(first, features.extract_features(x), rtol=1e-6, atol=1e-6)
    with monkeypatch.context() as m:                                   # a new process: only the disk is left
        m.setattr(features, "_SPLITS", {})
        m.setattr(features, "extract_features", lambda *a, **k: pytest.fail("recomputed cached features"))
        assert torch.equal(split_features("mnist", "test", idx[:2]), first[:2])
    assert save_net() != digest                                         # another network: another cache file
    assert not torch.allclose(split_features("mnist", "test", idx), first)
    assert len(list((tmp_cache / "features").glob("mnist-test-feature_net-*.safetensors"))) == 2
