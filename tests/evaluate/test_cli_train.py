"""`torchdiffusion evaluate` / `train-classifier` and the periodic evaluation during training."""
import json

import numpy as np
import pytest
import torch

from torchdiffusion.app.cli import main
from torchdiffusion.app.hooks import standard_hooks
from torchdiffusion.config import load_config
from torchdiffusion.training.tracking import read_metrics
from torchdiffusion.training import Trainer

def test_evaluate_npz_of_uint8_and_float_samples(feature_net, tmp_path, capsys):
    from torchdiffusion.evaluate import real_images

    x, _ = real_images("mnist", "train", 64, seed=0)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).numpy()                  # (N, 1, 28, 28)
    np.savez(tmp_path / "u8.npz", samples=u8[:, 0, :, :, None])             # (N, H, W, C) layout
    np.savez(tmp_path / "f.npz", samples=(u8.astype(np.float32) / 127.5 - 1))
    res = []
    for name in ("u8", "f"):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", str(tmp_path / f"{name}.npz"), "--n-ref", "1000", "--out", str(out)]) == 0
        res.append(json.loads(out.read_text()))
    captured = capsys.readouterr()
    assert "uint8 0..255" in captured.err and "floats in [-1, 1]" in captured.err
    assert "random floor draws" in captured.err
    assert res[0]["fd"] == pytest.approx(res[1]["fd"], rel=1e-6) and res[0]["n"] == 64 and res[0]["n_ref"] == 1000
    fd_row = next(line for line in captured.out.splitlines() if line.startswith("fd "))
    assert f"{res[1]['fd']:.4g} +- " in fd_row and "floor" in fd_row and f"ratio {res[1]['fd_ratio']:.2f}" in fd_row
    assert "random (unconditional samples)" in captured.out
    assert main(["evaluate", str(tmp_path / "f.npz"), "--n-ref", "1000", "--class-label", "-1", "--out",
                 str(tmp_path / "c.json")]) == 0
    labelled = json.loads((tmp_path / "c.json").read_text())
    assert labelled["floor_composition"].startswith("the samples' class counts (7 7 7 7 6 6")
    assert labelled["fd"] == res[1]["fd"] and "accuracy" in labelled
    np.savez(tmp_path / "bad.npz", samples=np.full((4, 1, 28, 28), 3.0, dtype=np.float32))
    assert main(["evaluate", str(tmp_path / "bad.npz")]) == 2
    assert "expected [-1, 1]" in capsys.readouterr().err


def test_train_classifier_reports_existing(tmp_cache, capsys):
    from torchdiffusion.checkpoint import save_checkpoint
    from torchdiffusion.evaluate import features as clf

    m = clf.FeatureNet()
    save_checkpoint(clf.feature_net_path(), meta={"kind": clf.FEATURE_NET_FORMAT, "arch": m.config,
                                                 "test_accuracy": 0.25}, model=m.state_dict())
    assert main(["train-classifier"]) == 0
    assert "0.2500" in capsys.readouterr().out
    save_checkpoint(clf.feature_net_path("fashion-mnist"), meta={"kind": clf.FEATURE_NET_FORMAT, "arch": m.config,
                                                              "test_accuracy": 0.125}, model=m.state_dict())
    assert main(["train-feature-net", "--dataset", "fashion-mnist"]) == 0
    assert "fashion-mnist.safetensors (test accuracy 0.1250)" in capsys.readouterr().out


def test_periodic_evaluation_is_logged_beside_the_loss(feature_net, tmp_path):
    cfg = load_config("tiny", [f"out_dir={tmp_path}", "train.steps=4", "train.ckpt_every=0", "train.log_every=2",
                               "train.eval_every=3", "train.eval_samples=32", "sample.steps=2"])
    Trainer(cfg, progress=False, hooks=standard_hooks(cfg)).fit()
    rows = [m for m in read_metrics(tmp_path / cfg.name / "logs") if "fd" in m]
    assert [m["step"] for m in rows] == [3]
    assert all(m["fd"] > 0 and 0 <= m["precision"] <= 1 and "kid" in m and "fd_floor" in m for m in rows)
    assert all(m["fd_ratio"] == pytest.approx(m["fd"] / m["fd_floor"]) and m["fd_floor_std"] > 0 for m in rows)


