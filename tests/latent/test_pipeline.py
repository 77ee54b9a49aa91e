"""Latent diffusion end to end: an autoencoder trained by the trainer, a diffusion model on its latents, sampling and
editing through the decoder, and the autoencoder's identity checked."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from torchdiffusion.app.cli import main
from torchdiffusion.build import codec_for, load_codec, load_denoiser
from torchdiffusion.checkpoint import read_meta
from torchdiffusion.data.toy import GaussianMixture
from torchdiffusion.latent import LatentCodec, LatentDataset
from torchdiffusion.latent import codec as codec_module
from torchdiffusion.nets.autoencoder import DiagonalGaussian
from torchdiffusion.sampling import SampleConfig, generate

AE = ["task=autoencoder", "model.kind=autoencoder", "model.autoencoder.factor=4", "model.autoencoder.channels=8",
      "model.autoencoder.norm_groups=4", "model.autoencoder.disc_layers=1", "model.autoencoder.disc_channels=8",
      "autoencoder_loss.perceptual_weight=0", "autoencoder_loss.disc_start=2", "data.subset=256",
      "train.batch_size=8", "train.steps=3", "train.sample_every=3", "train.ckpt_every=0", "train.log_every=1"]
LDM = ["model.unet.image_size=7", "model.unet.in_channels=4", "model.unet.channels=8", "model.unet.channel_mult=[1]",
       "model.unet.attn_resolutions=[]", "model.unet.norm_groups=4", "data.subset=256", "train.batch_size=8",
       "train.steps=2", "train.ckpt_every=0", "train.sample_every=0", "sample.steps=3", "sample.sampler=ddim"]


class Identity(nn.Module):
    """A linear 'autoencoder' of 2-D points: q(z | x) = N(x, ~0), decode(z) = z."""

    latent_shape, image_size = (2,), ()
    config = type("C", (), {"in_channels": 2, "factor": 1})

    def encode(self, x):
        return DiagonalGaussian(x, torch.full_like(x, -30.0))

    def decode(self, z):
        return z


def test_a_linear_autoencoder_gives_the_same_samples_in_latent_space(tmp_path, monkeypatch):
    """With z = c x the latent data is the mixture scaled by c and its exact denoiser D_z(z, c sigma) = c D_x(z/c,
    sigma); sampling in latent space on the grid c sigma and decoding gives the data-space samples."""
    monkeypatch.setattr(codec_module, "cache_dir", lambda: tmp_path)
    c = 0.25
    means, stds = torch.tensor([[1.0, 0.0], [-0.5, 0.8]]), torch.tensor([0.1, 0.2])
    pixel, latent = GaussianMixture(means, stds), GaussianMixture(c * means, c * stds)
    codec = LatentCodec(Identity(), scale=c)
    sig = torch.tensor([20.0, 6.0, 2.0, 0.7, 0.2, 0.05, 0.0])
    for sampler in ("ddim", "ddpm", "dpmpp_2m"):
        spec = SampleConfig(sampler=sampler, n=64, clip_x0=False)
        a = generate(pixel, (2,), spec, sigmas=tuple(sig.tolist()))
        b = generate(latent, (2,), spec, sigmas=tuple((c * sig).tolist()), decode=codec.decode)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    data = type("D", (), {"labels": None, "num_classes": 0, "name": "toy", "__len__": lambda self: 100,
                          "batch": lambda self, i, **k: (pixel.sample(len(i), generator=torch.Generator()
                                                                      .manual_seed(0)).float(), None)})()
    ds = LatentDataset(codec, data, key="toy", progress=False)
    z, _ = ds.batch(torch.arange(5), generator=torch.Generator().manual_seed(1))
    x = data.batch(torch.arange(100))[0][:5]  # what the data set encoded (one batch of all 100)
    torch.testing.assert_close(z, c * x, rtol=1e-4, atol=1e-5)
    assert ds.meta["latent_scale"] == c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_path):
    out = tmp_path_factory.mktemp("latent")
    cache = tmp_path_factory.mktemp("latent_cache")
    mp = pytest.MonkeyPatch()
    mp.setattr(codec_module, "cache_dir", lambda: cache)
    assert main(["train", f"out_dir={out}", "name=ae", *AE]) == 0
    ae = out / "ae" / "checkpoints" / "last.safetensors"
    assert main(["train", "--config", "tiny", f"out_dir={out}", "name=ldm", f"data.autoencoder={ae}", *LDM]) == 0
    yield out, ae, out / "ldm" / "checkpoints" / "last.safetensors"
    mp.undo()


def test_the_autoencoder_checkpoint_holds_its_latent_scale_and_pictures(runs):
    out, ae, _ = runs
    meta = read_meta(ae)
    assert meta["latent_scale"] > 0
    codec = load_codec(ae)
    assert codec.latent_shape == (4, 7, 7) and codec.scale == meta["latent_scale"]
    assert (out / "ae" / "samples" / "step_0000003.png").exists()
    logged = [json.loads(line) for line in (out / "ae" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"rec", "kl", "d_loss", "recon_mae"} <= set().union(*logged)


def test_a_latent_model_samples_and_edits_images(runs, tmp_path):
    out, ae, ldm = runs
    den, cfg, meta = load_denoiser(ldm)
    assert tuple(meta["data_shape"]) == (4, 7, 7) and meta["data"]["autoencoder_sha256"] == load_codec(ae).sha256
    assert main(["sample", str(ldm), "--n", "3", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert np.load(tmp_path / "ddim_2steps_seed0.npz")["images"].shape == (3, 28, 28, 1)
    assert main(["inpaint", str(ldm), "--images", "mnist-test:0-1", "--mask", "right", "--steps", "2",
                 "--out", str(tmp_path / "inp")]) == 0
    filled = np.load(tmp_path / "inp" / "inpaint.npz")["images"]
    from torchdiffusion.app.inputs import load_images

    original = ((load_images("mnist-test:0-1", (1, 28, 28)) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert filled.shape == (2, 28, 28, 1) and (filled[:, :, :14] == original[:, :, :14]).all()
    assert main(["img2img", str(ldm), "--images", "mnist-test:0", "--strength", "0.5", "--steps", "2",
                 "--out", str(tmp_path / "i2i")]) == 0


def test_a_different_autoencoder_is_refused(runs, tmp_path):
    out, ae, ldm = runs
    den, cfg, meta = load_denoiser(ldm)
    assert main(["train", f"out_dir={out}", "name=ae", *AE, "train.steps=4"]) == 0  # the file changes
    with pytest.raises(Exception, match="trained on the latents of the autoencoder with sha256"):
        codec_for(cfg, meta, ldm)
    assert main(["sample", str(ldm), "--n", "1", "--steps", "1", "--out", str(tmp_path)]) == 2
