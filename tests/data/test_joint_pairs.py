"""Packed (image, label) pairs (data/joint.py, edit.PlaneMean, app/joint.py): the packing is an isometry, so the
exact denoiser of packed data is the vector one seen through it, and conditioning by inpainting through the packed
path is conditioning of the pair (docs/conditioning.md)."""
import math

import pytest
import torch

from torchdiffusion.app.joint import classify, label_oneshot
from torchdiffusion.data import GaussianMixture, TensorImageDataset
from torchdiffusion.data.joint import (JointConfig, JointGaussian, JointImageLabel, encode_labels, pack_pair,
                                       pair_mask, random_joint_gaussian, unpack_pair)
from torchdiffusion.config import ConfigError, load_config, upgrade_config
from torchdiffusion.edit import PlaneMean, impute
from torchdiffusion.objectives import DiffusionObjective
from torchdiffusion.precond import Precond
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.schedules import EDMSchedule, get_schedule

C, H, W, K = 1, 2, 2, 3  # a 2x2 one-channel "image" and 3 classes: the packed pair has (1 + 3) x 2 x 2 values
X_DIM = C * H * W
N_DRAWS = 3000
SIGMAS = get_sigmas(EDMSchedule(sigma_min=0.002, sigma_max=80.0), 40, "karras").double()


