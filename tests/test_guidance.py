"""Guidance against closed forms: CFG and classifier guidance on exact Gaussian-mixture denoisers and posteriors."""
import math

import pytest
import torch

from torchdiffusion.app.cli import main as cli_main
from torchdiffusion.config import load_config
from torchdiffusion.data import GaussianMixture
from torchdiffusion.data.images import TensorImageDataset
from torchdiffusion.build import build_objective, load_denoiser, load_noisy_classifier
from torchdiffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance, class_labels_for, guide
from torchdiffusion.nets import NoisyClassifier, UNet
from torchdiffusion.objectives import DiffusionObjective
from torchdiffusion.precond import Precond, SigmaClassifier, x0_to
from torchdiffusion.sampling import SAMPLERS, SampleConfig, generate, get_sigmas, sampler_options
from torchdiffusion.schedules import get_schedule
from torchdiffusion.training import Trainer

K = 2


class NullAware(torch.nn.Module):
    """A mixture's exact denoiser with a null class: label K (or None) is the unconditional denoiser E[x0 | x],
    label k the denoiser of component k alone. Counts its calls and batch sizes."""

    def __init__(self, gmm: GaussianMixture):
        super().__init__()
        self.gmm, self.calls = gmm, []
        self.schedule = get_schedule("edm")

    def forward(self, x, sigma, class_labels=None):
        self.calls.append(x.shape[0])
        if class_labels is None:
            return self.gmm(x, sigma)
        null = class_labels == K
        out = self.gmm(x, sigma, class_labels=class_labels.clamp(max=K - 1))
        return torch.where(null[:, None], self.gmm(x, sigma), out)


def posterior_logits(gmm):
    """The exact noisy posterior log p(y | x_sigma) (up to a constant per sample) of a mixture."""
    return lambda x, sigma: gmm._log_resp(x, sigma)[0]


@pytest.fixture
def gmm():
    # two overlapping components with weights 0.8 / 0.2: unguided sampling lands in component 1 only ~20% of the time
    return GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.6, 0.6]), torch.tensor([0.8, 0.2]))


def _batch(n=64, seed=0, sigma_range=(0.05, 5.0)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2
    lo, hi = map(math.log, sigma_range)
    sigma = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    y = torch.randint(0, K, (n,), generator=g)
    return x, sigma, y


def test_cfg_scale_one_is_conditional_and_zero_unconditional(gmm):
    d = NullAware(gmm)
    x, sigma, y = _batch()
    assert torch.equal(ClassifierFreeGuidance(d, 1.0, num_classes=K)(x, sigma, class_labels=y),
                       gmm(x, sigma, class_labels=y))
    # scale 0: the unconditional rows of one batched call of 2n rows against a call of n rows (matmul kernels
    # may round per batch size)
    torch.testing.assert_close(ClassifierFreeGuidance(d, 0.0, num_classes=K)(x, sigma, class_labels=y), gmm(x, sigma),
                               rtol=1e-12, atol=1e-12)


def test_cfg_is_one_batched_call_with_the_guidance_formula(gmm):
    d = NullAware(gmm)
    x, sigma, y = _batch(n=10)
    out = ClassifierFreeGuidance(d, 3.0, num_classes=K)(x, sigma, class_labels=y)
    assert d.calls == [20]  # conditional and unconditional halves in one call
    d_c, d_u = gmm(x, sigma, class_labels=y), gmm(x, sigma)
    torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u), rtol=1e-12, atol=1e-12)


