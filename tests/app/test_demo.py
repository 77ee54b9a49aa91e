"""The demo's pictures for a class-conditional model (a tiny net trained for two steps)."""
import json

import numpy as np
from PIL import Image

from torchdiffusion.config import load_config
from torchdiffusion.app.demo import run_demo


def test_demo_writes_sample_n_conditional_samples_and_pictures(tmp_path, mnist_path):
    cfg = load_config("tiny", [f"out_dir={tmp_path}", "train.steps=2", "train.ckpt_every=0", "train.sample_every=0",
                               "model.unet.num_classes=10", "diffusion.objective.cond_drop_prob=0.1",
                               "sample.class_label=-1", "sample.n=10", "sample.steps=3",
                               "sample.sampler=dpmpp_2m_sde", "sample.spacing=karras"])
    result = run_demo(cfg, progress=False, resume=False)
    pics = result["pictures"]
    images = np.load(pics["npz"])["images"]
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.uint8
    w, h = Image.open(pics["grid"]).size
    assert w > h                                    # 10 samples in rows of ceil(sqrt(10)) = 4: three rows
    for key in ("forward", "trajectory"):
        assert Image.open(pics[key]).size[0] > 28
    summary = json.loads((tmp_path / cfg.name / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["pictures"]["grid"] == pics["grid"]