def test_periodic_evaluation_skips_non_mnist_data(tmp_path, capsys):
    cfg = load_config("toy2d", [f"out_dir={tmp_path}", "train.steps=2", "train.ckpt_every=0", "train.eval_every=1",
                                "train.sample_every=0"])
    Trainer(cfg, progress=False, hooks=standard_hooks(cfg)).fit()
    assert "periodic evaluation needs mnist or fashion-mnist, not moons" in capsys.readouterr().err
    assert not any("fd" in m for m in read_metrics(tmp_path / cfg.name / "logs"))


def test_evaluate_a_class_conditional_checkpoint(tmp_cache, mnist_path, tmp_path):
    """`evaluate` of a class-conditional model: --class-label -1 asks for class i mod 10 and reports the accuracy
    against the requested classes; --class-label none samples the null class (no accuracy); a bad value is refused."""
    from torchdiffusion.checkpoint import save_checkpoint
    from torchdiffusion.evaluate import features as clf

    (tmp_cache / "mnist").mkdir(parents=True)
    (tmp_cache / "mnist" / "mnist.npz").symlink_to(mnist_path)          # real data, throwaway classifier
    m = clf.FeatureNet()
    save_checkpoint(clf.feature_net_path(), meta={"kind": clf.FEATURE_NET_FORMAT, "dataset": "mnist",
                                                 "arch": m.config, "test_accuracy": 0.1}, model=m.state_dict())
    cfg = load_config("tiny", [f"out_dir={tmp_path}", "train.steps=2", "train.ckpt_every=0", "train.sample_every=0",
                               "model.unet.num_classes=10", "diffusion.objective.cond_drop_prob=0.1",
                               "sample.class_label=-1"])
    Trainer(cfg, progress=False, hooks=standard_hooks(cfg)).fit()
    ckpt = tmp_path / cfg.name / "checkpoints" / "last.safetensors"
    res = {}
    for label in ("-1", "none", "3"):
        out = tmp_path / f"{label}.json"
        assert main(["evaluate", str(ckpt), "--n", "20", "--steps", "2", "--sampler", "ddim", "--n-ref", "500",
                     "--class-label", label, "--out", str(out)]) == 0
        res[label] = json.loads(out.read_text())
    assert res["-1"]["class_label"] == -1 and 0 <= res["-1"]["accuracy"] <= 1
    assert res["-1"]["floor_composition"] == "the samples' class counts (2 2 2 2 2 2 2 2 2 2)"
    assert res["none"]["class_label"] is None and "accuracy" not in res["none"]
    assert res["none"]["floor_composition"] == "random (unconditional samples)"
    assert res["3"]["class_label"] == 3 and res["3"]["accuracy"] == pytest.approx(res["3"]["class_counts"][3] / 20)
    assert res["3"]["floor_composition"].startswith("the samples' class counts (0 0 0 20 0")
    out = tmp_path / "seeds.json"
    assert main(["evaluate", str(ckpt), "--n", "20", "--steps", "2", "--sampler", "ddim", "--n-ref", "500",
                 "--class-label", "-1", "--seeds", "0", "1", "--out", str(out)]) == 0
    both = json.loads(out.read_text())
    fds = [r["fd"] for r in both["per_seed"]]
    assert [r["seed"] for r in both["per_seed"]] == [0, 1] and fds[0] == pytest.approx(res["-1"]["fd"])
    assert both["fd"] == pytest.approx(sum(fds) / 2)
    assert both["fd_std"] == pytest.approx(abs(fds[0] - fds[1]) / 2 ** 0.5)
    assert both["spread"].startswith("std over 2 sampling seeds") and both["fd_floor"] == res["-1"]["fd_floor"]
    with pytest.raises(SystemExit):
        main(["evaluate", str(ckpt), "--class-label", "seven"])
