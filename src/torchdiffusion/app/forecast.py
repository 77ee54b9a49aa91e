"""Probabilistic forecasts and gap filling with a series checkpoint (task series; docs/timeseries.md).

A window's observed steps are the known part of :func:`torchdiffusion.edit.impute` (inpainting by replacement):
they are never changed, and each sample path has its own generator. Values are normalised with the statistics the
checkpoint recorded of its training data, and mapped back after sampling.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..build import build_dataset, load_denoiser
from ..data.timeseries import SeriesConfig, denormalise, normalise
from ..edit import edit_plan, impute, series_mask
from ..evaluate.timeseries import forecast_scores


@dataclasses.dataclass
class SeriesModel:
    """A series checkpoint's denoiser with its run configuration and the normalisation of its training data."""

    denoiser: object
    cfg: object
    meta: dict

    @property
    def length(self) -> int:
        return self.cfg.series.length

    def test_windows(self, dataset: str | None = None, series: SeriesConfig | None = None):
        """The test windows (the held-out end) of the run's series or of `dataset`, normalised with the run's
        training statistics when the series is the run's own."""
        cfg = self.cfg if dataset is None and series is None else dataclasses.replace(
            self.cfg, data=dataclasses.replace(self.cfg.data, dataset=dataset or self.cfg.data.dataset),
            series=series or self.cfg.series)
        return build_dataset(cfg, "test", progress=False)


def load_series_model(path, *, device="cpu") -> SeriesModel:
    """A series checkpoint (task series) as a :class:`SeriesModel`."""
    denoiser, cfg, meta = load_denoiser(path, device=device)
    if cfg.task != "series" or "data" not in meta:
        raise ValueError(f"{path} holds a {cfg.task!r} model; forecasting needs a series checkpoint (task series, "
                         "e.g. torchdiffusion train --config sunspots-forecast)")
    return SeriesModel(denoiser, cfg, meta)


def sample_series(model: SeriesModel, windows: torch.Tensor, mask: torch.Tensor, *, samples: int, seed: int = 0,
                  steps: int | None = None, resample: int = 1, jump_length: int = 10,
                  normalised: bool = False) -> torch.Tensor:
    """Draws (samples, N, C, L) of the unknown steps (mask 0) of windows (N, C, L) in the series' units (or
    normalised, as given, with `normalised`); the sampler and grid of the run's sample section (a multistep
    sampler replaced by a single-step one), `steps` to change the number of steps; `resample` > 1: RePaint's
    resampling over blocks of `jump_length` levels (Lugmayr et al. 2022, Alg. 1)."""
    spec = model.cfg.sample if steps is None else dataclasses.replace(model.cfg.sample, steps=steps)
    d = model.meta["data"]
    x = windows if normalised else normalise(windows.float(), d["mean"], d["std"])
    shift = known_mean(x, mask) if model.cfg.series.center else torch.zeros_like(x[..., :1])  # (N, C, 1)
    den, sigmas, opts, spec = edit_plan(model.denoiser, tuple(x.shape[1:]), spec, x.shape[0], step_sampler=True)
    out = impute(den, x - shift, mask, sigmas, samples=samples, seed=seed, sampler=spec.sampler,
                 batch_size=spec.batch_size, resample=resample, jump_length=jump_length, **opts)
    out = torch.where(mask.bool(), x, out + shift)  # the known steps as given (x - shift + shift is not bitwise x)
    if normalised:
        return out
    # the known steps are exact in normalised space; the given values themselves, not their round trip, go back
    return torch.where(mask.bool(), windows.float(), denormalise(out, d["mean"], d["std"]))


def known_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each window's known steps (N, C, 1): for a forecast mask, the mean over the context that a
    ``series.center`` model's training windows were centred on."""
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)


def forecast_context(model: SeriesModel, context: torch.Tensor, horizon: int, *, samples: int, seed: int = 0,
                     **options) -> torch.Tensor:
    """Sample paths (samples, N, C, horizon) of the `horizon` steps after each context (N, C, L - horizon), in the
    series' units (the window length L is the model's); `options` of :func:`sample_series` (steps, resample,
    jump_length)."""
    n, c, k = context.shape
    if k + horizon != model.length:
        raise ValueError(f"context of {k} steps + horizon {horizon} must fill the model's window of {model.length} "
                         f"steps: give the last {model.length - horizon} observed steps")
    window = torch.cat([context.float(), torch.zeros(n, c, horizon)], dim=2)  # (N, C, L)
    draws = sample_series(model, window, series_mask(model.length, horizon=horizon), samples=samples, seed=seed,
                          **options)
    return draws[..., k:]


