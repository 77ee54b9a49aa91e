"""The learning-rate schedule over the time budget (train.lr_schedule_over=time): warm-up and cosine as functions of
the elapsed training time over train.max_minutes, the final learning rate at the budget whatever the step rate, and
a run stopped and continued that is the run never stopped, bit for bit. The trainer's clock is simulated: a real
one would make every figure depend on the machine."""
import math
import time

import pytest
import torch

from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import ConfigError, TrainConfig, load_config, presets
from torchdiffusion.training import Hook, Trainer, lr_at, read_metrics
from torchdiffusion.training import trainer as trainer_mod
from torchdiffusion.training.trainer import lr_at_fraction

MINUTES = 0.05             # the budget: 3 s of simulated training time (60 * 0.05 is 3.0 exactly)
BUDGET_S = 60 * MINUTES
STEPS, WARMUP = 80, 10     # train.steps is only an upper bound here; warm-up over the first 1/8 of the budget
FAST, SLOW = 0.125, 0.25   # simulated seconds per step, exact in binary (so are the sums of step times)


def cfg(out, *over):
    """tiny (a small U-Net on 512 MNIST digits) with small batches, on the time-based schedule."""
    return load_config("tiny", [f"out_dir={out}", f"train.steps={STEPS}", f"train.warmup_steps={WARMUP}",
                                "train.batch_size=16", "train.ckpt_every=0", "train.log_every=5",
                                "train.lr_schedule_over=time", f"train.max_minutes={MINUTES}", *over])


class SimClock:
    """A clock that moves on `dt` seconds at each reading, so every timed step takes exactly dt (a power of two:
    the sums of step times are exact)."""

    def __init__(self, dt: float):
        self.dt, self.now = dt, 0.0

    def __call__(self) -> float:
        self.now += self.dt
        return self.now


class LrLog(Hook):
    """The learning rate each step trained with (the hook runs after step k, which used param_groups' lr)."""

    every = 1

    def __init__(self):
        self.lrs = []

    def __call__(self, trainer):
        self.lrs.append(trainer.opt.param_groups[0]["lr"])




def run(out, dt, *over, hooks=(), **kwargs):
    tr = Trainer(cfg(out, *over), progress=False, hooks=hooks, **kwargs)
    tr.clock = SimClock(dt)
    return tr, tr.fit()


def test_lr_at_fraction_warms_up_over_the_share_of_the_steps_then_decays_to_the_floor_at_the_budget():
    """Closed forms: linear warm-up to lr over w = warmup_steps / steps of the budget, cosine from lr at w to
    min_lr_ratio * lr at 1 (half way at (1 + w) / 2), the floor after the budget; constant stays at lr."""
    t = TrainConfig(steps=STEPS, warmup_steps=WARMUP, lr=2e-3, min_lr_ratio=0.05)
    floor = 0.05 * 2e-3
    w = WARMUP / STEPS
    assert lr_at_fraction(0.0, t) == 0.0
    assert lr_at_fraction(w / 4, t) == pytest.approx(2e-3 / 4, rel=1e-12)
    assert lr_at_fraction(w * (1 - 1e-9), t) < 2e-3  # still warming up just before w, at the peak at w
    assert lr_at_fraction(w, t) == pytest.approx(2e-3, rel=1e-12)
    assert lr_at_fraction((1 + w) / 2, t) == pytest.approx(floor + (2e-3 - floor) / 2, rel=1e-12)
    assert lr_at_fraction(1.0, t) == pytest.approx(floor, rel=1e-12) == lr_at_fraction(1.7, t)
    grid = [w + (1 - w) * i / 50 for i in range(51)]
    assert all(lr_at_fraction(a, t) > lr_at_fraction(b, t) for a, b in zip(grid, grid[1:]))
    # the warm-up share follows train.steps (the YAML's numbers keep their meaning): twice the steps, half the share
    t2 = TrainConfig(steps=2 * STEPS, warmup_steps=WARMUP, lr=2e-3)
    assert lr_at_fraction(w / 2, t2) == pytest.approx(2e-3, rel=1e-12) and lr_at_fraction(w / 4, t2) < 2e-3
    # no warm-up: the cosine from the start; constant: lr after the warm-up, to the budget and after it
    assert lr_at_fraction(0.0, TrainConfig(steps=STEPS, warmup_steps=0, lr=2e-3)) == pytest.approx(2e-3, rel=1e-12)
    const = TrainConfig(steps=STEPS, warmup_steps=WARMUP, lr=2e-3, lr_schedule="constant")
    assert [lr_at_fraction(f, const) for f in (w / 2, w, 0.5, 1.0, 2.0)] == pytest.approx([1e-3] + [2e-3] * 4,
                                                                                          rel=1e-12)
    # warm-up as long as the steps: warm-up over the whole budget
    assert lr_at_fraction(0.5, TrainConfig(steps=10, warmup_steps=10, lr=2e-3)) == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize("schedule, warmup", [("cosine", 10), ("cosine", 0), ("constant", 10)])
