"""The training-speed benchmark: FLOP accounting and its report (no timing assertions)."""
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.build import build_module
from torchdiffusion.nets import unet
from torchdiffusion.training import trainer


def test_step_flops_are_forward_plus_twice_forward(tmp_path, bench):
    """Backward of a conv / linear layer costs two forwards (input and weight gradients), except the first
    conv, whose input needs no gradient: forward + backward lies in (2.5, 3] x forward for a U-Net."""
    speed = bench("train_speed")
    cfg = speed.bench_config("tiny")
    den = build_module(cfg)
    with FlopCounterMode(display=False) as c, torch.no_grad():
        den(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 5.0]))
    ratio = speed.step_flops(cfg, str(tmp_path)) / (c.get_total_flops() / 2)
    assert 2.5 < ratio <= 3.0, ratio


def test_benchmark_report(tmp_path, capsys, bench):
    main = bench("train_speed").main
    out = tmp_path / "speed.json"
    assert main(["--configs", "tiny", "--dtypes", "fp32", "--layouts", "contiguous", "--steps", "1", "--warmup", "0", "--rounds", "2",
                 "--matmul-n", "128", "--json", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["config"] == "tiny" and row["batch"] == 32 and row["images_per_s"] > 0 and row["timed_steps"] == 2
    assert abs(row["achieved_gflops"] - row["images_per_s"] * row["gflop_per_image"]) < 0.05 * row["achieved_gflops"] + 0.1
    assert abs(row["ratio"] - row["achieved_gflops"] / row["peak_gflops"]) < 0.01
    assert "GFLOP/img" in capsys.readouterr().out


def test_stock_kernels_compute_the_same_step_and_are_restored(tmp_path, bench):
    """The 'before' rows swap in PyTorch's stock GroupNorm, attention and per-parameter AdamW: same math, so
    the same gradients (bf16 channels-last, where our fast paths differ most), and everything restored after."""
    from dataclasses import replace

    speed = bench("train_speed")
    make_trainer, stock_kernels = speed.make_trainer, speed.stock_kernels
    train = trainer

    cfg = speed.bench_config("tiny")
    cfg = replace(cfg, train=replace(cfg.train, precision="bf16", channels_last=True, batch_size=4))
    before = unet.GroupNorm.forward, unet.attention, train._adamw
    grads = []
    for stock in (False, True):
        with stock_kernels() if stock else __import__("contextlib").nullcontext():
            tr = make_trainer(cfg, str(tmp_path / str(stock)))
            if stock:
                assert unet.attention is torch.nn.functional.scaled_dot_product_attention
                assert not tr.opt.defaults.get("fused") and not tr.opt.defaults.get("foreach")
            tr.net.zero_grad()
            tr._gradients(torch.arange(4))
            grads.append(torch.cat([p.grad.flatten().float() for p in tr.net.parameters() if p.grad is not None]))
    assert (unet.GroupNorm.forward, unet.attention, train._adamw) == before
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 0.05, rel


def test_class_conditional_presets_get_labels(tmp_path, bench):
    """The benchmark's random data carries labels when the model is class-conditional (the demo and mnist-10min
    presets are), and the class embedding adds no model FLOPs worth counting."""
    from dataclasses import replace

    bench_config, step_flops = bench("train_speed").bench_config, bench("train_speed").step_flops
    for name in ("demo", "mnist-10min"):
        cfg = bench_config(name)
        assert cfg.model.unet.num_classes == 10
        uncond = replace(cfg, model=replace(cfg.model, unet=replace(cfg.model.unet, num_classes=None)),
                         diffusion=replace(cfg.diffusion, objective=replace(cfg.diffusion.objective, cond_drop_prob=0.0)))
        f_cond, f_uncond = step_flops(cfg, str(tmp_path / name)), step_flops(uncond, str(tmp_path / (name + "u")))
        assert abs(f_cond / f_uncond - 1) < 1e-3, (f_cond, f_uncond)
