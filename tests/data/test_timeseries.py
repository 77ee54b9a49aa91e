"""Time series data: windows and the split by time (no step of the valid or test part inside a training window),
normalisation by the training part and its round trip, the synthetic laws, user .npz files, clear errors."""
import numpy as np
import pytest
import torch

from torchdiffusion.data.timeseries import (AR2_COEFS, SINE_PERIOD, SeriesConfig, load_series, make_series_dataset,
                                            split_points, synthetic_series)

CFG = SeriesConfig(length=32, horizon=8, synthetic_length=500)


@pytest.mark.parametrize("name", ["sine", "ar2"])
def test_windows_follow_the_time_split(name):
    """Training windows end before t1; each valid / test window's horizon lies in its part, and the test horizons
    are the series' end, disjoint; every window is the slice of the normalised series at its start."""
    parts = {s: make_series_dataset(name, s, CFG) for s in ("train", "valid", "test")}
    t1, t2 = parts["train"].cut
    assert (t1, t2) == split_points(500, CFG) == (400, 450)
    assert max(parts["train"].starts) + CFG.length <= t1
    context = CFG.length - CFG.horizon
    for split, (lo, hi) in (("valid", (t1, t2)), ("test", (t2, 500))):
        origins = [s + context for s in parts[split].starts]
        assert min(origins) >= lo and max(origins) + CFG.horizon <= hi
        assert np.all(np.diff(origins) == CFG.horizon)  # disjoint targets
    for d in parts.values():
        assert d.sample_shape == (1, CFG.length)
        for i in (0, len(d) - 1):
            assert torch.equal(d.batch([i])[0][0], d.series[:, d.starts[i]:d.starts[i] + CFG.length])


def test_no_test_step_in_training_windows():
    """The test part's values never appear in a training batch (the last training index is below t2)."""
    d = make_series_dataset("ar2", "train", CFG)
    seen = {t for s in d.starts for t in range(s, s + CFG.length)}
    assert max(seen) < d.cut[0]


def test_normalisation_uses_the_training_part_and_round_trips():
    d = make_series_dataset("sine", "test", CFG)
    raw = torch.as_tensor(synthetic_series("sine", 500), dtype=torch.float32)
    train = d.series[:, :d.cut[0]].double()
    assert abs(float(train.mean())) < 1e-6 and abs(float(train.std(unbiased=False)) - 1) < 1e-5
    torch.testing.assert_close(d.denormalise(d.series), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.normalise(raw), d.series, rtol=1e-5, atol=1e-5)
    assert d.meta["mean"] == pytest.approx([synthetic_series("sine", 500)[0, :400].mean()], rel=1e-9)


def test_synthetic_laws():
    """AR(2) least squares recovers the coefficients within 4 standard errors (about 0.015 at 4000 steps); the
    sinusoid's lag-24 autocorrelation is high and its lag-12 one strongly negative."""
    x = synthetic_series("ar2", 4000)[0]
    design = np.column_stack([x[1:-1], x[:-2]])
    coef, *_ = np.linalg.lstsq(design, x[2:], rcond=None)
    np.testing.assert_allclose(coef, AR2_COEFS, atol=0.06)
    s = synthetic_series("sine", 2400)[0]
    corr = lambda lag: np.corrcoef(s[lag:], s[:-lag])[0, 1]  # noqa: E731
    assert corr(SINE_PERIOD) > 0.8 and corr(SINE_PERIOD // 2) < -0.8


def test_npz_series_and_windows(tmp_path):
    series = np.stack([np.arange(300.0), np.arange(300.0) ** 0.5])  # (2, 300)
    np.savez(tmp_path / "s.npz", x=series)
    d = make_series_dataset(str(tmp_path / "s.npz"), "train", CFG)
    assert d.sample_shape == (2, 32)
    windows = np.random.default_rng(0).standard_normal((50, 3, 32))
    np.savez(tmp_path / "w.npz", x=windows)
    test = make_series_dataset(str(tmp_path / "w.npz"), "test", CFG)
    assert len(test) == 5 and test.starts == list(range(45, 50))  # the last 10 % of the windows
    torch.testing.assert_close(test.denormalise(test.windows).double(), torch.as_tensor(windows[45:]))


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="longer than the training part.*lower series.length"):
        make_series_dataset("sine", "train", CFG.replace(length=450))
    with pytest.raises(ValueError, match="below series.length.*lower series.horizon"):
        make_series_dataset("sine", "train", CFG.replace(horizon=32))
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5\).*\(N, C, L\)"):
        make_series_dataset(str(tmp_path / "bad.npz"), "train", CFG)
    with pytest.raises(ValueError, match="no array 'x'.*series.key"):
        np.savez(tmp_path / "k.npz", y=np.zeros(100))
        make_series_dataset(str(tmp_path / "k.npz"), "train", CFG)
    np.savez(tmp_path / "w.npz", x=np.zeros((20, 1, 16)))
    with pytest.raises(ValueError, match="set series.length=16"):
        make_series_dataset(str(tmp_path / "w.npz"), "train", CFG)
    with pytest.raises(ValueError, match="unknown series 'nope'"):
        load_series("nope", CFG)


@pytest.mark.parametrize("name,steps", [("sunspots", 309), ("co2", 526), ("elnino", 732)])
def test_real_series_from_statsmodels(name, steps):
    pytest.importorskip("statsmodels")
    x = load_series(name, CFG)
    assert x.shape == (1, steps) and np.isfinite(x).all()


def test_rolling_origins_and_centred_windows():
    """eval_stride 1: a test window at every origin whose horizon fits in the test part; center: a training
    window is served minus its mean over the first L - horizon steps (its stored values unchanged)."""
    rolling = make_series_dataset("sine", "test", CFG.replace(eval_stride=1))
    assert rolling.starts == list(range(450 - 24, 500 - 32 + 1))
    d = make_series_dataset("ar2", "train", CFG.replace(center=True))
    x = d.batch([0, 5])[0]  # (2, 1, 32)
    assert x[..., :24].mean(-1).abs().max() < 1e-6
    torch.testing.assert_close(x, d.windows[[0, 5]] - d.windows[[0, 5], :, :24].mean(-1, keepdim=True))
