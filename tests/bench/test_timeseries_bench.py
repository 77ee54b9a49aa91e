"""The time-series benchmark's baselines and driver (bench/timeseries.py): AR(p) least squares recovers a known
AR(2), its simulated one-step paths have the fitted mean and noise, seasonal-naive repeats the last season and
spreads by the training residuals, and --quick writes one row per method with scores of the test windows."""
import json

import numpy as np
import pytest

from torchdiffusion.data.timeseries import AR2_COEFS, synthetic_series


def test_ar_fit_recovers_a_known_ar2(bench):
    ts = bench("timeseries")
    x = synthetic_series("ar2", 4000)[0]
    coef, sd = ts.fit_ar(x, 2)
    np.testing.assert_allclose(coef[1:], AR2_COEFS, atol=0.06)  # 4 standard errors
    assert abs(coef[0]) < 0.15 and abs(sd - 1) < 0.05


def test_ar_paths_have_the_fitted_one_step_law(bench):
    ts = bench("timeseries")
    train = synthetic_series("ar2", 3000)
    coef, sd = ts.fit_ar(train[0], 2)
    history = np.array([[0.5, 1.0, 2.0]])
    paths = ts.ar_forecast(history, train, 2, 3, 20000, np.random.default_rng(0))  # (S, 1, 3)
    mean = coef[0] + coef[1] * 2.0 + coef[2] * 1.0
    assert abs(paths[:, 0, 0].mean() - mean) < 4 * sd / np.sqrt(20000)
    assert abs(paths[:, 0, 0].std() / sd - 1) < 0.03
    assert paths[:, 0, 2].std() > paths[:, 0, 0].std()  # the spread grows with the horizon


def test_seasonal_naive_repeats_the_last_season(bench):
    ts = bench("timeseries")
    season = np.tile(np.arange(5.0), 20)[None]  # (1, 100), exactly periodic
    draws = ts.seasonal_naive(season[:, :60], season[:, :60], 5, 7, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(draws, np.broadcast_to(season[:, 60:67], (10, 1, 7)))


def test_quick_driver_scores_three_methods(bench, tmp_path, capsys):
    ts = bench("timeseries")
    res = ts.main(["--quick", "--series", "sine", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"),
                   "--samples", "8", "--steps", "3"])
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["diffusion", "seasonal-naive", "AR(24)"]
    assert all(r["windows"] == 8 and r["horizon"] == 24 and r["crps"] > 0 for r in rows)
    assert all(0 <= r[k] <= 1 for r in rows for k in ("coverage50", "coverage90"))
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows
    assert (tmp_path / "fan_sine.png").is_file() and "| sine | AR(24) |" in capsys.readouterr().out
