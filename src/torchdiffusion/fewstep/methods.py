"""The few-step methods by name: their hyperparameters (:class:`DistillConfig`, the ``distill`` section of a run's
configuration), what each needs (a teacher, its weights as the student's start, coupled pairs), the student it
trains, its objective, and the sampling its student is drawn with by default.

    method                    teacher (checkpoint)        student starts from   sampled with
    progressive               denoiser, DDIM grid         the teacher           ddim, its round's steps
    consistency-distillation  denoiser, one ODE step      the teacher           consistency, 1 step
    consistency-training      none                        scratch               consistency, 1 step
    consistency-tuning        weights only                the teacher           consistency, 1 step
    lcm                       latent, class-conditional   the teacher           consistency, 4 steps, guidance embedded
    reflow                    denoiser, draws couplings   the teacher           euler, 1 step
    one-step                  denoiser, draws couplings   the teacher           ddim, 1 step
    meanflow                  none                        scratch               meanflow, 1 step

The assembling (loading the teacher, its hash, the coupling file, the student's configuration) is in
:mod:`torchdiffusion.build`; this module only turns a configuration and a teacher denoiser into parts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..precond import Precond
from ..schedules import DiscreteSchedule, Schedule
from ..sampling.sigmas import SPACINGS, get_sigmas
from ..utils import check_choice
from .consistency import (DISTANCES, ConsistencyDistillation, ConsistencyFunction, ConsistencyTraining,
                          ConsistencyTuning, LatentConsistencyDistillation, TEACHER_SOLVERS)
from .meanflow import MeanFlowDenoiser, MeanFlowObjective
from .progressive import ProgressiveDistillation, halve_grid
from .rectified import OneStepDistillation, ReflowObjective


@dataclass(frozen=True)
class Method:
    """What a method needs: `teacher` 'denoiser' (its denoiser runs in the objective or draws the couplings; the
    student starts from its weights), 'weights' (the student only starts from them) or 'none' (from scratch);
    `coupled` (trains on stored noise-sample pairs); `consistency` (the student is sampled as a consistency
    function); `sampler` (what `sample` uses by default)."""

    teacher: str
    coupled: bool
    consistency: bool
    sampler: str


METHODS = {
    "progressive": Method("denoiser", False, False, "ddim"),               # Salimans & Ho 2022
    "consistency-distillation": Method("denoiser", False, True, "consistency"),  # Song et al. 2023
    "consistency-training": Method("none", False, True, "consistency"),    # Song & Dhariwal 2023
    "consistency-tuning": Method("weights", False, True, "consistency"),   # Geng et al. 2024 (ECT)
    "lcm": Method("denoiser", False, True, "consistency"),                 # Luo et al. 2023
    "reflow": Method("denoiser", True, False, "euler"),                    # Liu et al. 2022
    "one-step": Method("denoiser", True, False, "ddim"),                   # Liu et al. 2022, sec. 2.3
    "meanflow": Method("none", False, False, "meanflow"),                  # Geng et al. 2025
}
SOLVERS = TEACHER_SOLVERS       # the teacher ODE steps of consistency distillation (teacher_step)
COUPLING_SAMPLERS = ("heun", "euler", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc")  # deterministic: an ODE's pairs
DEFAULT_SOLVER = {"lcm": "euler"}  # LCM's DDIM step between skipping levels (DDIM is Euler in x = x0 + sigma n)
DEFAULT_DISTANCE = {"consistency-distillation": "l2", "lcm": "pseudo_huber", "consistency-training": "pseudo_huber",
                    "consistency-tuning": "pseudo_huber"}
LCM_SAMPLE_STEPS = 4            # Luo et al. 2023: 1-4 step sampling; the student's default
NEW_INPUTS = ("guidance_embed.", "interval_embed.")  # student inputs a teacher network lacks (LCM, MeanFlow)


@dataclass
class DistillConfig:
    method: str = ""                # a few-step method (torchdiffusion distill METHOD); '' for other tasks
    teacher: str = ""               # the teacher checkpoint ('' : none, consistency-training and meanflow)
    teacher_ema: bool = True        # the teacher's EMA weights (else its raw ones)
    spacing: str = ""               # the teacher's grid of levels (progressive, lcm, couplings); '' : its sampling's
    # progressive distillation (Salimans & Ho 2022)
    teacher_steps: int = 8          # DDIM steps of the first round's teacher (a power of two)
    rounds: int = 0                 # rounds, each halving the steps (0: down to 1 step)
    round: int = 1                  # the round this run is (set by `distill`: teacher_steps / 2^(round-1) steps)
    # consistency distillation / training / tuning, latent consistency
    levels: int = 18                # CD: levels N of the Karras grid; lcm: levels of its skipping-step grid
    sigma_min: float = 0.002        # the boundary epsilon, f(x, epsilon) = x (CD, CT; ECT's is 0, lcm's its grid's)
    sigma_max: float = 0.0          # the top of the CD / CT grid (0: the schedule's sigma_max)
    rho: float = 7.0                # Karras spacing exponent of the CD / CT grid
    sigma_data: float = 0.5         # sigma_d of c_skip
    solver: str = ""                # the teacher's ODE step: heun, euler or dpmpp_2s ('' : heun; euler (DDIM) for lcm)
    distance: str = ""              # l2, pseudo_huber or feature ('' : l2 for CD, pseudo_huber otherwise)
    feature: str = "own"            # distance 'feature': 'own' (latent.perceptual, never the evaluation net) or LPIPS
    huber_c: float = 0.0            # pseudo-Huber c (0: 0.00054 sqrt(d), Song & Dhariwal 2023; ECT: 0)
    mu: float = 0.95                # CD, lcm: EMA rate of the target network
    ct_s0: int = 10                 # CT curriculum: initial levels s0 (Song & Dhariwal 2023, eq. 5)
    ct_s1: int = 1280               # CT curriculum: final levels s1
    ect_stages: int = 8             # ECT: stages over train.steps (r -> t as they go)
    ect_q: float = 2.0              # ECT: q of r = t (1 - q^-(s+1) (1 + k sigmoid(-b t)))
    ect_k: float = 8.0              # ECT: k
    ect_b: float = 1.0              # ECT: b
    guidance_min: float = 2.0       # lcm: guidance scales w drawn uniformly in [guidance_min, guidance_max]
    guidance_max: float = 8.0
    # reflow and one-step distillation (Liu et al. 2022)
    couplings: int = 10000          # noise-sample pairs drawn once with the teacher's ODE (stored in the run folder)
    coupling_sampler: str = "heun"  # the deterministic sampler that draws them
    coupling_steps: int = 32        # its steps
    # MeanFlow (Geng et al. 2025)
    meanflow_ratio: float = 0.25    # fraction of examples with r != t
    meanflow_power: float = 1.0     # adaptive weight 1 / (||delta||^2 + c)^p (0: plain L2)


def check_distill(d: DistillConfig) -> None:
    """Names and bounds of the distill section; ValueError naming the field and what it allows."""
    check_choice("distill.method", d.method, METHODS)
    if d.spacing:
        check_choice("distill.spacing", d.spacing, SPACINGS)
    if d.solver:
        check_choice("distill.solver", d.solver, SOLVERS)
    if d.distance:
        check_choice("distill.distance", d.distance, DISTANCES)
    check_choice("distill.coupling_sampler", d.coupling_sampler, COUPLING_SAMPLERS)
    if METHODS[d.method].teacher != "none" and not d.teacher:
        raise ValueError(f"method {d.method!r} needs a teacher checkpoint (distill.teacher)")
    if d.teacher_steps < 2 or d.teacher_steps & (d.teacher_steps - 1):
        raise ValueError(f"distill.teacher_steps must be a power of two >= 2, got {d.teacher_steps}")
    most = int(math.log2(d.teacher_steps))  # rounds down to one step
    if not 1 <= d.round <= most or not 0 <= d.rounds <= most:
        raise ValueError(f"distill.round must be in [1, {most}] and distill.rounds in [0, {most}] (log2 of "
                         f"teacher_steps={d.teacher_steps}), got {d.round} and {d.rounds}")
    ints = {"levels": 2, "ct_s0": 2, "ect_stages": 1, "couplings": 1, "coupling_steps": 1}
    for name, low in ints.items():
        if getattr(d, name) < low:
            raise ValueError(f"distill.{name} must be at least {low}, got {getattr(d, name)}")
    if d.ct_s1 < d.ct_s0 or not 0 <= d.guidance_min <= d.guidance_max or not 0 <= d.meanflow_ratio <= 1:
        raise ValueError("need distill.ct_s0 <= ct_s1, 0 <= guidance_min <= guidance_max and 0 <= meanflow_ratio <= 1")
    if d.sigma_min < 0 or d.sigma_max < 0 or d.huber_c < 0 or not 0 <= d.mu < 1 or d.ect_q <= 1:
        raise ValueError("need distill.sigma_min, sigma_max, huber_c >= 0, 0 <= mu < 1 and ect_q > 1")


def round_steps(d: DistillConfig) -> tuple[int, int]:
    """(teacher steps, student steps) of progressive round `d.round`."""
    teacher = d.teacher_steps >> (d.round - 1)
    return teacher, teacher // 2


def rounds_of(d: DistillConfig) -> int:
    """The number of progressive rounds: distill.rounds, or down to one step (log2 teacher_steps)."""
    return d.rounds or int(math.log2(d.teacher_steps))


def usable_spacing(spacing: str, schedule: Schedule) -> str:
    """`spacing`, except the DDIM respacings of a discrete schedule ('leading' with one step is sigma_min; neither
    exists for a continuous schedule): 'trailing' for a discrete schedule, 'uniform' otherwise."""
    if spacing == "leading" or (spacing == "trailing" and not isinstance(schedule, DiscreteSchedule)):
        return "trailing" if isinstance(schedule, DiscreteSchedule) else "uniform"
    return spacing


def default_spacing(method: str, spacing: str, schedule: Schedule) -> str:
    """distill.spacing when it is not given: the teacher's sampling `spacing` (usable_spacing), except for lcm on a
    discrete schedule, 'trailing': every (T/N)-th of the teacher's steps down from T - 1, Luo et al.'s skipping-step
    schedule."""
    if method == "lcm" and isinstance(schedule, DiscreteSchedule):
        return "trailing"
    return usable_spacing(spacing, schedule)


def progressive_grid(schedule: Schedule, d: DistillConfig) -> torch.Tensor:
    """The round's teacher grid of 2N DDIM steps (decreasing, ending in 0): the first round's teacher_steps grid,
    halved once per earlier round (round k's teacher is round k-1's student, trained on that grid); the student's
    is every other level of it."""
    grid = get_sigmas(schedule, d.teacher_steps, d.spacing)
    for _ in range(d.round - 1):
        grid = halve_grid(grid)
    return grid


def lcm_grid(schedule: Schedule, d: DistillConfig) -> torch.Tensor:
    """LCM's skipping-step grid (Luo et al. 2023, sec. 4.3): `levels` levels of the teacher's grid, increasing; its
    lowest is the student's boundary."""
    return get_sigmas(schedule, d.levels, d.spacing)[:-1].flip(0)


