"""Pictures show their data: grid tiles are the input images pixel for pixel, the forward strip's columns have
the noise level the schedule predicts, the strips and curves draw the values they were given (read back from
the matplotlib figure before it is written, and from the PNG files)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from torchdiffusion import viz
from torchdiffusion.schedules import get_schedule

K = 4.0  # Monte Carlo tolerances in standard errors


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the viz functions draw, kept as they are handed to the file writer."""
    kept = []
    write = viz._save_fig

    def keep(plt, fig, path):
        kept.append(fig)
        return write(plt, fig, path)

    monkeypatch.setattr(viz, "_save_fig", keep)
    return kept


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 7)
    assert viz.to_uint8(x).ravel().tolist() == [0, 0, 64, 128, 191, 255, 255]  # round((x + 1) 127.5), clamped


def test_grid_tiles_are_the_input_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 6, generator=g) * 2 - 1
    pad = 1
    grid = viz.make_grid(x, nrow=3, pad=pad, pad_value=7)
    assert grid.shape == (2 * (4 + pad) + pad, 3 * (6 + pad) + pad, 3)
    tiles = viz.to_uint8(x)
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for i in range(5):
        r, c = divmod(i, 3)
        y0, x0 = pad + r * (4 + pad), pad + c * (6 + pad)
        assert np.array_equal(grid[y0:y0 + 4, x0:x0 + 6], tiles[i]), i
        covered[y0:y0 + 4, x0:x0 + 6] = True
    assert (grid[~covered] == 7).all()  # padding and the empty sixth cell

    png = np.asarray(Image.open(viz.save_grid(x, tmp_path / "g.png", nrow=3, scale=2)))  # default padding 2
    full = viz.make_grid(x, nrow=3)
    assert png.shape == (2 * full.shape[0], 2 * full.shape[1], 3)
    assert np.array_equal(png[::2, ::2], full) and np.array_equal(png[1::2, 1::2], full)  # nearest upscaling


def test_grey_grid_png_holds_the_pixels(tmp_path):
    x = torch.linspace(-1, 1, 2 * 16).view(2, 1, 4, 4)
    png = Image.open(viz.save_grid(x, tmp_path / "g.png", nrow=2, scale=1))
    assert png.mode == "L"
    arr = np.asarray(png)
    assert np.array_equal(arr[2:6, 2:6], viz.to_uint8(x)[0, ..., 0])
    assert np.array_equal(arr[2:6, 8:12], viz.to_uint8(x)[1, ..., 0])


def _clipped_normal_std(sd: float) -> float:
    """Std of clamp(sd Z, -1, 1) for Z ~ N(0, 1): E[clip^2] = sd^2 (2 Phi(c) - 1 - 2 c phi(c)) + 2 (1 - Phi(c)),
    c = 1 / sd (mean 0)."""
    c = 1 / sd
    Phi = 0.5 * (1 + math.erf(c / math.sqrt(2)))
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(sd**2 * (2 * Phi - 1 - 2 * c * phi) + 2 * (1 - Phi))


def test_forward_strip_columns_have_the_noise_of_the_schedule(tmp_path, figures):
    """Rows of zero images: the cell at timestep t shows sqrt(1 - alpha_bar_t) n, clipped to [-1, 1] and mapped
    to [0, 1], so its std is half that of a clipped normal (64x64 pixels x 2 rows per column: standard error
    0.8%). A row of constant 0.5 images shows the mean sqrt(alpha_bar_t) 0.5 at the smallest level."""
    sched = get_schedule("linear", T=100)
    ts = (0, 10, 30, 60, 99)
    x0 = torch.zeros(3, 1, 64, 64)
    x0[2] = 0.5
    path = viz.forward_strip(x0, sched, [float(sched.sigmas[t]) for t in ts], tmp_path / "f.png",
                             generator=torch.Generator().manual_seed(0))
    assert path.exists() and len(figures) == 1
    axes = np.array(figures[0].axes).reshape(3, len(ts))
    for j, t in enumerate(ts):
        shown = np.stack([np.asarray(axes[i, j].images[0].get_array()) for i in (0, 1)])  # (2, 64, 64)
        sd = math.sqrt(1 - float(sched.alpha_bar[t]))
        want = _clipped_normal_std(sd) / 2
        se = want / math.sqrt(2 * shown.size)
        assert abs(shown.std() - want) < K * se, (t, shown.std(), want)
        assert abs(shown.mean() - 0.5) < K * want / math.sqrt(shown.size)
        assert axes[0, j].get_title() == f"sigma={float(sched.sigmas[t]):.3g}"
    low = np.asarray(axes[2, 0].images[0].get_array())
    sd0 = math.sqrt(1 - float(sched.alpha_bar[0]))
    want_mean = (math.sqrt(float(sched.alpha_bar[0])) * 0.5 + 1) / 2
    assert abs(low.mean() - want_mean) < K * sd0 / 2 / math.sqrt(low.size)