class Packed(torch.nn.Module):
    """A denoiser of vectors (x flattened, y) seen through the packing: z -> pack(D(unpack(z)))."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z, sigma, **_):
        x, y = unpack_pair(z, K)
        out = self.inner(torch.cat([x.flatten(1), y], 1), sigma)
        return pack_pair(out[:, :X_DIM].view_as(x), out[:, X_DIM:])


def _embedding() -> torch.Tensor:
    """The matrix E (D_packed, D) of pack_pair, column j the packing of the j-th unit vector of (x, y)."""
    eye = torch.eye(X_DIM + K, dtype=torch.float64)
    return pack_pair(eye[:, :X_DIM].view(-1, C, H, W), eye[:, X_DIM:]).flatten(1).T


def test_packing_is_an_exactly_invertible_isometry():
    """unpack(pack(x, y)) = (x, y); E^T E = I, so iid noise on the packed tensor is noise of the same sigma on
    both blocks; E E^T is the projection onto constant label planes, i.e. PlaneMean's P."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, C, H, W, generator=g, dtype=torch.float64), torch.randn(5, K, generator=g,
                                                                                  dtype=torch.float64)
    x2, y2 = unpack_pair(pack_pair(x, y), K)
    torch.testing.assert_close(x2, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    e = _embedding()
    torch.testing.assert_close(e.T @ e, torch.eye(X_DIM + K, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    z = torch.randn(5, C + K, H, W, generator=g, dtype=torch.float64)
    identity = PlaneMean(lambda v, s: v, C)  # P applied to an identity denoiser
    torch.testing.assert_close(identity(z, torch.ones(5)).flatten(1), z.flatten(1) @ (e @ e.T), rtol=1e-12,
                               atol=1e-12)


def test_packed_gaussian_denoiser_is_the_wiener_filter_of_the_packed_law():
    """The packed data are N(E mu, E C E^T) (degenerate off the constant planes); their Wiener filter
    E mu + E C E^T (E C E^T + sigma^2 I)^-1 (z - E mu), by a dense solve, is E D(E^T z), and PlaneMean leaves it
    unchanged."""
    j = random_joint_gaussian(X_DIM, K, seed=3)
    e = _embedding()
    mu, cov = e @ j.mean, e @ j.cov @ e.T
    z = torch.randn(3, C + K, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.7, 4.0], dtype=torch.float64)
    den = PlaneMean(Packed(j), C)
    got = den(z, sigma).flatten(1)
    for i in range(3):
        a = cov + sigma[i] ** 2 * torch.eye(len(mu), dtype=torch.float64)
        want = mu + cov @ torch.linalg.solve(a, z[i].flatten() - mu)
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-9)


class Spy(torch.nn.Module):
    """A denoiser that records its input and returns a fixed output."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, z, sigma, **_):
        self.seen = z.clone()
        return self.out.to(z)


def test_readout_shows_each_label_value_in_every_pixel_and_reads_plane_means_back():
    """readout sqrt(H W): the inner denoiser sees the image channels unchanged and label plane k filled with the
    pair's noisy label value y_k + sigma n_k (= unpack_pair's coordinate) in every pixel; its label output, any
    tensor, comes back as the packed plane of its plane mean, so the pair's label output is that mean itself."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, C, H, W, generator=g, dtype=torch.float64), torch.randn(4, K, generator=g,
                                                                                  dtype=torch.float64)
    z = pack_pair(x, y) + 0.7 * torch.randn(4, C + K, H, W, generator=g, dtype=torch.float64)
    out = torch.randn(4, C + K, H, W, generator=g, dtype=torch.float64)
    spy = Spy(out)
    got = PlaneMean(spy, C, readout=math.sqrt(H * W))(z, torch.full((4,), 0.7))
    zx, zy = unpack_pair(z, K)
    torch.testing.assert_close(spy.seen[:, :C], zx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spy.seen[:, C:], zy[:, :, None, None].expand(4, K, H, W), rtol=1e-12, atol=1e-12)
    gx, gy = unpack_pair(got, K)
    torch.testing.assert_close(gx, out[:, :C], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gy, out[:, C:].mean((-2, -1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, PlaneMean(lambda v, s: v, C)(got, None), rtol=1e-12, atol=1e-12)  # on P's range


def test_readout_is_a_change_of_coordinates_of_the_exact_denoiser():
    """The exact denoiser of the pair written in the readout's coordinates (label block scaled by s), G(u) =
    S E D(E^T S^-1 u), read through PlaneMean(readout=s) is the packed exact denoiser E D(E^T z) again: the readout
    changes what a network must compute, not what the denoiser is."""
    j = random_joint_gaussian(X_DIM, K, seed=3)
    s = math.sqrt(H * W)

    def scaled(u, sigma):
        return PlaneMean(Packed(j), C, readout=1 / s)(u, sigma)  # S E D(E^T S^-1 u) on the constant planes

    z = torch.randn(3, C + K, H, W, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.7, 4.0], dtype=torch.float64)
    want = PlaneMean(Packed(j), C)(z, sigma)
    torch.testing.assert_close(PlaneMean(scaled, C, readout=s)(z, sigma), want, rtol=1e-9, atol=1e-9)


def test_label_weight_weights_the_label_block_of_the_loss():
    """With joint.label_weight w the simple loss per sample is (|e_x|^2 + w |e_y|^2) / numel times the weighting,
    e the error in the network's output space, computed here by hand from the same sigma and noise."""
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(5, C, H, W, generator=g), torch.randn(5, K, generator=g)
    z0 = pack_pair(x, y)
    sigma, noise = torch.rand(5, generator=g) + 0.2, torch.randn(5, C + K, H, W, generator=g)
    net = lambda v, t, **_: 0.3 * v.flip(-1)  # an arbitrary "network" (eps prediction)
    sched = get_schedule("linear")
    objective = DiffusionObjective(sched, weighting="uniform")
    base = PlaneMean(Precond(net, sched, "eps"), C)
    weighted = PlaneMean(Precond(net, sched, "eps"), C, label_weight=4.0)
    got = objective.per_sample(weighted, z0, sigma=sigma, noise=noise)
    err = (base(z0 + sigma[:, None, None, None] * noise, sigma) - z0) / sigma[:, None, None, None]  # eps error
    ex, ey = unpack_pair(err, K)
    want = (ex.flatten(1).pow(2).sum(1) + 4.0 * ey.pow(2).sum(1)) / z0[0].numel()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    unweighted = objective.per_sample(base, z0, sigma=sigma, noise=noise)
    torch.testing.assert_close(unweighted, (ex.flatten(1).pow(2).sum(1) + ey.pow(2).sum(1)) / z0[0].numel(),
                               rtol=1e-5, atol=1e-7)


def test_joint_options_are_checked_and_old_checkpoints_keep_their_readout():
    with pytest.raises(ConfigError, match="'scaled', 'planes'"):
        load_config("mnist-joint", ["joint.readout=flat"])
    with pytest.raises(ConfigError, match="label_weight must be a positive"):
        load_config("mnist-joint", ["joint.label_weight=0"])
    with pytest.raises(ConfigError, match="weights the simple loss"):
        load_config("mnist-joint", ["joint.label_weight=5", "diffusion.objective.kind=hybrid",
                                    "model.unet.learn_sigma=true"])
    with pytest.raises(ValueError, match="positive"):
        PlaneMean(lambda v, s: v, C, readout=0.0)
    old = {"task": "joint", "joint": {"classes": 10, "label_scale": 2.0}}
    assert upgrade_config(old)["joint"]["readout"] == "planes"  # written before the option: the first design
    assert upgrade_config({"task": "joint", "joint": {"readout": "scaled"}})["joint"]["readout"] == "scaled"
    assert load_config("mnist-joint").joint.readout == "scaled"


@pytest.mark.parametrize("given", ["x", "y"])
def test_pair_mask_covers_exactly_one_block(given):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, C, H, W, generator=g), torch.randn(4, K, generator=g)
    mask = pair_mask(C, K, given)
    known_x, known_y = unpack_pair(pack_pair(x, y) * mask, K)
    free_x, free_y = unpack_pair(pack_pair(x, y) * (1 - mask), K)
    if given == "x":
        assert torch.equal(known_x, x) and torch.equal(free_y, y) and not known_y.any() and not free_x.any()
    else:
        assert torch.equal(known_y, y) and torch.equal(free_x, x) and not known_x.any() and not free_y.any()