def coupling_sigmas(schedule: Schedule, d: DistillConfig) -> torch.Tensor:
    """The grid the teacher's ODE is solved on to draw the couplings (its top is the one-step student's level)."""
    return get_sigmas(schedule, d.coupling_steps, d.spacing)


def boundary(d: DistillConfig, schedule: Schedule) -> float:
    """The consistency function's boundary level epsilon: 0 for ECT, the skipping grid's lowest level for lcm."""
    if d.method == "consistency-tuning":
        return 0.0
    if d.method == "lcm":
        return float(lcm_grid(schedule, d)[0])
    return d.sigma_min


def student_denoiser(net, schedule: Schedule, prediction: str, d: DistillConfig):
    """The trained module: a MeanFlowDenoiser for meanflow, else the Precond denoiser of the prediction type."""
    if d.method == "meanflow":
        return MeanFlowDenoiser(net, schedule)
    return Precond(net, schedule, prediction)


def served(student, d: DistillConfig, schedule: Schedule):
    """The student as it is sampled: a consistency student wrapped in its consistency function (with the boundary
    and sigma_data it was trained with), any other one as it is."""
    if not METHODS[d.method].consistency:
        return student
    return ConsistencyFunction(student, boundary(d, schedule), d.sigma_data)


def _distance(d: DistillConfig) -> str:
    return d.distance or DEFAULT_DISTANCE[d.method]