def read_context(path: str, key: str = "x") -> torch.Tensor:
    """Observed history for the command line: an .npz array under `key` (T,) or (C, T), or (N, C, T), or a text
    file of numbers (one series); returned as (N, C, T)."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        with np.load(p, allow_pickle=False) as f:
            if key not in f.files:
                raise ValueError(f"{p} has no array {key!r} (it has {', '.join(f.files)}): use --key")
            x = np.asarray(f[key], dtype=np.float64)
    else:
        x = np.loadtxt(p, dtype=np.float64, ndmin=1)
    x = x.reshape((1, 1, -1) if x.ndim == 1 else ((1, *x.shape) if x.ndim == 2 else x.shape))
    if x.ndim != 3:
        raise ValueError(f"{p}: the history must be (T,), (C, T) or (N, C, T), got shape {x.shape}")
    return torch.as_tensor(x, dtype=torch.float32)


def forecast_test(model: SeriesModel, *, samples: int, seed: int = 0, dataset: str | None = None,
                  horizon: int | None = None, **options):
    """Forecasts of every test window (the held-out end) of the run's series (or `dataset`): (draws (samples, N,
    C, H), truth (N, C, H), windows (N, C, L)) in the series' units; `options` of :func:`sample_series`."""
    series = model.cfg.series if horizon is None else model.cfg.series.replace(horizon=horizon)
    data = model.test_windows(dataset, series)
    windows = data.denormalise(data.windows)  # (N, C, L)
    h = series.horizon
    draws = forecast_context(model, windows[..., :-h], h, samples=samples, seed=seed, **options)
    return draws, windows[..., -h:], windows


def forecast_fan(path, windows: torch.Tensor, draws: torch.Tensor, *, title: str = "", rows: int = 4) -> Path:
    """A picture of forecast fans: per window (up to `rows`), the observed truth (context and horizon), the median
    and the central 50 % and 90 % intervals of the draws (samples, N, C, H), channel 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, length, h = min(rows, windows.shape[0]), windows.shape[-1], draws.shape[-1]
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n), squeeze=False)
    t, th = np.arange(length), np.arange(length - h, length)
    for i, ax in enumerate(axes[:, 0]):
        d = draws[:, i, 0].double().numpy()  # (S, H)
        q = np.quantile(d, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
        ax.fill_between(th, q[0], q[4], alpha=0.2, color="C0", label="90 %")
        ax.fill_between(th, q[1], q[3], alpha=0.4, color="C0", label="50 %")
        ax.plot(th, q[2], color="C0", lw=1, label="median")
        ax.plot(t, windows[i, 0].numpy(), color="k", lw=1, label="observed")
        ax.axvline(length - h - 0.5, color="gray", lw=0.5, ls="--")
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=4)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cmd_forecast(args) -> int:
    """torchdiffusion forecast CKPT: forecast the held-out end of the run's series (or --series), scored with
    CRPS and interval coverage; or, with --history, the steps after a given history. Writes forecast.npz (and a
    fan picture for the held-out end) into --out."""
    model = load_series_model(args.checkpoint)
    out = Path(args.out or Path(args.checkpoint).resolve().parent.parent / "forecast")
    out.mkdir(parents=True, exist_ok=True)
    h = args.horizon or model.cfg.series.horizon
    options = {"steps": args.steps, "resample": args.resample, "jump_length": args.jump_length}
    if args.history:
        history = read_context(args.history, args.key)
        k = model.length - h
        if history.shape[-1] < k:
            raise ValueError(f"the history has {history.shape[-1]} steps; the model needs the last {k} before a "
                             f"horizon of {h} (window {model.length})")
        draws = forecast_context(model, history[..., -k:], h, samples=args.samples, seed=args.seed, **options)
        np.savez(out / "forecast.npz", samples=draws.numpy())
        print(json.dumps({"samples": list(draws.shape), "median": draws.median(0).values.flatten().tolist()}))
        return 0
    draws, truth, windows = forecast_test(model, samples=args.samples, seed=args.seed, dataset=args.series,
                                          horizon=h, **options)
    np.savez(out / "forecast.npz", samples=draws.numpy(), truth=truth.numpy(), windows=windows.numpy())
    forecast_fan(out / "forecast.png", windows, draws, title=args.series or model.cfg.data.dataset)
    print(json.dumps({"series": args.series or model.cfg.data.dataset, "windows": int(truth.shape[0]),
                      "horizon": h, **forecast_scores(draws, truth)}))
    return 0


def add_forecast_command(sub) -> None:
    """The `forecast` subcommand of the command line."""
    f = sub.add_parser("forecast", help="probabilistic forecasts with a series checkpoint (task series; "
                                        "docs/timeseries.md): the held-out end of its series, or --history")
    f.add_argument("checkpoint", help="a series checkpoint (.safetensors)")
    f.add_argument("--series", default=None, help="forecast the held-out end of this series instead of the run's")
    f.add_argument("--history", default=None, help="an .npz (key --key) or text file of observed values to "
                                                   "continue: (T,), (C, T) or (N, C, T)")
    f.add_argument("--key", default="x", help="the array's key in the --history .npz")
    f.add_argument("--horizon", type=int, default=0, help="steps to forecast (default: the run's series.horizon)")
    f.add_argument("--samples", type=int, default=100, help="sample paths per window")
    f.add_argument("--seed", type=int, default=0, help="path s of window n uses the generator (seed, s N + n)")
    f.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    f.add_argument("--resample", type=int, default=1, help="RePaint resampling: passes over each block (1: off)")
    f.add_argument("--jump-length", type=int, default=10, help="RePaint: levels per resampled block")
    f.add_argument("--out", default=None, help="output folder (default: the run's forecast/ folder)")
    f.set_defaults(func=cmd_forecast)
