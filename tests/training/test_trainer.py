"""The trainer: learning works, checkpoints reload exactly, interrupted runs resume exactly."""
import math

import pytest
import torch

from torchdiffusion.checkpoint import CheckpointError, load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.data import make_toy
from torchdiffusion.build import load_denoiser
from torchdiffusion.sampling import generate
from torchdiffusion.training import Trainer, lr_at


def sliced_w2(a, b, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], k, generator=g)
    d = d / d.norm(dim=0)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def toy_cfg(tmp_path, *over):
    return load_config("toy2d", [f"out_dir={tmp_path}", "train.ckpt_every=0", *over])


def test_mlp_learns_two_moons(tmp_path):
    """600 steps on two moons: sliced W2 of 4000 samples to fresh data < 0.15 (N(0, I) is at ~0.40)."""
    tr = Trainer(toy_cfg(tmp_path, "train.steps=600"), progress=False)
    tr.fit()
    x = generate(tr.ema_denoiser, (2,), n=4000, sampler="ddim", steps=50)
    ref = make_toy("moons", 4000, generator=torch.Generator().manual_seed(1))
    ref2 = make_toy("moons", 4000, generator=torch.Generator().manual_seed(2))
    dist, floor, noise = sliced_w2(x, ref), sliced_w2(ref2, ref), sliced_w2(torch.randn(4000, 2), ref)
    assert dist < 0.15 and dist < noise / 2.5, (dist, floor, noise)


def _weights(path):
    _, groups = load_checkpoint(path)
    return groups


def test_interrupted_run_resumes_exactly(tmp_path):
    """A run stopped by its time budget and started again ends with the same weights, EMA and optimizer
    state as a run that was never interrupted (same data order, same noise, same dropout)."""
    over = ["train.steps=60", "model.mlp.dropout=0.1", "train.log_every=10"]
    Trainer(toy_cfg(tmp_path / "a", *over), progress=False).fit()
    first = Trainer(toy_cfg(tmp_path / "b", *over, "train.max_minutes=0.0002"), progress=False).fit()
    assert first["stopped_early"] and 0 < first["steps"] < 60
    ckpt_b = tmp_path / "b" / "toy2d" / "checkpoints" / "last.safetensors"
    assert load_checkpoint(ckpt_b)[0]["step"] == first["steps"]  # a valid checkpoint at the stop
    second = Trainer(toy_cfg(tmp_path / "b", *over), progress=False)
    assert second.step == first["steps"]
    second.fit()
    wa = _weights(tmp_path / "a" / "toy2d" / "checkpoints" / "last.safetensors")
    wb = _weights(ckpt_b)
    for group in ("model", "ema", "optim"):
        assert wa[group].keys() == wb[group].keys()
        for k in wa[group]:
            assert torch.equal(wa[group][k], wb[group][k]), (group, k)


def test_resume_refuses_a_different_run(tmp_path):
    Trainer(toy_cfg(tmp_path, "train.steps=5"), progress=False).fit()
    with pytest.raises(CheckpointError, match="different configuration.*train.lr"):
        Trainer(toy_cfg(tmp_path, "train.steps=10", "train.lr=0.1"), progress=False)


def test_save_load_gives_identical_outputs(tmp_path):
    tr = Trainer(toy_cfg(tmp_path, "train.steps=20"), progress=False)
    tr.fit()
    for use_ema, ref in ((True, tr.ema_denoiser), (False, tr.module)):
        den, cfg, meta = load_denoiser(tmp_path / "toy2d" / "checkpoints" / "last.safetensors", use_ema=use_ema)
        x, s = torch.randn(32, 2), torch.rand(32) * 5
        with torch.no_grad():
            assert torch.equal(den(x, s), ref.eval()(x, s))
    assert meta["step"] == 20 and cfg.train.steps == 20


def test_unet_on_mnist_subset_lowers_the_loss(tmp_path):
    tr = Trainer(load_config("tiny", [f"out_dir={tmp_path}", "train.steps=40", "train.ckpt_every=0"]),
                 progress=False)
    before = tr.validation_loss()
    tr.fit()
    after = tr.validation_loss()
    assert after < 0.75 * before, (before, after)


