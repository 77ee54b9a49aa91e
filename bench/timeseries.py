"""The time-series benchmark (docs/timeseries.md): probabilistic forecasts of the held-out end of each series by a
1-D diffusion model (inpainting of the horizon), against a seasonal-naive and an autoregressive baseline.

Per series it trains (or continues) the run of its preset, forecasts every test window (the last series.horizon
steps of windows whose horizon lies in the series' last test_frac), and scores the S sample paths of each method
with the CRPS (energy form, evaluate/timeseries.py), in the series' units, and the coverage of the central 50 % and
90 % intervals:

* seasonal-naive: the value one season m ago, y_hat(u + h) = y(u + h - m ceil(h / m)), plus residuals drawn from
  the empirical residuals of that lag on the training part (h-step errors, so the spread grows with h);
* AR(p): y_t = c + sum_i a_i y_{t-i} + e_t fitted by least squares on the training part, e_t ~ N(0, s^2) with s
  the residuals' standard deviation; sample paths simulated forward from the observed history.

Run ``python bench/timeseries.py --out outputs/bench_timeseries --json outputs/bench_timeseries/results.json``
(``--quick``: the synthetic series, a tiny network and 40 training steps, seconds; a smoke check only).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from torchdiffusion.app.forecast import forecast_fan, forecast_test, load_series_model
from torchdiffusion.build import build_dataset
from torchdiffusion.config import load_config
from torchdiffusion.data.timeseries import REAL_SERIES, SYNTHETIC_SERIES, statsmodels_file
from torchdiffusion.evaluate.timeseries import forecast_scores
from torchdiffusion.training import Trainer

SERIES_RUNS = {  # series -> (preset, overrides)
    "sine": ("sunspots-forecast", ["data.dataset=sine", "name=sine-forecast", "series.length=96",
                                   "series.horizon=24", "series.eval_stride=0"]),
    "ar2": ("sunspots-forecast", ["data.dataset=ar2", "name=ar2-forecast", "series.length=64",
                                  "series.horizon=16", "series.eval_stride=0"]),
    "sunspots": ("sunspots-forecast", []),
    "co2": ("co2-forecast", []),
    "elnino": ("elnino-forecast", []),
}
QUICK = ["train.steps=40", "train.ckpt_every=0", "model.unet1d.channels=8", "model.unet1d.channel_mult=[1,2]",
         "model.unet1d.num_res_blocks=1", "model.unet1d.attn_levels=[]", "model.unet1d.norm_groups=4",
         "model.unet1d.time_freq_dim=32", "train.batch_size=32"]
BASELINE_STREAM = 0xBA5E  # seed of the baselines' draws


# ---------------------------------------------------------------------------------------------- baselines
def seasonal_naive(history: np.ndarray, train: np.ndarray, season: int, horizon: int, samples: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(samples, C, horizon) draws: the value one season ago plus an h-step residual of the training part."""
    c, u = history.shape
    out = np.empty((samples, c, horizon))
    for h in range(1, horizon + 1):
        lag = season * math.ceil(h / season)
        point = history[:, u + h - 1 - lag]  # (C,)
        resid = train[:, lag:] - train[:, :-lag]  # (C, T - lag)
        pick = rng.integers(0, resid.shape[1], size=samples)
        out[:, :, h - 1] = point[None] + resid[:, pick].T
    return out


def fit_ar(train: np.ndarray, p: int) -> tuple[np.ndarray, float]:
    """Least-squares AR(p) of one channel (T,): (coefficients [c, a_1..a_p], residual standard deviation)."""
    t = len(train)
    design = np.column_stack([np.ones(t - p)] + [train[p - i:t - i] for i in range(1, p + 1)])  # (T - p, p + 1)
    target = train[p:]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    return coef, float(resid.std(ddof=p + 1))


def ar_forecast(history: np.ndarray, train: np.ndarray, p: int, horizon: int, samples: int,
                rng: np.random.Generator) -> np.ndarray:
    """(samples, C, horizon) paths of the AR(p) of each channel, simulated from the last p observed values."""
    c = history.shape[0]
    out = np.empty((samples, c, horizon))
    for ch in range(c):
        coef, sd = fit_ar(train[ch], p)
        paths = np.tile(history[ch, -p:], (samples, 1))  # (S, p)
        for h in range(horizon):
            lags = paths[:, ::-1][:, :p]  # (S, p): y_{t-1}, ..., y_{t-p}
            nxt = coef[0] + lags @ coef[1:] + sd * rng.standard_normal(samples)
            paths = np.column_stack([paths, nxt])
            out[:, ch, h] = nxt
    return out


