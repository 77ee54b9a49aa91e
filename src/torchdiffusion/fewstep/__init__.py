"""One to four steps: progressive distillation, consistency distillation / training / tuning, rectified flow with
reflow and one-step distillation, MeanFlow trained from scratch. Every method is an objective the trainer runs, on the denoiser contract."""
from .consistency import (ConsistencyDistillation, ConsistencyFunction, ConsistencyTraining, ConsistencyTuning,
                          LatentConsistencyDistillation,
                          consistency_skip, pseudo_huber, teacher_step)
from .meanflow import MeanFlowDenoiser, MeanFlowObjective
from .methods import METHODS, DistillConfig, check_distill, make_objective, sample_defaults, served, student_denoiser
from .progressive import ProgressiveDistillation, halve_grid
from .rectified import CouplingDataset, OneStepDistillation, ReflowObjective, make_coupling, straightness

__all__ = ["ConsistencyDistillation", "ConsistencyFunction", "ConsistencyTraining", "ConsistencyTuning",
           "LatentConsistencyDistillation",
           "MeanFlowDenoiser", "MeanFlowObjective", "consistency_skip", "pseudo_huber", "teacher_step", "ProgressiveDistillation", "halve_grid",
           "CouplingDataset", "OneStepDistillation", "ReflowObjective", "make_coupling", "straightness",
           "METHODS", "DistillConfig", "check_distill", "make_objective", "sample_defaults", "served", "student_denoiser"]
