"""train.precision auto: the faster dtype of a time-boxed probe, cached per machine and shape, kept on resume.

The probe's clock is replaced by a virtual one that only the objective advances, by a cost per dtype the test
sets, so which dtype is "faster" is decided by the test, not by this machine's load."""
import json

import pytest
import torch

from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.objectives import DiffusionObjective
from torchdiffusion.training import Trainer, precision

LAST = ("toy2d", "checkpoints", "last.safetensors")


class VirtualTime:
    """precision.clock replaced by a counter; each objective call advances it by cost[the dtype it runs in] and
    is counted per dtype."""

    def __init__(self, monkeypatch, cost, matmul=(1e-3, 1e-3)):
        self.now, self.cost, self.calls = 0.0, dict(cost), {"fp32": 0, "bf16": 0}
        original = DiffusionObjective.__call__

        def call(obj, *args, **kwargs):
            dtype = "bf16" if torch.is_autocast_enabled("cpu") else "fp32"
            self.now += self.cost[dtype]
            self.calls[dtype] += 1
            return original(obj, *args, **kwargs)

        monkeypatch.setattr(DiffusionObjective, "__call__", call)
        monkeypatch.setattr(precision, "clock", lambda: self.now)
        monkeypatch.setattr(precision, "micro_probe", lambda device, width: dict(zip(precision.DTYPES, matmul)))

    def reset(self):
        self.calls = {"fp32": 0, "bf16": 0}


def toy(tmp_path, *over):
    return load_config("toy2d", [f"out_dir={tmp_path}", "train.ckpt_every=0", "train.precision=auto",
                                 "train.warmup_steps=0", "train.lr_schedule=constant", *over])


@pytest.mark.parametrize("slow", ["fp32", "bf16"])
def test_auto_picks_the_dtype_whose_step_is_faster(tmp_path, tmp_cache, monkeypatch, capsys, slow):
    """Each dtype in turn made 10x slower: auto trains in the other one, says so in one line with the times,
    and the training forward runs under that dtype."""
    fast = "bf16" if slow == "fp32" else "fp32"
    clock = VirtualTime(monkeypatch, {slow: 1.0, fast: 0.1})
    tr = Trainer(toy(tmp_path), progress=False)
    d = tr.precision_decision
    assert tr.precision == fast and d.how == "step-probe", d
    assert d.times["step_fp32"] == pytest.approx(clock.cost["fp32"])
    assert d.times["step_bf16"] == pytest.approx(clock.cost["bf16"])
    assert clock.calls["fp32"] >= 2 and clock.calls["bf16"] >= 2  # a warm-up and at least one timed step each
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "train.precision" in ln]
    assert len(lines) == 1 and f"auto: {fast}" in lines[0] and "step_bf16" in lines[0], lines
    with tr.autocast():
        assert torch.is_autocast_enabled("cpu") == (fast == "bf16")


@pytest.mark.parametrize("ratio, probes_step", [(3.0, False), (1.5, True)])
def test_slow_bf16_matmul_skips_the_step_probe(tmp_path, tmp_cache, monkeypatch, ratio, probes_step):
    """A bf16 matmul more than BF16_MICRO_SLOWDOWN (2) times slower than fp32 decides fp32 with no training step
    run at all (a bf16 step can take minutes on an AVX2-only CPU); at 1.5x the steps are timed."""
    clock = VirtualTime(monkeypatch, {"fp32": 1.0, "bf16": 0.1}, matmul=(1e-3, ratio * 1e-3))
    tr = Trainer(toy(tmp_path), progress=False)
    d = tr.precision_decision
    if probes_step:
        assert d.how == "step-probe" and tr.precision == "bf16" and clock.calls["bf16"] > 0
    else:
        assert d.how == "micro-probe" and tr.precision == "fp32" and clock.calls == {"fp32": 0, "bf16": 0}
        assert set(d.times) == {"matmul_fp32", "matmul_bf16", "probe_s"}


def test_step_probe_keeps_to_its_time_box(tmp_path, tmp_cache, monkeypatch):
    """An fp32 step of 4 s (virtual) in a 10 s box: fp32 gets its warm-up only, and a bf16 step predicted at
    1.5 x 4 s (the matmul ratio) is not run, since its warm-up and one timed step would overrun the 6 s left."""
    clock = VirtualTime(monkeypatch, {"fp32": 4.0, "bf16": 0.1}, matmul=(1e-3, 1.5e-3))
    tr = Trainer(toy(tmp_path), progress=False)
    assert clock.calls == {"fp32": 1, "bf16": 0}
    assert tr.precision == "fp32" and "step_bf16" not in tr.precision_decision.times
    assert tr.precision_decision.times["probe_s"] <= precision.STEP_BUDGET_S


def test_a_cached_decision_is_used_without_probing(tmp_path, tmp_cache, monkeypatch, capsys):
    """The second run of the same shape on this machine reads the decision from cache_dir()/precision.json and
    runs no probe step; another batch size is another shape and is probed."""
    clock = VirtualTime(monkeypatch, {"fp32": 1.0, "bf16": 0.1})
    assert Trainer(toy(tmp_path / "a"), progress=False).precision == "bf16"
    entries = json.loads((tmp_cache / precision.CACHE_FILE).read_text())["decisions"]
    assert [e["precision"] for e in entries.values()] == ["bf16"]
    clock.reset()
    clock.cost = {"fp32": 0.1, "bf16": 1.0}  # a probe would now choose fp32
    capsys.readouterr()
    tr = Trainer(toy(tmp_path / "b", "name=other", "train.lr=0.01"), progress=False)
    assert tr.precision == "bf16" and tr.precision_decision.how == "cache"
    assert clock.calls == {"fp32": 0, "bf16": 0}
    assert "cached decision" in capsys.readouterr().err
    other = Trainer(toy(tmp_path / "c", "train.batch_size=128"), progress=False)
    assert other.precision == "fp32" and other.precision_decision.how == "step-probe"