def baselines(model, samples: int, horizon: int, ar_order: int) -> dict:
    """The baselines' draws (samples, N, C, H) on the model's test windows, in the series' units."""
    data = model.test_windows()
    raw = data.denormalise(data.series).double().numpy()  # (C, T)
    train = raw[:, :data.cut[0]]
    rng = np.random.default_rng(BASELINE_STREAM)
    p = ar_order or max(2, data.season)
    origins = [s + model.length - horizon for s in data.starts]
    naive = [seasonal_naive(raw[:, :u], train, data.season, horizon, samples, rng) for u in origins]
    ar = [ar_forecast(raw[:, :u], train, p, horizon, samples, rng) for u in origins]
    stack = lambda d: torch.as_tensor(np.stack(d, axis=1))  # noqa: E731  (S, N, C, H)
    return {"seasonal-naive": stack(naive), f"AR({p})": stack(ar)}


# ------------------------------------------------------------------------------------------------- driver
def run_series(name: str, args) -> list[dict]:
    """Train (or continue) the series' run, forecast its test windows, score the three methods."""
    preset, over = SERIES_RUNS[name]
    over = over + [f"out_dir={args.out}/runs"] + (QUICK if args.quick else []) + list(args.set)
    cfg = load_config(preset, over)
    t0 = time.perf_counter()
    Trainer(cfg, progress=False).fit()
    train_s = time.perf_counter() - t0
    model = load_series_model(cfg.run_dir / "checkpoints" / "last.safetensors")
    h = cfg.series.horizon
    draws, truth, windows = forecast_test(model, samples=args.samples, seed=args.seed, steps=args.steps,
                                          resample=args.resample, jump_length=args.jump_length)
    forecast_fan(Path(args.out) / f"fan_{name}.png", windows, draws, title=f"{name}: diffusion forecasts")
    label = "diffusion" if args.resample == 1 else f"diffusion (resample {args.resample}, jump {args.jump_length})"
    methods = {label: draws.double(), **baselines(model, args.samples, h, args.ar_order)}
    rows = []
    for method, d in methods.items():
        rows.append({"series": name, "method": method, "windows": int(truth.shape[0]), "horizon": h,
                     **forecast_scores(d, truth.double()),
                     **({"train_steps": cfg.train.steps, "train_seconds": round(train_s, 1)}
                        if method == label else {})})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = "| series | method | windows x horizon | CRPS | 50 % coverage | 90 % coverage |\n|---|---|---|---|---|---|"
    return "\n".join([head] + [f"| {r['series']} | {r['method']} | {r['windows']} x {r['horizon']} | "
                               f"{r['crps']:.4g} | {r['coverage50']:.2f} | {r['coverage90']:.2f} |" for r in rows])


def available(names: list[str]) -> list[str]:
    """The series that can be read here (the real ones need statsmodels)."""
    out = []
    for n in names:
        if n in REAL_SERIES:
            try:
                statsmodels_file(REAL_SERIES[n][0])
            except FileNotFoundError as e:
                print(f"skipping {n}: {e}")
                continue
        out.append(n)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench_timeseries", help="folder of runs, pictures and results")
    p.add_argument("--json", default=None, help="write the rows as JSON to this path")
    p.add_argument("--series", nargs="+", default=None, choices=list(SERIES_RUNS),
                   help="series to run (default: all; --quick: the synthetic ones)")
    p.add_argument("--samples", type=int, default=100, help="sample paths per test window and method")
    p.add_argument("--steps", type=int, default=None, help="diffusion sampler steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion forecasts")
    p.add_argument("--resample", type=int, default=1, help="RePaint resampling passes of the forecasts (1: off)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: levels per resampled block")
    p.add_argument("--ar-order", type=int, default=0, help="p of the AR baseline (0: max(2, the season))")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of every run (e.g. train.steps=500)")
    p.add_argument("--quick", action="store_true", help="synthetic series, tiny network, 40 steps: a smoke check")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.steps = min(args.samples, 16), args.steps or 8
    names = available(args.series or (list(SYNTHETIC_SERIES) if args.quick else list(SERIES_RUNS)))
    rows = [r for n in names for r in run_series(n, args)]
    print(format_rows(rows))
    result = {"rows": rows, "quick": args.quick, "samples": args.samples, "steps": args.steps,
              "resample": args.resample, "jump_length": args.jump_length}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
