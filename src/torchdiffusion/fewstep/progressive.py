"""Progressive distillation (Salimans & Ho 2022, Algorithm 2), in VE coordinates (x = x0 + sigma n).

The teacher samples with deterministic DDIM on a grid of 2N intervals; the student learns to take one DDIM step
where the teacher takes two. For a student interval sigma -> sigma'' with the teacher's midpoint sigma', the
teacher's two DDIM steps x -> x' -> x'' (x' = D + (sigma'/sigma)(x - D)) fix the x0 the student must predict so
that its one DDIM step lands on x'':

    x'' = x~ + (sigma''/sigma)(x - x~)   =>   x~ = (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma)   (x~ = x'' at 0),

which is the paper's target written in VE coordinates. The loss is the truncated-SNR weighted x0 error,
max(SNR, 1) ||x~ - D_student(x, sigma)||^2 with SNR = 1/sigma^2 (the paper's "truncated SNR" weighting). One round
halves the steps: the student's grid is every other level of the teacher's.
"""
from __future__ import annotations

import torch

from ..utils import append_dims, rand, randn_like


def halve_grid(sigmas: torch.Tensor) -> torch.Tensor:
    """Every other level of a grid of 2N intervals (decreasing, ending in 0): the student's grid of N."""
    if (len(sigmas) - 1) % 2:
        raise ValueError(f"a grid of {len(sigmas) - 1} intervals cannot be halved: progressive distillation needs an "
                         "even number of teacher steps (a power of two for several rounds)")
    return sigmas[::2].clone()


def ddim_to(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM between per-example levels (N,): D + (sigma_next / sigma)(x - D)."""
    return denoised + append_dims(sigma_next / sigma, x.ndim) * (x - denoised)


class ProgressiveDistillation:
    """``objective(student, x0, cond, generator=None)``: the student's one DDIM step over `teacher_sigmas`[2i] ->
    [2i+2] matches the teacher's two; `teacher_sigmas` has 2N intervals (decreasing, ending in 0)."""

    def __init__(self, teacher, teacher_sigmas: torch.Tensor):
        self.teacher = teacher.eval().requires_grad_(False) if isinstance(teacher, torch.nn.Module) else teacher
        self.teacher_sigmas = torch.as_tensor(teacher_sigmas, dtype=torch.float32)
        self.student_sigmas = halve_grid(self.teacher_sigmas)
        self.last_terms: dict = {}

    @property
    def student_steps(self) -> int:
        return len(self.student_sigmas) - 1

    @torch.no_grad()
    def target(self, x: torch.Tensor, i: torch.Tensor, cond: dict) -> torch.Tensor:
        """x~ for examples at student interval i (N,) (long)."""
        s, s_mid, s_next = (self.teacher_sigmas[j].to(x.device) for j in (2 * i, 2 * i + 1, 2 * i + 2))
        x_mid = ddim_to(x, self.teacher(x, s, **cond), s, s_mid)
        d_mid = self.teacher(x_mid, s_mid, **cond)
        x_next = torch.where(append_dims(s_next > 0, x.ndim), ddim_to(x_mid, d_mid, s_mid, s_next), d_mid)
        ratio = append_dims(s_next / s, x.ndim)
        return (x_next - ratio * x) / (1 - ratio)

    def per_sample(self, student, x0, cond=None, *, generator=None, sigma=None, noise=None) -> torch.Tensor:
        cond = cond or {}
        n = x0.shape[0]
        i = (rand((n,), generator=generator) * self.student_steps).long().clamp(max=self.student_steps - 1)
        s = self.student_sigmas[i].to(x0.device)
        x = x0 + append_dims(s, x0.ndim) * (randn_like(x0, generator=generator) if noise is None else noise)
        target = self.target(x, i, cond)
        weight = torch.clamp(1 / s.double() ** 2, min=1.0).float()  # truncated SNR: max(SNR, 1)
        return weight * (student(x, s, **cond) - target).flatten(1).pow(2).mean(1)

    def __call__(self, student, x0, cond=None, *, generator=None) -> torch.Tensor:
        return self.per_sample(student, x0, cond, generator=generator).mean()
