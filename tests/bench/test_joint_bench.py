"""The joint (image, label) benchmark (bench/joint.py): the run trains the preset for a CPU budget with the
preset's warm-up share; the NFE per image it reports is the sampler's count; the table."""
import re

import pytest
import torch

from torchdiffusion.build import build_module
from torchdiffusion.config import load_config
from torchdiffusion.edit import resample_path


def test_the_run_trains_the_preset_for_the_cpu_budget(bench, tmp_path):
    jb = bench("joint")
    cfg = jb.run_config("fashion-mnist", 7.5, str(tmp_path), None)
    preset = load_config(jb.PRESET).train
    t = cfg.train
    assert (cfg.task, cfg.data.dataset, t.max_minutes, t.lr_schedule_over, t.clock) == (
        "joint", "fashion-mnist", 7.5, "time", "cpu")
    assert t.warmup_steps / t.steps == pytest.approx(preset.warmup_steps / preset.steps, rel=1e-3)


def test_classification_rows_count_the_denoiser_calls_per_image(bench):
    """One-shot: 1 call; replacement: one per DDPM step; RePaint: one per downward move of its path; per image,
    whatever the number of images (all N in one batch per draw)."""
    jb = bench("joint")
    cfg = load_config(None, ["task=joint", "joint.classes=3", "model.unet.image_size=8", "model.unet.in_channels=4",
                             "model.unet.channels=8", "model.unet.channel_mult=[1]", "model.unet.attn_resolutions=[]",
                             "model.unet.norm_groups=4", "train.sample_every=0"])
    den = build_module(cfg).eval()
    opts = {"steps": 4, "draws": 2, "resample": 3}
    rows = jb.classification_rows(den, cfg, torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long), opts)
    path = resample_path(4, 1, 3)
    down = sum(b > a for a, b in zip(path, path[1:]))
    assert [r["nfe_per_image"] for r in rows] == [1] * len(jb.ONESHOT_SIGMAS) + [4 * 2, down * 2]
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 5 for r in rows)
    lines = jb.format_table(rows).splitlines()
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in lines]  # unescaped cell borders
    assert len(lines) == 2 + len(rows) and cells == [10] * len(lines)