def _huber(d: DistillConfig):
    return d.huber_c if d.huber_c > 0 else None  # None: the objective's default, 0.00054 sqrt(d)


def make_objective(d: DistillConfig, schedule: Schedule, *, teacher=None, total_steps: int, feature=None,
                   num_classes: int | None = None, prediction: str = "eps", objective_cfg=None,
                   patch_size: int | None = None):
    """The method's objective, ``objective(student, x0, cond, generator=None[, step])``. `teacher`: the frozen
    teacher denoiser (methods whose teacher is 'denoiser'); `feature`: the distance 'feature' network;
    `total_steps`: the run's optimizer steps (CT's curriculum, ECT's stages); the rest configures reflow's
    denoising loss (the teacher's own objective, on coupled pairs)."""
    m = d.method
    common = dict(sigma_data=d.sigma_data, feature=feature)
    if m == "progressive":
        return ProgressiveDistillation(teacher, progressive_grid(schedule, d))
    if m == "consistency-distillation":
        return ConsistencyDistillation(teacher, levels=d.levels, sigma_min=d.sigma_min,
                                       sigma_max=d.sigma_max or schedule.sigma_max, rho=d.rho,
                                       solver=d.solver or "heun", mu=d.mu, distance=_distance(d),
                                       huber_c=_huber(d), **common)
    if m == "consistency-training":
        return ConsistencyTraining(total_steps=total_steps, s0=d.ct_s0, s1=d.ct_s1, sigma_min=d.sigma_min,
                                   sigma_max=d.sigma_max or schedule.sigma_max, rho=d.rho, distance=_distance(d),
                                   huber_c=_huber(d), **common)
    if m == "consistency-tuning":
        return ConsistencyTuning(stage_steps=max(1, total_steps // d.ect_stages), q=d.ect_q, k=d.ect_k, b=d.ect_b,
                                 c=d.huber_c, distance=_distance(d), **common)
    if m == "lcm":
        if num_classes is None:
            raise ValueError("lcm distils a class-conditional teacher (its null class is the unguided model)")
        return LatentConsistencyDistillation(teacher, lcm_grid(schedule, d), null_label=num_classes,
                                             guidance_range=(d.guidance_min, d.guidance_max),
                                             solver=d.solver or DEFAULT_SOLVER["lcm"], mu=d.mu,
                                             distance=_distance(d), huber_c=_huber(d), **common)
    if m == "reflow":
        return ReflowObjective(schedule, objective_cfg, prediction=prediction, num_classes=num_classes,
                               patch_size=patch_size)
    if m == "one-step":
        return OneStepDistillation(float(coupling_sigmas(schedule, d)[0]))
    return MeanFlowObjective(ratio=d.meanflow_ratio, power=d.meanflow_power)


def sample_defaults(d: DistillConfig, schedule: Schedule, guidance_scale: float) -> dict:
    """The fields of the student's SampleConfig that `sample` uses by default: the method's sampler at its step
    count, on the grid it was trained on where that grid is not the sampler's own (progressive: the round's
    halved grid; lcm: LCM_SAMPLE_STEPS levels of its skipping grid; one-step: the couplings' top level), with
    the consistency boundary as the sampler's sigma_min. `guidance_scale`: lcm's embedded scale."""
    m = d.method
    out = {"sampler": METHODS[m].sampler, "steps": 1, "sigmas": (), "final": "", "sampler_options": {},
           "guidance": "none", "guidance_scale": 1.0}
    if m == "progressive":
        grid = progressive_grid(schedule, d)[::2]
        out.update(steps=len(grid) - 1, sigmas=tuple(float(s) for s in grid))
    elif m == "one-step":
        out["sigmas"] = (float(coupling_sigmas(schedule, d)[0]), 0.0)
    if METHODS[m].consistency:
        out["sampler_options"] = {"sigma_min": boundary(d, schedule)}
    if m == "lcm":
        grid = lcm_grid(schedule, d)
        n = len(grid)
        picks = sorted({n - 1 - i * n // LCM_SAMPLE_STEPS for i in range(LCM_SAMPLE_STEPS)} - {0}, reverse=True)
        out.update(steps=len(picks), sigmas=tuple(float(grid[i]) for i in picks) + (0.0,), guidance="embedded",
                   guidance_scale=float(guidance_scale))
    return out
