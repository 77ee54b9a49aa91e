"""Editing and constrained sampling: exact Gaussian-mixture denoisers for the math, tiny nets for the plumbing."""
import numpy as np
import pytest
import torch

from torchdiffusion import edit
from torchdiffusion.data.toy import GaussianMixture, gaussian, random_mixture
from torchdiffusion.nets import UNet
from torchdiffusion.objectives import DiffusionObjective, ObjectiveConfig
from torchdiffusion.precond import Precond
from torchdiffusion.sampling import SampleConfig, get_sigmas, sample_ddim
from torchdiffusion.schedules import get_schedule
from torchdiffusion.utils import slerp

EDM = get_schedule("edm")


def two_modes():
    """Two well separated modes in 4-D: the known coordinates 0, 1 tell which mode a sample is in."""
    return GaussianMixture(torch.tensor([[2.0] * 4, [-2.0] * 4]), [0.3])


@pytest.mark.parametrize("sampler,resample", [("ddpm", 1), ("ddim", 1), ("ddpm", 3)])
def test_inpainting_keeps_known_pixels_and_fills_consistently(sampler, resample):
    gmm = two_modes()
    x0, k = gmm.sample(400, generator=torch.Generator().manual_seed(0), return_labels=True)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    out = edit.inpaint(gmm, x0, mask, get_sigmas(EDM, 30, "karras"), sampler=sampler, resample=resample,
                       jump_length=5, generator=torch.Generator().manual_seed(1))
    assert (out[:, :2] - x0[:, :2]).abs().max() <= 1e-6
    agree = ((out[:, 2:].mean(1) > 0) == (k == 0)).float().mean()
    # measured: replacement ddpm 0.9925, ddim 0.9375; RePaint (resample 3) 1.0
    assert agree >= (0.99 if resample > 1 else 0.9)


