"""A joint (image, label) run end to end (app/joint.py, task joint): train, checkpoint, resume, then p(y | x) by the
three methods and p(x | y), with the known block returned exactly (docs/conditioning.md)."""
import json

import numpy as np
import pytest
import torch

from torchdiffusion import viz
from torchdiffusion.app.cli import main

from torchdiffusion.app.joint import classify, generate_given_labels, joint_layout, load_joint
from torchdiffusion.build import build_dataset
from torchdiffusion.checkpoint import CheckpointError, load_checkpoint
from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.data import TensorImageDataset
from torchdiffusion.data.joint import JointImageLabel, pack_pair, pair_mask, unpack_pair
from torchdiffusion.edit import impute
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.training import Trainer

K = 3


def tiny_cfg(out_dir, steps, *extra):
    return load_config(None, [
        f"out_dir={out_dir}", "name=run", "task=joint", f"joint.classes={K}", "joint.label_scale=2.0",
        "model.unet.image_size=8", f"model.unet.in_channels={1 + K}", "model.unet.channels=8",
        "model.unet.channel_mult=[1, 2]", "model.unet.attn_resolutions=[]", "model.unet.norm_groups=4",
        "train.batch_size=8", "train.lr=0.003", "train.warmup_steps=0", "train.lr_schedule=constant",
        "train.ema_decay=0.9", "train.log_every=1", "train.sample_every=0", "train.ckpt_every=0",
        f"train.steps={steps}", *extra])


def tiny_data(cfg):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g)
    return JointImageLabel(TensorImageDataset(images, torch.arange(32) % K, K, name="rand"), cfg.joint)


def test_train_resume_classify_generate(tmp_path, capsys):
    """4 steps at once and 2 + 2 with a restart give the same weights; the checkpoint loads as the trainer's
    projected EMA denoiser; classification by every method gives probabilities, the same for the same seed;
    inpainting returns the known block bitwise; generation does not depend on the batch size."""
    cfg_a = tiny_cfg(tmp_path / "a", 4)
    Trainer(cfg_a, dataset=tiny_data(cfg_a), progress=False).fit()
    Trainer(tiny_cfg(tmp_path / "b", 2), dataset=tiny_data(cfg_a), progress=False).fit()
    second = Trainer(tiny_cfg(tmp_path / "b", 4), dataset=tiny_data(cfg_a), progress=False)
    assert second.step == 2
    second.fit()
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.safetensors"
    wa = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.safetensors")[1]
    wb = load_checkpoint(ckpt)[1]
    assert all(torch.equal(wa["ema"][k], wb["ema"][k]) for k in wa["ema"])
    den, cfg = load_joint(ckpt)
    channels, classes, scale = joint_layout(cfg)
    assert (channels, classes, scale) == (1, K, 2.0)
    images = tiny_data(cfg).images.batch(torch.arange(4))[0]
    z, s = pack_pair(images, torch.zeros(4, K)), torch.tensor([0.1, 1.0, 5.0, 20.0])
    with torch.no_grad():
        out = den(z, s)
        torch.testing.assert_close(out, second.ema_denoiser.eval()(z, s), rtol=1e-5, atol=1e-5)
    planes = out[:, channels:]
    assert torch.equal(planes, planes[..., :1, :1].expand_as(planes))  # the label block is constant planes
    sigmas = get_sigmas(den.schedule, 4, "karras")
    for method in ("oneshot", "replacement", "repaint"):
        p = classify(den, images, sigmas, classes=K, scale=scale, method=method, samples=2, seed=3, resample=2)
        assert p.shape == (4, K) and (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(4))
        assert torch.equal(p, classify(den, images, sigmas, classes=K, scale=scale, method=method, samples=2,
                                       seed=3, resample=2))
    draws = impute(den, z, pair_mask(channels, K, "x"), sigmas, samples=2, seed=0)
    assert torch.equal(unpack_pair(draws[0], K)[0], images) and torch.equal(unpack_pair(draws[1], K)[0], images)
    labels = torch.tensor([0, 1, 2, 1])
    opts = dict(channels=channels, classes=K, scale=scale, image_size=(8, 8), seed=5)
    x = generate_given_labels(den, labels, sigmas, batch_size=4, **opts)
    assert x.shape == (4, 1, 8, 8)  # per-sample generators: other batches give the same draws up to rounding
    torch.testing.assert_close(x, generate_given_labels(den, labels, sigmas, batch_size=3, **opts), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="class indices"):
        generate_given_labels(den, torch.zeros(4, K), sigmas, **opts)
    # the command line: images given a label (class i mod K) are generate_given_labels on the sample grid; pairs
    # without a label come with the class their label block carries; guidance is refused with the way to condition
    out = tmp_path / "samples"
    base = ["sample", str(ckpt), "--n", "4", "--steps", "4", "--spacing", "karras", "--seed", "5", "--out", str(out),
            "--no-clip-x0"]
    assert main(base + ["--class-label", "-1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == [0, 1, 2, 0]
    got = np.load(info["npz"])["images"]  # (N, H, W, C) uint8: the images alone, no label planes
    want = generate_given_labels(den, torch.tensor([0, 1, 2, 0]), get_sigmas(den.schedule, 4, "karras"), **opts)
    assert got.shape == (4, 8, 8, 1)
    assert np.abs(got.astype(int) - viz.to_uint8(want).astype(int)).max() <= 1  # rounding at a pixel boundary
    assert main(base) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["labels"]) == 4 and all(0 <= k < K for k in info["labels"])
    assert main(base + ["--guidance", "cfg", "--guidance-scale", "2"]) != 0
    assert "inpainting the label block" in capsys.readouterr().err


def test_joint_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="in_channels"):
        tiny_cfg(tmp_path, 1, "model.unet.in_channels=3")
    with pytest.raises(ConfigError, match="num_classes=null"):
        tiny_cfg(tmp_path, 1, "model.unet.num_classes=3")
    with pytest.raises(ConfigError, match="sample_every=0"):
        tiny_cfg(tmp_path, 1, "train.sample_every=10")
    cfg = load_config("mnist-joint")
    assert cfg.task == "joint" and cfg.model.unet.in_channels == 1 + cfg.joint.classes


def test_a_denoiser_checkpoint_is_not_a_joint_model(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=plain", "model.unet.image_size=8",
                             "model.unet.channels=8", "model.unet.channel_mult=[1]", "model.unet.attn_resolutions=[]",
                             "model.unet.norm_groups=4", "train.steps=1", "train.batch_size=4",
                             "train.sample_every=0", "train.warmup_steps=0"])
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    Trainer(cfg, dataset=TensorImageDataset(images), progress=False).fit()
    with pytest.raises(CheckpointError, match="not a joint"):
        load_joint(tmp_path / "plain" / "checkpoints" / "last.safetensors")


def test_a_joint_run_trains_on_packed_mnist(mnist_path):
    data = build_dataset(load_config("mnist-joint", ["data.subset=16"]), progress=False)
    assert isinstance(data, JointImageLabel) and data.sample_shape == (11, 28, 28)
    z, _ = data.batch(torch.arange(4))
    torch.testing.assert_close(unpack_pair(z, 10)[1].argmax(1), data.labels[:4])
