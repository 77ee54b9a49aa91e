"""A masked diffusion language model against an autoregressive one of the same size, data and compute.

The presets ``shakespeare-mdlm`` (MDLM: absorbing process, continuous-time NELBO with SUBS) and ``shakespeare-ar``
(the same transformer with a causal mask, next-token cross-entropy) are trained for each budget of ``--minutes``,
the two at the same time, one thread each (the 2-core machine's two cores). Equal compute is equal steps: both get
the same ``train.steps``, planned from the slower of their timed training steps (one thread, on the real data) so
that the cosine decay completes in the budget. Then, for every budget:

* test (and validation) bits per character: the MDLM bound (``--draws`` time draws per window) and the AR model's
  exact negative log-likelihood, over every window of the split (``evaluate.text``);
* generation speed: characters per second of MDLM's ancestral sampler (with its cache) for each of ``--steps`` and
  of the AR model's left-to-right sampler (one call per character), ``--speed-n`` sequences per batch;
* sample quality: ``--nll-n`` unconditional samples of each sampler scored by the AR model (bits per character of
  the samples under it), against the AR model's own samples; MDLM at a quarter of the AR model's network calls is
  the issue's goal row;
* the validation curves of both (the trainer's bits per character on the first validation windows, logged at every
  checkpoint) in one plot, and samples as text.

    python bench/text.py --minutes 30 --json outputs/bench_text_30.json --out-dir outputs/bench_text
    python bench/text.py --minutes 60 --json outputs/bench_text_60.json --out-dir outputs/bench_text
    python bench/text.py --quick                                   # a smoke run of a few seconds per model

Runs are kept under ``--out-dir``; ``--reuse`` takes a finished run there (one that reached its planned steps)
instead of training it again. The data are prepared on first use (``torchdiffusion prepare-data --dataset
shakespeare``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchdiffusion.app.cli import load_bench
from torchdiffusion import viz
from torchdiffusion.app.text import draw, start
from torchdiffusion.build import load_text_model
from torchdiffusion.checkpoint import read_meta
from torchdiffusion.config import TextSampleConfig, load_config
from torchdiffusion.discrete import NextTokenObjective
from torchdiffusion.evaluate.text import evaluate_text_checkpoint
from torchdiffusion.nets import count_parameters
from torchdiffusion.training import Trainer
from torchdiffusion.training.tracking import read_metrics
from torchdiffusion.utils import LOG2, sample_generators

PRESETS = {"mdlm": "shakespeare-mdlm", "ar": "shakespeare-ar"}
BUDGET_FILL = 0.95     # fraction of the budget the step count aims at (validation and checkpoints take the rest)
TIMED_STEPS = 6
CKPT_EVERY = 100       # steps between validations (points of the curves) and checkpoints
SPEED_STEPS = (8, 16, 32, 64, 128, 256)
NLL_STEPS = (8, 16, 32, 64, 128)
SEED = 0
QUICK = dict(minutes=[0.1], draws=1, steps=[4, 16], nll_n=4, speed_n=2, splits=("valid",))


BENCH = Path(__file__).parent  # this folder: the benchmarks used here
speed = load_bench("train_speed", BENCH)
machine = load_bench("backbones", BENCH).machine


# --------------------------------------------------------------------------------------------------- training
def overrides(objective: str, minutes: float, out_dir: Path) -> list[str]:
    return [f"out_dir={out_dir}", f"name={objective}-{minutes:g}min", "train.threads=1",
            f"train.ckpt_every={CKPT_EVERY}", f"train.max_minutes={2 * minutes + 2:g}"]  # a guard only


def step_seconds(objective: str, minutes: float, out_dir: Path) -> tuple[float, int]:
    """Median seconds of one training step of the preset (one thread, real data) and its parameter count."""
    cfg = load_config(PRESETS[objective], overrides(objective, minutes, out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(replace(cfg, out_dir=tmp, name="timing"), progress=False, resume=False)
        try:
            sec = statistics.median(speed.time_steps(tr, TIMED_STEPS, warmup=2))
            return sec, count_parameters(tr.net)
        finally:
            tr.close()


def finished(ckpt: Path) -> int | None:
    """The steps of a run that completed its schedule (None if it did not, or is not there)."""
    if not ckpt.is_file():
        return None
    meta = read_meta(ckpt)
    return meta["step"] if meta.get("step") == meta["config"]["train"]["steps"] else None


def train_pair(minutes: float, timing: dict, out_dir: Path, *, reuse: bool, quick: bool, log) -> dict:
    """Both presets for `minutes` at equal steps, trained at the same time in two processes; `timing`: each
    objective's (seconds per step, parameters)."""
    sec = max(s for s, _ in timing.values())
    steps = max(4, int(BUDGET_FILL * minutes * 60 / sec))
    extra = [f"train.steps={steps}"] + ([f"train.warmup_steps={max(1, steps // 10)}", "train.ckpt_every=2"]
                                       if quick else [])
    runs, procs = {}, {}
    for o in PRESETS:
        over = overrides(o, minutes, out_dir) + extra
        cfg = load_config(PRESETS[o], over)
        ckpt = cfg.run_dir / "checkpoints" / "last.safetensors"
        runs[o] = {"objective": o, "preset": PRESETS[o], "params": timing[o][1],
                   "step_seconds": round(timing[o][0], 4), "planned_steps": steps, "overrides": over,
                   "checkpoint": str(ckpt), "run_dir": str(cfg.run_dir)}
        if reuse and finished(ckpt):
            log(f"{o} {minutes:g} min: reusing {ckpt} ({finished(ckpt)} steps)")
            runs[o].update(reused=True, planned_steps=finished(ckpt))
            continue
        log(f"{o} {minutes:g} min: {timing[o][1] / 1e6:.3f} M parameters, {timing[o][0]:.3f} s/step "
            f"-> train.steps={steps} (both)")
        logf = open(out_dir / f"{o}-{minutes:g}min.log", "w")
        cmd = [sys.executable, "-m", "torchdiffusion", "train", "--config", PRESETS[o], "--no-resume", *over, *extra]
        procs[o] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), time.time(), logf)
    for o, (p, t0, logf) in procs.items():
        rc = p.wait()
        logf.close()
        if rc != 0:
            raise SystemExit(f"training {o} failed (exit {rc}); its log: {logf.name}")
        runs[o]["train_seconds"] = round(time.time() - t0, 1)
    for o, r in runs.items():
        r["steps"] = read_meta(Path(r["checkpoint"])).get("step")
    return runs


