"""Every new backbone as a first-class network: gradients reach every parameter, bf16 and channels-last agree with
fp32, and train -> checkpoint -> resume -> sample (with classifier-free guidance) runs through the project's own
trainer, checkpoints and samplers."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchdiffusion.build import load_denoiser
from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.data import TensorImageDataset
from torchdiffusion.nets import build_net
from torchdiffusion.sampling import generate
from torchdiffusion.training import Trainer

DIT = dict(image_size=8, patch_size=2, depth=2, hidden_size=32, num_heads=2, num_classes=3)
UVIT = dict(image_size=8, patch_size=2, depth=3, hidden_size=32, num_heads=2, num_classes=3)
UNET = dict(image_size=8, channels=8, channel_mult=(1, 2), attn_resolutions=(8, 4), num_heads=2, norm_groups=4,
            num_classes=3)
CASES = {  # name -> (kind, config fields)
    "dit": ("dit", dict(DIT, context_dim=5, decoder_depth=1, learn_sigma=True)),
    "dit-adaln": ("dit", dict(DIT, conditioning="adaln")),
    "dit-in-context": ("dit", dict(DIT, conditioning="in_context", context_dim=5)),
    "dit-cross-attention": ("dit", dict(DIT, conditioning="cross_attention", context_dim=5)),
    "uvit": ("uvit", dict(UVIT, context_dim=5, mlp_time_embed=True)),
    "unet-convnext": ("unet", dict(UNET, block="convnext")),
    "unet-window": ("unet", dict(UNET, attention="window", window_size=4)),
    "unet-dynamic": ("unet", dict(UNET, dynamic_conv_kernels=3)),
    "unet-convnext-dynamic": ("unet", dict(UNET, block="convnext", dynamic_conv_kernels=2)),
    "unet-cross": ("unet", dict(UNET, context_dim=5, cross_attn_resolutions=(4,))),
}


def make(name):
    kind, fields = CASES[name]
    torch.manual_seed(0)
    return build_net(kind, **fields)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 999, torch.arange(n) % 3


def training_kwargs(name, n):
    """What a training step passes: class labels, and MaskDiT's token mask for the DiT with a decoder."""
    if name == "dit":
        return {"token_mask": torch.rand(n, 16, generator=torch.Generator().manual_seed(2)).argsort(1).argsort(1) >= 8}
    return {}


