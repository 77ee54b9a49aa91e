"""Bad numbers, mismatched or damaged checkpoints, leftovers and a full disk: each stops early with one line that
names the field or file and says what to do, and no good checkpoint is overwritten."""
import dataclasses
import errno
import os

import pytest
import torch

from torchdiffusion import checkpoint as ckpt_mod
from torchdiffusion.app import cli
from torchdiffusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.training import Hook, Trainer
from torchdiffusion.training.trainer import NonFiniteLossError


def cfg(out, *over):
    return load_config("toy2d", [f"out_dir={out}", "train.steps=12", "train.ckpt_every=4", "train.log_every=2",
                                 "train.batch_size=64", *over])


def ckpt_dir(out):
    return out / "toy2d" / "checkpoints"


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("torchdiffusion ")]
    assert len(err) == 1, err
    return err[0]


class _NanAt:
    """The run's objective, returning NaN at the given (1-based) calls."""

    def __init__(self, objective, calls):
        self.objective, self.bad, self.calls = objective, set(calls), 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss = self.objective(*args, **kwargs)
        return loss * float("nan") if self.calls in self.bad else loss


class _Weights(Hook):
    every = 1

    def __init__(self):
        self.at = {}

    def __call__(self, trainer):
        self.at[trainer.step] = [p.detach().clone() for p in trainer.net.parameters()]


# --------------------------------------------------------------------------------------------- NaN / inf
def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    tr = Trainer(cfg(tmp_path), progress=False)
    tr.objective = _NanAt(tr.objective, {6})
    with pytest.raises(NonFiniteLossError, match="diverged at step 6: loss nan") as info:
        tr.fit()
    message = str(info.value)
    assert "last.safetensors (step 4) holds the newest finite weights" in message and "\n" not in message
    assert "train.lr" in message and "train.nonfinite_skips" in message
    meta, groups = load_checkpoint(ckpt_dir(tmp_path) / "last.safetensors")  # finite, or it would be refused
    assert meta["step"] == 4 and load_checkpoint(ckpt_dir(tmp_path) / "best.safetensors")[0]["step"] <= 4


def test_a_huge_learning_rate_ends_with_an_error_not_with_nan_weights(tmp_path, capsys):
    """The issue's reproduction: lr 1e6 used to end with exit 0 and all-NaN weights in last.safetensors."""
    code = cli.main(["train", "--config", "toy2d", f"out_dir={tmp_path}", "train.lr=1e6", "train.steps=200",
                     "train.ckpt_every=1", "train.batch_size=64"])
    assert code == 2 and "training diverged" in one_line_error(capsys)
    meta, _ = load_checkpoint(ckpt_dir(tmp_path) / "last.safetensors")  # refused if it held NaN
    assert meta["step"] < 200


def test_skipped_steps_update_nothing_and_too_many_in_a_row_stop(tmp_path):
    """train.nonfinite_skips=2: two NaN steps in a row are skipped (the weights, the optimizer and the EMA stay;
    the batch and the step number are used up); a third in a row stops the run."""
    weights = _Weights()
    tr = Trainer(cfg(tmp_path, "train.nonfinite_skips=2"), progress=False, hooks=[weights])
    tr.objective = _NanAt(tr.objective, {5, 6})
    assert tr.fit()["steps"] == 12 and tr.ema.updates == 10
    assert all(torch.equal(a, b) for a, b in zip(weights.at[4], weights.at[6]))
    assert not all(torch.equal(a, b) for a, b in zip(weights.at[6], weights.at[7]))
    tr = Trainer(cfg(tmp_path / "b", "train.nonfinite_skips=2"), progress=False)
    tr.objective = _NanAt(tr.objective, {5, 6, 7})
    with pytest.raises(NonFiniteLossError, match="step 7.*after 2 skipped steps in a row"):
        tr.fit()


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    Trainer(cfg(out, "train.steps=2"), progress=False).fit()
    return ckpt_dir(out) / "last.safetensors"


