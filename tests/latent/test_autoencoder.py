"""The KL autoencoder and the latent codec against closed forms; its objective's terms."""
import math

import pytest
import torch

from torchdiffusion.latent import AutoencoderLossConfig, AutoencoderObjective, LatentCodec, latent_scale, mask_to_latent
from torchdiffusion.latent.perceptual import LPIPS, OwnDistance, PerceptualNet, VGG16_CFG
from torchdiffusion.nets.autoencoder import AutoencoderConfig, AutoencoderNet, DiagonalGaussian, KLAutoencoder

TINY = dict(channels=8, norm_groups=4, num_res_blocks=1)


def test_kl_equals_the_closed_form_and_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g) * 0.5
    post = DiagonalGaussian(mean, logvar)
    var = logvar.exp()
    closed = 0.5 * (mean**2 + var - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), closed)
    z = torch.stack([post.sample(g) for _ in range(20000)])  # (S, 3, 2, 2, 2)
    log_q = torch.distributions.Normal(mean, post.std).log_prob(z).flatten(2).sum(2)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(2).sum(2)
    mc, se = (log_q - log_p).mean(0), (log_q - log_p).std(0) / math.sqrt(len(z))
    assert ((mc - closed).abs() < 5 * se).all(), (mc, closed, se)


def test_reparameterised_gradient_is_unbiased():
    """d/dmu E[z^2] = 2 mu and d/dlogvar E[z^2] = exp(logvar) for z ~ N(mu, exp(logvar)): the mean of the
    reparameterised gradients agrees within 5 standard errors."""
    mu, logvar = torch.tensor([0.7], requires_grad=True), torch.tensor([-0.4], requires_grad=True)
    g, grads = torch.Generator().manual_seed(1), []
    for _ in range(4000):
        z = DiagonalGaussian(mu, logvar).sample(g)
        grads.append(torch.stack(torch.autograd.grad((z**2).sum(), (mu, logvar))).flatten())
    grads = torch.stack(grads)
    want = torch.tensor([2 * 0.7, math.exp(-0.4)])
    se = grads.std(0) / math.sqrt(len(grads))
    assert ((grads.mean(0) - want).abs() < 5 * se).all(), (grads.mean(0), want)


@pytest.mark.parametrize("factor,latent", [(2, (4, 14, 14)), (4, (4, 7, 7))])
def test_encode_decode_shapes(factor, latent):
    ae = KLAutoencoder(AutoencoderConfig(factor=factor, **TINY))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    post = ae.encode(x)
    assert ae.latent_shape == latent and tuple(post.mean.shape) == (2, *latent)
    assert ae.decode(post.sample()).shape == x.shape
    with pytest.raises(ValueError, match="latents of shape"):
        ae.decode(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="images of shape"):
        ae.encode(torch.zeros(2, 3, 28, 28))


def test_sizes_the_factor_does_not_divide_are_refused():
    with pytest.raises(ValueError, match="30x30 does not divide by the autoencoder's factor 4: choose a factor in 1, 2"):
        KLAutoencoder(AutoencoderConfig(image_size=30, factor=4, **TINY))
    with pytest.raises(ValueError, match="allowed values: 1, 2, 4, 8"):
        KLAutoencoder(AutoencoderConfig(factor=3, **TINY))
    with pytest.raises(ValueError, match="needs 3"):
        KLAutoencoder(AutoencoderConfig(factor=4, channel_mult=(1, 2), **TINY))


def test_the_scale_factor_gives_latents_of_unit_variance():
    ae = KLAutoencoder(AutoencoderConfig(factor=4, **TINY)).eval()
    g = torch.Generator().manual_seed(2)
    fit, held = torch.rand(2048, 1, 28, 28, generator=g) * 2 - 1, torch.rand(1024, 1, 28, 28, generator=g) * 2 - 1
    scale = latent_scale(ae, fit)
    codec = LatentCodec(ae, scale)
    z = torch.cat([codec.encode(b, sample=True, generator=g) for b in held.split(256)])
    assert abs(float(z.std()) - 1) < 0.05
    torch.testing.assert_close(codec.decode(codec.encode(held[:4])), ae.decode(ae.encode(held[:4]).mode()),
                               rtol=1e-4, atol=1e-5)


def test_mask_to_latent_keeps_only_fully_known_cells():
    mask = torch.ones(1, 8, 8)
    mask[:, 2, 5] = 0
    z = mask_to_latent(mask, 4)
    assert z.shape == (1, 2, 2) and z.tolist() == [[[1.0, 0.0], [1.0, 1.0]]]


