"""The training-speed benchmark: FLOP accounting and its report (no timing assertions)."""
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.train_speed import bench_config, main, step_flops


def test_step_flops_are_forward_plus_twice_forward(tmp_path):
    """Backward of a conv / linear layer costs two forwards (input and weight gradients), except the first
    conv, whose input needs no gradient: forward + backward lies in (2.5, 3] x forward for a U-Net."""
    cfg = bench_config("tiny")
    from torchdiffusion.pipeline import build_denoiser

    den = build_denoiser(cfg)
    with FlopCounterMode(display=False) as c, torch.no_grad():
        den(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 5.0]))
    ratio = step_flops(cfg, str(tmp_path)) / (c.get_total_flops() / 2)
    assert 2.5 < ratio <= 3.0, ratio


def test_benchmark_report(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["--configs", "tiny", "--dtypes", "fp32", "--layouts", "contiguous", "--steps", "1", "--warmup", "0",
                 "--matmul-n", "128", "--json", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["config"] == "tiny" and row["batch"] == 32 and row["images_per_s"] > 0
    assert abs(row["achieved_gflops"] - row["images_per_s"] * row["gflop_per_image"]) < 0.05 * row["achieved_gflops"] + 0.1
    assert abs(row["ratio"] - row["achieved_gflops"] / row["peak_gflops"]) < 0.01
    assert "GFLOP/img" in capsys.readouterr().out