@pytest.mark.parametrize("args, message", [
    (["--guidance", "cfg", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
])
def test_sample_refuses_bad_values_before_sampling(toy_ckpt, tmp_path, monkeypatch, capsys, args, message):
    calls = []
    monkeypatch.setattr(cli, "generate", lambda *a, **k: calls.append(1))
    assert cli.main(["sample", str(toy_ckpt), "--out", str(tmp_path), *args]) == 2
    assert message in one_line_error(capsys) and not calls


def test_sample_refuses_an_unwritable_out_before_sampling(toy_ckpt, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "generate", lambda *a, **k: calls.append(1))
    (tmp_path / "a_file").write_text("")
    assert cli.main(["sample", str(toy_ckpt), "--out", str(tmp_path / "a_file" / "samples")]) == 2
    assert "cannot write to" in one_line_error(capsys) and not calls
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o500)
        assert cli.main(["sample", str(toy_ckpt), "--out", str(tmp_path / "ro")]) == 2 and not calls


# ------------------------------------------------------------------------------------- checkpoint trust
def _rewrite(path, change):
    """Load a checkpoint, let `change(meta, groups)` edit it, and write it back (a valid file, new checksum)."""
    meta, groups = load_checkpoint(path)
    change(meta, groups)
    save_checkpoint(path, meta={k: v for k, v in meta.items() if k not in ("format_version", "groups")}, **groups)


def _first(d):
    return next(iter(d))


@pytest.mark.parametrize("change, message", [
    (lambda m, g: g["optim"].update({"0.exp_avg": torch.zeros(7)}),
     r"'optim.0.exp_avg' is torch.float32 of shape \(7,\)"),
    (lambda m, g: g["optim"].update({"3.exp_avg_sq": g["optim"]["3.exp_avg_sq"].double()}),
     "'optim.3.exp_avg_sq' is torch.float64"),
    (lambda m, g: g["model"].update({_first(g["model"]): g["model"][_first(g["model"])].half()}), "is torch.float16"),
    (lambda m, g: g["ema"].pop(_first(g["ema"])), "'ema' tensors do not match the configured network"),
    (lambda m, g: g.pop("rng"), "'rng.torch' is missing"),
    (lambda m, g: m.pop("sampler"), "metadata field 'sampler' is missing"),
    (lambda m, g: m.update(step="7"), "metadata field 'step' must be an integer, got '7'"),
    (lambda m, g: m["sampler"].pop("position"), "'sampler.position' is missing"),
    (lambda m, g: m["optimizer"].update(param_groups={}), "'param_groups' must be a list"),
    (lambda m, g: m.update(ema_updates=-1), "must not be negative"),
])
def test_resume_checks_every_tensor_and_field_before_use(tmp_path, change, message):
    """A checkpoint that does not fit the run (a fused AdamW would read a short moment out of bounds) or lacks
    a field is refused with one line naming the tensor or field."""
    Trainer(cfg(tmp_path, "train.steps=4"), progress=False).fit()
    _rewrite(ckpt_dir(tmp_path) / "last.safetensors", change)
    with pytest.raises(CheckpointError, match=message) as info:
        Trainer(cfg(tmp_path), progress=False)
    assert "\n" not in str(info.value) and "last.safetensors" in str(info.value)


def test_resume_survives_a_missing_log_folder_and_a_partial_metrics_line(tmp_path):
    Trainer(cfg(tmp_path, "train.steps=4"), progress=False).fit()
    metrics = tmp_path / "toy2d" / "logs" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 6, "loss": 0.3')  # a process killed while writing its log line
    Trainer(cfg(tmp_path, "train.steps=8"), progress=False).fit()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 8 and metrics.read_text().endswith("\n")
    for p in (tmp_path / "toy2d" / "logs").iterdir():
        p.unlink()
    (tmp_path / "toy2d" / "logs").rmdir()
    assert Trainer(cfg(tmp_path, "train.steps=10"), progress=False).fit()["steps"] == 10


def test_a_folder_with_best_but_no_last_continues_from_best(tmp_path, capsys):
    """What a user has after deleting a damaged last: the run goes on from best (with a notice), not from 0."""
    Trainer(cfg(tmp_path, "train.steps=8", "train.keep_last=0"), progress=False).fit()
    best_step = load_checkpoint(ckpt_dir(tmp_path) / "best.safetensors")[0]["step"]
    (ckpt_dir(tmp_path) / "last.safetensors").unlink()
    tr = Trainer(cfg(tmp_path), progress=False)
    assert f"continuing the run from best.safetensors (step {best_step})" in capsys.readouterr().err
    assert tr.step == best_step > 0 and tr.fit()["steps"] == 12


def test_a_damaged_last_is_refused_with_advice_naming_what_exists(tmp_path):
    Trainer(cfg(tmp_path, "train.keep_last=0"), progress=False).fit()
    last = ckpt_dir(tmp_path) / "last.safetensors"
    raw = bytearray(last.read_bytes())
    raw[-5] ^= 0x10  # bit rot
    last.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum does not match.*best.safetensors.*delete last.safetensors "
                                              "to continue from the newest of the others") as info:
        Trainer(cfg(tmp_path, "train.steps=16"), progress=False)
    assert "older step" not in str(info.value) and "step_" not in str(info.value)


