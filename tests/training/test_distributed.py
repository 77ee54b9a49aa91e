"""Data-parallel training: 2 processes (gloo, torch.multiprocessing) train to the same weights as 1 process
with the same global batch, write one checkpoint, and a 1-process run continues their checkpoint exactly."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.data import TensorImageDataset
from torchdiffusion.training.distributed import DistInfo, per_rank_batch
from torchdiffusion.training import Trainer

TOL = 1e-5  # float32 all-reduce sums the two halves of the batch gradient in another order than one process


def tiny_dataset():
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g), name="rand")


def tiny_cfg(out_dir, *over):
    return load_config(None, [
        f"out_dir={out_dir}", "name=ddp", "data.flip=true", "model.unet.image_size=8", "model.unet.channels=8",
        "model.unet.channel_mult=[1, 2]", "model.unet.attn_resolutions=[4]", "model.unet.num_heads=2",
        "model.unet.norm_groups=4", "train.batch_size=8", "train.lr=0.003", "train.warmup_steps=0",
        "train.lr_schedule=constant", "train.ema_decay=0.9", "train.log_every=1", "train.sample_every=0",
        "train.ckpt_every=0", "train.threads=1", *over])


def _worker(rank, world, init_file, out_dir, over):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Trainer(tiny_cfg(out_dir, *over), dataset=tiny_dataset(), progress=False).fit()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's finalisation: see tests/latent/test_autoencoder_ddp.py (a torch shutdown race)


def _groups(out_dir):
    return load_checkpoint(out_dir / "ddp" / "checkpoints" / "last.safetensors")


def _assert_close(a, b, groups=("model", "ema")):
    for group in groups:
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], atol=TOL, rtol=TOL, msg=f"{group} {k}")


# VDM (uniform times, the split-independent choice): the learned schedule is a submodule of the network, so its
# gradients (the ELBO's for the endpoints, the squared loss's for the interior) are all-reduced with the rest
VDM = ["diffusion.schedule=vp", "diffusion.objective.kind=vdm", "diffusion.objective.vdm.t_sampling=uniform",
       "diffusion.objective.vdm.hidden=16"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("objective", [[], VDM], ids=["simple", "vdm"])
def test_two_processes_match_one_and_resume_on_one(tmp_path, objective):
    # 2 processes x 4 examples, each in 2 micro-batches (DDP no_sync on the first), 3 steps
    over = ["train.steps=3", "train.grad_accum=2", *objective]
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), over), nprocs=2, join=True)
    meta2, two = _groups(tmp_path / "two")
    assert meta2["step"] == 3 and meta2["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "ddp" / "checkpoints").iterdir()) == \
        ["best.safetensors", "last.safetensors"]  # written once, by rank 0
    if objective:
        assert any(k.startswith("vdm_gamma.") for k in two["model"])

    ref = Trainer(tiny_cfg(tmp_path / "one", "train.steps=3", *objective), dataset=tiny_dataset(), progress=False)
    ref.fit()
    _assert_close(two, _groups(tmp_path / "one")[1], ("model", "ema", "optim"))

    # continue both to step 6 in one process: the 2-process checkpoint resumes like the 1-process one
    for name in ("one", "two"):
        tr = Trainer(tiny_cfg(tmp_path / name, "train.steps=6", *objective), dataset=tiny_dataset(), progress=False)
        assert tr.step == 3
        tr.fit()
    _assert_close(_groups(tmp_path / "two")[1], _groups(tmp_path / "one")[1])


def test_per_rank_batch_checks_divisibility():
    assert per_rank_batch(8, DistInfo(rank=1, world_size=2)) == 4
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        per_rank_batch(8, DistInfo(rank=0, world_size=3))
    with pytest.raises(ValueError, match="grad_accum"):
        per_rank_batch(8, DistInfo(rank=0, world_size=2), grad_accum=5)


def test_single_process_without_torchrun_env(monkeypatch):
    from torchdiffusion.training.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed()
    assert info == DistInfo() and info.is_main and not info.enabled and not dist.is_initialized()
