"""Time series for 1-D diffusion (docs/timeseries.md): series as float arrays (C, T), windows of length L as
(N, C, L), a fixed split by time and per-series normalisation.

A series of T steps is cut at t1 = T - valid - test and t2 = T - test (``test`` = round(test_frac T), ``valid``
likewise):

    train  windows lying entirely in [0, t1)                               (stride cfg.stride)
    valid  windows whose last `horizon` steps lie in [t1, t2)               (origins every eval_stride steps,
    test   windows whose last `horizon` steps lie in [t2, T), the held-out   by default every horizon steps:
           END of the series                                                disjoint targets)

so no step of the valid or test part is ever inside a training window; a valid or test window's first L - horizon
steps (its context) may reach back into the earlier parts, which are observed history at that forecast origin.
Each channel is normalised with the mean and standard deviation of the training part, (x - mean) / std; the
statistics travel with the data set (``meta``, stored in every checkpoint) so samples map back
(:meth:`SeriesWindows.denormalise`). With ``center``, each window served for training has its mean over its first
L - horizon steps (its context) subtracted, the shift a forecast removes from the observed steps and adds back.

Series: synthetic ones with known laws (``sine``: a noisy sinusoid of period 24; ``ar2``: an AR(2) process with
known coefficients), real ones shipped inside statsmodels' wheel (``sunspots``: yearly sunspot numbers 1700-2008;
``co2``: Mauna Loa CO2, weekly values averaged by month; ``elnino``: monthly sea surface temperature 1950-2010),
read from its CSV files with the csv module (``pip install statsmodels``), and a user ``.npz`` whose array under
key ``x`` (cfg.key) is a series (C, T) or (T,), or windows (N, C, L) in time order (split by index, the last
windows the test part).
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..utils import check_choice

SERIES_SPLITS = ("train", "valid", "test")
SYNTHETIC_SEED = 20261201  # the fixed draw of the synthetic series (the same data on every machine)
SINE_PERIOD = 24           # the noisy sinusoid's period (its season)
SINE_NOISE = 0.3           # the noisy sinusoid's noise standard deviation (amplitude 1)
AR2_COEFS = (1.5, -0.75)   # x_t = 1.5 x_{t-1} - 0.75 x_{t-2} + e_t, e_t ~ N(0, 1): complex roots of modulus 0.87
REAL_SERIES = {  # name -> (statsmodels file, season in steps, what it is)
    "sunspots": ("sunspots/sunspots.csv", 11, "yearly mean sunspot number, 1700-2008"),
    "co2": ("co2/co2.csv", 12, "Mauna Loa CO2 (ppm), weekly values averaged by month, 1958-2001"),
    "elnino": ("elnino/elnino.csv", 12, "monthly sea surface temperature (deg C), Nino region, 1950-2010"),
}
SYNTHETIC_SERIES = {"sine": SINE_PERIOD, "ar2": 1}  # name -> season (AR(2): the last value)
SERIES = tuple(SYNTHETIC_SERIES) + tuple(REAL_SERIES)


@dataclass
class SeriesConfig:
    """How a time series becomes windows (the run's section ``series``; data.dataset names the series)."""

    length: int = 64                # L: steps per window (the network's length)
    horizon: int = 16               # the last `horizon` steps of a window are forecast; the first L - horizon given
    stride: int = 1                 # steps between the starts of training windows
    eval_stride: int = 0            # steps between the forecast origins of valid / test windows (0: horizon, so
                                    # their targets are disjoint; smaller: rolling origins, more windows)
    center: bool = False            # subtract from each window its mean over the first L - horizon steps (trending
                                    # series: the model sees shapes, not levels; forecasts add it back)
    valid_frac: float = 0.1         # fraction of the series (before the test part) held out for validation
    test_frac: float = 0.1          # fraction at the END of the series held out for testing
    season: int = 0                 # the season in steps for the seasonal-naive baseline (0: the series' own)
    synthetic_length: int = 2000    # steps of a synthetic series
    key: str = "x"                  # the array's key in a user .npz file

    def replace(self, **changes) -> "SeriesConfig":
        return replace(self, **changes)


def check_series_config(c: SeriesConfig) -> None:
    """Bounds of the window settings, each error naming the field and what to set."""
    if c.length < 2 or c.stride < 1 or c.synthetic_length < 2 or c.eval_stride < 0:
        raise ValueError(f"series.length must be at least 2, series.stride and series.synthetic_length positive and "
                         f"series.eval_stride >= 0, got {c.length}, {c.stride}, {c.synthetic_length}, {c.eval_stride}")
    if not 1 <= c.horizon < c.length:
        raise ValueError(f"series.horizon={c.horizon} must be at least 1 and below series.length={c.length} (a "
                         "window needs observed steps before its horizon): lower series.horizon or raise "
                         "series.length")
    for name in ("valid_frac", "test_frac"):
        if not 0 <= getattr(c, name) < 0.5:
            raise ValueError(f"series.{name} must be in [0, 0.5), got {getattr(c, name)}")
    if c.season < 0:
        raise ValueError(f"series.season must be >= 0 (0: the series' own), got {c.season}")


# --------------------------------------------------------------------------------------------- the series
def synthetic_series(name: str, length: int, seed: int = SYNTHETIC_SEED) -> np.ndarray:
    """A synthetic series (1, length) float64 of known law: ``sine`` x_t = sin(2 pi t / 24) + 0.3 e_t; ``ar2``
    x_t = 1.5 x_{t-1} - 0.75 x_{t-2} + e_t (e_t iid N(0, 1); 200 burn-in steps dropped)."""
    check_choice("synthetic series", name, SYNTHETIC_SERIES)
    rng = np.random.default_rng(seed)
    if name == "sine":
        t = np.arange(length)
        return (np.sin(2 * np.pi * t / SINE_PERIOD) + SINE_NOISE * rng.standard_normal(length))[None]
    burn, (a1, a2) = 200, AR2_COEFS
    e = rng.standard_normal(length + burn)
    x = np.zeros(length + burn)
    for t in range(2, length + burn):
        x[t] = a1 * x[t - 1] + a2 * x[t - 2] + e[t]
    return x[None, burn:]


def statsmodels_file(relative: str) -> Path:
    """A data file inside the installed statsmodels package; a clear error when statsmodels is missing."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real series (sunspots, co2, elnino) are read from the statsmodels package: "
                                "pip install statsmodels (or pip install 'torchdiffusion[timeseries]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed statsmodels; reinstall it "
                                "(pip install --force-reinstall statsmodels)")
    return path


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def _monthly_means(rows: list[list[str]]) -> np.ndarray:
    """co2: weekly (YYYYMMDD, value or empty) rows averaged by calendar month; a month without values is linearly
    interpolated between its neighbours."""
    months: dict[int, list[float]] = {}
    for date, value in rows:
        key = int(date[:4]) * 12 + int(date[4:6]) - 1
        months.setdefault(key, [])
        if value.strip():
            months[key].append(float(value))
    keys = np.arange(min(months), max(months) + 1)
    vals = np.array([np.mean(months[k]) if months.get(k) else np.nan for k in keys])
    ok = ~np.isnan(vals)
    return np.interp(keys, keys[ok], vals[ok])


def real_series(name: str) -> np.ndarray:
    """A real series (1, T) float64 read from statsmodels' CSV file (see REAL_SERIES)."""
    check_choice("real series", name, REAL_SERIES)
    rows = _rows(statsmodels_file(REAL_SERIES[name][0]))
    if name == "sunspots":
        x = np.array([float(v) for _, v in rows])
    elif name == "co2":
        x = _monthly_means(rows)
    else:  # elnino: one row per year, twelve months
        x = np.array([float(v) for row in rows for v in row[1:13]])
    return x[None]


def season_of(name: str, cfg: SeriesConfig) -> int:
    """The season in steps of a series for the seasonal-naive baseline (cfg.season, else the series' own, else 1)."""
    if cfg.season:
        return cfg.season
    if name in REAL_SERIES:
        return REAL_SERIES[name][1]
    return SYNTHETIC_SERIES.get(name, 1)


def load_npz_series(path: Path, key: str) -> np.ndarray:
    """A user .npz: the array under `key`, a series (C, T) or (T,) or windows (N, C, L), as float64."""
    with np.load(path, allow_pickle=False) as f:
        if key not in f.files:
            raise ValueError(f"{path} has no array {key!r} (it has {', '.join(f.files) or 'none'}): save the series "
                             f"as np.savez(path, {key}=array) or set series.key to its name")
        x = np.asarray(f[key], dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim not in (2, 3) or 0 in x.shape:
        raise ValueError(f"{path}[{key!r}] has shape {x.shape}; give a series (T,) or (C, T), or windows "
                         "(N, C, L) in time order")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}[{key!r}] holds NaN or infinite values: fill or drop them first")
    return x


def load_series(name: str, cfg: SeriesConfig) -> np.ndarray:
    """The series `name` as (C, T) float64 (or windows (N, C, L) for a user .npz of windows)."""
    if name in SYNTHETIC_SERIES:
        return synthetic_series(name, cfg.synthetic_length)
    if name in REAL_SERIES:
        return real_series(name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"series file {path} does not exist")
        return load_npz_series(path, cfg.key)
    raise ValueError(f"unknown series {name!r}; accepted: {', '.join(map(repr, SERIES))}, or a .npz file holding "
                     "a series (C, T) or windows (N, C, L)")


# ------------------------------------------------------------------------------------- split and windows
def split_points(steps: int, cfg: SeriesConfig) -> tuple[int, int]:
    """(t1, t2): training steps are [0, t1), validation [t1, t2), test [t2, steps) (module docstring)."""
    test, valid = int(round(cfg.test_frac * steps)), int(round(cfg.valid_frac * steps))
    t2 = steps - test
    t1 = t2 - valid
    if t1 < cfg.length:
        raise ValueError(f"a window of series.length={cfg.length} steps is longer than the training part ({t1} of "
                         f"{steps} steps): lower series.length (or series.valid_frac / series.test_frac)")
    return t1, t2


def window_starts(steps: int, cfg: SeriesConfig, split: str) -> list[int]:
    """The first step of every window of a split of a series of `steps` steps."""
    check_choice("series split", split, SERIES_SPLITS)
    t1, t2 = split_points(steps, cfg)
    if split == "train":
        return list(range(0, t1 - cfg.length + 1, cfg.stride))
    lo, hi = (t1, t2) if split == "valid" else (t2, steps)
    context = cfg.length - cfg.horizon
    step = cfg.eval_stride or cfg.horizon
    return [u - context for u in range(lo, hi - cfg.horizon + 1, step) if u >= context]


class SeriesWindows:
    """Windows (N, C, L) of one split of a normalised series, served like the image data sets: ``batch(indices)``
    -> (float32 (B, C, L), None). ``series`` is the whole normalised series (C, T) and ``cut`` (t1, t2) its split
    points (None for a user array of windows); ``mean`` and ``std`` (C,) map values back (:meth:`denormalise`)."""

    labels = None
    num_classes = 0

    def __init__(self, windows: torch.Tensor, *, name: str, mean: np.ndarray, std: np.ndarray, horizon: int,
                 season: int, starts=None, series: torch.Tensor | None = None, cut=None, center: bool = False):
        self.windows = windows  # (N, C, L) float32, normalised
        self.center = bool(center)
        self.name, self.horizon, self.season = name, int(horizon), int(season)
        self.mean, self.std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)  # (C,)
        self.starts, self.series, self.cut = starts, series, cut

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.windows.shape[1:])

    @property
    def meta(self) -> dict:
        """What a checkpoint records of its data: the series and its normalisation."""
        return {"series": self.name, "mean": self.mean.tolist(), "std": self.std.tolist(), "horizon": self.horizon,
                "season": self.season}

    def batch(self, indices, *, generator=None, flip: bool = False, device=None):
        """(float32 (B, C, L) normalised windows, centred on their context's mean with ``center``, None); series
        are never flipped."""
        if flip:
            raise ValueError("data.flip reverses images; a time series has a direction: set data.flip=false")
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.windows[idx]  # (B, C, L)
        if self.center:
            x = x - x[..., :x.shape[-1] - self.horizon].mean(-1, keepdim=True)
        return x.to(device), None

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised values (..., C, L) back in the series' units: x std + mean."""
        return denormalise(x, self.mean, self.std)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(x, self.mean, self.std)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of x (..., C, L)."""
    m, s = (torch.as_tensor(np.asarray(v), dtype=x.dtype, device=x.device)[:, None] for v in (mean, std))
    return (x - m) / s


def denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """x std + mean per channel of x (..., C, L): the inverse of :func:`normalise`."""
    m, s = (torch.as_tensor(np.asarray(v), dtype=x.dtype, device=x.device)[:, None] for v in (mean, std))
    return x * s + m


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every axis but the channel one (x (C, T) or (N, C, L)); a constant channel
    gets std 1."""
    axes = tuple(i for i in range(x.ndim) if i != x.ndim - 2)
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    return mean, np.where(std > 0, std, 1.0)