def test_objective_terms_and_the_discriminator_split():
    """With a discriminator: before disc_start the adversarial terms count zero; after it L_D's gradient reaches
    only the discriminator and L_G's only the autoencoder."""
    net = AutoencoderNet(AutoencoderConfig(factor=2, disc_layers=1, disc_channels=8, **TINY))
    obj = AutoencoderObjective(AutoencoderLossConfig(perceptual_weight=0.0, disc_start=5, kl_weight=1e-3))
    module = type("M", (), {"net": net})()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    g = torch.Generator().manual_seed(0)
    before = obj.terms(net, x, generator=torch.Generator().manual_seed(0), step=0)
    after = obj.terms(net, x, generator=torch.Generator().manual_seed(0), step=5)
    torch.testing.assert_close(before["loss"], before["nll"] + 1e-3 * before["kl"])
    assert float(after["adaptive_weight"]) > 0 and not torch.allclose(after["loss"], before["loss"])
    d_grads = torch.autograd.grad(after["loss"], list(net.discriminator.parameters()))
    assert sum(float(t.abs().sum()) for t in d_grads) > 0  # L_D trains the discriminator
    out = net(x, generator=torch.Generator().manual_seed(0))
    gl = -out["logits_gen"].mean()
    assert torch.autograd.grad(gl, next(net.discriminator.parameters()), allow_unused=True)[0] is None
    assert torch.autograd.grad(gl, net.autoencoder.decoder.last_layer)[0].abs().sum() > 0
    per = obj.per_sample(module, x)
    assert per.shape == (4,) and torch.equal(per, obj.per_sample(module, x))  # validation is deterministic
    with pytest.raises(ValueError, match="needs a perceptual distance"):
        AutoencoderObjective(AutoencoderLossConfig(perceptual_weight=1.0))


def test_own_perceptual_distance_and_lpips_from_files(tmp_path):
    own = OwnDistance(PerceptualNet(1))
    x, y = torch.rand(3, 1, 28, 28) * 2 - 1, torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.allclose(own(x, x), torch.zeros(3)) and (own(x, y) > 0).all()
    torch.testing.assert_close(own(x, y), own(y, x))
    # LPIPS-VGG from the two files a user supplies (random weights in the published key layout)
    vgg, ch, i = {}, 3, 0
    for v in VGG16_CFG:
        if v == "M":
            i += 1
            continue
        vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"] = torch.randn(v, ch, 3, 3) * 0.05, torch.zeros(v)
        ch, i = v, i + 2
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "vgg.pth")
    lpips = LPIPS(tmp_path)
    d = lpips(x, y)
    assert d.shape == (3,) and (d > 0).all() and torch.allclose(lpips(x, x), torch.zeros(3), atol=1e-7)
    with pytest.raises(FileNotFoundError, match="vgg16.pth"):
        LPIPS(tmp_path / "nowhere")


def _labelled_folder(root, n_per_class, sizes):
    """A folder of grey PNGs in class subfolders, image k of size sizes[k % len(sizes)]."""
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(n_per_class):
            s = sizes[k % len(sizes)]
            Image.fromarray(g.integers(0, 256, (s, s), dtype=np.uint8)).save(root / f"class{c}" / f"{k}.png")
    return root


def test_own_perceptual_network_on_a_users_folder(tmp_path, monkeypatch):
    """Cached per folder (two folders of one name do not share a network, the file stays in the cache), trained at
    the run's image size (a folder of mixed sizes works), and a set too small to classify is refused clearly."""
    from torchdiffusion.latent import perceptual
    monkeypatch.setattr(perceptual, "cache_dir", lambda: tmp_path / "cache")
    a = _labelled_folder(tmp_path / "a" / "pics", 32, sizes=(8, 12))
    b = tmp_path / "b" / "pics"
    pa, pb = perceptual.perceptual_path(str(a), 8), perceptual.perceptual_path(str(b), 8)
    assert pa != pb and pa.parent == pb.parent == tmp_path / "cache" / "perceptual"
    assert perceptual.perceptual_path("mnist") == tmp_path / "cache" / "perceptual" / "mnist.safetensors"
    dist = perceptual.perceptual_distance("own", str(a), image_size=8, progress=False)
    assert pa.exists() and not pb.exists()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.allclose(dist(x, x), torch.zeros(2)) and (dist(x, -x) > 0).all()
    small = _labelled_folder(tmp_path / "small", 8, sizes=(8,))
    with pytest.raises(ValueError, match="at least 64 labelled training images.*has 16.*perceptual_weight=0"):
        perceptual.train_perceptual_net(str(small), progress=False)