def test_inpainting_is_the_equality_projection_of_a_pixel_selection():
    gmm = random_mixture(dim=6, n_modes=3, seed=2)
    x0 = gmm.sample(5, generator=torch.Generator().manual_seed(0))
    known = torch.tensor([0, 2, 3])
    A = torch.eye(6)[known]
    sig = get_sigmas(EDM, 6, "karras")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)) * sig[0]
    run = lambda project: edit.sample_constrained(gmm, x, sig, project=project, sampler="ddpm",
                                                  generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(6).index_fill(0, known, 1.0)
    a = run(edit.inpaint_projection(x0, mask))
    b = run(edit.linear_equality_projection(A, x0[:, known]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", edit.STEP_SAMPLERS)
def test_projection_keeps_every_sample_in_the_set(sampler):
    gmm = random_mixture(dim=16, n_modes=4, seed=0)
    sig = get_sigmas(EDM, 5, "karras")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) * sig[0]
    box = edit.sample_constrained(gmm, x, sig, project=edit.box_projection(-0.5, 0.25), sampler=sampler,
                                  generator=g)
    assert box.min() >= -0.5 and box.max() <= 0.25
    A, b = torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    eq = edit.sample_constrained(gmm, x, sig, project=edit.linear_equality_projection(A, b), sampler=sampler,
                                 generator=g, resample=2, jump_length=2)
    assert (eq @ A.T - b).abs().max() <= 1e-5


def test_multistep_sampler_and_bad_inputs_are_refused():
    gmm = two_modes()
    sig = get_sigmas(EDM, 4, "karras")
    with pytest.raises(ValueError, match="allowed values: 'ddpm'"):
        edit.sample_constrained(gmm, torch.zeros(2, 4), sig, project=edit.box_projection(), sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="does not match the images"):
        edit.inpaint(gmm, torch.zeros(2, 4), torch.ones(3), sig)
    with pytest.raises(ValueError, match="full row rank"):
        edit.linear_equality_projection(torch.ones(2, 4), torch.zeros(2))


def test_resample_path():
    assert edit.resample_path(4) == [0, 1, 2, 3, 4]
    # blocks of 2 levels, each traversed twice; the last block ends at sigma = 0 and is not repeated
    assert edit.resample_path(6, jump_length=2, resample=2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]


def test_ddim_inversion_reconstructs_and_error_falls_with_steps():
    """Mixture in 8-D with modes of std 0.05..0.3, Karras grid 80 -> 0.002: reconstruction RMSE of DDIM after
    inversion, measured 0.613 / 0.481 / 0.254 / 0.084 at 10 / 20 / 40 / 80 steps (plain inversion), 0.0066 at
    40 steps with 2 fixed-point iterations."""
    gmm = random_mixture(dim=8, n_modes=4, seed=1)
    x0 = gmm.sample(64, generator=torch.Generator().manual_seed(0))

    def rmse(steps, iters=0):
        sig = get_sigmas(EDM, steps, "karras")
        return float((sample_ddim(gmm, edit.ddim_invert(gmm, x0, sig, iters=iters), sig) - x0).pow(2).mean().sqrt())

    errors = [rmse(s) for s in (10, 20, 40, 80)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1
    assert rmse(40, iters=2) < 0.02


def test_interpolation_frames_are_the_slerp_of_the_exact_inverses():
    """On Gaussian data N(m, s^2 I) (as 1x4x4 images) DDIM is affine, x_0 - m = P (x_T - m) with
    P = prod_i (s^2 + sigma_i sigma_{i+1}) / (s^2 + sigma_i^2), so the exact inverse of an image x is
    z = m + (x - m) / P and frame t is m + P (slerp(z_a, z_b, t) - m): the first and last frames reconstruct
    a and b, the others follow the great circle. 10 fixed-point iterations per inversion step solve DDIM's step
    exactly (measured error 5e-7 in float32, 0.14 with plain inversion, 2.8e-3 with 2 iterations)."""
    s = 0.5
    m = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)
    data = gaussian(m, s)
    a, b = data.sample(2, generator=torch.Generator().manual_seed(0)).view(2, 1, 4, 4)
    sig = get_sigmas(EDM, 40, "karras")
    levels = sig.double().tolist()
    P = float(np.prod([(s**2 + hi * lo) / (s**2 + hi**2) for hi, lo in zip(levels[:-1], levels[1:])]))
    frames = edit.interpolate(data, a, b, sig, frames=5, iters=10)
    mm = m.view(1, 4, 4).float()
    za, zb = (mm + (x - mm) / P for x in (a, b))
    want = torch.stack([mm + P * (slerp(za[None], zb[None], t)[0] - mm) for t in (0.0, 0.25, 0.5, 0.75, 1.0)])
    assert frames.shape == (5, 1, 4, 4)
    torch.testing.assert_close(frames[0], a, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(frames[-1], b, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(frames, want, rtol=1e-5, atol=2e-5)
    assert (frames[2] - (a + b) / 2).abs().max() > 0.1  # the middle frame is not the pixel average


def test_sdedit_limits():
    gmm = two_modes()
    sig = get_sigmas(EDM, 50, "karras")
    x = gmm.sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(edit.sdedit(gmm, x, sig, 1e-3), x)
    assert len(edit.sdedit_sigmas(sig, 1.0)) == 51 and len(edit.sdedit_sigmas(sig, 0.5)) == 26
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            edit.sdedit(gmm, x, sig, bad)


def test_sdedit_with_the_exact_denoiser_keeps_the_data_distribution():
    """Inputs drawn from p, noised to sigma(t0) and denoised (Heun, exact denoiser) are again draws from p:
    the weight of the right mode and the mean within 4 standard errors, the variances within 10%."""
    w = torch.tensor([0.3, 0.7])
    gmm = GaussianMixture(torch.tensor([[1.5, 0.0], [-1.5, 0.0]]), [0.4], w)
    n = 4000
    x0 = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    out = edit.sdedit(gmm, x0, get_sigmas(EDM, 40, "karras"), 0.6, sampler="heun",
                      generator=torch.Generator().manual_seed(2))
    assert (out - x0).norm(dim=1).mean() > 1.0  # the samples did move
    frac = (out[:, 0] > 0).float().mean()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    var = gmm.covariance().diag().float()
    assert abs(out[:, 0].mean() - gmm.mean[0]) < 4 * (var[0] / n) ** 0.5
    torch.testing.assert_close(out.var(0), var, rtol=0.1, atol=0)


def tiny_unet(**kw):
    return UNet(image_size=kw.pop("image_size", 28), channels=8, channel_mult=(1, 2), attn_resolutions=(),
                mid_attention=False, norm_groups=4, **kw)


def test_sr_objective_makes_the_low_res_condition_and_the_unet_takes_it():
    obj = DiffusionObjective(get_schedule("linear"), ObjectiveConfig(low_res=14, cond_aug_max_sigma=0.3),
                             prediction="eps")
    seen = {}

    def spy(x, sigma, **cond):
        seen.update(cond)
        return x

    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    obj.per_sample(spy, x0, generator=torch.Generator().manual_seed(0))
    assert seen["low_res"].shape == (6, 1, 14, 14) and seen["low_res_sigma"].shape == (6,)
    assert ((seen["low_res_sigma"] >= 0) & (seen["low_res_sigma"] <= 0.3)).all()
    clean = edit.low_res_condition(x0, 14, torch.zeros(6))["low_res"]  # no augmentation: 2x2 means
    torch.testing.assert_close(clean, x0.unflatten(2, (14, 2)).unflatten(4, (14, 2)).mean((3, 5)))
    denoiser = Precond(tiny_unet(cond_channels=1), get_schedule("linear"))
    loss = obj(denoiser, x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and denoiser.net.conv_in.weight.shape[1] == 2
    with pytest.raises(ValueError, match="needs low_res"):
        denoiser(x0, torch.ones(6))
    with pytest.raises(ValueError, match="cond_channels=0"):
        Precond(tiny_unet(), get_schedule("linear"))(x0, torch.ones(6), low_res=clean)


def test_cascade_is_independent_of_batching():
    torch.manual_seed(0)
    base = Precond(tiny_unet(image_size=14), get_schedule("linear")).eval()
    sr = Precond(tiny_unet(cond_channels=1), get_schedule("linear")).eval()
    run = lambda bs: edit.sample_cascade(base, sr, (1, 14, 14), (1, 28, 28),
                                         SampleConfig(n=3, sr_aug_sigma=0.2, seed=5, steps=3, batch_size=bs))
    (low1, high1), (low3, high3) = run(1), run(3)
    assert low1.shape == (3, 1, 14, 14) and high1.shape == (3, 1, 28, 28)
    torch.testing.assert_close(high1, high3, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="conditioning images"):
        edit.sample_cascade(sr, sr, (1, 28, 28), (1, 28, 28), SampleConfig(n=1, steps=2), low_res=14)


# ------------------------------------------------------------------------------------------------- CLI
def cli(*args):
    from torchdiffusion.app.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny base (14x14) and super-resolution checkpoints, two training steps each on an MNIST subset."""
    out = tmp_path_factory.mktemp("edit_runs")
    common = ["--config", "tiny", f"out_dir={out}", "train.steps=2", "train.ckpt_every=0", "data.subset=64",
              "train.batch_size=8"]
    assert cli("train", *common, "name=base", "data.image_size=14", "model.unet.image_size=14") == 0
    assert cli("train", *common, "name=sr", "model.unet.cond_channels=1", "diffusion.objective.low_res=14",
               "diffusion.objective.cond_aug_max_sigma=0.2") == 0
    return out / "base" / "checkpoints" / "last.safetensors", out / "sr" / "checkpoints" / "last.safetensors"


def test_cli_cascade_and_edits_write_their_outputs(ckpts, tmp_path, capsys):
    base, sr = ckpts
    assert cli("sample", base, "--sr-checkpoint", sr, "--sr-aug-sigma", 0.1, "--n", 3, "--steps", 2,
               "--out", tmp_path) == 0
    arr = np.load(tmp_path / "ddim_2steps_seed0_sr_aug0.1.npz")["images"]
    assert arr.shape == (3, 28, 28, 1)
    assert np.load(tmp_path / "ddim_2steps_seed0_sr_aug0.1_base.npz")["images"].shape == (3, 14, 14, 1)
    assert (tmp_path / "ddim_2steps_seed0_sr_aug0.1_pairs.png").exists()
    imgs = "mnist-test:0-1"
    assert cli("inpaint", base, "--images", imgs, "--mask", "center", "--steps", 3, "--sampler", "ddpm",
               "--out", tmp_path, "--resample", 2, "--jump-length", 1) == 0
    x = np.load(tmp_path / "inpaint.npz")["images"]
    assert x.shape == (2, 14, 14, 1)
    assert cli("img2img", base, "--images", imgs, "--strength", 0.3, 1.0, "--steps", 3, "--out", tmp_path) == 0
    assert np.load(tmp_path / "img2img.npz")["images"].shape == (4, 14, 14, 1)
    assert cli("invert", base, "--images", imgs, "--steps", 3, "--out", tmp_path) == 0
    assert np.load(tmp_path / "inverted_noise.npz")["noise"].shape == (2, 1, 14, 14)
    assert cli("interpolate", base, "--images", imgs, "--frames", 3, "--steps", 3, "--out", tmp_path) == 0
    assert np.load(tmp_path / "interpolation.npz")["images"].shape == (3, 14, 14, 1)
    for name in ("inpaint", "img2img", "invert", "interpolation"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_cli_bad_input_exits_2_with_a_message(ckpts, tmp_path, capsys):
    base, sr = ckpts
    np.savez(tmp_path / "mask.npz", x=np.ones((1, 10, 10), dtype=np.uint8))
    assert cli("inpaint", base, "--images", "mnist-test:0", "--mask", tmp_path / "mask.npz", "--out", tmp_path) == 2
    assert "has shape (10, 10) but the images are 14x14" in capsys.readouterr().err
    assert cli("inpaint", base, "--images", "mnist-test:0", "--mask", "diagonal", "--out", tmp_path) == 2
    assert "named masks: left, right" in capsys.readouterr().err
    assert cli("img2img", base, "--images", "mnist-test:0", "--strength", 1.5, "--out", tmp_path) == 2
    assert "strength must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert cli("invert", sr, "--images", "mnist-test:0", "--out", tmp_path) == 2  # SR nets need low_res
    assert "low_res" in capsys.readouterr().err
    assert cli("sample", sr, "--sr-checkpoint", sr, "--n", 1, "--steps", 1, "--out", tmp_path) == 2
    assert "conditioning images" in capsys.readouterr().err


def test_cli_edits_of_a_class_conditional_model(tmp_path, capsys):
    """Edits condition on --class-label only (the run's sample.class_label = -1 is about new samples): the default
    is the null class, -1 gives image i class i mod 10, and a class outside 0..9 is refused with a message."""
    run = ["--config", "tiny", f"out_dir={tmp_path}", "name=cond", "train.steps=2", "train.ckpt_every=0",
           "data.subset=64", "train.batch_size=8", "model.unet.num_classes=10", "diffusion.objective.cond_drop_prob=0.1",
           "sample.class_label=-1"]
    assert cli("train", *run) == 0
    ckpt = tmp_path / "cond" / "checkpoints" / "last.safetensors"
    outs = {}
    for label in (None, "-1", "0"):
        out = tmp_path / f"inp{label}"
        extra = [] if label is None else ["--class-label", label]
        assert cli("inpaint", ckpt, "--images", "mnist-test:0-1", "--mask", "center", "--steps", 3, "--out", out,
                   *extra) == 0
        outs[label] = np.load(out / "inpaint.npz")["images"]
    assert outs[None].shape == (2, 28, 28, 1)
    assert (outs["-1"][0] == outs["0"][0]).all()          # image 0 gets class 0 either way
    assert not (outs[None] == outs["0"]).all()             # the null class is another condition
    assert cli("inpaint", ckpt, "--images", "mnist-test:0", "--mask", "center", "--class-label", 12,
               "--out", tmp_path) == 2
    assert "class_label must be in 0..9 or -1" in capsys.readouterr().err


def test_edits_work_on_a_run_that_samples_with_a_multistep_sampler(tmp_path, capsys):
    """mnist-10min and the demo sample with dpmpp_2m_sde (multistep): inpaint falls back to a single-step sampler
    and says so; img2img runs the multistep sampler on its truncated grid; asking inpaint for a multistep
    sampler explicitly is refused with the list of allowed ones."""
    run = ["--config", "tiny", f"out_dir={tmp_path}", "name=ms", "train.steps=2", "train.ckpt_every=0",
           "data.subset=64", "train.batch_size=8", "sample.sampler=dpmpp_2m_sde", "sample.spacing=karras",
           "sample.sampler_options={eta: 0.5}"]
    assert cli("train", *run) == 0
    ckpt = tmp_path / "ms" / "checkpoints" / "last.safetensors"
    assert cli("inpaint", ckpt, "--images", "mnist-test:0-1", "--mask", "right", "--steps", 3,
               "--out", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "'dpmpp_2m_sde', which is multistep; using 'ddpm'" in err
    x = np.load(tmp_path / "a" / "inpaint.npz")["images"]
    assert x.shape == (2, 28, 28, 1)
    assert cli("img2img", ckpt, "--images", "mnist-test:0", "--strength", 0.5, "--steps", 4,
               "--out", tmp_path / "b") == 0
    assert cli("inpaint", ckpt, "--images", "mnist-test:0", "--mask", "right", "--sampler", "dpmpp_2m",
               "--out", tmp_path / "c") == 2
    assert "single-step samplers only" in capsys.readouterr().err