@pytest.mark.parametrize("content", [b"\xff\x00 not json", b'{"format": 1, "decisions": {"k": ', b"[1, 2]",
                                     b'{"format": 1, "decisions": {"k": {"precision": "fp16", "times": {}}}}'])
def test_a_damaged_cache_file_is_ignored_and_rewritten(tmp_path, tmp_cache, monkeypatch, content):
    """Garbage, a truncated file, the wrong structure or an unknown dtype: the run probes as with no cache, and
    the file is rewritten with its decision, which the next run then reads."""
    path = tmp_cache / precision.CACHE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    clock = VirtualTime(monkeypatch, {"fp32": 1.0, "bf16": 0.1})
    tr = Trainer(toy(tmp_path / "a"), progress=False)
    assert tr.precision == "bf16" and tr.precision_decision.how == "step-probe" and clock.calls["bf16"] > 0
    assert [e["precision"] for e in json.loads(path.read_text())["decisions"].values()] == ["bf16"]
    assert Trainer(toy(tmp_path / "b"), progress=False).precision_decision.how == "cache"


def _groups(path):
    return load_checkpoint(path)[1]


def test_a_resumed_auto_run_keeps_its_dtype_and_equals_the_uninterrupted_run(tmp_path, tmp_cache, monkeypatch):
    """auto resolved to bf16 (the non-default, so a continuation that fell back to fp32 would differ): the
    checkpoint records it; the continuation uses it without a probe even when a probe would now pick fp32 and
    the cache is gone, and ends bitwise equal (weights, EMA, optimizer; dropout on) to the uninterrupted auto run
    and to a run with bf16 forced (the probe changes nothing of training)."""
    over = ["model.mlp.dropout=0.1", "train.log_every=5"]
    clock = VirtualTime(monkeypatch, {"fp32": 1.0, "bf16": 0.1})
    whole = Trainer(toy(tmp_path / "a", "train.steps=12", *over), progress=False)
    assert whole.precision == "bf16"
    whole.fit()
    Trainer(toy(tmp_path / "f", "train.steps=12", *over, "train.precision=bf16"), progress=False).fit()
    Trainer(toy(tmp_path / "b", "train.steps=5", *over), progress=False).fit()
    assert load_checkpoint(tmp_path / "b" / LAST[0] / LAST[1] / LAST[2])[0]["precision"] == "bf16"
    (tmp_cache / precision.CACHE_FILE).unlink()
    clock.reset()
    clock.cost = {"fp32": 0.1, "bf16": 1.0}
    rest = Trainer(toy(tmp_path / "b", "train.steps=12", *over), progress=False)
    assert rest.step == 5 and rest.precision == "bf16" and rest.precision_decision.how == "resumed"
    assert clock.calls == {"fp32": 0, "bf16": 0}
    rest.fit()
    a, b, f = (_groups(tmp_path.joinpath(run, *LAST)) for run in ("a", "b", "f"))
    for group in ("model", "ema", "optim"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]) and torch.equal(a[group][k], f[group][k]), (group, k)


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_fp32_and_bf16_force_the_dtype_without_a_probe(tmp_path, tmp_cache, monkeypatch, forced):
    """A forced dtype never probes (the micro-probe would raise) and writes no cache; it is recorded too."""
    def no_probe(*args):
        raise AssertionError("probed")

    monkeypatch.setattr(precision, "micro_probe", no_probe)
    tr = Trainer(toy(tmp_path, f"train.precision={forced}", "train.steps=2"), progress=False)
    assert tr.precision == forced and tr.precision_decision.how == "forced"
    tr.fit()
    assert not (tmp_cache / precision.CACHE_FILE).exists()
    assert load_checkpoint(tmp_path.joinpath(*LAST))[0]["precision"] == forced


def test_an_unknown_precision_names_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="train.precision 'fp16'; allowed values: 'auto', 'fp32', 'bf16'"):
        Trainer(load_config("toy2d", [f"out_dir={tmp_path}", "train.precision=fp16"]), progress=False)


def test_typical_width_is_the_median_matmul_inner_dimension():
    """Linear: in_features; convolution: in_channels / groups * kernel area; clamped to MICRO_WIDTHS."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Linear(64, 64), torch.nn.Conv2d(8, 16, 3),
                              torch.nn.Conv2d(16, 16, 3, groups=4), torch.nn.Linear(300, 1))
    assert precision.typical_width(net) == 64  # median of 2, 36, 64, 72, 300
    assert precision.typical_width(torch.nn.Linear(4096, 8)) == precision.MICRO_WIDTHS[1]
    assert precision.typical_width(torch.nn.Linear(3, 8)) == precision.MICRO_WIDTHS[0]


def test_the_step_function_changes_nothing_of_the_run():
    """The probe's forward + backward run on copies: the module's weights, BatchNorm statistics, gradients and
    train/eval mode, and a stateful objective's state, are as before (a probe on the module itself would move
    the running mean and leave the objective's counter at 2)."""
    class Counting:
        calls = 0

        def __call__(self, module, x0, cond, *, generator=None):
            self.calls += 1
            return module(x0).square().mean()

    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).eval()
    objective, before = Counting(), {k: v.clone() for k, v in module.state_dict().items()}
    step = precision.step_function(module, objective, torch.randn(16, 4) + 3.0, {}, torch.device("cpu"))
    for dtype in precision.DTYPES:
        step(dtype)
    assert objective.calls == 0 and not module.training
    assert all(p.grad is None for p in module.parameters())
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