def test_trajectory_strip_draws_the_scaled_states_and_predictions(tmp_path, figures):
    sched = get_schedule("linear", T=100)
    g = torch.Generator().manual_seed(0)
    sigmas = [10.0, 1.0, 0.0]
    xs = [torch.randn(2, 1, 8, 8, generator=g) * (s + 0.1) for s in sigmas]
    x0s = [torch.rand(2, 1, 8, 8, generator=g) * 2 - 1 for _ in sigmas]
    viz.trajectory_strip(xs, x0s, sigmas, tmp_path / "t.png", schedule=sched)
    axes = np.array(figures[0].axes).reshape(4, 3)
    view = lambda img: ((img.clamp(-1, 1) + 1) / 2)[0].numpy()  # noqa: E731  (1, H, W) -> displayed (H, W)
    for i in range(2):
        assert axes[2 * i, 0].get_ylabel() == "x_t" and axes[2 * i + 1, 0].get_ylabel() == "predicted x0"
        for k, s in enumerate(sigmas):
            scale = 1 / math.sqrt(1 + s * s)  # the VP network input sqrt(alpha_bar) (x0 + sigma n)
            np.testing.assert_allclose(axes[2 * i, k].images[0].get_array(), view(xs[k][i] * scale),
                                       rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(axes[2 * i + 1, k].images[0].get_array(), view(x0s[k][i]),
                                       rtol=1e-6, atol=1e-6)


def test_loss_curve_draws_the_logged_values(tmp_path, figures):
    """The raw line is (step, value) of every record holding the key (others skipped), the running mean is
    the k-point moving average with k = len // 20, and a positive loss gets a log axis."""
    metrics = []
    for i in range(1, 101):
        metrics.append({"step": i, "loss": 2.0 / i + 0.01 * (i % 3)})
        if i % 10 == 0:
            metrics.append({"step": i, "val_loss_ema": 0.5})  # a record without the key
    path = viz.loss_curve(metrics, tmp_path / "l.png")
    assert path.exists()
    ax = figures[0].axes[0]
    steps = np.arange(1, 101)
    vals = 2.0 / steps + 0.01 * (steps % 3)
    raw, smooth = ax.lines[:2]
    np.testing.assert_allclose(raw.get_xdata(), steps)
    np.testing.assert_allclose(raw.get_ydata(), vals, rtol=1e-12)
    k = 100 // 20
    np.testing.assert_allclose(smooth.get_xdata(), steps[k - 1:])
    np.testing.assert_allclose(smooth.get_ydata(), [vals[j - k + 1:j + 1].mean() for j in range(k - 1, 100)],
                               rtol=1e-12)
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss"


def test_scatter_draws_the_samples_and_the_data(tmp_path, figures):
    g = torch.Generator().manual_seed(0)
    samples, data = torch.randn(50, 2, generator=g), torch.randn(80, 3, generator=g)
    viz.scatter_2d(samples, tmp_path / "s.png", data=data, title="t")
    ax = figures[0].axes[0]
    data_pts, sample_pts = (c.get_offsets() for c in ax.collections)
    np.testing.assert_array_equal(np.asarray(data_pts), data[:, :2].numpy())
    np.testing.assert_array_equal(np.asarray(sample_pts), samples.numpy())
    assert ax.get_title() == "t"
    assert np.asarray(Image.open(tmp_path / "s.png")).std() > 0


def test_autoencoder_table_draws_originals_reconstructions_and_scaled_latent_channels(tmp_path, figures):
    g = torch.Generator().manual_seed(0)
    x, rec = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    z = torch.randn(3, 2, 2, 2, generator=g) * torch.tensor([0.5, 4.0]).view(1, 2, 1, 1)
    viz.autoencoder_table(x, rec, z, tmp_path / "ae.png")
    axes = np.array(figures[0].axes).reshape(4, 3)
    view = lambda img: ((img.clamp(-1, 1) + 1) / 2)[0].numpy()  # noqa: E731
    assert [axes[i, 0].get_ylabel() for i in range(4)] == ["original", "reconstruction", "latent 0", "latent 1"]
    for j in range(3):
        np.testing.assert_allclose(axes[0, j].images[0].get_array(), view(x[j]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(axes[1, j].images[0].get_array(), view(rec[j]), rtol=1e-6, atol=1e-6)
        for c in range(2):  # each channel over its own peak magnitude across the batch
            want = z[j, c] / z[:, c].abs().max()
            np.testing.assert_allclose(axes[2 + c, j].images[0].get_array(), view(want[None]), rtol=1e-6,
                                       atol=1e-6)
    assert float(viz.latent_views(z)[:, 1].abs().max()) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="same number of images"):
        viz.autoencoder_table(x, rec, z[:2], tmp_path / "bad.png")
