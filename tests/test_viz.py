"""Pictures: grids have the right geometry and pixel values; figures are written as PNG files."""
import numpy as np
import torch
from PIL import Image

from torchdiffusion import viz
from torchdiffusion.schedules import get_schedule


def test_grid_geometry_and_values(tmp_path):
    x = torch.full((5, 1, 4, 6), -1.0)
    x[2] = 1.0
    grid = viz.make_grid(x, nrow=3, pad=1)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 1 + 2 * 7, 0] == 255        # image 0 black, image 2 white
    assert grid[0, 0, 0] == 255                                         # padding
    img = Image.open(viz.save_grid(x, tmp_path / "g.png", nrow=3, scale=2))  # default padding of 2
    assert img.size == (2 * (3 * (6 + 2) + 2), 2 * (2 * (4 + 2) + 2))


def test_figures_are_written(tmp_path):
    sched = get_schedule("linear", T=100)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    p = viz.forward_strip(x0, sched, [float(sched.sigmas[t]) for t in (0, 50, 99)], tmp_path / "f.png")
    xs = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    q = viz.trajectory_strip(xs, xs, [10.0, 1.0, 0.0], tmp_path / "t.png", schedule=sched)
    r = viz.loss_curve([{"step": i, "loss": 1.0 / (i + 1)} for i in range(50)], tmp_path / "l.png")
    for path in (p, q, r):
        arr = np.asarray(Image.open(path))
        assert arr.ndim == 3 and arr.std() > 0  # a real, non-blank picture