def randomize_zeros(net):
    """Small random values for the zero-initialised parameters (adaLN-Zero, zero output layers), which otherwise
    block the gradient of everything before them for the first steps."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_reach_every_parameter(name):
    """Called as the trainer calls them (labels, no context: the null context entry; MaskDiT's token mask), every
    parameter gets a non-zero gradient (data-parallel training needs every parameter in every step's graph)."""
    net = randomize_zeros(make(name))
    x, t, y = batch()
    (net(x, t, class_labels=y, **training_kwargs(name, 4)) - x).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_channels_last_close_to_fp32(name):
    """bf16 has an 8-bit mantissa (~0.4% per op): the output of a net with trained-like (non-zero) weights stays
    within 5% in relative L2 norm under autocast with channels-last input, and equals fp32 in channels-last."""
    net = randomize_zeros(make(name)).eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = net(x, t, class_labels=y)
        net.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(net(xc, t, class_labels=y), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(xc, t, class_labels=y).float()
    assert ref.abs().max() > 0 and (out - ref).norm() / ref.norm() < 0.05


# -------------------------------------------------------------------------------- through the trainer
RUNS = {  # name -> overrides of a tiny class-conditional run on 8x8 images
    "dit": ["model.kind=dit", "model.dit.image_size=8", "model.dit.patch_size=2", "model.dit.depth=2",
            "model.dit.hidden_size=16", "model.dit.num_heads=2", "model.dit.num_classes=3"],
    "maskdit": ["model.kind=dit", "model.dit.image_size=8", "model.dit.patch_size=2", "model.dit.depth=2",
                "model.dit.hidden_size=16", "model.dit.num_heads=2", "model.dit.num_classes=3",
                "model.dit.decoder_depth=1", "diffusion.objective.mask_ratio=0.5",
                "diffusion.objective.mae_weight=0.1"],
    "uvit": ["model.kind=uvit", "model.uvit.image_size=8", "model.uvit.patch_size=2", "model.uvit.depth=3",
             "model.uvit.hidden_size=16", "model.uvit.num_heads=2", "model.uvit.num_classes=3",
             "model.uvit.context_dim=4"],
    "unet-options": ["model.unet.image_size=8", "model.unet.channels=8", "model.unet.channel_mult=[1, 2]",
                     "model.unet.attn_resolutions=[8, 4]", "model.unet.num_heads=2", "model.unet.norm_groups=4",
                     "model.unet.num_classes=3", "model.unet.block=convnext", "model.unet.attention=window",
                     "model.unet.window_size=4", "model.unet.dynamic_conv_kernels=2", "model.unet.context_dim=4",
                     "model.unet.cross_attn_resolutions=[4]"],
}


def tiny_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(32) % 3, 3, name="rand")


def run_cfg(out_dir, name, steps, *extra):
    return load_config(None, [
        f"out_dir={out_dir}", "name=run", "train.batch_size=8", "train.lr=0.003", "train.warmup_steps=0",
        "train.lr_schedule=constant", "train.ema_decay=0.9", "train.log_every=1", "train.sample_every=0",
        "train.ckpt_every=0", f"train.steps={steps}", "diffusion.objective.cond_drop_prob=0.2",
        "train.precision=bf16", *RUNS[name], *extra])


@pytest.mark.parametrize("name", list(RUNS))
def test_train_checkpoint_resume_sample(name, tmp_path):
    """4 steps in one run and 2 + 2 steps with a restart give the same weights, EMA and optimizer state (bf16,
    condition dropout, MaskDiT's masks: every random draw follows the step and the example);
    the checkpoint loads back to the trainer's EMA denoiser and samples with classifier-free guidance, with a
    padded context batched through the guidance for the networks that take one."""
    Trainer(run_cfg(tmp_path / "a", name, 4), dataset=tiny_data(), progress=False).fit()
    Trainer(run_cfg(tmp_path / "b", name, 2), dataset=tiny_data(), progress=False).fit()
    second = Trainer(run_cfg(tmp_path / "b", name, 4), dataset=tiny_data(), progress=False)
    assert second.step == 2
    second.fit()
    _, wa = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.safetensors")
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.safetensors"
    _, wb = load_checkpoint(ckpt)
    for group in ("model", "ema", "optim"):
        assert wa[group].keys() == wb[group].keys() and all(torch.equal(wa[group][k], wb[group][k])
                                                            for k in wa[group]), group
    den, cfg, _ = load_denoiser(ckpt)
    x, s = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0, 20.0])
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():  # the same weights in two module instances: equal up to kernel-level rounding
        torch.testing.assert_close(den(x, s, class_labels=y), second.ema_denoiser.eval()(x, s, class_labels=y),
                                   rtol=1e-5, atol=1e-5)
    cond = {}
    if "context_dim=4" in " ".join(RUNS[name]):
        lengths = torch.tensor([3, 1, 0, 2, 3, 1])  # padded contexts, one entirely masked
        cond = {"context": torch.randn(6, 3, 4), "context_mask": torch.arange(3) < lengths[:, None]}
    samples = generate(den, (1, 8, 8), n=6, sampler="dpmpp_2m", steps=4, guidance="cfg", guidance_scale=2.0,
                       class_label=-1, cond=cond)
    assert samples.shape == (6, 1, 8, 8) and torch.isfinite(samples).all()


def _ddp_worker(rank, world, init_file, out_dir, name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Trainer(run_cfg(out_dir, name, 3, "train.precision=fp32"), dataset=tiny_data(), progress=False).fit()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's finalisation: see tests/latent/test_autoencoder_ddp.py (a torch shutdown race)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_maskdit_on_two_processes_trains_the_weights_of_one(tmp_path):
    """DiT with MaskDiT's decoder under DistributedDataParallel (which refuses a parameter outside a step's graph)
    on 2 processes x 4 examples: the same weights as 1 process x 8 (to float32 all-reduce rounding), since every
    example's mask, noise and label dropout come from its own generator."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), "maskdit"), nprocs=2, join=True)
    Trainer(run_cfg(tmp_path / "one", "maskdit", 3, "train.precision=fp32"), dataset=tiny_data(),
            progress=False).fit()
    _, two = load_checkpoint(tmp_path / "two" / "run" / "checkpoints" / "last.safetensors")
    _, one = load_checkpoint(tmp_path / "one" / "run" / "checkpoints" / "last.safetensors")
    for group in ("model", "ema"):
        for k in one[group]:
            torch.testing.assert_close(two[group][k], one[group][k], rtol=1e-4, atol=1e-6, msg=f"{group} {k}")


def test_backbone_benchmark_counts_attention_and_grouped_convolutions(bench):
    """bench/backbones.py's FLOP accounting: attention as its two matmuls, 2 (N L^2 d) multiply-accumulates per
    head (torch's counter gives the CPU attention kernel 0), and a depthwise convolution's backward at twice its
    forward (torch's own formula counts the weight gradient as ungrouped)."""
    from torch.utils.flop_counter import FlopCounterMode

    bb = bench("backbones")
    q = torch.randn(2, 3, 10, 8)
    with bb.counted_attention(), FlopCounterMode(display=False) as c:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert c.get_total_flops() == 2 * 2 * (2 * 3 * 10 * 10 * 8)
    assert torch.nn.functional.scaled_dot_product_attention is not bb._attention_as_matmuls  # restored
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    fwd = 2 * 2 * 16 * 49 * 81
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: bb._conv_backward_flop}) as c:
        conv(x).sum().backward()
    assert c.get_total_flops() == 3 * fwd
