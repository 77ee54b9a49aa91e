"""A run stopped by Ctrl-C (SIGINT) or SIGTERM at any point, then started again, ends with the weights, EMA and
optimizer state of a run never stopped, bit for bit; the checkpoint written at the stop holds the last completed
step. (The 2-process torchrun case is in test_faults_dist.py.)"""
import os
import signal

import pytest
import torch

from torchdiffusion import checkpoint as ckpt_mod
from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.training import Hook, Trainer
from torchdiffusion.training import guard

STEPS, CKPT_EVERY = 20, 8


def cfg(out, *over):
    """toy2d with dropout (so the random stream must resume too), a checkpoint every 8 steps, a log every 4."""
    return load_config("toy2d", [f"out_dir={out}", f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}",
                                 "train.log_every=4", "train.batch_size=64", "model.mlp.dropout=0.1",
                                 "train.warmup_steps=3", *over])


def groups(out, name="last"):
    return load_checkpoint(out / "toy2d" / "checkpoints" / f"{name}.safetensors")


def assert_same_run(a, b):
    """Model, EMA and optimizer tensors of last and best, and their steps, bit for bit."""
    for name in ("last", "best"):
        (ma, ga), (mb, gb) = groups(a, name), groups(b, name)
        assert ma["step"] == mb["step"] and ma["best_val"] == mb["best_val"] and ma["sampler"] == mb["sampler"]
        for group in ("model", "ema", "optim", "rng"):
            assert ga[group].keys() == gb[group].keys()
            for k in ga[group]:
                assert torch.equal(ga[group][k], gb[group][k]), (name, group, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    Trainer(cfg(out), progress=False).fit()
    return out


class _Objective:
    """The run's objective with an action at its k-th call (forward), or in the backward of that call."""

    def __init__(self, objective, k, action, in_backward=False):
        self.objective, self.k, self.action, self.in_backward, self.calls = objective, k, action, in_backward, 0

    def __getattr__(self, name):  # per_sample (validation) and the rest
        return getattr(self.objective, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k and not self.in_backward:
            self.action()
        loss = self.objective(*args, **kwargs)
        if self.calls == self.k and self.in_backward:
            loss.register_hook(lambda g: self.action() or g)
        return loss


class _At(Hook):
    """A hook that runs an action at one step."""

    every = 1

    def __init__(self, step, action):
        self.step, self.action = step, action

    def __call__(self, trainer):
        if trainer.step == self.step:
            self.action()


def arm(tr, point: str, step: int, action, monkeypatch) -> None:
    """Make `action` happen at `point` of step `step` (1-based) of trainer `tr`."""
    if point == "before the step":
        draw = tr.sampler.next_batch
        tr.sampler.next_batch = lambda: (action() if tr.step == step - 1 else None, draw())[1]
    elif point in ("objective", "backward"):
        tr.objective = _Objective(tr.objective, step - tr.step, action, in_backward=point == "backward")
    elif point == "optimizer step":
        opt_step = tr.opt.step
        tr.opt.step = lambda *a, **k: (action() if tr.step == step - 1 else None, opt_step(*a, **k))[1]
    elif point == "checkpoint write":
        write = ckpt_mod.save_file
        monkeypatch.setattr(ckpt_mod, "save_file",
                            lambda *a, **k: (action() if tr.step == step else None, write(*a, **k))[1])
    elif point == "hook":
        tr.hooks.append(_At(step, action))


def kill(sig):
    return lambda: os.kill(os.getpid(), sig)


POINTS = [("before the step", signal.SIGINT, 5), ("objective", signal.SIGTERM, 6), ("backward", signal.SIGINT, 11),
          ("optimizer step", signal.SIGTERM, 13), ("checkpoint write", signal.SIGTERM, 8), ("hook", signal.SIGINT, 16)]


@pytest.mark.parametrize("point, sig, step", POINTS, ids=[p[0] for p in POINTS])
def test_a_signal_anywhere_saves_the_completed_step_and_resumes_exactly(tmp_path, reference, monkeypatch, capfd,
                                                                       point, sig, step):
    tr = Trainer(cfg(tmp_path), progress=False)
    arm(tr, point, step, kill(sig), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    monkeypatch.undo()
    assert "interrupted at step" in capfd.readouterr().err
    meta, _ = groups(tmp_path)
    assert meta["step"] == step  # the step the signal came in finished, and nothing after it was done
    Trainer(cfg(tmp_path), progress=False).fit()
    assert_same_run(reference, tmp_path)


def test_four_signals_in_one_run_still_resume_exactly(tmp_path, reference, monkeypatch):
    """Stopped four times (SIGTERM in a forward, SIGINT during a checkpoint write, SIGTERM in AdamW, SIGINT in a
    hook), continued after each: the same run as one never stopped."""
    for point, sig, step in (("objective", signal.SIGTERM, 3), ("checkpoint write", signal.SIGINT, 8),
                             ("optimizer step", signal.SIGTERM, 9), ("hook", signal.SIGINT, 17)):
        tr = Trainer(cfg(tmp_path), progress=False)
        arm(tr, point, step, kill(sig), monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            tr.fit()
        monkeypatch.undo()
    assert Trainer(cfg(tmp_path), progress=False).fit()["steps"] == STEPS
    assert_same_run(reference, tmp_path)


def test_a_signal_repeated_within_moments_is_one_stop_and_a_later_one_forces(tmp_path, monkeypatch, capfd):
    """Launchers often forward one stop twice: a second signal right after the first changes nothing. A second
    signal after FORCE_AFTER_S stops at once, inside the hook it came in, without writing a checkpoint."""
    tr = Trainer(cfg(tmp_path), progress=False)
    arm(tr, "objective", 5, lambda: (os.kill(os.getpid(), signal.SIGTERM), os.kill(os.getpid(), signal.SIGTERM)),
        monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert groups(tmp_path)[0]["step"] == 5
    monkeypatch.setattr(guard, "FORCE_AFTER_S", 0.0)
    tr = Trainer(cfg(tmp_path), progress=False)
    before = (tmp_path / "toy2d" / "checkpoints" / "last.safetensors").read_bytes()
    arm(tr, "hook", 10, lambda: (os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGINT)),
        monkeypatch)
    with pytest.raises(KeyboardInterrupt) as info:
        tr.fit()
    assert type(info.value) is KeyboardInterrupt and "without saving" in str(info.value)
    assert "stopped at once, not saved" in capfd.readouterr().err
    # the periodic checkpoint of step 8 is on disk; nothing was written at step 10
    assert (tmp_path / "toy2d" / "checkpoints" / "last.safetensors").read_bytes() != before
    assert groups(tmp_path)[0]["step"] == 8
