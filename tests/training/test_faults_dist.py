"""Faults of data-parallel runs, with 2 gloo processes set up as torchrun sets them up (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment, so the trainer creates the process group itself): torchrun's shutdown
SIGTERM to every process resumes exactly, rank 0 holds the run lock, and a frozen peer ends the run with a clear
error after train.dist_timeout_s instead of hanging it."""
import json
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.data import TensorImageDataset
from torchdiffusion.training import Hook, Trainer
from torchdiffusion.training.guard import LOCK_NAME, RunLock, RunLockError
from torchdiffusion.training.trainer import PeerFailure

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
RUN = ["train.steps=6", "train.ckpt_every=2", "train.dist_timeout_s=30"]  # a hang fails in 30 s


def tiny_dataset():
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g), name="rand")


def tiny_cfg(out_dir, *over):
    return load_config(None, [
        f"out_dir={out_dir}", "name=ddp", "model.unet.image_size=8", "model.unet.channels=8",
        "model.unet.channel_mult=[1, 2]", "model.unet.attn_resolutions=[]", "model.unet.mid_attention=false",
        "model.unet.norm_groups=4", "train.batch_size=8", "train.lr=0.003", "train.warmup_steps=0",
        "train.ema_decay=0.9", "train.log_every=1", "train.sample_every=0", "train.threads=1", *over])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


class _AtCall:
    """The run's objective with an action before its k-th call."""

    def __init__(self, objective, k, action):
        self.objective, self.k, self.action, self.calls = objective, k, action, 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            self.action()
        return self.objective(*args, **kwargs)


class _LockProbe(Hook):
    """Rank 0 (the only one that runs hooks) records who holds the run lock."""

    every = 1

    def __init__(self, out):
        self.out = out

    def __call__(self, trainer):
        (self.out / "lock_holder").write_text((trainer.run_dir / LOCK_NAME).read_text())


def _shutdown_worker(rank, port, out):
    torchrun_env(rank, 2, port)
    (out / f"pid{rank}").write_text(str(os.getpid()))
    Trainer(tiny_cfg(out / "ref", *RUN), dataset=tiny_dataset(), progress=False).fit()
    tr = Trainer(tiny_cfg(out / "run", *RUN), dataset=tiny_dataset(), progress=False, hooks=[_LockProbe(out)])
    if rank == 0:  # torchrun's shutdown: SIGTERM to every worker at once, here in the forward of step 3
        pids = [int((out / f"pid{r}").read_text()) for r in (0, 1)]
        tr.objective = _AtCall(tr.objective, 3, lambda: [os.kill(p, signal.SIGTERM) for p in pids])
    try:
        tr.fit()
        (out / f"result{rank}").write_text("finished")
    except KeyboardInterrupt:
        (out / f"result{rank}").write_text(f"interrupted at {tr.step}")
    Trainer(tiny_cfg(out / "run", *RUN), dataset=tiny_dataset(), progress=False).fit()  # the restart
    try:
        Trainer(tiny_cfg(out / "held", *RUN), dataset=tiny_dataset(), progress=False)
        (out / f"held{rank}").write_text("accepted")
    except RunLockError as e:
        (out / f"held{rank}").write_text(str(e))
    dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's finalisation: see tests/latent/test_autoencoder_ddp.py (a torch shutdown race)


def test_torchrun_shutdown_sigterm_resumes_exactly_and_rank0_holds_the_lock(tmp_path):
    held = RunLock.acquire(tmp_path / "held" / "ddp")  # another run holds this folder
    try:
        mp.spawn(_shutdown_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    finally:
        held.release()
    assert [(tmp_path / f"result{r}").read_text() for r in (0, 1)] == ["interrupted at 3"] * 2
    ref = load_checkpoint(tmp_path / "ref" / "ddp" / "checkpoints" / "last.safetensors")
    run = load_checkpoint(tmp_path / "run" / "ddp" / "checkpoints" / "last.safetensors")
    assert ref[0]["step"] == run[0]["step"] == 6 and ref[0]["sampler"] == run[0]["sampler"]
    for group in ("model", "ema", "optim"):
        for k in ref[1][group]:
            assert torch.equal(ref[1][group][k], run[1][group][k]), (group, k)
    assert json.loads((tmp_path / "lock_holder").read_text())["pid"] == int((tmp_path / "pid0").read_text())
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in (tmp_path / "held0").read_text()
    assert "rank 0 could not open" in (tmp_path / "held1").read_text()


def _frozen_worker(rank, port, out):
    torchrun_env(rank, 2, port)
    (out / f"pid{rank}").write_text(str(os.getpid()))
    tr = Trainer(tiny_cfg(out, *RUN, "train.dist_timeout_s=3"), dataset=tiny_dataset(), progress=False)
    if rank == 1:  # a frozen peer: stopped in the forward of step 4
        tr.objective = _AtCall(tr.objective, 4, lambda: os.kill(os.getpid(), signal.SIGSTOP))
    try:
        tr.fit()
    except PeerFailure as e:
        (out / f"error{rank}").write_text(str(e))
    os._exit(0)  # the process group cannot be shut down cleanly with a frozen member


def test_a_frozen_peer_fails_the_run_after_the_timeout_with_the_last_step_saved(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_frozen_worker, args=(r, port, tmp_path)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        procs[0].join(120)
        assert procs[0].exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    message = (tmp_path / "error0").read_text()
    assert "train.dist_timeout_s=3 s at step 3" in message and "saved" in message and "\n" not in message
    meta, groups = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors")
    # the state of step 3, the last completed one: its data position too, though step 4's batch was drawn
    assert meta["step"] == 3 and (meta["sampler"]["epoch"], meta["sampler"]["position"]) == (0, 3)