# ------------------------------------------------------------------------------------------------ measurement
def generate(module, cfg, tokenizer, n: int, spec: TextSampleConfig) -> tuple[torch.Tensor, int, float]:
    """n unconditional samples (sample i seeded by (spec.seed, i)): tokens (n, L), model calls, seconds."""
    x, fixed = start(cfg, tokenizer, n)
    t0 = time.perf_counter()
    tokens, calls = draw(module, cfg, x, fixed, spec, sample_generators(spec.seed, n))
    return tokens, calls, time.perf_counter() - t0


@torch.no_grad()
def ar_bits(ar_module, vocab_size: int, tokens: torch.Tensor) -> torch.Tensor:
    """Bits per character of each sequence under the autoregressive model, (N,)."""
    nats = torch.cat([NextTokenObjective(vocab_size).per_sample(ar_module, x) for x in tokens.split(64)])
    return nats / tokens.shape[1] / LOG2


def samplers(steps) -> list[tuple[str, str, TextSampleConfig]]:
    """(model, label, settings) of every sampler measured: the AR model, then MDLM's ancestral sampler per step
    count. (LLaDA's remasking takes the argmax, so its unconditional samples are all the same text: it has no
    row here.)"""
    rows = [("ar", "ar left to right", TextSampleConfig(sampler="ancestral", seed=SEED))]
    rows += [("mdlm", f"mdlm ancestral {s}", TextSampleConfig(sampler="ancestral", steps=s, seed=SEED))
             for s in steps]
    return rows


def measure(runs: dict, *, draws: int, speed_steps, nll_steps, speed_n: int, nll_n: int, splits, log) -> dict:
    out = {"eval": {}, "speed": [], "nll": [], "samples": {}}
    for o, r in runs.items():
        t0 = time.time()
        res = evaluate_text_checkpoint(r["checkpoint"], draws=draws, splits=splits)
        out["eval"][o] = {s: res[s] for s in splits}
        log(f"{o}: " + ", ".join(f"{s} {res[s]['bits_per_character']:.4f} bits/char" for s in splits)
            + f" ({time.time() - t0:.0f} s)")
    models = {o: load_text_model(r["checkpoint"]) for o, r in runs.items()}
    ar_module, ar_cfg, _, tokenizer = models["ar"]
    k = ar_cfg.model.text_transformer.vocab_size
    length = ar_cfg.model.text_transformer.seq_len
    # speed: one warm-up batch per sampler, then the timed one
    for o, label, spec in samplers(speed_steps):
        module, cfg = models[o][0], models[o][1]
        generate(module, cfg, tokenizer, speed_n, replace(spec, seed=SEED + 1))
        _, calls, sec = generate(module, cfg, tokenizer, speed_n, spec)
        row = {"sampler": label, "model": o, "steps": spec.steps or length, "model_calls": calls,
               "seconds": round(sec, 3), "chars_per_second": round(speed_n * length / sec, 1)}
        out["speed"].append(row)
        log(f"speed {label}: {calls} calls, {row['chars_per_second']} chars/s")
    # quality: samples scored by the AR model
    for o, label, spec in samplers(nll_steps):
        module, cfg = models[o][0], models[o][1]
        tokens, calls, sec = generate(module, cfg, tokenizer, nll_n, spec)
        bits = ar_bits(ar_module, k, tokens)
        row = {"sampler": label, "model": o, "steps": spec.steps or length, "model_calls": calls,
               "ar_bits_per_char": float(bits.mean()), "se": float(bits.std() / math.sqrt(len(bits))),
               "n": nll_n}
        out["nll"].append(row)
        out["samples"][label] = tokenizer.decode(tokens[:4])
        log(f"nll {label}: {calls} calls, {row['ar_bits_per_char']:.3f} +- {row['se']:.3f} bits/char under ar")
    ref = out["nll"][0]["ar_bits_per_char"]
    for row in out["nll"]:
        row["ratio_to_ar_samples"] = row["ar_bits_per_char"] / ref
    return out