def test_wrong_image_size_is_reported(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(1, 32, 32\) but the network expects \(1, 28, 28\)"):
        Trainer(load_config("tiny", [f"out_dir={tmp_path}", "data.image_size=32"]), progress=False)


def test_lr_schedule():
    cfg = load_config("tiny", ["train.steps=1000", "train.warmup_steps=100", "train.lr=1.0",
                               "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.01) and lr_at(99, cfg) == pytest.approx(1.0)
    assert lr_at(550, cfg) == pytest.approx(0.1 + 0.9 * 0.5)      # half way through the cosine
    assert lr_at(1000, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(100, 1000))


def test_no_resume_keeps_the_earlier_run(tmp_path):
    Trainer(toy_cfg(tmp_path, "train.steps=3"), progress=False).fit()
    tr = Trainer(toy_cfg(tmp_path, "train.steps=3"), progress=False, resume=False)
    assert tr.step == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("toy2d.")]
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "last.safetensors").exists()


def _tiny_trainer(tmp_path, *over):
    cfg = load_config("tiny", [f"out_dir={tmp_path}", "train.ckpt_every=0", "train.warmup_steps=0",
                               "train.lr_schedule=constant", "train.ema_decay=0.9", *over])
    return Trainer(cfg, progress=False)


def test_gradient_accumulation_matches_one_batch(tmp_path):
    """4 micro-batches of 8 give the weights of one batch of 32 (the same examples, flips and noise; only the
    float summation order differs)."""
    nets = []
    for k in (1, 4):
        tr = _tiny_trainer(tmp_path / str(k), "data.flip=true", f"train.grad_accum={k}")
        for _ in range(3):
            tr.train_step(tr.sampler.next_batch())
        nets.append((tr.net.state_dict(), tr.ema.model.state_dict()))
    for a, b in zip(*nets):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


def test_bf16_and_fp32_steps_agree(tmp_path):
    """The gradient of one batch under bf16 autocast (channels-last) and in fp32 (contiguous). bf16 keeps 8
    significant bits (unit roundoff 2^-9 ~ 0.2%); convolutions accumulate in fp32 and GroupNorm statistics
    are fp32, so errors stay at a few roundoffs per layer: the loss within 1% and the whole gradient within
    5% in relative L2 norm (a wrong cast or layout gives O(1) errors). They must differ (bf16 really ran)."""
    grads, losses = [], []
    for over in (["train.precision=fp32"], ["train.precision=bf16", "train.channels_last=true"]):
        tr = _tiny_trainer(tmp_path, *over, "model.unet.zero_init_residual=false")
        w = tr.net.conv_out.weight
        w.data.copy_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))  # output != 0
        losses.append(float(tr._gradients(torch.arange(32))))
        grads.append(torch.cat([p.grad.flatten() for p in tr.net.parameters()]))
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0], losses
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert 1e-5 < rel < 0.05, rel


def test_max_minutes_stops_a_unet_run_with_a_resumable_checkpoint(tmp_path):
    """A time budget ends the run between steps with a valid last checkpoint; a rerun continues from it."""
    over = ["train.steps=40", "train.log_every=5"]
    first = _tiny_trainer(tmp_path, *over, "train.max_minutes=0.0001").fit()
    assert first["stopped_early"] and 0 < first["steps"] < 40
    meta, groups = load_checkpoint(tmp_path / "tiny" / "checkpoints" / "last.safetensors")
    assert meta["step"] == first["steps"] and groups["model"] and groups["optim"]
    again = _tiny_trainer(tmp_path, *over, "train.steps=" + str(first["steps"] + 2))
    assert again.step == first["steps"] and again.fit()["steps"] == first["steps"] + 2


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    """train.compile with a compiler that fails at the first call: a warning, then the same step eagerly."""
    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *a, **k):
            raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", lambda net: Broken(net))
    eager = _tiny_trainer(tmp_path / "a")
    eager.train_step(torch.arange(32))
    tr = _tiny_trainer(tmp_path / "b", "train.compile=true")
    with pytest.warns(UserWarning, match="training eagerly"):
        tr.train_step(torch.arange(32))
    for a, b in zip(eager.net.parameters(), tr.net.parameters()):
        assert torch.equal(a, b)


def test_config_differences_treats_missing_keys_as_defaults():
    from torchdiffusion.config import RunConfig, to_dict
    from torchdiffusion.training import config_differences

    new = to_dict(RunConfig())
    old = to_dict(RunConfig())
    del old["diffusion"]["objective"]["cond_drop_prob"]  # saved before the field existed
    assert config_differences(old, new) == []
    new["diffusion"]["objective"]["cond_drop_prob"] = 0.1
    assert config_differences(old, new) == ["diffusion.objective.cond_drop_prob: 0.0 -> 0.1"]
