"""`torchdiffusion report RUN_DIR`: a self-contained page with every logged metric, looked at in a real browser."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from torchdiffusion.app.cli import main
from torchdiffusion.app.run_report import metric_summary, write_report
from torchdiffusion.training import read_metrics

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
WINDOW = (1000, 1400)  # width, height of the screenshot


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_runs")
    assert main(["train", "--config", "tiny", f"out_dir={out}", "train.steps=6", "train.log_every=2",
                 "train.sample_every=3", "train.ckpt_every=3", "data.subset=256", "sample.steps=2"]) == 0
    run = out / "tiny"
    (run / "eval.json").write_text(json.dumps({"fd": 123.4, "n": 64, "features": "feature_net"}))
    return run


def test_report_holds_every_metric_and_nothing_external(run_dir):
    page = write_report(run_dir).read_text()
    metrics = read_metrics(run_dir / "logs")
    keys = {k for m in metrics for k in m} - {"step", "time"}
    assert keys >= {"loss", "lr", "images_per_s", "val_loss_ema"}
    for name, points, last, step, lo, hi in metric_summary(metrics):
        assert f"<td>{name}</td>" in page and f"{last:.6g}" in page
    assert page.count("<img") >= len(keys) + 2          # a curve per metric and the two sample grids
    assert "123.4" in page and "train:" in page         # the evaluation and the configuration
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # every picture inline
    with pytest.raises(FileNotFoundError, match="holds no logs"):
        write_report(run_dir / "samples")


@pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (Debian: apt-get install chromium)")
def test_report_renders_in_a_browser(run_dir, tmp_path):
    page = write_report(run_dir, tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (WINDOW[1], WINDOW[0])
    assert img.std() > 10 and (img < 128).mean() > 0.01   # text and pictures, not a blank page
