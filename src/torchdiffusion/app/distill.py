"""Few-step students (docs/fewstep.md): ``torchdiffusion distill METHOD TEACHER [key=value ...]``.

:func:`run_distill` composes the student's configuration from its teacher's
(:func:`torchdiffusion.build.distill_config`) and trains it with the ordinary trainer (task 'distill'), so it resumes
like ``train``: the same command run again continues where it stopped, and a student whose teacher file changed is
refused. Progressive distillation runs its rounds one after the other, each a run of its own
(``<name>/round<k>-<steps>step``) whose teacher is the round before; a finished round is left as it is.
"""
from __future__ import annotations

from typing import Callable

from ..build import COUPLING_FILE, distill_config, progressive_rounds, save_coupling
from ..checkpoint import read_meta
from ..fewstep import CouplingDataset
from ..training import Trainer


def run_distill(method: str, teacher: str | None, overrides=(), *, config=None, resume: bool = True,
                hooks: Callable | None = None, **trainer_options) -> dict:
    """Train the student(s) of `method` from `teacher` (a checkpoint, or '-' / None for a method without one, on the
    preset or YAML `config`); `hooks(cfg)` gives each run's trainer hooks. Returns a summary per run: its
    checkpoint, the sampler and steps `sample` uses by default, the teacher's hash, and the trainer's summary."""
    cfg = distill_config(method, teacher, overrides, config=config)
    runs = progressive_rounds(cfg) if method == "progressive" else [cfg]
    results = []
    for run in runs:
        trainer = Trainer(run, resume=resume, hooks=hooks(run) if hooks else (), **trainer_options)
        if isinstance(trainer.data, CouplingDataset) and not (run.run_dir / COUPLING_FILE).exists():
            save_coupling(run, trainer.data)  # a --no-resume moved the earlier run, its pairs with it, aside
        summary = trainer.fit()
        last = run.run_dir / "checkpoints" / "last.safetensors"
        results.append({"checkpoint": str(last), "sampler": run.sample.sampler, "sample_steps": run.sample.steps,
                        "teacher_sha256": read_meta(last).get("teacher_sha256"), **summary})
    return {"method": method, "teacher": cfg.distill.teacher, "runs": results}
