"""`torchdiffusion report RUN_DIR`: one self-contained HTML page about a run, to open in a browser.

The page holds the run's configuration, a curve for every logged scalar, the sample grids drawn during training,
the latest evaluation (any ``eval*.json`` in the run folder, as ``torchdiffusion evaluate --out`` writes it), the
checkpoint's state and the timings. Everything is inline (pictures as data URIs, no script, no external file), so
the page can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from .. import viz
from ..checkpoint import META_KEY
from ..training import read_metrics

MAX_GRIDS = 12  # sample grids shown, evenly spaced over the run
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #356; padding-bottom: .2em; } h2 { color: #356; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #eef2f6; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.curves img { width: 48%; margin: .5%; } .grids figure { display: inline-block; margin: .4em; text-align: center; }
.grids img { width: 250px; image-rendering: pixelated; } pre { background: #f6f8fa; padding: 1em; overflow: auto; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return html.escape(str(v))


def _table(rows: list[list], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class='num'>{_fmt(v)}</td>" if isinstance(v, (int, float))
                                    else f"<td>{_fmt(v)}</td>" for v in r) + "</tr>")
    return "".join(out) + "</table>"


def metric_summary(metrics: list[dict]) -> list[list]:
    """One row per logged scalar: name, points, last value (and its step), min, max."""
    keys = sorted({k for m in metrics for k in m} - {"step", "time"})
    rows = []
    for k in keys:
        pts = [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))]
        if pts:
            vals = [v for _, v in pts]
            rows.append([k, len(pts), pts[-1][1], pts[-1][0], min(vals), max(vals)])
    return rows


def checkpoint_state(run_dir: Path) -> dict:
    """The JSON metadata of the run's last checkpoint (no tensor is read), or {} when there is none."""
    path = run_dir / "checkpoints" / "last.safetensors"
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(META_KEY, "{}"))


def timings(metrics: list[dict], meta: dict) -> list[list]:
    rows = []
    times = [m["time"] for m in metrics if "time" in m]
    if len(times) > 1:
        rows.append(["logged wall time (s)", round(times[-1] - times[0], 1)])
    ips = [m["images_per_s"] for m in metrics if "images_per_s" in m]
    if ips:
        rows.append(["images per second (median of log windows)", round(statistics.median(ips), 1)])
    if meta:
        rows.append(["checkpoint step", meta.get("step")])
        if meta.get("best_val") is not None:
            rows.append(["best validation loss (EMA)", meta["best_val"]])
    return rows


def scalar_rows(result: dict, prefix: str = "") -> list[list]:
    """[name, value] of every number and string of a JSON result, nested fields named by their path
    (``test.bits_per_character``)."""
    rows = []
    for k, v in result.items():
        if isinstance(v, dict):
            rows += scalar_rows(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
            rows.append([f"{prefix}{k}", v])
    return rows


def text_samples(path: Path) -> list[str]:
    """The section of a text run's last ``generate-text`` (RUN_DIR/text/samples.json), if there is one."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    settings = result.get("settings", {})
    head = ", ".join(f"{k} {settings[k]!r}" for k in ("sampler", "steps", "prompt", "infill", "seed") if k in settings)
    blocks = "".join(f"<pre>{html.escape(t)}</pre>" for t in result.get("samples", []))
    return ["<h2>Text samples</h2>", f"<p>{html.escape(head)}; {result.get('model_calls')} model calls "
            f"(step {result.get('step')})</p>", blocks]


def write_report(run_dir, out=None) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    metrics = read_metrics(run_dir / "logs")
    meta = checkpoint_state(run_dir)
    if not metrics and not meta:
        raise FileNotFoundError(f"{run_dir} holds no logs/metrics.jsonl and no checkpoint: is it a run folder "
                                "(out_dir/name of `torchdiffusion train`)?")
    sections = [f"<h1>Run {html.escape(run_dir.name)}</h1>",
                f"<p>{html.escape(str(run_dir.resolve()))} &middot; report written "
                f"{time.strftime('%Y-%m-%d %H:%M')}</p>"]
    sections += ["<h2>Metrics</h2>", _table(metric_summary(metrics), ["metric", "points", "last", "at step", "min",
                                                                      "max"])]
    with tempfile.TemporaryDirectory() as tmp:
        imgs = [f"<img alt='{html.escape(k)}' src='{_data_uri(viz.loss_curve(metrics, Path(tmp) / f'{i}.png', k))}'>"
                for i, (k, *_) in enumerate(metric_summary(metrics))]
    sections += ["<h2>Curves</h2>", "<div class='curves'>" + "".join(imgs) + "</div>"]
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if grids:
        k = min(MAX_GRIDS, len(grids))
        pick = sorted({round(i * (len(grids) - 1) / max(1, k - 1)) for i in range(k)})
        figs = "".join(f"<figure><img alt='{g.stem}' src='{_data_uri(g)}'><figcaption>step "
                       f"{int(g.stem.split('_')[1])}</figcaption></figure>" for g in (grids[i] for i in pick))
        sections += ["<h2>Samples during training</h2>", f"<div class='grids'>{figs}</div>"]
    sections += text_samples(run_dir / "text" / "samples.json")
    for ev in sorted(run_dir.glob("eval*.json")):
        rows = scalar_rows(json.loads(ev.read_text()))
        sections += [f"<h2>Evaluation ({html.escape(ev.name)})</h2>", _table(rows, ["quantity", "value"])]
    sections += ["<h2>Timings and state</h2>", _table(timings(metrics, meta), ["quantity", "value"])]
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        sections += ["<h2>Configuration</h2>", f"<pre>{html.escape(cfg.read_text())}</pre>"]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page)
    return out
