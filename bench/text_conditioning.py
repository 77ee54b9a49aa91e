"""Text conditioning against class labels at the same training budget (docs/conditioning.md, "Text-conditioned
generation").

Trains (or takes the checkpoints of) two MNIST models for the same CPU time, both with the learning rate decayed over
that time: the caption model (preset mnist-text: cross-attention at 14x14 and 7x7 to the frozen all-MiniLM-L6-v2) and
the class-label model (preset mnist-10min). Both are then asked for the classes of the first N test images; the
caption model is given those images' captions in the **held-out phrasings**, which never occur in training
(data.captions.PHRASINGS), the class model their labels. Both sample with classifier-free guidance at the same scale
(against the empty caption, resp. the null class). Reported per model: class accuracy of the samples (the data
set's evaluation feature network), FD against the test split with its matched floor (FD / floor), and the share of
the attributes a prompt names (thin / thick, slanted / upright / left-leaning, small / large) that the sample shows
when measured with the same rule (for the class model, which never sees them, this is the chance level).

    python bench/text_conditioning.py --minutes 10 --json outputs/bench_text_conditioning.json
    python bench/text_conditioning.py --quick          # smoke setting (seconds of training)
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchdiffusion.app.cli import load_bench
from torchdiffusion.app.prompts import sample_prompts
from torchdiffusion.build import load_denoiser
from torchdiffusion.config import load_config
from torchdiffusion.data import make_dataset
from torchdiffusion.data.captions import attribute_agreement, caption_choices, caption_set_of
from torchdiffusion.evaluate import evaluate_samples
from torchdiffusion.evaluate.features import feature_net_path
from torchdiffusion.sampling import generate
from torchdiffusion.text_encoder import require_encoder
from torchdiffusion.training import Trainer

BENCH = Path(__file__).parent  # this folder: the benchmarks used here
backbones = load_bench("backbones", BENCH)  # its machine() describes the run

PRESETS = {"text": "mnist-text", "class": "mnist-10min"}
UNBOUNDED_STEPS = 1_000_000     # the budget, not a step count, ends both runs (lr decays over the time)
QUICK = {"minutes": 0.15, "samples": 100, "steps": 5, "floor_draws": 2, "bootstrap": 10, "subset": 2048}
KEYS = ("fd", "fd_floor", "fd_ratio", "fd_ratio_std", "accuracy")


def run_config(kind: str, minutes: float, out_dir: str, subset: int | None):
    """The preset of `kind` ('text' or 'class') trained for `minutes` of CPU time (train.clock=cpu: the process's
    CPU seconds of training steps, so other jobs on the machine do not shorten it), the learning rate over that
    time; the warm-up keeps the preset's share of the schedule (warmup_steps / steps)."""
    base = load_config(PRESETS[kind]).train
    warmup = round(base.warmup_steps / base.steps * UNBOUNDED_STEPS)
    over = [f"train.max_minutes={minutes}", f"train.steps={UNBOUNDED_STEPS}", f"train.warmup_steps={warmup}",
            "train.lr_schedule_over=time", "train.clock=cpu", f"out_dir={out_dir}",
            f"name={PRESETS[kind]}-{minutes:g}min"]
    if subset:
        over.append(f"data.subset={subset}")
    return load_config(PRESETS[kind], over)


def train_model(kind: str, minutes: float, out_dir: str, subset: int | None, log=print) -> tuple[Path, dict]:
    """Train the preset of `kind` for the budget: (its last checkpoint, {steps, train_seconds})."""
    cfg = run_config(kind, minutes, out_dir, subset)
    log(f"{kind}: training {cfg.name} for {minutes} min")
    fit = Trainer(cfg, progress=False, log_lines=True, resume=False).fit()
    return cfg.run_dir / "checkpoints" / "last.safetensors", {"steps": fit["steps"],
                                                             "train_seconds": round(fit["seconds"], 1)}


def heldout_prompts(dataset: str, n: int) -> tuple[list[str], torch.Tensor, list[dict]]:
    """(captions in the held-out phrasings, labels, named attributes) of the first n test images."""
    test = make_dataset(dataset, split="test")
    images, labels = test.images[:n], test.labels[:n]
    choices = caption_choices(images, labels, caption_set_of(dataset), "heldout")
    return [c for c, _ in choices], labels, [a for _, a in choices]