def test_earlier_checkpoints_are_kept_as_train_keep_last_says(tmp_path, capsys):
    Trainer(cfg(tmp_path, "train.steps=16", "train.keep_last=2"), progress=False).fit()
    names = sorted(p.name for p in ckpt_dir(tmp_path).iterdir())
    assert names == ["best.safetensors", "last.safetensors", "step_0000008.safetensors", "step_0000012.safetensors"]
    assert load_checkpoint(ckpt_dir(tmp_path) / "step_0000012.safetensors")[0]["step"] == 12
    (ckpt_dir(tmp_path) / "last.safetensors").unlink()
    tr = Trainer(cfg(tmp_path, "train.steps=16", "train.keep_last=2"), progress=False)
    best = load_checkpoint(ckpt_dir(tmp_path) / "best.safetensors")[0]["step"]
    assert tr.step == max(best, 12)


# ---------------------------------------------------------------------------------- leftovers and messages
def test_temporary_files_of_killed_checkpoint_writes_are_deleted_on_start(tmp_path, capsys):
    Trainer(cfg(tmp_path, "train.steps=4"), progress=False).fit()
    stale = ckpt_dir(tmp_path) / "last.safetensors.x1y2z3.tmp"
    stale.write_bytes(b"\0" * 100_000)
    Trainer(cfg(tmp_path, "train.steps=4"), progress=False)
    assert not stale.exists() and "deleted 1 temporary file(s) (0.1 MB)" in capsys.readouterr().err


def test_a_full_disk_keeps_the_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    write = ckpt_mod.save_file

    def disk_full_after_step_4(tensors, filename, metadata=None):
        if '"step": 4,' not in metadata[ckpt_mod.META_KEY]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full_after_step_4)
    assert cli.main(["train", "--config", "toy2d", f"out_dir={tmp_path}", "train.steps=12", "train.ckpt_every=4",
                     "train.batch_size=64"]) == 2
    line = one_line_error(capsys)
    assert "step 8: could not write checkpoint" in line and "No space left on device (ENOSPC)" in line
    assert "the previous file is kept unchanged" in line and "run the same command again" in line
    assert load_checkpoint(ckpt_dir(tmp_path) / "last.safetensors")[0]["step"] == 4
    assert not list(ckpt_dir(tmp_path).glob("*.tmp"))


@pytest.mark.parametrize("override, field", [
    ("train.log_every=0", "train.log_every must be at least 1"), ("train.ckpt_every=-1", "train.ckpt_every"),
    ("train.warmup_steps=-5", "train.warmup_steps"), ("train.grad_clip=-1", "train.grad_clip"),
    ("train.threads=-1", "train.threads"), ("train.batch_size=0", "train.batch_size"), ("train.lr=0", "train.lr"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s"), ("train.nonfinite_skips=-1", "train.nonfinite_skips"),
    ("train.keep_last=-1", "train.keep_last"), ("train.ema_decay=1", "train.ema_decay"),
    ("name=../..", "name must be a plain folder name"), ("name=/tmp/elsewhere", "name must be a plain folder name"),
])
def test_bad_train_values_are_refused_before_anything_is_written(tmp_path, capsys, override, field):
    assert cli.main(["train", "--config", "toy2d", f"out_dir={tmp_path / 'runs'}", override]) == 2
    assert field in one_line_error(capsys)
    assert not (tmp_path / "runs").exists() and sorted(os.listdir(tmp_path)) == []


def test_a_config_built_in_python_is_checked_by_the_trainer(tmp_path):
    good = cfg(tmp_path)
    bad = dataclasses.replace(good, train=dataclasses.replace(good.train, log_every=0))
    with pytest.raises(ConfigError, match="train.log_every must be at least 1"):
        Trainer(bad, progress=False)


def test_a_folder_given_as_config_is_refused(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path)]) == 2
    assert "is a folder, not a YAML file" in one_line_error(capsys)
