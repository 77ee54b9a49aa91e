"""Learned variances through the trainer (docs/likelihood.md): the importance-sampling history of kind vlb is saved
in checkpoints and an interrupted run resumes bit for bit; a hybrid run trains, checkpoints, reloads and samples
with its learned variance."""

import pytest
import torch

from torchdiffusion.build import load_denoiser
from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.precond import Precond
from torchdiffusion.sampling import generate
from torchdiffusion.training import Trainer

STEPS = 12


def cfg(out, kind, *over):
    """tiny (a small U-Net on 512 MNIST digits) at 16 x 16 with variance channels on a 10-step cosine DDPM, so that
    the importance sampler warms up (10 values of each of the 10 terms) within the first steps."""
    return load_config("tiny", [f"out_dir={out}", f"train.steps={STEPS}", "train.ckpt_every=0", "train.batch_size=32",
                                "data.image_size=16", "model.unet.image_size=16", "model.unet.learn_sigma=true",
                                "diffusion.schedule=cosine", "diffusion.T=10", f"diffusion.objective.kind={kind}",
                                *over])




def last(out):
    return load_checkpoint(out / "tiny" / "checkpoints" / "last.safetensors")


def test_vlb_history_is_saved_and_an_interrupted_run_resumes_exactly(interrupt_at, tmp_path, mnist_path):
    Trainer(cfg(tmp_path / "a", "vlb"), progress=False).fit()
    tr = Trainer(cfg(tmp_path / "b", "vlb"), progress=False)
    tr.hooks.append(interrupt_at(8))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    meta, stopped = last(tmp_path / "b")
    assert meta["step"] == 8 and int(stopped["objective"]["counts"].min()) == 10  # warm: importance sampling is on
    resumed = Trainer(cfg(tmp_path / "b", "vlb"), progress=False)
    assert torch.equal(resumed.objective.importance.values, stopped["objective"]["values"])
    resumed.fit()
    (ma, ga), (mb, gb) = last(tmp_path / "a"), last(tmp_path / "b")
    assert ma["step"] == mb["step"] == STEPS
    for group in ("model", "ema", "optim", "objective"):
        assert ga[group].keys() == gb[group].keys()
        for k in ga[group]:
            assert torch.equal(ga[group][k], gb[group][k]), (group, k)


def test_hybrid_run_trains_reloads_and_samples_with_its_variance(tmp_path, mnist_path):
    tr = Trainer(cfg(tmp_path, "hybrid", "train.steps=6"), progress=False)
    tr.fit()
    den, run_cfg, _ = load_denoiser(tmp_path / "tiny" / "checkpoints" / "last.safetensors")
    assert den.learns_variance and run_cfg.diffusion.objective.kind == "hybrid"
    spec = dict(sampler="ddpm", steps=5, n=4, class_label=None)
    a = generate(den, (1, 16, 16), **spec)
    assert torch.equal(a, generate(tr.ema_denoiser, (1, 16, 16), **spec))  # the checkpoint is the trained model
    fixed = Precond(den.net, den.schedule, den.prediction)  # the same network with the fixed beta-tilde
    assert torch.isfinite(a).all() and not torch.allclose(a, generate(fixed, (1, 16, 16), **spec), atol=1e-3)
