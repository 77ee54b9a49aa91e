"""Guidance: classifier-free guidance and classifier guidance, and the rule for which classes to ask for.

All guidances are denoiser -> denoiser transforms (:class:`~torchdiffusion.precond.DenoiserTransform`) taking
``class_labels`` (N,) (or, for text conditioning, a ``context`` with its ``context_mask``), so every sampler works
with them unchanged. In VE coordinates x = x0 + sigma n, the score is
grad log p(x) = (D(x, sigma) - x) / sigma^2 and eps = (x - D) / sigma, both affine in D. Hence

* classifier-free guidance (Ho & Salimans 2021, eq. 6) on eps is the same rule on D:
  eps_s = eps_u + s (eps_c - eps_u)  <=>  D_s = D_u + s (D_c - D_u), with D_u the null-class denoiser (the empty,
  all-masked context for a text-conditioned one: :class:`ContextFreeGuidance`);
* classifier guidance (Dhariwal & Nichol 2021, Alg. 1, in VE form) adds s grad_x log p(y | x, sigma) to the score:
  D_s = D + s sigma^2 grad_x log p_phi(y | x, sigma).

For Gaussian mixtures with the exact noisy posterior p(y | x_sigma), s = 1 turns the unconditional denoiser into the
exact conditional one (tests/test_guidance.py checks it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .precond import DenoiserTransform, x0_from, x0_to
from .utils import append_dims, check_choice

GUIDANCES = ("none", "cfg", "classifier", "embedded")  # embedded: the net takes the scale as an input (LCM)
RESCALE_SPACES = ("eps", "v", "x0")


def _in_interval(sigma: torch.Tensor, interval) -> torch.Tensor:
    """(N,) bool: sigma in (sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024: guidance in a limited interval)."""
    if interval is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def _check_interval(interval):
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1]):
        raise ValueError(f"interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, got {interval}")
    return None if interval is None else (float(interval[0]), float(interval[1]))


def net_num_classes(denoiser) -> int | None:
    """The class count of the network under a chain of denoiser transforms (None: unconditional); Precond and
    every transform declare it."""
    return getattr(denoiser, "num_classes", None)


def _repeat_cond(cond: dict, n: int, idx: torch.Tensor) -> dict:
    """Extend each per-sample tensor of `cond` (first dim n) by its rows `idx`, for a batched second half."""
    return {k: torch.cat([v, v[idx]]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v
            for k, v in cond.items()}


class ClassifierFreeGuidance(DenoiserTransform):
    """D_s = D(x, null) + s (D(x, y) - D(x, null)), conditional and unconditional in ONE batched call.

    `interval` = (sigma_lo, sigma_hi): guide only where sigma_lo < sigma <= sigma_hi, elsewhere return the
    conditional D (Kynkaanniemi et al. 2024). `rescale` = phi of Lin et al. 2024 (eq. 15-16): the guided prediction
    in `rescale_space` (v by default, as in the paper; eps or x0) is rescaled per sample to the standard
    deviation of the conditional one, x_r = x_cfg std(x_c) / std(x_cfg), and mixed as phi x_r + (1 - phi) x_cfg.
    """

    def __init__(self, inner, scale: float, *, num_classes: int | None = None, null_label: int | None = None,
                 interval: tuple[float, float] | None = None, rescale: float = 0.0, rescale_space: str = "v"):
        super().__init__(inner)
        if null_label is None:
            num_classes = num_classes if num_classes is not None else net_num_classes(inner)
            if num_classes is None:
                raise ValueError("classifier-free guidance needs a class-conditional denoiser: pass num_classes "
                                 "or null_label")
            null_label = num_classes  # the null row of the class embedding
        self.null_label = int(null_label)
        self._set_rule(scale, interval, rescale, rescale_space)

    def _set_rule(self, scale, interval, rescale, rescale_space) -> None:
        """Check and keep the scale, interval and rescale of the guidance rule."""
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        check_choice("rescale_space", rescale_space, RESCALE_SPACES)
        self.scale = float(scale)
        self.interval, self.rescale, self.rescale_space = _check_interval(interval), float(rescale), rescale_space

    def _has_condition(self, cond: dict) -> bool:
        """Whether there is a condition to guide towards (else the unconditional denoiser is returned)."""
        return cond.get("class_labels") is not None

    def _paired(self, cond: dict, n: int, idx: torch.Tensor) -> dict:
        """The condition of the batched call: the n conditional rows, then rows `idx` with the null class."""
        y = cond["class_labels"]
        rest = {k: v for k, v in cond.items() if k != "class_labels"}
        return {**_repeat_cond(rest, n, idx), "class_labels": torch.cat([y, torch.full_like(y[idx], self.null_label)])}

    def forward(self, x, sigma, class_labels=None, **cond):
        cond = {**cond, **({"class_labels": class_labels} if class_labels is not None else {})}
        if not self._has_condition(cond):  # nothing to guide towards: the unconditional denoiser
            return self.inner(x, sigma, **cond)
        n = x.shape[0]
        active = _in_interval(sigma, self.interval) & torch.as_tensor(self.scale != 1.0)  # (N,)
        idx = active.nonzero().squeeze(1)  # (M,) samples that need the unconditional half
        if idx.numel() == 0:
            return self.inner(x, sigma, **cond)
        both = self.inner(torch.cat([x, x[idx]]), torch.cat([sigma, sigma[idx]]),  # (N + M, ...)
                          **self._paired(cond, n, idx))
        d_c, d_u = both[:n], both[n:]
        xa, sa, dca = x[idx], sigma[idx], d_c[idx]
        guided = d_u + self.scale * (dca - d_u)  # (M, ...)
        if self.rescale > 0:
            guided = self._rescale(guided, dca, xa, sa)
        return d_c.index_copy(0, idx, guided.to(d_c.dtype))

    def _rescale(self, guided, d_c, x, sigma):
        """Lin et al. 2024, eq. 15-16, in the prediction space `rescale_space`."""
        keep = sigma > 0  # eps and v are undefined at sigma = 0
        sp = self.rescale_space
        p_cfg = x0_to(sp, guided, x, sigma.clamp_min(1e-12))
        p_c = x0_to(sp, d_c, x, sigma.clamp_min(1e-12))
        std_c, std_cfg = p_c.flatten(1).std(1), p_cfg.flatten(1).std(1).clamp_min(1e-12)  # (M,)
        p_r = p_cfg * append_dims(std_c / std_cfg, x.ndim)
        p = self.rescale * p_r + (1 - self.rescale) * p_cfg
        return torch.where(append_dims(keep, x.ndim), x0_from(sp, p, x, sigma.clamp_min(1e-12)), guided)


class ContextFreeGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance against the empty context (text conditioning): D_s = D(x, null) + s (D(x, c) -
    D(x, null)) (Ho & Salimans 2021, eq. 6, on D), the null condition being the same `context` (N, L, C) with every
    entry of `context_mask` (N, L) False, which a network with a learned null entry reads as unconditional
    (nets.transformer.NullContext). No context: the unconditional denoiser. `interval` and `rescale` as in
    :class:`ClassifierFreeGuidance`; class labels, if any, are kept in both halves."""

    def __init__(self, inner, scale: float, *, interval: tuple[float, float] | None = None, rescale: float = 0.0,
                 rescale_space: str = "v"):
        DenoiserTransform.__init__(self, inner)
        self._set_rule(scale, interval, rescale, rescale_space)

    def _has_condition(self, cond: dict) -> bool:
        return cond.get("context") is not None

    def _paired(self, cond: dict, n: int, idx: torch.Tensor) -> dict:
        """The n rows with their context, then rows `idx` with the same context fully masked."""
        ctx, mask = cond["context"], cond.get("context_mask")
        if mask is None:
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)  # (N, L)
        rest = {k: v for k, v in cond.items() if k not in ("context", "context_mask")}
        return {**_repeat_cond(rest, n, idx), "context": torch.cat([ctx, ctx[idx]]),
                "context_mask": torch.cat([mask, torch.zeros_like(mask[idx])])}