def test_lr_at_is_the_step_schedule_of_before(schedule, warmup):
    """lr_at (train.lr_schedule_over=steps) against the step schedule written out here: warm-up lr (k+1)/K,
    then floor + (lr - floor)(1 + cos(pi p))/2 with p = (k - K)/(steps - K), or lr (constant)."""
    t = TrainConfig(steps=STEPS, warmup_steps=warmup, lr=3e-3, min_lr_ratio=0.1, lr_schedule=schedule)
    floor = 0.1 * 3e-3
    for k in range(STEPS + 5):
        if k < warmup:
            want = 3e-3 * (k + 1) / warmup
        elif schedule == "constant":
            want = 3e-3
        else:
            want = floor + (3e-3 - floor) * (1 + math.cos(math.pi * min(1.0, (k - warmup) / (STEPS - warmup)))) / 2
        assert lr_at(k, t) == pytest.approx(want, rel=1e-12), k


def test_the_step_schedule_ignores_the_clock(tmp_path):
    """lr_schedule_over=steps (the default): each step's learning rate is lr_at(step), and the run goes to
    train.steps, however slow the clock says the steps are (1000 s each, a 60-minute budget). A preset on the time
    schedule has a budget for it."""
    assert TrainConfig().lr_schedule_over == "steps"
    timed = [p for p in presets() if load_config(p).train.lr_schedule_over == "time"]
    assert all(load_config(p).train.max_minutes > 0 for p in timed)
    log = LrLog()
    tr, summary = run(tmp_path, 1000.0, "train.steps=8", "train.warmup_steps=3", "train.lr_schedule_over=steps",
                      "train.max_minutes=60", hooks=[log])
    assert summary["steps"] == 8 and not summary["stopped_early"] and summary["train_seconds"] == 8000.0
    assert log.lrs == [lr_at(k, tr.cfg.train) for k in range(8)]


def test_the_time_schedule_ends_at_the_final_lr_at_the_budget_whatever_the_step_rate(tmp_path):
    """Steps of 0.25 s and of 0.125 s: 12 and 24 steps in the 3 s budget, each at lr_at_fraction of the training
    time before it; both runs have the same learning rate at the same time, warm up over the first 0.375 s and end
    within one step of the floor (the schedule at the budget is the floor), with a checkpoint at the end."""
    runs = {}
    for dt in (SLOW, FAST):
        log = LrLog()
        tr, summary = run(tmp_path / str(dt), dt, hooks=[log])
        runs[dt] = log.lrs
        t, n = tr.cfg.train, int(BUDGET_S / dt)
        assert summary["steps"] == n and not summary["stopped_early"] and summary["train_seconds"] == BUDGET_S
        assert log.lrs == [lr_at_fraction(k * dt / BUDGET_S, t) for k in range(n)]
        floor, w = t.min_lr_ratio * t.lr, WARMUP / STEPS
        assert tr.schedule_fraction == 1.0 and tr.scheduled_lr() == pytest.approx(floor, rel=1e-12)
        # the last step starts dt before the budget: (lr - floor) sin^2(pi/2 * dt / (budget (1 - w))) above the floor
        assert 0 < log.lrs[-1] - floor <= (t.lr - floor) * (math.pi / 2 * dt / (BUDGET_S * (1 - w))) ** 2
        peak = math.ceil(w * BUDGET_S / dt - 1e-9)  # the first step that starts at or after the end of the warm-up
        for k in range(peak):  # warm-up: lr times the training time over w * budget (0.375 s)
            assert log.lrs[k] == pytest.approx(t.lr * k * dt / (w * BUDGET_S), rel=1e-12, abs=1e-15), k
        assert max(log.lrs) == log.lrs[peak] <= t.lr
        assert all(a > b for a, b in zip(log.lrs[peak:], log.lrs[peak + 1:]))
        meta, _ = load_checkpoint(tr.ckpt_dir / "last.safetensors")
        assert meta["step"] == n and meta["train_seconds"] == BUDGET_S
        records = [m for m in read_metrics(tr.run_dir / "logs") if "schedule" in m]
        assert records[-1]["step"] == n and records[-1]["schedule"] == 1.0
    assert runs[FAST][::2] == runs[SLOW]  # the same learning rate at the same training time
    assert runs[FAST][3] == pytest.approx(1e-3, rel=1e-12)  # the 4th fast step starts at 0.375 s, at the peak lr