def curves_plot(results: list[dict], path: Path) -> Path:
    """Validation bits per character against training minutes, every run in one plot."""
    plt = viz._plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for res in results:
        for o, r in res["runs"].items():
            m = [x for x in read_metrics(Path(r["run_dir"]) / "logs") if "val_loss_ema" in x]
            steps = [x["step"] for x in m]
            minutes = [s * res["minutes"] / r["planned_steps"] for s in steps]
            ax.plot(minutes, [x["val_loss_ema"] for x in m], marker=".", lw=1.2,
                    ls="-" if o == "ar" else "--", label=f"{o}, {res['minutes']:g}-min schedule")
    ax.set_xlabel("training minutes (steps x planned step time)")
    ax.set_ylabel("validation bits per character (EMA)")
    ax.set_title("MDLM bound and AR NLL, Shakespeare characters")
    ax.grid(alpha=0.3)
    ax.legend()
    return viz._save_fig(plt, fig, path)


def table(res: dict) -> str:
    lines = [f"## {res['minutes']:g} CPU-minutes each"]
    ev = res["measure"]["eval"]
    lines.append("| model | params | steps | s/step | " + " | ".join(f"{s} bits/char" for s in ev["ar"]) + " |")
    lines.append("| --- | --- | --- | --- | " + " | ".join("---" for _ in ev["ar"]) + " |")
    for o, r in res["runs"].items():
        cells = [f"{ev[o][s]['bits_per_character']:.4f} +- {ev[o][s]['bits_per_character_se']:.4f}" for s in ev[o]]
        lines.append(f"| {o} | {r['params']:,} | {r['steps']} | {r['step_seconds']} | " + " | ".join(cells) + " |")
    for s in ev["ar"]:
        ratio = ev["mdlm"][s]["bits_per_character"] / ev["ar"][s]["bits_per_character"]
        lines.append(f"\n{s}: MDLM bound / AR NLL = {ratio:.4f} (goal <= 1.08)")
    lines += ["", "| sampler | model calls | chars/s |", "| --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['model_calls']} | {r['chars_per_second']} |" for r in res["measure"]["speed"]]
    lines += ["", "| sampler | model calls | bits/char under AR | / AR's own samples |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['model_calls']} | {r['ar_bits_per_char']:.3f} +- {r['se']:.3f} | "
              f"{r['ratio_to_ar_samples']:.3f} |" for r in res["measure"]["nll"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[30.0], help="training budgets, each model")
    p.add_argument("--out-dir", default="outputs/bench_text", help="where the runs and the plot go")
    p.add_argument("--reuse", action="store_true", help="take finished runs in --out-dir")
    p.add_argument("--draws", type=int, default=4, help="MDLM time draws per evaluation window")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="MDLM sampling steps (speed and NLL rows)")
    p.add_argument("--speed-n", type=int, default=16, help="sequences per timed generation batch")
    p.add_argument("--nll-n", type=int, default=64, help="samples scored by the AR model per sampler")
    p.add_argument("--quick", action="store_true", help="a smoke run: seconds of training, few samples")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    opts = dict(minutes=a.minutes, draws=a.draws, steps=a.steps, nll_n=a.nll_n, speed_n=a.speed_n,
                splits=("test", "valid"))
    if a.quick:
        opts.update(QUICK)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    # every budget's steps from one timing, taken before any training loads the machine
    timing = {o: step_seconds(o, opts["minutes"][0], out_dir) for o in PRESETS}
    results = []
    for minutes in opts["minutes"]:
        runs = train_pair(minutes, timing, out_dir, reuse=a.reuse, quick=a.quick, log=print)
        torch.set_num_threads(1)  # measured as trained: one thread
        res = {"minutes": minutes, "runs": runs}
        res["measure"] = measure(runs, draws=opts["draws"], speed_steps=opts["steps"] or SPEED_STEPS,
                                 nll_steps=opts["steps"] or NLL_STEPS, speed_n=opts["speed_n"],
                                 nll_n=opts["nll_n"], splits=opts["splits"], log=print)
        results.append(res)
        print(table(res))
        plot = curves_plot(results, out_dir / "valid_curves.png")
        print(f"validation curves: {plot}")
        if a.json:
            Path(a.json).write_text(json.dumps({**info, "options": opts, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