def make_series_dataset(name: str, split: str = "train", cfg: SeriesConfig | None = None) -> SeriesWindows:
    """The windows of one split (train, valid or test) of series `name` (see SERIES, or a .npz path),
    normalised with the training part's statistics."""
    cfg = cfg or SeriesConfig()
    check_series_config(cfg)
    check_choice("series split", split, SERIES_SPLITS)
    raw = load_series(str(name), cfg)
    season = season_of(str(name), cfg)
    if raw.ndim == 3:
        return _window_array(raw, str(name), split, cfg, season)
    t1, t2 = split_points(raw.shape[1], cfg)
    mean, std = _stats(raw[:, :t1])
    series = torch.as_tensor((raw - mean[:, None]) / std[:, None], dtype=torch.float32)  # (C, T)
    starts = window_starts(raw.shape[1], cfg, split)
    if not starts:
        raise ValueError(f"the {split} part of {name!r} holds no window of {cfg.horizon} forecast steps after "
                         f"{cfg.length - cfg.horizon} observed ones: raise series.{split}_frac or lower series.horizon")
    windows = torch.stack([series[:, s:s + cfg.length] for s in starts])  # (N, C, L)
    return SeriesWindows(windows, name=str(name), mean=mean, std=std, horizon=cfg.horizon, season=season,
                         starts=starts, series=series, cut=(t1, t2), center=cfg.center)


def _window_array(raw: np.ndarray, name: str, split: str, cfg: SeriesConfig, season: int) -> SeriesWindows:
    """A user array of windows (N, C, L) in time order: the last round(test_frac N) windows are the test split,
    the round(valid_frac N) before them the validation split."""
    n, length = raw.shape[0], raw.shape[2]
    if length != cfg.length:
        raise ValueError(f"{name} holds windows of {length} steps but series.length={cfg.length}: set "
                         f"series.length={length}")
    test, valid = int(round(cfg.test_frac * n)), int(round(cfg.valid_frac * n))
    bounds = {"train": (0, n - test - valid), "valid": (n - test - valid, n - test), "test": (n - test, n)}
    lo, hi = bounds[split]
    if hi <= lo:
        raise ValueError(f"{name} has {n} windows, none in the {split} split: raise series.{split}_frac or give "
                         "more windows")
    mean, std = _stats(raw[:bounds["train"][1]])
    windows = torch.as_tensor((raw[lo:hi] - mean[:, None]) / std[:, None], dtype=torch.float32)
    return SeriesWindows(windows, name=name, mean=mean, std=std, horizon=cfg.horizon, season=season,
                         starts=list(range(lo, hi)), center=cfg.center)