def _independent_gaussian() -> JointGaussian:
    a = torch.randn(X_DIM, X_DIM, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cx = a @ a.T / X_DIM + 0.2 * torch.eye(X_DIM, dtype=torch.float64)
    cy = torch.tensor([[0.6, 0.2, 0.0], [0.2, 0.5, -0.1], [0.0, -0.1, 0.4]], dtype=torch.float64)
    mean = torch.linspace(-1, 1, X_DIM + K, dtype=torch.float64)
    return JointGaussian(mean, torch.block_diag(cx, cy), X_DIM)


def _packed_draws(j, value, given, resample=1):
    x, y = value[:, :X_DIM].view(-1, C, H, W), value[:, X_DIM:]
    out = impute(PlaneMean(Packed(j), C), pack_pair(x, y), pair_mask(C, K, given), SIGMAS, samples=N_DRAWS,
                 seed=0, sampler="heun", batch_size=N_DRAWS, resample=resample)[:, 0]  # (S, C + K, H, W)
    xs, ys = unpack_pair(out, K)
    return torch.cat([xs.flatten(1), ys], 1)  # (S, D)


@pytest.mark.parametrize("given", ["x", "y"])
def test_packed_inpainting_recovers_the_exact_conditional_of_independent_blocks(given):
    """Block-diagonal C: inpainting through the packed path (PlaneMean of the packed exact denoiser, the pair mask)
    samples the exact conditional (here the free block's marginal): mean within 4 standard errors, covariance
    within 15 %; the known block comes back exactly."""
    j = _independent_gaussian()
    value = j.sample(1, generator=torch.Generator().manual_seed(5))
    draws = _packed_draws(j, value, given)
    mean, cov = j.conditional(value, given)
    free = j.mask(given)[0] == 0
    torch.testing.assert_close(draws[:, ~free], value[:, ~free].expand(N_DRAWS, -1), rtol=1e-12, atol=1e-12)
    se = (cov.diagonal() / N_DRAWS).sqrt()
    assert ((draws[:, free].mean(0) - mean[0]).abs() < 4 * se).all()
    torch.testing.assert_close(torch.cov(draws[:, free].T), cov, rtol=0.15, atol=0.02)


def test_packed_inpainting_of_correlated_blocks_is_the_vector_inpainting():
    """Correlated C, label given the image: the packed path draws what the vector path draws (replacement is
    biased on correlated blocks, docs/conditioning.md, and the packed path must share that law, not another):
    the two means agree within 4 standard errors of their difference on every label coordinate."""
    j = random_joint_gaussian(X_DIM, K, seed=0)
    value = j.sample(1, generator=torch.Generator().manual_seed(1))
    packed = _packed_draws(j, value, "x")[:, X_DIM:]
    vector = impute(j, value, j.mask("x"), SIGMAS, samples=N_DRAWS, seed=1, sampler="heun",
                    batch_size=N_DRAWS)[:, 0, X_DIM:]
    se = ((packed.var(0) + vector.var(0)) / N_DRAWS).sqrt()
    assert ((packed.mean(0) - vector.mean(0)).abs() < 4 * se).all()


def test_oneshot_is_the_class_posterior_of_the_noisy_image():
    """Data at K points (m_k, y_k), y_k the label blocks (a mixture with zero spread): at the centroid of the
    label blocks every class's block is equally far, so the exact one-shot read is p(k | x_sigma = a) =
    softmax_k(-|a - m_k|^2 / (2 sigma^2)), computed here in closed form."""
    scale, s, sigma = 2.0, 0.0, 0.8
    g = torch.Generator().manual_seed(6)
    m = torch.randn(K, X_DIM, generator=g, dtype=torch.float64)
    mix = GaussianMixture(torch.cat([m, encode_labels(torch.arange(K), K, scale).double()], 1), s)
    a = torch.randn(4, C, H, W, generator=g, dtype=torch.float64)
    p = label_oneshot(PlaneMean(Packed(mix), C), a, classes=K, scale=scale, sigma=sigma)
    want = torch.softmax(-torch.cdist(a.flatten(1), m) ** 2 / (2 * (s**2 + sigma**2)), 1)
    torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-9)