def test_cfg_interval_guides_only_inside(gmm):
    d = NullAware(gmm)
    x, sigma, y = _batch(n=200)
    lo, hi = 0.3, 2.0
    out = ClassifierFreeGuidance(d, 4.0, num_classes=K, interval=(lo, hi))(x, sigma, class_labels=y)
    inside = (sigma > lo) & (sigma <= hi)
    assert 20 < inside.sum() < 180
    assert d.calls == [200 + int(inside.sum())]  # only guided samples get an unconditional row
    d_c, d_u = gmm(x, sigma, class_labels=y), gmm(x, sigma)
    torch.testing.assert_close(out[~inside], d_c[~inside], rtol=1e-12, atol=1e-12)  # other batch size, same rows
    torch.testing.assert_close(out[inside], (d_u + 4.0 * (d_c - d_u))[inside], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("space", ["v", "eps"])
def test_cfg_rescale(gmm, space):
    """phi = 0 is plain CFG; phi = 1 gives the guided prediction the conditional one's std (Lin et al. 2024, eq. 15)."""
    d = NullAware(gmm)
    x, sigma, y = _batch(n=50)
    plain = ClassifierFreeGuidance(d, 5.0, num_classes=K)(x, sigma, class_labels=y)
    phi0 = ClassifierFreeGuidance(d, 5.0, num_classes=K, rescale=0.0, rescale_space=space)(x, sigma, class_labels=y)
    assert torch.equal(plain, phi0)
    phi1 = ClassifierFreeGuidance(d, 5.0, num_classes=K, rescale=1.0, rescale_space=space)(x, sigma, class_labels=y)
    std = lambda d0: x0_to(space, d0, x, sigma).std(1)  # noqa: E731
    torch.testing.assert_close(std(phi1), std(gmm(x, sigma, class_labels=y)), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(std(plain), std(phi1))
    with pytest.raises(ValueError, match="rescale_space"):
        ClassifierFreeGuidance(d, 2.0, num_classes=K, rescale_space="w")


def test_classifier_guidance_with_zero_gradient_classifier_changes_nothing(gmm):
    net = NoisyClassifier(image_size=8, channels=8, channel_mult=(1, 2), attn_resolutions=(), num_heads=1,
                          norm_groups=4, num_classes=3)
    torch.nn.init.zeros_(net.head.weight)  # logits = bias: no dependence on x
    clf = SigmaClassifier(net, get_schedule("linear"))
    tiny = Precond(UNet(image_size=8, channels=8, channel_mult=(1, 2), attn_resolutions=(), num_heads=1,
                        norm_groups=4, num_classes=3), get_schedule("linear"))
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0, 50.0])
    y = torch.tensor([0, 1, 2, 0])
    out = ClassifierGuidance(tiny, clf, 10.0)(x, sigma, class_labels=y)
    assert torch.equal(out, tiny(x, sigma))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_classifier_guidance_with_exact_posterior_is_exact_cfg(gmm, scale):
    """D + s sigma^2 grad log p(y | x_sigma) = D_u + s (D_c - D_u) for the exact posterior (Tweedie); s = 1 is the
    exact conditional denoiser."""
    x, sigma, y = _batch()
    cg = ClassifierGuidance(gmm, posterior_logits(gmm), scale)(x, sigma, class_labels=y)
    d_c, d_u = gmm(x, sigma, class_labels=y), gmm(x, sigma)
    torch.testing.assert_close(cg, d_u + scale * (d_c - d_u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["cfg", "classifier"])
def test_guided_samples_land_in_requested_component(gmm, method):
    """Requesting the minority component (weight 0.2): unguided ~20% land there, guided at s = 3 over 95%."""
    d = NullAware(gmm)
    sigmas = get_sigmas(get_schedule("edm"), 40, "karras").double()
    n = 1000
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64) * sigmas[0]
    y = torch.ones(n, dtype=torch.long)

    def fraction(scale):
        gd = (ClassifierFreeGuidance(d, scale, num_classes=K) if method == "cfg" else
              ClassifierGuidance(gmm, posterior_logits(gmm), scale))
        x = SAMPLERS["heun"](lambda x, s: gd(x, s, class_labels=y), x0.clone(), sigmas)
        return float((gmm._log_resp(x, torch.zeros(n))[0].argmax(1) == 1).double().mean())

    f0, f3 = fraction(0.0), fraction(3.0)
    se = math.sqrt(0.2 * 0.8 / n)
    assert abs(f0 - 0.2) < 5 * se + 0.03, f0  # unguided: the component's weight (up to overlap)
    assert f3 > 0.95, f3


def test_cond_dropout_rate():
    obj = DiffusionObjective(get_schedule("linear"), cond_drop_prob=0.25, num_classes=10)
    y = torch.arange(10).repeat(2000)  # (20000,)
    out = obj.drop_condition({"class_labels": y}, generator=torch.Generator().manual_seed(0))["class_labels"]
    dropped = out == 10
    se = math.sqrt(0.25 * 0.75 / len(y))
    assert abs(float(dropped.double().mean()) - 0.25) < 4 * se
    assert torch.equal(out[~dropped], y[~dropped])
    assert DiffusionObjective(get_schedule("linear")).drop_condition({"class_labels": y})["class_labels"] is y
    with pytest.raises(ValueError, match="num_classes"):
        DiffusionObjective(get_schedule("linear"), cond_drop_prob=0.1).drop_condition({"class_labels": y})
    with pytest.raises(ValueError, match="cond_drop_prob"):
        DiffusionObjective(get_schedule("linear"), cond_drop_prob=1.5)
    assert build_objective(load_config("mnist-cond")).num_classes == 10


def test_class_labels_and_guide_validation():
    assert class_labels_for(5, -1, 3, offset=4).tolist() == [1, 2, 0, 1, 2]
    assert class_labels_for(3, 2, 10).tolist() == [2, 2, 2] and class_labels_for(3, None, 10) is None
    with pytest.raises(ValueError, match="0..9"):
        class_labels_for(3, 10, 10)
    with pytest.raises(ValueError, match="allowed values"):
        guide(None, "cgf")
    with pytest.raises(ValueError, match="classifier"):
        guide(None, "classifier", 2.0)