def test_the_log_line_shows_the_learning_rate_and_the_share_of_the_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_mod, "LOG_LINE_EVERY_S", 0)
    tr, _ = run(tmp_path, SLOW, log_lines=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    lr = tr.opt.param_groups[0]["lr"]  # the last step's
    assert last.startswith(f"step 12/{STEPS} ") and f"lr {lr:.3g}" in last and "3/3 s of training (100%)" in last


def test_a_time_schedule_run_stopped_and_continued_is_the_run_never_stopped(interrupt_at, tmp_path):
    """Ctrl-C after step 8 of 12 (between checkpoints), then the same command: last and best hold the model, EMA,
    optimizer and random stream of the run never stopped, bit for bit (the checkpoint records the training time
    spent, 2 s, and the continuation goes on from it); a third start trains nothing (the budget is spent)."""
    over = ("train.ckpt_every=6", "model.unet.dropout=0.1")
    run(tmp_path / "a", SLOW, *over)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", SLOW, *over, hooks=[interrupt_at(8)])
    meta, _ = load_checkpoint(tmp_path / "b" / "tiny" / "checkpoints" / "last.safetensors")
    assert meta["step"] == 8 and meta["train_seconds"] == 2.0
    tr, summary = run(tmp_path / "b", SLOW, *over)
    assert summary["steps"] == 12 and summary["steps_this_run"] == 4
    for name in ("last", "best"):
        (ma, ga), (mb, gb) = (load_checkpoint(tmp_path / r / "tiny" / "checkpoints" / f"{name}.safetensors")
                              for r in ("a", "b"))
        for key in ("step", "train_seconds", "best_val", "sampler", "ema_updates"):
            assert ma[key] == mb[key], (name, key)
        for group in ("model", "ema", "optim", "rng"):
            assert ga[group].keys() == gb[group].keys() and ga[group]
            for k in ga[group]:
                assert torch.equal(ga[group][k], gb[group][k]), (name, group, k)
    assert run(tmp_path / "b", SLOW, *over)[1]["steps_this_run"] == 0


def test_the_time_schedule_needs_a_budget_and_the_choice_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_minutes.*train\.max_minutes=10.*train\.lr_schedule_over=steps"):
        load_config("tiny", ["train.lr_schedule_over=time"])
    with pytest.raises(ConfigError, match=r"train\.lr_schedule_over 'minutes'; allowed values: 'steps', 'time'"):
        load_config("tiny", ["train.lr_schedule_over=minutes", "train.max_minutes=10"])
    assert load_config("tiny", ["train.lr_schedule_over=time", "train.max_minutes=10"]).train.lr_schedule_over == "time"


def test_the_cpu_clock_counts_the_cpu_time_of_the_steps_not_the_waits(tmp_path, monkeypatch):
    """train.clock=cpu: train_seconds is this process's CPU time over the steps, so time the CPU spends on other jobs
    (here a step that waits 0.05 s without working) does not eat the budget; the wall clock counts the wait."""
    wait = 0.05

    def waiting_step(self, batch):
        time.sleep(wait)
        return torch.zeros(())

    seconds = {}
    for clock in ("wall", "cpu"):
        tr = Trainer(cfg(tmp_path / clock, f"train.clock={clock}"), progress=False)
        assert tr.clock is Trainer.CLOCKS[clock]
        monkeypatch.setattr(Trainer, "train_step", waiting_step)
        for _ in range(4):
            tr._timed_step()
        monkeypatch.undo()
        seconds[clock] = tr.train_seconds
        tr.close()
    assert seconds["wall"] >= 4 * wait
    assert seconds["cpu"] < 0.5 * 4 * wait  # the waits cost no CPU time (what is left: the batch and timing code)


def test_the_cpu_clock_needs_the_time_schedule_and_the_choice_is_checked():
    with pytest.raises(ConfigError, match=r"train\.clock='cpu'.*train\.lr_schedule_over=time.*train\.clock=wall"):
        load_config("tiny", ["train.clock=cpu", "train.max_minutes=10"])
    with pytest.raises(ConfigError, match=r"train\.clock 'gpu'; allowed values: 'wall', 'cpu'"):
        load_config("tiny", ["train.clock=gpu", "train.lr_schedule_over=time", "train.max_minutes=10"])
    assert load_config("tiny", ["train.clock=cpu", "train.lr_schedule_over=time",
                                "train.max_minutes=10"]).train.clock == "cpu"
