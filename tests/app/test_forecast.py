"""Task series end to end: train -> checkpoint -> resume (bitwise) -> forecast for both 1-D networks; the observed
part of a forecast is never changed; sample paths do not depend on how many are drawn; the command line."""
import json

import pytest
import torch

from torchdiffusion.app.cli import main
from torchdiffusion.app.forecast import forecast_context, load_series_model, sample_series
from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import ConfigError, load_config
from torchdiffusion.edit import series_mask
from torchdiffusion.training import Trainer

DIT = ["model.kind=dit1d", "model.dit1d.patch_len=4", "model.dit1d.depth=2", "model.dit1d.hidden_size=32",
       "model.dit1d.num_heads=2", "model.dit1d.time_freq_dim=32"]
KINDS = {"unet1d": [], "dit1d": DIT}


def cfg(out, *over):
    return load_config("series-tiny", [f"out_dir={out}", "train.log_every=5", *over])


def ckpt(out):
    return out / "series-tiny" / "checkpoints" / "last.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    Trainer(cfg(out), progress=False).fit()
    return load_series_model(ckpt(out)), out


@pytest.mark.parametrize("kind", KINDS)
def test_interrupted_series_run_resumes_exactly(tmp_path, kind):
    """A run stopped by its time budget and continued ends with the weights, EMA and optimizer state of a run
    never interrupted; the checkpoint records the series' normalisation and the network its window length."""
    over = KINDS[kind] + ["train.steps=30"]
    Trainer(cfg(tmp_path / "a", *over), progress=False).fit()
    first = Trainer(cfg(tmp_path / "b", *over, "train.max_minutes=0.0002"), progress=False).fit()
    assert first["stopped_early"] and 0 < first["steps"] < 30
    Trainer(cfg(tmp_path / "b", *over), progress=False).fit()
    (meta_a, wa), (_, wb) = load_checkpoint(ckpt(tmp_path / "a")), load_checkpoint(ckpt(tmp_path / "b"))
    for group in ("model", "ema", "optim"):
        assert wa[group].keys() == wb[group].keys()
        for k in wa[group]:
            assert torch.equal(wa[group][k], wb[group][k]), (group, k)
    assert meta_a["data"]["series"] == "sine" and meta_a["config"]["model"][kind]["length"] == 32
    model = load_series_model(ckpt(tmp_path / "a"))
    draws = forecast_context(model, torch.randn(2, 1, 24), 8, samples=3, steps=4)
    assert draws.shape == (3, 2, 1, 8) and torch.isfinite(draws).all()


def test_forecast_never_changes_the_observed_part(trained):
    """Forecasting and gap filling (with RePaint's resampling for the gaps) return the given values exactly."""
    model, _ = trained
    data = model.test_windows()
    windows = data.denormalise(data.windows[:3])  # (3, 1, 32) in the series' units
    for mask, resample in ((series_mask(32, horizon=8), 1), (series_mask(32, gaps=[(5, 11), (20, 23)]), 2)):
        draws = sample_series(model, windows, mask, samples=4, seed=3, steps=4, resample=resample,
                              jump_length=2)  # (4, 3, 1, 32)
        known = mask.bool().expand_as(draws)
        assert torch.equal(draws[known], windows.expand_as(draws)[known])
        assert not torch.equal(draws[~known], windows.expand_as(draws)[~known])
        assert not torch.equal(draws[0], draws[1])  # independent paths


def test_sample_paths_do_not_depend_on_how_many_are_drawn(trained):
    model, _ = trained
    context = torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(0))
    few = forecast_context(model, context, 8, samples=2, seed=5, steps=4)
    many = forecast_context(model, context, 8, samples=5, seed=5, steps=4)
    torch.testing.assert_close(many[:2], few, rtol=1e-5, atol=1e-6)


def test_forecast_errors_name_the_fix(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="must fill the model's window of 32 steps"):
        forecast_context(model, torch.zeros(1, 1, 20), 8, samples=1)
    with pytest.raises(ValueError, match="horizon=32 must be in"):
        series_mask(32, horizon=32)
    with pytest.raises(ConfigError, match="series.horizon=40 must be at least 1 and below series.length=32"):
        load_config("series-tiny", ["series.horizon=40"])


def test_the_network_length_follows_the_series(tmp_path):
    """A series run's network takes series.length and the data's channels; another length set by hand is refused."""
    tr = Trainer(cfg(tmp_path, "series.length=48", "series.horizon=12"), progress=False)
    assert (tr.cfg.model.unet1d.length, tr.cfg.model.unet1d.in_channels) == (48, 1)
    with pytest.raises(ConfigError, match="model.unet1d.length=40 contradicts series.length=32"):
        Trainer(cfg(tmp_path / "b", "model.unet1d.length=40"), progress=False)


def test_cli_forecast_scores_the_held_out_end(trained, tmp_path, capsys):
    _, out = trained
    assert main(["forecast", str(ckpt(out)), "--samples", "4", "--steps", "3", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["series"] == "sine" and res["horizon"] == 8 and res["crps"] > 0
    assert (tmp_path / "forecast.npz").is_file() and (tmp_path / "forecast.png").is_file()
    history = tmp_path / "h.txt"
    history.write_text("\n".join(str(v) for v in torch.sin(torch.arange(40) / 4).tolist()))
    assert main(["forecast", str(ckpt(out)), "--history", str(history), "--samples", "2", "--steps", "3",
                 "--out", str(tmp_path / "h")]) == 0
    short = tmp_path / "short.txt"
    short.write_text("1\n2\n3\n")
    assert main(["forecast", str(ckpt(out)), "--history", str(short), "--out", str(tmp_path / "h")]) == 2
    assert "needs the last 24 before a horizon of 8" in capsys.readouterr().err


def test_a_series_run_refuses_image_sample_grids():
    with pytest.raises(ConfigError, match="set train.sample_every=0"):
        load_config("series-tiny", ["train.sample_every=10"])


def test_a_centred_model_forecasts_at_the_level_of_its_context(tmp_path):
    """series.center: the context's mean is removed before sampling and added back, so a context far above the
    training range (50 training standard deviations) is forecast at its own level; the known steps stay exact."""
    Trainer(cfg(tmp_path, "series.center=true", "train.steps=10"), progress=False).fit()
    model = load_series_model(ckpt(tmp_path))
    data = model.test_windows()
    windows = data.denormalise(data.windows[:2] + 50)  # (2, 1, 32)
    draws = sample_series(model, windows, series_mask(32, horizon=8), samples=3, steps=4)
    std = model.meta["data"]["std"][0]
    level = windows[..., :24].mean(-1)  # (2, 1)
    assert ((draws[..., 24:].mean(-1) - level).abs() < 5 * std).all()
    assert torch.equal(draws[..., :24], windows[..., :24].expand(3, -1, -1, -1))