class ClassifierGuidance(DenoiserTransform):
    """D_s = D + s sigma^2 grad_x log p_phi(y | x, sigma) (Dhariwal & Nichol 2021, Alg. 1, in VE form).

    `classifier(x, sigma) -> logits` in VE coordinates (a :class:`~torchdiffusion.precond.SigmaClassifier`, or an
    exact posterior). The
    inner denoiser is called without the labels (a class-conditional net then sees its null class, i.e. it is the
    unconditional model) unless `condition_inner` is set. `interval` as in :class:`ClassifierFreeGuidance`.
    """

    def __init__(self, inner, classifier, scale: float, *, interval: tuple[float, float] | None = None,
                 condition_inner: bool = False):
        super().__init__(inner)
        self.classifier = classifier
        self.scale = float(scale)
        self.interval = _check_interval(interval)
        self.condition_inner = condition_inner

    def log_prob_grad(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p_phi(y | x, sigma), same shape as x."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = F.log_softmax(self.classifier(xg, sigma), dim=-1)  # (N, K)
            picked = logp.gather(1, class_labels.long().to(logp.device)[:, None]).sum()
            grad = torch.autograd.grad(picked, xg, allow_unused=True)[0]
        return torch.zeros_like(x) if grad is None else grad

    def forward(self, x, sigma, class_labels=None, **cond):
        inner_cond = {**cond, "class_labels": class_labels} if self.condition_inner else cond
        d = self.inner(x, sigma, **inner_cond)
        if class_labels is None or self.scale == 0:
            return d
        active = _in_interval(sigma, self.interval)
        if not active.any():
            return d
        grad = self.log_prob_grad(x, sigma, class_labels)
        w = self.scale * sigma.to(grad.dtype) ** 2 * active.to(grad.dtype)  # (N,)
        return d + (append_dims(w, x.ndim) * grad).to(d.dtype)


def guide(denoiser, guidance: str = "none", scale: float = 1.0, *, classifier=None,
          interval: tuple[float, float] | None = None, rescale: float = 0.0):
    """Wrap `denoiser` in the named guidance ('none', 'cfg' or 'classifier'); classifier: a SigmaClassifier.
    'embedded' returns the denoiser unchanged: its network takes the scale as an input (a latent consistency
    student, Luo et al. 2023), which the caller binds as ``guidance_scale``."""
    check_choice("guidance", guidance, GUIDANCES)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if guidance == "none" and scale != 1.0:
        raise ValueError(f"guidance scale {scale:g} has no effect without a guidance method: choose guidance 'cfg' "
                         "(classifier-free) or 'classifier'")
    if guidance == "embedded":
        return denoiser
    if guidance == "cfg":
        return ClassifierFreeGuidance(denoiser, scale, interval=interval, rescale=rescale)
    if guidance == "classifier":
        if classifier is None:
            raise ValueError("guidance 'classifier' needs a noise-conditional classifier (--classifier CKPT)")
        if rescale:
            raise ValueError("rescale applies to guidance 'cfg' only")
        return ClassifierGuidance(denoiser, classifier, scale, interval=interval)
    return denoiser


def class_labels_for(n: int, class_label: int | None, num_classes: int | None, *, offset: int = 0):
    """Per-sample labels (n,) that depend only on the sample index: class_label for all, or with -1 sample i gets
    class (offset + i) mod num_classes; None -> None (unconditional)."""
    if class_label is None:
        return None
    if num_classes is None:
        raise ValueError("class labels given but the model is not class-conditional (num_classes is None)")
    if class_label == -1:
        return (torch.arange(offset, offset + n) % num_classes).long()
    if not 0 <= class_label < num_classes:
        raise ValueError(f"class_label must be in 0..{num_classes - 1} or -1 (all classes in turn), got {class_label}")
    return torch.full((n,), int(class_label), dtype=torch.long)


def requested_labels(n: int, class_label: int | None, guidance: str, num_classes: int | None):
    """The (n,) classes a sampling run asks for (None: unconditional): `class_label` as in :func:`class_labels_for`,
    except that with guidance on, None means -1 (class i mod K): guidance needs a class to guide towards."""
    check_choice("guidance", guidance, GUIDANCES)
    return class_labels_for(n, -1 if class_label is None and guidance != "none" else class_label, num_classes)
