"""The evaluation feature networks (MNIST, Fashion-MNIST), the FID InceptionV3 architecture and evaluate_samples."""
import pytest
import torch
import torch.nn.functional as F

from torchdiffusion.checkpoint import save_checkpoint
from torchdiffusion.evaluate import features as clf
from torchdiffusion.evaluate import inception as inc


def test_classifier_shapes_and_random_shift():
    m = clf.FeatureNet().eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert m(x).shape == (5, 10) and m.features(x).shape == (5, m.feature_dim)
    with pytest.raises(ValueError, match="28, 28"):
        m.features(torch.zeros(2, 1, 32, 32))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(clf.random_shift(x, 0, generator=g), x)
    img = torch.full((64, 1, 28, 28), -1.0)
    img[:, :, 10:14, 12:15] = 1.0                       # a blob away from the border: shifts keep all of it
    s = clf.random_shift(img, 2, generator=g)
    assert torch.equal((s == 1).sum((1, 2, 3)), (img == 1).sum((1, 2, 3)))
    pos = (s[:, 0] == 1).nonzero()
    assert pos[:, 1].min() >= 8 and pos[:, 1].max() <= 15 and not torch.equal(s[0], s[1:].mean(0))


def test_load_classifier_missing_says_how_to_train(tmp_cache):
    with pytest.raises(FileNotFoundError, match="torchdiffusion train-feature-net"):
        clf.load_feature_net("mnist")
    with pytest.raises(FileNotFoundError, match="train-feature-net --dataset fashion-mnist"):
        clf.load_feature_net("fashion-mnist")
    assert clf.feature_net_path("fashion-mnist") == tmp_cache / "feature_nets" / "fashion-mnist.safetensors"
    with pytest.raises(ValueError, match="allowed values"):
        clf.feature_net_path("cifar10")


def test_classifier_file_round_trip(tmp_cache):
    m = clf.FeatureNet()
    meta = {"kind": clf.FEATURE_NET_FORMAT, "dataset": "mnist", "arch": m.config, "test_accuracy": 0.5}
    save_checkpoint(clf.feature_net_path("mnist"), meta=meta, model=m.state_dict())
    loaded = clf.load_feature_net("mnist")
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.allclose(loaded(x), m.eval()(x))
    assert clf.feature_net_metadata()["test_accuracy"] == 0.5


def test_trained_feature_net_accuracy(feature_net):
    """The feature network (``torchdiffusion train-feature-net``) reads > 98.5 % of 2000 test digits correctly."""
    from torchdiffusion.evaluate import real_images

    x, y = real_images("mnist", "test", 2000, seed=3)
    assert clf.feature_net_accuracy(clf.load_feature_net(), x, y) > 0.985
    assert clf.feature_net_metadata()["test_accuracy"] > 0.99


def test_trained_fashion_feature_net_accuracy(fashion_feature_net):
    """The Fashion-MNIST feature network (``torchdiffusion train-feature-net --dataset fashion-mnist``, 6 epochs)
    reads > 90 % of the 10,000 Fashion-MNIST test images correctly, as its metadata records; its penultimate
    features are what FD, KID and precision/recall of Fashion-MNIST samples use."""
    from torchdiffusion.data import make_dataset

    test = make_dataset("fashion-mnist-test")
    x, y = test.batch(torch.arange(len(test)))
    acc = clf.feature_net_accuracy(clf.load_feature_net("fashion-mnist"), x, y)
    meta = clf.feature_net_metadata("fashion-mnist")
    assert acc > 0.90 and abs(acc - meta["test_accuracy"]) < 2e-3
    assert meta["dataset"] == "fashion-mnist" and meta["epochs"] == clf.FEATURE_RECIPES["fashion-mnist"]["epochs"]


def test_fid_inception_architecture():
    """23,850,960 parameters = torchvision's published inception_v3 count 27,161,264 minus the auxiliary head
    (3,326,696) plus the 8 extra classes of the 1008-way FID graph (8 x 2049); 2048-d pool3 features."""
    m = inc.FIDInceptionV3().eval()
    assert sum(p.numel() for p in m.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    with torch.no_grad():
        f = m(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert f.shape == (2, inc.FID_FEATURE_DIM) and (f >= 0).all()


def test_fid_preprocess_quantizes_and_resizes_like_pytorch_fid():
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    out = inc.fid_preprocess(x)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)            # what a PNG stores
    ref = 2 * F.interpolate(u8.float().div(255).repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear",
                            align_corners=False) - 1
    assert out.shape == (2, 3, 299, 299) and torch.allclose(out, ref, atol=1e-6)


def test_inception_weights_missing_or_wrong(tmp_cache):
    with pytest.raises(FileNotFoundError, match=inc.INCEPTION_WEIGHTS_FILE):
        inc.load_inception()
    p = inc.inception_weights_path()
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="SHA-256"):
        inc.load_inception()
    assert inc.INCEPTION_SHA256.startswith(inc.INCEPTION_WEIGHTS_FILE.split("-")[-1].split(".")[0])


def test_evaluate_samples_on_real_digits(feature_net):
    """Real training digits (held out from the test-split reference) as 'samples': FD at its matched floor, every
    class covered, labels read correctly; uniform noise is far away; a bad shape is refused."""
    from torchdiffusion.evaluate import evaluate_samples
    from torchdiffusion.evaluate.features import split_dataset

    x, y = split_dataset("mnist", "train").batch(torch.arange(300) * 197)
    r = evaluate_samples(x, labels=y, n_ref=2000)
    assert abs(r["fd_ratio"] - 1) < 0.5 and r["precision"] > 0.7 and r["recall"] > 0.7
    assert sum(r["class_counts"]) == 300 and r["class_coverage"] == 1.0 and r["accuracy"] > 0.97
    noise = evaluate_samples(torch.rand(300, 1, 28, 28) * 2 - 1, n_ref=2000)
    assert noise["fd"] > 10 * r["fd"] and noise["precision"] < 0.3 and noise["fd_ratio"] > 10
    assert noise["floor_composition"] == "random (unconditional samples)" and "accuracy" not in noise
    with pytest.raises(ValueError, match="shape"):
        evaluate_samples(torch.zeros(4, 3, 28, 28))
    with pytest.raises(ValueError, match="allowed values"):
        evaluate_samples(x, "cifar10")
