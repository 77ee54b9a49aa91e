"""End to end through the console script: train, sample, and clear errors with a non-zero exit."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torchdiffusion", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = run("train", "--config", "tiny", f"out_dir={out}", "train.steps=6", "train.ckpt_every=3")
    assert r.returncode == 0, r.stderr
    return out / "tiny"


def test_train_then_sample(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.safetensors"
    assert ckpt.exists() and (trained / "checkpoints" / "best.safetensors").exists()
    assert (trained / "config.yaml").exists() and list((trained / "logs").glob("events.out.tfevents.*"))
    r = run("sample", ckpt, "--n", 5, "--steps", 3, "--sampler", "ddpm", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "ddpm_3steps_seed0.npz")["images"]
    assert arr.shape == (5, 28, 28, 1) and arr.dtype == np.uint8
    img = Image.open(tmp_path / "ddpm_3steps_seed0.png")
    assert img.size[0] > 28 * 2


def test_errors_exit_nonzero_with_a_message(trained, tmp_path):
    r = run("train", "--config", "tiny", "train.stepz=3")
    assert r.returncode == 2 and "unknown config key 'train.stepz'" in r.stderr and "steps" in r.stderr
    r = run("train", "--config", "tiny", f"data.dataset={tmp_path / 'nowhere'}", f"out_dir={tmp_path}")
    assert r.returncode == 2 and "nowhere" in r.stderr
    r = run("train", "--config", "tiny", "data.image_size=32", f"out_dir={tmp_path}")
    assert r.returncode == 2 and "network expects (1, 28, 28)" in r.stderr
    bad = tmp_path / "bad.safetensors"
    raw = (trained / "checkpoints" / "last.safetensors").read_bytes()
    bad.write_bytes(raw[: len(raw) - 100])
    r = run("sample", bad)
    assert r.returncode == 2 and "truncated or corrupted" in r.stderr
    r = run("sample", trained / "checkpoints" / "last.safetensors", "--sampler", "nope", "--out", tmp_path)
    assert r.returncode == 2 and "unknown sampler 'nope'" in r.stderr


def test_malformed_dataset_file(tmp_path):
    f = tmp_path / "data.npz"
    np.savez(f, x=np.zeros((4, 5), dtype=np.float32))
    r = run("train", "--config", "tiny", f"data.dataset={f}", f"out_dir={tmp_path}")
    assert r.returncode == 2 and "data.npz" in r.stderr


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    """A training process killed with SIGTERM writes its last checkpoint before it exits (nothing lost)."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "torchdiffusion", "train", "--config", "toy2d",
                          f"out_dir={tmp_path}", "train.steps=1000000", "train.ckpt_every=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "toy2d" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (logs.exists() and logs.stat().st_size > 0):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted at step" in err
    from torchdiffusion.checkpoint import load_checkpoint

    meta, _ = load_checkpoint(tmp_path / "toy2d" / "checkpoints" / "last.safetensors")
    assert meta["step"] > 0


def cli(*args):
    from torchdiffusion.app.cli import main

    return main([str(a) for a in args])


def test_sampler_option_flag_reaches_the_sampler(trained, tmp_path, capsys):
    """--sampler-option eta=1 turns deterministic DDIM stochastic, exactly as sampler_options={'eta': 1} through
    the Python front door; an option the sampler lacks is refused, naming the ones it has."""
    from torchdiffusion.build import load_denoiser
    from torchdiffusion.sampling import generate

    ckpt = trained / "checkpoints" / "last.safetensors"
    common = ["sample", ckpt, "--n", 3, "--steps", 3, "--sampler", "ddim"]
    assert cli(*common, "--out", tmp_path / "a") == 0
    assert cli(*common, "--sampler-option", "eta=1.0", "--out", tmp_path / "b") == 0
    a = np.load(tmp_path / "a" / "ddim_3steps_seed0.npz")["images"]
    b = np.load(tmp_path / "b" / "ddim_3steps_seed0.npz")["images"]
    assert not (a == b).all()
    den, cfg, _ = load_denoiser(ckpt)
    ref = generate(den, (1, 28, 28), cfg.sample, n=3, steps=3, sampler="ddim", sampler_options={"eta": 1.0})
    from torchdiffusion.viz import to_uint8

    assert (to_uint8(ref) == b).all()
    capsys.readouterr()
    assert cli(*common, "--sampler-option", "churn=1", "--out", tmp_path) == 2
    assert "sampler 'ddim' takes no option(s) churn; its options: eta" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not KEY=VALUE: the parser refuses it with a usage message
        cli(*common, "--sampler-option", "eta", "--out", tmp_path)
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_guidance_scale_needs_a_guidance_method(trained, tmp_path, capsys):
    """No hidden rule turns guidance 'none' into 'cfg': a scale without a method is refused with the fix."""
    ckpt = trained / "checkpoints" / "last.safetensors"
    assert cli("sample", ckpt, "--guidance-scale", 2, "--n", 1, "--steps", 1, "--out", tmp_path) == 2
    assert "needs a guidance method: add --guidance cfg" in capsys.readouterr().err


def test_renamed_command_and_bench_front_door(tmp_cache, tmp_path, capsys):
    """`train-classifier` still works and names its new name; `bench` runs a benchmark of the checkout."""
    from torchdiffusion.checkpoint import save_checkpoint
    from torchdiffusion.evaluate import features

    net = features.FeatureNet()
    save_checkpoint(features.feature_net_path(), meta={"kind": features.FEATURE_NET_FORMAT, "dataset": "mnist",
                                                       "arch": net.config, "test_accuracy": 0.5},
                    model=net.state_dict())
    assert cli("train-classifier") == 0
    cap = capsys.readouterr()
    assert "now `torchdiffusion train-feature-net`" in cap.err and "feature network exists" in cap.out
    assert cli("bench", "structure", "--json", tmp_path / "s.json") == 0
    assert "import arrows" in capsys.readouterr().out and (tmp_path / "s.json").exists()
    assert cli("bench", "nope") == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_every_benchmark_script_has_a_bench_command():
    """`torchdiffusion bench NAME` reaches every script of bench/ (a new benchmark must be registered)."""
    from pathlib import Path

    from torchdiffusion.app.cli import BENCHMARKS
    bench = Path(__file__).resolve().parents[2] / "bench"
    assert sorted(BENCHMARKS.values()) == sorted(p.name for p in bench.glob("*.py"))