def _tiny_images(n=64, size=8, seed=0):
    """Two classes of 8x8 images: bright top half (0) or bright bottom half (1), plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    img = torch.zeros(n, 1, size, size)
    img[y == 0, :, : size // 2] = 1
    img[y == 1, :, size // 2:] = 1
    img = (img * 200 + torch.rand(img.shape, generator=g) * 55).to(torch.uint8)
    return TensorImageDataset(img, y, 2)


def _tiny_cfg(tmp_path, kind, *over):
    common = [f"out_dir={tmp_path}", "data.dataset=tiny", f"model.kind={kind}", "train.batch_size=16",
              "train.warmup_steps=0", "train.sample_every=0", "train.ckpt_every=0", "train.log_every=5"]
    net = {"unet": ["model.unet.image_size=8", "model.unet.channels=8", "model.unet.channel_mult=[1,2]",
                    "model.unet.attn_resolutions=[]", "model.unet.num_heads=1", "model.unet.norm_groups=4",
                    "model.unet.num_classes=2", "diffusion.objective.cond_drop_prob=0.2"],
           "noisy_classifier": ["task=noisy_classifier", "model.noisy_classifier.image_size=8",
                                "model.noisy_classifier.channels=8", "model.noisy_classifier.channel_mult=[1,2]",
                                "model.noisy_classifier.attn_resolutions=[]", "model.noisy_classifier.num_heads=1",
                                "model.noisy_classifier.norm_groups=4", "model.noisy_classifier.num_classes=2"]}[kind]
    return load_config(None, [f"name={kind}", *common, *net, *over])


def test_trainer_trains_noisy_classifier(tmp_path):
    """The Trainer runs the classifier objective; the fixed-noise validation cross-entropy falls from ~log 2."""
    cfg = _tiny_cfg(tmp_path, "noisy_classifier", "train.steps=40", "train.lr=0.005", "train.ema_decay=0.9")
    tr = Trainer(cfg, dataset=_tiny_images(), progress=False)
    before = tr.validation_loss()
    tr.fit()
    after = tr.validation_loss()
    assert abs(before - math.log(2)) < 0.2 and after < 0.75 * before, (before, after)
    assert not (tr.run_dir / "samples").exists()
    ckpt = tr.ckpt_dir / "last.safetensors"
    clf, _, _ = load_noisy_classifier(ckpt)
    assert clf(torch.zeros(3, 1, 8, 8), torch.ones(3)).shape == (3, 2)
    with pytest.raises(Exception, match="load_noisy_classifier"):
        load_denoiser(ckpt)


def test_generate_labels_independent_of_batch_size_and_cli(tmp_path, capsys):
    tr = Trainer(_tiny_cfg(tmp_path, "unet", "train.steps=2"), dataset=_tiny_images(), progress=False)
    tr.fit()
    kw = dict(n=5, steps=4, guidance="cfg", guidance_scale=3.0, class_label=-1)
    a = generate(tr.ema_denoiser, (1, 8, 8), batch_size=5, **kw)
    b = generate(tr.ema_denoiser, (1, 8, 8), batch_size=2, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # batched matmuls may round differently
    ckpt = str(tr.ckpt_dir / "last.safetensors")
    assert cli_main(["sample", ckpt, "--class", "1", "--guidance", "cfg", "--guidance-scale", "4", "--n", "4",
                     "--steps", "3", "--out", str(tmp_path / "s")]) == 0
    assert "class1_cfg4" in capsys.readouterr().out
    assert cli_main(["sample", ckpt, "--guidance", "classifier", "--n", "2", "--steps", "2"]) == 2
    assert "classifier" in capsys.readouterr().err


def test_sample_config_final_step_reaches_the_sampler(tmp_path):
    """sample.final and sample.sampler_options are passed to the sampler, and an option a sampler lacks is
    refused."""
    tr = Trainer(_tiny_cfg(tmp_path, "unet", "train.steps=2"), dataset=_tiny_images(), progress=False)
    tr.fit()  # a fresh U-Net's output layer is zero: D(x) = x, and every final step agrees
    spec = SampleConfig(sampler="dpmpp_3m", steps=5, spacing="optimized", final="heun0", n=3)
    assert sampler_options(spec) == {"final": "heun0"}
    a = generate(tr.ema_denoiser, (1, 8, 8), spec, clip_x0=False)
    b = generate(tr.ema_denoiser, (1, 8, 8), spec, clip_x0=False, final="denoise")
    c = generate(tr.ema_denoiser, (1, 8, 8), spec, clip_x0=False, final="", sampler_options={"final": "denoise"})
    assert not torch.allclose(a, b) and torch.equal(b, c)
    assert generate(tr.ema_denoiser, (1, 8, 8), spec).abs().max() <= 1.0  # clip_x0 bounds the samples too
    assert sampler_options(SampleConfig()) == {}
    with pytest.raises(ValueError, match="takes no option"):
        generate(tr.ema_denoiser, (1, 8, 8), n=1, sampler="ddpm", steps=2, final="heun0")
    with pytest.raises(ValueError, match="its options: eta"):
        generate(tr.ema_denoiser, (1, 8, 8), n=1, sampler="ddim", steps=2, sampler_options={"order": 2})