def test_joint_data_set_yields_packed_pairs():
    images = torch.randint(0, 256, (6, C, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    base = TensorImageDataset(images, torch.arange(6) % K, K, name="rand")
    data = JointImageLabel(base, JointConfig(classes=K, label_scale=2.0))
    z, labels = data.batch([4, 1])
    assert labels is None and z.shape == (2, *data.sample_shape) == (2, C + K, H, W)
    x, y = unpack_pair(z, K)
    torch.testing.assert_close(x, base.batch([4, 1])[0])
    torch.testing.assert_close(y, torch.tensor([[-2.0, 2.0, -2.0], [-2.0, 2.0, -2.0]]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="labelled"):
        JointImageLabel(TensorImageDataset(images), JointConfig(classes=K))


def test_bad_inputs_are_refused_with_a_message():
    with pytest.raises(ValueError, match=r"integer class indices of shape \(N,\)"):
        encode_labels(torch.zeros(3, K), K)
    with pytest.raises(ValueError, match=r"lie in 0\.\.2"):
        encode_labels(torch.tensor([0, 3]), K)
    with pytest.raises(ValueError, match="same N"):
        pack_pair(torch.zeros(2, C, H, W), torch.zeros(3, K))
    with pytest.raises(ValueError, match="given"):
        pair_mask(C, K, "z")
    with pytest.raises(ValueError, match="'oneshot', 'replacement', 'repaint'"):
        classify(lambda z, s: z, torch.zeros(2, C, H, W), SIGMAS, classes=K, scale=1.0, method="vote")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        classify(lambda z, s: z, torch.zeros(2, X_DIM), SIGMAS, classes=K, scale=1.0)
    assert math.isclose(float(pair_mask(C, K, "x").sum()), C)
