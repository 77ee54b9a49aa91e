"""The trainer's numerics against hand computation: the EMA formula, global-norm gradient clipping, and a
torch.compile'd network training to the eager losses."""
import shutil
import warnings

import pytest
import torch
from torch import nn

from torchdiffusion.config import load_config
from torchdiffusion.training import Trainer
from torchdiffusion.training.trainer import EMA


def toy_trainer(tmp_path, *over):
    cfg = load_config("toy2d", [f"out_dir={tmp_path}", "train.ckpt_every=0", "train.batch_size=64",
                                "train.warmup_steps=0", "train.lr_schedule=constant", *over])
    return Trainer(cfg, progress=False)


# ------------------------------------------------------------------------------------------------------ EMA
def test_ema_follows_the_warmup_decay_on_parameters_and_float_buffers():
    """EMA.update k (k = 0, 1, ...) is theta_ema <- d_k theta_ema + (1 - d_k) theta with
    d_k = min(decay, (1 + k) / (10 + k)), on every floating-point parameter and buffer (BatchNorm's running
    statistics); integer buffers are not averaged. decay = 0.5 takes the warm-up branch for k < 8 and the
    constant one after; the reference is computed in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(net, 0.5)
    ref = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    steps_tracked = ema.model.state_dict()["1.num_batches_tracked"].clone()
    g = torch.Generator().manual_seed(1)
    for k in range(20):
        with torch.no_grad():
            for name, v in net.state_dict().items():
                if v.is_floating_point():
                    v.copy_(torch.randn(v.shape, generator=g) * (1 + k))
                else:
                    v.add_(1)
        ema.update(net)
        d = min(0.5, (1 + k) / (10 + k))
        cur = net.state_dict()
        ref = {name: d * e + (1 - d) * cur[name].double() for name, e in ref.items()}
        for name, e in ref.items():
            torch.testing.assert_close(ema.model.state_dict()[name].double(), e, rtol=1e-5, atol=1e-5,
                                       msg=f"update {k}: {name}")
    assert ema.updates == 20
    assert torch.equal(ema.model.state_dict()["1.num_batches_tracked"], steps_tracked)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())


def test_trainer_ema_is_the_average_of_the_weights_after_each_step(tmp_path):
    """Through the trainer: after every optimizer step the EMA moves towards the new weights with d_k (decay
    0.995 keeps the warm-up branch for these 6 steps)."""
    tr = toy_trainer(tmp_path, "train.ema_decay=0.995")
    ref = [p.detach().double().clone() for p in tr.ema.model.parameters()]
    for k in range(6):
        tr.train_step(tr.sampler.next_batch())
        d = min(0.995, (1 + k) / (10 + k))
        ref = [d * e + (1 - d) * p.detach().double() for e, p in zip(ref, tr.net.parameters())]
    for e, p in zip(ref, tr.ema.model.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-6)
    assert tr.ema.updates == 6


# ------------------------------------------------------------------------------------------ gradient clipping
def _step_gradients(tr):
    """The gradients the optimizer sees at its first step (after clipping), one tensor per parameter."""
    seen = []

    def keep(opt, args, kwargs):
        seen.append([p.grad.detach().clone() for p in tr.net.parameters()])

    handle = tr.opt.register_step_pre_hook(keep)
    try:
        tr.train_step(tr.sampler.next_batch())
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("clip_factor", [0.25, 4.0])
def test_gradient_clipping_scales_the_global_norm(tmp_path, clip_factor):
    """grad_clip = c: the optimizer sees g min(1, c / (||g|| + 1e-6)) with ||g|| the norm over all parameters
    together (not per tensor). The unclipped g comes from the same step of a run with grad_clip = 0 (same
    initialisation, batch and noise). c = ||g|| / 4 scales every tensor by the same factor; c = 4 ||g|| changes
    nothing."""
    raw = _step_gradients(toy_trainer(tmp_path / "raw", "train.grad_clip=0"))
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in raw)))
    c = clip_factor * norm
    clipped = _step_gradients(toy_trainer(tmp_path / "clip", f"train.grad_clip={c!r}"))
    scale = min(1.0, c / (norm + 1e-6))
    for g, h in zip(raw, clipped):
        torch.testing.assert_close(h, g * scale, rtol=1e-5, atol=1e-9)
    if clip_factor < 1:  # some tensors have norms below c: per-tensor clipping would leave them alone
        assert min(float(g.norm()) for g in raw) < c


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (none on PATH)")
def test_compiled_network_trains_to_the_eager_losses(tmp_path, monkeypatch):
    """train.compile=true compiles a one-block MLP (no fallback warning, one compiled graph at least) and 8 steps
    give the eager losses and weights to float32 rounding (the compiler fuses and reorders float ops): measured
    within 1e-6 relative; required 1e-4 (losses) and 1e-4 absolute on weights of size ~0.1. The compilation
    takes about 25 s of CPU with an empty inductor cache (compiling in this process: no worker pool)."""
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    torch._dynamo.reset()
    runs = {}
    for mode in ("eager", "compiled"):
        tr = toy_trainer(tmp_path / mode, f"train.compile={mode == 'compiled'}", "model.mlp.num_blocks=1",
                         "model.mlp.hidden=32")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [float(tr.train_step(tr.sampler.next_batch())) for _ in range(8)]
        assert not [w for w in caught if "training eagerly" in str(w.message)], [str(w.message) for w in caught]
        runs[mode] = (losses, [p.detach().clone() for p in tr.net.parameters()], tr)
    compiled = runs["compiled"][2]
    assert isinstance(compiled.train_net, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(torch.tensor(runs["compiled"][0]), torch.tensor(runs["eager"][0]), rtol=1e-4, atol=0)
    for a, b in zip(runs["compiled"][1], runs["eager"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
