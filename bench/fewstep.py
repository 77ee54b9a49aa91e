"""Few-step methods against exact answers: students of each method trained with the exact mixture denoiser as their
teacher (or, for consistency training, from data alone), scored at 1, 2 and 4 network evaluations beside the best
sampler of the exact sampler benchmark at the same NFE.

    python bench/fewstep.py exact [--mixtures ring2d mix8d] [--exact-methods pd cd ...] [--train-steps 4000]
                                  [--n 20000] [--json out.json]
    python bench/fewstep.py images --teacher CKPT [--methods ...] [--steps 2000] [--max-minutes 30] [--json out.json]

Score: sliced-W2 excess of the samples over the floor (two independent data draws of the same size), as in
bench/samplers.py. Students are the residual MLP of torchdiffusion.nets (EDM preconditioning), trained with Adam and a
cosine learning rate for `--train-steps` steps of 1024 examples each:

* pd: progressive distillation from the exact teacher on an 8-step DDIM grid (Karras spacing), three rounds: 4, 2, 1
  steps (each round's student starts from the previous one);
* cd: consistency distillation, exact teacher, Heun, 18 levels, EMA target mu = 0.95;
* ct: improved consistency training from data (pseudo-Huber, curriculum 10 -> 160 levels);
* ect: consistency tuning of a denoiser first trained with denoising score matching for the same number of steps;
* rf2 / rf2-1step: the reflowed rectified flow of the exact 1-rectified flow's ODE pairs, sampled with Euler, and
  its one-step distillation;
* meanflow: MeanFlow from data alone (no teacher; average velocity with an interval input, 25% of the examples with
  r != t), sampled with its one-jump-per-interval sampler on a uniform grid of path times.

The images part distils a trained class-conditional image teacher (e.g. the mnist-10min preset's checkpoint) with
`torchdiffusion distill` for each method (`--steps` training steps, stopped at `--max-minutes` of wall time), and
scores the students at 1, 2 and 4 network evaluations (progressive: its rounds' students at 4, 2 and 1 DDIM steps;
consistency students: multistep consistency sampling on the levels of CM_LEVELS scaled to the teacher's sigma_max)
beside the teacher with its own sampler at `--teacher-nfe` steps: FD over the matched floor
(``evaluate.evaluate_samples``), class accuracy, and the CPU-minutes (wall minutes x threads) each method took;
the first 100 samples of every row are drawn to ``<out-dir>/grids/<method>_<nfe>nfe.png`` (column k asks for class k).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchdiffusion.app.distill import run_distill
from torchdiffusion.build import load_denoiser
from torchdiffusion.checkpoint import read_meta
from torchdiffusion.data.toy import random_mixture, ring_mixture
from torchdiffusion.evaluate import evaluate_samples
from torchdiffusion.guidance import net_num_classes, requested_labels
from torchdiffusion.evaluate.metrics import SlicedW2
from torchdiffusion.fewstep import (ConsistencyDistillation, ConsistencyFunction, ConsistencyTraining,
                                    ConsistencyTuning, CouplingDataset, MeanFlowDenoiser, MeanFlowObjective,
                                    OneStepDistillation, ProgressiveDistillation, ReflowObjective, make_coupling)
from torchdiffusion.nets import MLPConfig, MLPDenoiserNet
from torchdiffusion.objectives import DiffusionObjective
from torchdiffusion.precond import Precond
from torchdiffusion.sampling import SAMPLERS, generate, get_sigmas
from torchdiffusion.sampling.sigmas import OPTIMIZED_SAMPLER
from torchdiffusion.schedules import get_schedule
from torchdiffusion import viz

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NFES = (1, 2, 4)
CM_LEVELS = {1: [80.0], 2: [80.0, 0.8], 4: [80.0, 2.0, 0.6, 0.15]}  # multistep consistency sampling levels
BATCH = 1024
GRID_SAMPLES = 100  # images: samples drawn in each (method, NFE) grid
LR = 1e-3


def mixtures() -> dict:
    return {"ring2d": ring_mixture(8, 1.0, 0.05), "mix8d": random_mixture(8, 6, seed=11)}


def student(dim: int, schedule) -> Precond:
    return Precond(MLPDenoiserNet.from_config(MLPConfig(dim=dim, hidden=256, num_blocks=3)), schedule, "edm")


def train(objective, model, data, steps: int, seed: int, *, after=None, needs_step=False, pairs=None) -> Precond:
    """Adam + cosine decay over `steps` batches of BATCH examples drawn from the mixture (or from `pairs`)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for k in range(steps):
        if pairs is None:
            x0, cond = data.sample(BATCH, generator=g).float(), {}
        else:
            x0, _, cond = pairs.batch(torch.randint(0, len(pairs), (BATCH,), generator=g))
        kw = {"step": k} if needs_step else {}
        loss = objective(model, x0, cond, generator=g, **kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after is not None:
            after(model)
    return model.eval()


@torch.no_grad()
def sample(name: str, den, x_T, sigmas, seed: int, **opts):
    return SAMPLERS[name](den, x_T.clone(), sigmas, generator=torch.Generator().manual_seed(seed), **opts).float()


def _cm(f) -> dict:
    """Multistep consistency sampling of a consistency function at each NFE."""
    return {k: ("consistency", f, torch.tensor(CM_LEVELS[k] + [0.0]), {"sigma_min": f.sigma_min}) for k in NFES}


def _pd(mix, edm, steps, seed) -> dict:
    """Progressive distillation: 8 -> 4 -> 2 -> 1 DDIM steps, each round starting from the previous student."""
    teacher, grid, pd = mix, get_sigmas(edm, 8, "karras"), {}
    model = student(mix.dim, edm)
    for _ in range(3):
        obj = ProgressiveDistillation(teacher, grid)
        model = train(obj, copy.deepcopy(model).requires_grad_(True), mix, steps, seed)
        pd[obj.student_steps] = ("ddim", model, obj.student_sigmas, {})
        teacher, grid = model, obj.student_sigmas
    return {"pd": pd}


def _cd(mix, edm, steps, seed) -> dict:
    cd = ConsistencyDistillation(mix, levels=18, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mu=0.95)
    cd_student = train(cd, student(mix.dim, edm), mix, steps, seed, after=cd.after_step, needs_step=True)
    return {"cd": _cm(ConsistencyFunction(cd_student, SIGMA_MIN, 0.5))}


def _ct(mix, edm, steps, seed) -> dict:
    ct = ConsistencyTraining(total_steps=steps, s0=10, s1=160, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    return {"ct": _cm(ConsistencyFunction(train(ct, student(mix.dim, edm), mix, steps, seed, needs_step=True),
                                          SIGMA_MIN, 0.5))}


def _ect(mix, edm, steps, seed) -> dict:
    dsm = train(DiffusionObjective(edm), student(mix.dim, edm), mix, steps, seed)
    ect = ConsistencyTuning(stage_steps=max(1, steps // 8))
    return {"ect": _cm(ConsistencyFunction(train(ect, dsm, mix, steps, seed, needs_step=True), 0.0, 0.5))}


def _mlp(dim: int, **kw):
    return MLPDenoiserNet.from_config(MLPConfig(dim=dim, hidden=256, num_blocks=3, **kw))


def _rf(mix, edm, steps, seed) -> dict:
    """Reflow of the exact 1-rectified flow's ODE pairs (Euler), and its one-step distillation."""
    rf = get_schedule("rf", logit_std=0.0)
    noise, samples = make_coupling(mix, (mix.dim,), 20_000, get_sigmas(rf, 32, "logsnr"),
                                   sampler=SAMPLERS["dpmpp_3m"], seed=seed + 5, final="heun0")
    pairs = CouplingDataset(samples, noise)
    rf2 = train(ReflowObjective(rf, prediction="velocity"), Precond(_mlp(mix.dim), rf, "velocity"), mix, steps,
                seed, pairs=pairs)
    one = train(OneStepDistillation(rf.sigma_max), Precond(_mlp(mix.dim), rf, "x0"), mix, steps, seed,
                pairs=pairs)
    return {"rf2": {k: ("euler", rf2, get_sigmas(rf, k, "uniform"), {}) for k in NFES},
            "rf2-1step": {1: ("euler", one, torch.tensor([rf.sigma_max, 0.0]), {})}}


def _meanflow(mix, edm, steps, seed) -> dict:
    """MeanFlow from data (no teacher), one jump per interval of a uniform grid of path times."""
    rf = get_schedule("rf", logit_std=0.0)
    mf = train(MeanFlowObjective(), MeanFlowDenoiser(_mlp(mix.dim, interval_embed=True), rf), mix, steps, seed)
    return {"meanflow": {k: ("meanflow", mf, get_sigmas(rf, k, "uniform"), {}) for k in NFES}}


EXACT_METHODS = {"pd": _pd, "cd": _cd, "ct": _ct, "ect": _ect, "rf": _rf, "meanflow": _meanflow}


def methods(mix, steps: int, seed: int, log, only=None) -> dict:
    """label -> {nfe: (sampler name, denoiser, sigmas, options)} for the students of every method in `only`
    (default: all of EXACT_METHODS; "rf" gives the rows rf2 and rf2-1step)."""
    edm = get_schedule("edm", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    out, t0 = {}, time.time()
    for name, fn in EXACT_METHODS.items():
        if only is None or name in only:
            out.update(fn(mix, edm, steps, seed))
            log(f"  {name} {time.time() - t0:.0f}s")
    return out


def baselines(mix) -> dict:
    """The samplers of the exact benchmark at NFE 1, 2, 4, 5 with the exact denoiser."""
    edm = get_schedule("edm", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    name, opts = OPTIMIZED_SAMPLER
    rows = {"euler/karras": {k: ("euler", mix, get_sigmas(edm, k, "karras"), {}) for k in (1, 2, 4, 5)},
            "dpmpp_2m/logsnr": {k: ("dpmpp_2m", mix, get_sigmas(edm, k, "logsnr"), {}) for k in (2, 4, 5)},
            f"{name}+heun0/optimized": {k: (name, mix, get_sigmas(edm, k, "optimized"), opts) for k in (2, 4, 5)},
            "dpmpp_2m_sde/karras": {k: ("dpmpp_2m_sde", mix, get_sigmas(edm, k, "karras"), {}) for k in (2, 4, 5)}}
    return rows


def run(mixture_names=None, n: int = 20_000, train_steps: int = 4000, seed: int = 0, log=print,
        only=None) -> dict:
    res = {"n": n, "train_steps": train_steps, "methods": sorted(only or EXACT_METHODS), "mixtures": {}}
    for mname, mix in mixtures().items():
        if mixture_names and mname not in mixture_names:
            continue
        g = torch.Generator().manual_seed(seed)
        ref = SlicedW2(mix.sample(n, generator=g).double(), 1000)
        floor = ref(mix.sample(n, generator=g).double())
        x_T = torch.randn(n, mix.dim, generator=g) * SIGMA_MAX
        log(f"[{mname}] floor {floor:.4f}")
        rows = []
        for label, per_nfe in {**baselines(mix), **methods(mix, train_steps, seed, log, only)}.items():
            for nfe, (sampler, den, sigmas, opts) in sorted(per_nfe.items()):
                x = x_T * float(sigmas[0]) / SIGMA_MAX
                excess = ref(sample(sampler, den, x.double() if den is mix else x, sigmas, seed + 3, **opts)
                             .double()) - floor
                rows.append({"method": label, "nfe": nfe, "sw2_excess": excess})
                log(f"  {label:28s} NFE {nfe}: {excess:+.4f}")
        res["mixtures"][mname] = {"floor": floor, "rows": rows}
    return res


IMAGE_METHODS = ("progressive", "consistency-distillation", "consistency-tuning")  # from a pixel-space teacher
IMAGE_QUICK = dict(steps=2, samples=64, floor_draws=2, bootstrap=10)


def images(teacher: str, methods_: tuple, *, steps: int, max_minutes: float, n: int, teacher_nfe: int,
           floor_draws: int, bootstrap: int, out_dir: str, threads: int, log=print) -> dict:
    """The images part (see the module docstring): one row per (method, NFE) and the teacher's row."""
    den, cfg, meta = load_denoiser(teacher)
    shape = tuple(meta["data_shape"])
    grids = Path(out_dir) / "grids"
    score = lambda d, c, name, **kw: _score_shape(d, c, shape, n, floor_draws, bootstrap,  # noqa: E731
                                                  grid=grids / f"{name}.png", **kw)
    rows = [{"method": "teacher", "nfe": teacher_nfe, "cpu_minutes": None,
             **score(den, cfg, f"teacher_{teacher_nfe}nfe", steps=teacher_nfe)}]
    log(f"teacher at {teacher_nfe} steps: FD {rows[0]['fd']:.2f} ({rows[0]['fd_ratio']:.2f}x the floor)")
    sigma_max = float(get_sigmas(den.schedule, 1)[0]) if hasattr(den, "schedule") else SIGMA_MAX
    for method in methods_:
        over = [f"out_dir={out_dir}", f"name={method}", f"train.steps={steps}", f"train.max_minutes={max_minutes}",
                f"train.threads={threads}", "train.sample_every=0"]
        if method == "progressive":
            over.append("distill.teacher_steps=8")  # rounds 8 -> 4 -> 2 -> 1 student steps
        t0 = time.time()
        result = run_distill(method, teacher, over, log_lines=False)
        cpu_minutes = (time.time() - t0) / 60 * threads
        if method == "progressive":
            students = [(r["sample_steps"], r["checkpoint"]) for r in result["runs"]]
        else:
            students = [(k, result["runs"][-1]["checkpoint"]) for k in NFES]
        for nfe, ckpt in students:
            sden, scfg, _ = load_denoiser(ckpt)
            extra = {}
            if scfg.sample.sampler == "consistency":
                extra = {"sigmas": tuple(sigma_max * v / CM_LEVELS[1][0] for v in CM_LEVELS[nfe]) + (0.0,),
                         "steps": nfe}
            row = {"method": method, "nfe": nfe, "cpu_minutes": cpu_minutes,
                   "train_steps": read_step(ckpt), **score(sden, scfg, f"{method}_{nfe}nfe", **extra)}
            rows.append(row)
            log(f"{method} NFE {nfe}: FD {row['fd']:.2f} ({row['fd_ratio']:.2f}x), {cpu_minutes:.1f} CPU-min")
    return {"teacher": teacher, "dataset": cfg.data.dataset, "samples": n, "rows": rows}


def read_step(ckpt) -> int:
    return int(read_meta(ckpt)["step"])


def _score_shape(den, cfg, shape, n, floor_draws, bootstrap, grid: Path, **sample) -> dict:
    """FD over the matched floor and accuracy of n samples (class i mod 10); the first GRID_SAMPLES drawn to
    `grid` (column k asks for class k)."""
    spec = replace(cfg.sample, **sample)
    labels = requested_labels(n, -1, spec.guidance, net_num_classes(den))
    t0 = time.time()
    x = generate(den, shape, spec, n=n, labels=labels)
    ms = 1000 * (time.time() - t0) / n
    viz.save_grid(x[:GRID_SAMPLES], grid, nrow=10)
    r = evaluate_samples(x, cfg.data.dataset, labels=labels, floor_draws=floor_draws, bootstrap=bootstrap,
                         fd_inf=False)
    return {"fd": r["fd"], "fd_floor": r["fd_floor"], "fd_ratio": r["fd_ratio"], "accuracy": r.get("accuracy"),
            "ms_per_image": ms, "grid": str(grid)}


def images_table(res: dict) -> str:
    out = [f"{res['dataset']}: FD over the matched floor, {res['samples']} samples (teacher {res['teacher']})", "",
           "| method | NFE | training steps | CPU-minutes | FD | floor | FD / floor | accuracy | ms/img |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cpu = f"{r['cpu_minutes']:.1f}" if r["cpu_minutes"] is not None else "-"
        acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "-"
        out.append(f"| {r['method']} | {r['nfe']} | {r.get('train_steps', '-')} | {cpu} | {r['fd']:.2f} | "
                   f"{r['fd_floor']:.2f} | {r['fd_ratio']:.2f} | {acc} | {r['ms_per_image']:.1f} |")
    return "\n".join(out)


def table(res: dict) -> str:
    out = []
    for mname, r in res["mixtures"].items():
        nfes = sorted({row["nfe"] for row in r["rows"]})
        out += [f"### {mname}: sliced-W2 excess over the floor ({r['floor']:.4f})", "",
                "| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for m in dict.fromkeys(row["method"] for row in r["rows"]):
            cells = {row["nfe"]: row["sw2_excess"] for row in r["rows"] if row["method"] == m}
            out.append(f"| {m} | " + " | ".join(f"{cells[k]:.4f}" if k in cells else "-" for k in nfes) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["exact", "images"], help="exact: mixtures with the exact teacher; images: "
                   "students of a trained image teacher")
    p.add_argument("--mixtures", nargs="*", default=None, help="exact: ring2d, mix8d")
    p.add_argument("--n", type=int, default=20_000, help="exact: samples per score")
    p.add_argument("--train-steps", type=int, default=4000, help="exact: training steps of every student")
    p.add_argument("--exact-methods", nargs="+", default=None, help=f"exact: from {', '.join(EXACT_METHODS)} "
                   "(default: all)")
    p.add_argument("--teacher", default=None, help="images: the teacher checkpoint (class-conditional, pixels)")
    p.add_argument("--methods", nargs="+", default=list(IMAGE_METHODS), help=f"images: from {', '.join(IMAGE_METHODS)}")
    p.add_argument("--steps", type=int, default=2000, help="images: training steps per student (per PD round)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="images: wall-time cap per student run")
    p.add_argument("--samples", type=int, default=1000, help="images: samples per score")
    p.add_argument("--teacher-nfe", type=int, default=20, help="images: the teacher's sampling steps")
    p.add_argument("--floor-draws", type=int, default=5, help="images: real floor sets per score")
    p.add_argument("--bootstrap", type=int, default=200, help="images: bootstrap resamples for the FD spread")
    p.add_argument("--out-dir", default="outputs/bench_fewstep", help="images: where the students' runs go")
    p.add_argument("--quick", action="store_true", help="images smoke setting: " + ", ".join(
        f"{k}={v}" for k, v in IMAGE_QUICK.items()))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.part == "exact":
        for m in a.exact_methods or ():
            if m not in EXACT_METHODS:
                p.error(f"unknown exact method {m!r}; choose from {', '.join(EXACT_METHODS)}")
        res = run(a.mixtures, a.n, a.train_steps, only=a.exact_methods)
        text = table(res)
    else:
        if not a.teacher:
            p.error("images needs --teacher CKPT (e.g. a mnist-10min checkpoint)")
        for m in a.methods:
            if m not in IMAGE_METHODS:
                p.error(f"unknown image method {m!r}; choose from {', '.join(IMAGE_METHODS)}")
        q = IMAGE_QUICK if a.quick else dict(steps=a.steps, samples=a.samples, floor_draws=a.floor_draws,
                                             bootstrap=a.bootstrap)
        res = images(a.teacher, tuple(a.methods), steps=q["steps"], max_minutes=a.max_minutes, n=q["samples"],
                     teacher_nfe=a.teacher_nfe, floor_draws=q["floor_draws"], bootstrap=q["bootstrap"],
                     out_dir=a.out_dir, threads=a.threads)
        text = images_table(res)
    res["seconds"] = round(time.time() - t0, 1)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
