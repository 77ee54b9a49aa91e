"""The noise-conditional classifier: shapes, pooling heads, configuration, the VE-coordinates wrapper."""
import pytest
import torch

from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.objectives import ClassifierObjective
from torchdiffusion.precond import SigmaClassifier
from torchdiffusion.nets import ClassifierConfig, NoisyClassifier
from torchdiffusion.build import build_module, build_net, build_objective, net_input_shape, num_classes
from torchdiffusion.schedules import get_schedule

SMALL = dict(channels=8, channel_mult=(1, 2), attn_resolutions=(7,), num_heads=2, norm_groups=4)


@pytest.mark.parametrize("pool", ["mean", "attention"])
@pytest.mark.parametrize("size", [14, (12, 10)])
def test_shapes_and_per_sample_independence(pool, size):
    net = NoisyClassifier(image_size=size, num_classes=5, pool=pool, **{**SMALL, "attn_resolutions": ()}).eval()
    h, w = (size, size) if isinstance(size, int) else size
    x, t = torch.randn(3, 1, h, w), torch.tensor([0.0, 10.0, 999.0])
    out = net(x, t)
    assert out.shape == (3, 5) and net.features(x, t).shape == (3, 16)
    torch.testing.assert_close(net(x[1:2], t[1:2]), out[1:2], rtol=1e-5, atol=1e-5)  # no batch coupling


def test_config_round_trip_and_errors():
    cfg = ClassifierConfig(image_size=14, **SMALL, pool="mean")
    net = NoisyClassifier.from_config(cfg)
    assert net.config == cfg and net.num_classes == 10
    with pytest.raises(ValueError, match="allowed values"):
        NoisyClassifier(pool="max")
    with pytest.raises(ValueError, match="match no level"):
        NoisyClassifier(attn_resolutions=(5,))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(2, 1, 28, 28), torch.zeros(2))


def test_sigma_classifier_feeds_the_schedules_network_input():
    """(x, sigma) -> net(input_scale(sigma) x, net_time(sigma)), as Precond does for the denoiser."""
    sch = get_schedule("linear")
    net = NoisyClassifier(image_size=14, **SMALL).eval()
    clf = SigmaClassifier(net, sch)
    x, sigma = torch.randn(4, 1, 14, 14), torch.tensor([0.01, 0.5, 3.0, 80.0])
    want = net(sch.input_scale(sigma).float()[:, None, None, None] * x, sch.net_time(sigma).float())
    torch.testing.assert_close(clf(x, sigma), want)
    with pytest.raises(ValueError, match="sigma must have shape"):
        clf(x, sigma[:2])


def test_build_makes_the_classifier_task_from_its_preset():
    cfg = load_config("classifier-mnist")
    assert cfg.task == "noisy_classifier" and cfg.model.kind == "noisy_classifier" and cfg.train.sample_every == 0
    assert isinstance(build_net(cfg), NoisyClassifier) and net_input_shape(cfg) == (1, 28, 28)
    assert num_classes(cfg) == 10
    assert isinstance(build_module(cfg), SigmaClassifier) and isinstance(build_objective(cfg), ClassifierObjective)
    with pytest.raises(ConfigError, match="task 'noisy_classifier' trains a network of kind 'noisy_classifier'"):
        build_module(load_config("classifier-mnist", ["model.kind=unet"]))
    with pytest.raises(ConfigError, match="task 'denoiser' trains a network of kind 'unet' or 'dit' or 'uvit' or "
                                          "'mlp'"):
        build_module(load_config("classifier-mnist", ["task=denoiser"]))


def test_classifier_objective_is_cross_entropy_on_noised_input():
    sch = get_schedule("linear")
    clf = SigmaClassifier(NoisyClassifier(image_size=14, **SMALL).eval(), sch)
    x0, y = torch.randn(5, 1, 14, 14), torch.tensor([0, 1, 2, 3, 4])
    sigma, noise = torch.full((5,), 2.0), torch.randn(5, 1, 14, 14)
    per = ClassifierObjective(sch).per_sample(clf, x0, {"class_labels": y}, sigma=sigma, noise=noise)
    want = torch.nn.functional.cross_entropy(clf(x0 + 2.0 * noise, sigma), y, reduction="none")
    torch.testing.assert_close(per, want)
    with pytest.raises(ValueError, match="class labels"):
        ClassifierObjective(sch)(clf, x0, {})