def draw(kind: str, ckpt: Path, prompts, labels, *, scale: float, steps: int, seed: int) -> torch.Tensor:
    """len(labels) samples of the model, guided (cfg) at `scale`: from the prompts, or from the labels."""
    den, cfg, meta = load_denoiser(ckpt)
    spec = replace(cfg.sample, n=len(labels), steps=steps, seed=seed, guidance="cfg", guidance_scale=scale,
                   class_label=None)
    with torch.no_grad():
        if kind == "text":
            return sample_prompts(den, cfg, meta, tuple(meta["data_shape"]), spec, prompts)
        return generate(den, tuple(meta["data_shape"]), spec, labels=labels)


def score(kind: str, x: torch.Tensor, dataset: str, labels, named, *, floor_draws: int, bootstrap: int) -> dict:
    """Accuracy, FD with its floor, and the agreement of the samples' measured attributes with the named ones."""
    res = evaluate_samples(x, dataset, labels=labels, floor_draws=floor_draws, bootstrap=bootstrap)
    agree, count = attribute_agreement(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), named,
                                       caption_set_of(dataset))
    return {"model": kind, **{k: res[k] for k in KEYS if k in res}, "attribute_agreement": round(agree, 4),
            "attributes_named": count}


def format_table(rows: list) -> str:
    head = f"{'model':<7} {'steps':>6} {'train s':>8} {'accuracy':>9} {'FD':>8} {'floor':>7} {'FD/floor':>9} {'attr':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<7} {r.get('steps', '-'):>6} {r.get('train_seconds', '-'):>8} "
                     f"{r['accuracy']:>9.3f} {r['fd']:>8.2f} {r['fd_floor']:>7.2f} {r['fd_ratio']:>9.2f} "
                     f"{r['attribute_agreement']:>6.3f}")
    return "\n".join(lines)


def run(opts: dict, ckpts: dict, out_dir: str, log=print) -> list:
    """Train the models without a checkpoint, sample both for the held-out prompts, score them."""
    dataset = "mnist"
    prompts, labels, named = heldout_prompts(dataset, opts["samples"])
    rows = []
    for kind in ("text", "class"):
        info = {}
        if not ckpts.get(kind):
            ckpts[kind], info = train_model(kind, opts["minutes"], out_dir, opts.get("subset"), log)
        t0 = time.time()
        x = draw(kind, Path(ckpts[kind]), prompts, labels, scale=opts["scale"], steps=opts["steps"], seed=0)
        row = {**score(kind, x, dataset, labels, named, floor_draws=opts["floor_draws"],
                       bootstrap=opts["bootstrap"]), **info, "checkpoint": str(ckpts[kind]),
               "sample_seconds": round(time.time() - t0, 1)}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/text_conditioning.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training CPU minutes of each model (default 10)")
    p.add_argument("--samples", type=int, default=1000, help="samples per model: one per test image (default 1000)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (the presets' dpmpp_2m_sde, karras)")
    p.add_argument("--scale", type=float, default=2.0, help="classifier-free guidance scale of both (default 2)")
    p.add_argument("--floor-draws", type=int, default=5, help="real floor sets per evaluation")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FD spread")
    p.add_argument("--text-ckpt", default="", help="take this caption-model checkpoint instead of training one")
    p.add_argument("--class-ckpt", default="", help="take this class-model checkpoint instead of training one")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke setting: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--out-dir", default="outputs/bench_text_conditioning", help="where the runs go")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    require_encoder()
    if not feature_net_path("mnist").exists():
        raise SystemExit("no MNIST feature network in the cache: run torchdiffusion train-feature-net --dataset mnist")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {"minutes": args.minutes, "samples": args.samples, "steps": args.steps, "scale": args.scale,
            "floor_draws": args.floor_draws, "bootstrap": args.bootstrap, "subset": None}
    if args.quick:
        opts.update(QUICK)
    info = backbones.machine()
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}; {opts}", file=sys.stderr)
    rows = run(opts, {"text": args.text_ckpt, "class": args.class_ckpt}, args.out_dir,
               log=lambda m: print(m, file=sys.stderr))
    print(format_table(rows))
    if args.json:
        backbones.write_json(args.json, {**info, "options": opts, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
