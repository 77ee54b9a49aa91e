"""evaluate_checkpoint on a model trained on latents: its samples are decoded by the model's own autoencoder before
evaluation sees them."""
import numpy as np
import pytest
import torch

from torchdiffusion.app.cli import main
from torchdiffusion.build import load_codec, load_denoiser
from torchdiffusion.checkpoint import CheckpointError
from torchdiffusion.evaluate import report
from torchdiffusion.latent import codec as codec_module
from torchdiffusion.sampling import generate

IMAGE, LATENT = (1, 8, 8), (2, 4, 4)  # f = 2, two latent channels
AE = ["task=autoencoder", "model.kind=autoencoder", "model.autoencoder.image_size=8", "model.autoencoder.factor=2",
      "model.autoencoder.channel_mult=[1, 2]", "model.autoencoder.latent_channels=2", "model.autoencoder.channels=8",
      "model.autoencoder.norm_groups=4", "model.autoencoder.mid_attention=false",
      "autoencoder_loss.perceptual_weight=0", "train.batch_size=8", "train.steps=2", "train.warmup_steps=0",
      "train.sample_every=0", "train.ckpt_every=0", "train.log_every=1"]
LDM = ["model.unet.image_size=4", "model.unet.in_channels=2", "model.unet.channels=8", "model.unet.channel_mult=[1]",
       "model.unet.norm_groups=4", "train.batch_size=8", "train.steps=2", "train.warmup_steps=0",
       "train.ckpt_every=0", "sample.steps=2", "sample.sampler=ddim"]


@pytest.fixture
def latent_run(tmp_path, monkeypatch):
    """An autoencoder and a latent U-Net, two training steps each, on 64 random 8x8 grey images."""
    monkeypatch.setattr(codec_module, "cache_dir", lambda: tmp_path / "cache")
    data = tmp_path / "rand.npz"
    g = np.random.default_rng(0)
    np.savez(data, x=g.integers(0, 256, (64, 8, 8), dtype=np.uint8))
    assert main(["train", f"out_dir={tmp_path}", "name=ae", f"data.dataset={data}", *AE]) == 0
    ae = tmp_path / "ae" / "checkpoints" / "last.safetensors"
    assert main(["train", "--config", "tiny", f"out_dir={tmp_path}", "name=ldm", f"data.dataset={data}",
                 f"data.autoencoder={ae}", *LDM]) == 0
    return ae, tmp_path / "ldm" / "checkpoints" / "last.safetensors"


def test_a_latent_model_is_evaluated_on_its_decoded_samples(latent_run, monkeypatch):
    ae, ldm = latent_run
    seen = []

    def record(samples, dataset, **kwargs):  # stands for the feature network's evaluation
        seen.append(samples.clone())
        return {"n": len(samples)}

    monkeypatch.setattr(report, "_dataset_of", lambda cfg: "mnist")  # random images have no feature network
    monkeypatch.setattr(report, "evaluate_samples", record)
    result = report.evaluate_checkpoint(ldm, n=3, seeds=None)
    den, cfg, meta = load_denoiser(ldm)
    assert tuple(meta["data_shape"]) == LATENT and result["n"] == 3
    (x,) = seen
    assert tuple(x.shape) == (3, *IMAGE) and tuple(x.shape) != (3, *LATENT)
    with torch.no_grad():  # exactly the decoder's images of the latent samples (clamped: sample.clip_x0)
        want = generate(den, LATENT, cfg.sample, n=3, decode=load_codec(ae).decode)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="not defined for a model on latents"):
        report.evaluate_checkpoint(ldm, n=3, likelihood=("vlb",))


def test_evaluation_refuses_a_different_autoencoder(latent_run, monkeypatch, tmp_path):
    ae, ldm = latent_run
    monkeypatch.setattr(report, "_dataset_of", lambda cfg: "mnist")
    monkeypatch.setattr(report, "evaluate_samples", lambda samples, dataset, **kw: pytest.fail("evaluated"))
    assert main(["train", f"out_dir={tmp_path}", "name=ae", f"data.dataset={tmp_path / 'rand.npz'}", *AE,
                 "train.steps=3"]) == 0  # the autoencoder file changes under the model
    with pytest.raises(CheckpointError, match="trained on the latents of the autoencoder with sha256"):
        report.evaluate_checkpoint(ldm, n=3)


def test_training_time_evaluation_of_a_latent_run_sees_decoded_images(latent_run, tmp_path, monkeypatch):
    """train.eval_every on a latent model: the periodic evaluation decodes its samples too."""
    from torchdiffusion.evaluate import quality
    ae, _ = latent_run
    seen = []

    def record(samples, dataset, **kwargs):
        seen.append(tuple(samples.shape))
        return {k: 0.0 for k in quality.PERIODIC_KEYS}

    marker = tmp_path / "feature_net.safetensors"
    marker.write_bytes(b"")
    monkeypatch.setattr(quality, "eval_dataset", lambda name: "mnist")
    monkeypatch.setattr(quality, "feature_net_path", lambda dataset: marker)
    monkeypatch.setattr(quality, "evaluate_samples", record)
    data = tmp_path / "rand.npz"
    assert main(["train", "--config", "tiny", f"out_dir={tmp_path}", "name=ldm-eval", f"data.dataset={data}",
                 f"data.autoencoder={ae}", *LDM, "train.eval_every=1", "train.eval_samples=4"]) == 0
    assert seen and all(s == (4, *IMAGE) for s in seen)
