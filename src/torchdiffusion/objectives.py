"""Training objectives on the denoiser contract: `objective(denoiser, x0, cond) -> loss`.

Every objective draws a noise level sigma from the schedule and noise n and forms x = x0 + sigma n
(:func:`add_noise`). The denoising objective asks the denoiser for D(x, sigma) ~ x0 and measures the error in
the space of what the network predicts: for a network of prediction type p wrapped with c_out(sigma)
(:mod:`~torchdiffusion.precond`), the network-output error is exactly (D - x0) / |c_out| (eps: (D - x0)/sigma =
eps_hat - eps, DDPM's L_simple; x0: D - x0; v: ...), so L2 in that space is a sigma-dependent weight on the x0
error, and L1 / Huber are applied to the same scaled error. The prediction type is given to the objective (or
read from the denoiser, which every transform forwards), never guessed.

Weightings (multiplying the per-sample loss in the network-output space):

* ``uniform``: 1, i.e. DDPM's L_simple for eps-prediction (Ho et al. 2020, eq. 14).
* ``min_snr``: the x0-space weight min(SNR, gamma) of Hang et al. 2023, i.e. min(SNR, gamma) * |c_out|^2 here
  (for eps-prediction min(SNR, gamma) / SNR, for v-prediction min(SNR, gamma) / (SNR + 1)).
* ``vlb``: the weight that makes the L2 loss the variational bound term L_{t-1} per dimension:
  KL(q(x_s|x_t,x0) || p(x_s|x_t)) = (SNR(s) - SNR(t)) / 2 * ||x0 - D||^2 (Kingma et al. 2021, eq. 13, which
  equals DDPM's beta_t^2 / (2 beta~_t alpha_t (1 - alpha_bar_t)) ||eps - eps_hat||^2), times T so that the
  expectation over uniform t is the sum over terms. At the first step (s = 0) the term is the decoder's,
  and the weight of the second step is used instead (as Improved DDPM clips beta-tilde there).

Masked-patch training (MaskDiT, Zheng et al. 2023): with ``mask_ratio`` r > 0 each training example drops
a uniformly random subset of L - floor(L (1 - r)) of its L patch tokens (drawn from the example's own generator,
so resume and data-parallel runs draw the same masks), the network sees only the kept ones (``token_mask``), the
weighted denoising loss is averaged over the kept patches only, and ``mae_weight`` lambda adds the MAE-style
reconstruction of the dropped ones, lambda * mean over dropped patches of ||D_patch - norm(x_patch)||^2 / P, the
target being the noisy input's patch normalised to zero mean and unit variance (MaskDiT's loss, with the
paper's lambda = 0.1). Validation (:meth:`DiffusionObjective.per_sample`) and sampling use every token.

Learned variances (Nichol & Dhariwal 2021; docs/likelihood.md), ``kind``: ``simple`` is the loss above; ``hybrid``
adds lambda T L_t (``vlb_weight`` lambda, 0.001), L_t the bound's term of the drawn step in bits/dim
(:func:`~torchdiffusion.variance.vlb_term`) with the model mean's gradient stopped, so only the variance
channels learn from it (their L_hybrid = L_simple + lambda L_vlb, eq. 16); ``vlb`` is L_t / p_t alone (mean and
variance learn from it), t drawn by importance sampling (:class:`~torchdiffusion.variance.ImportanceSampler`), an
unbiased estimate of sum_t L_t. Both need a discrete schedule and a network with learned variance.

``vdm`` (Kingma et al. 2021; :mod:`~torchdiffusion.vdm`): the ELBO in bits/dim with a learned noise schedule, the
module's own (``denoiser.schedule``), continuous time or T steps (``vdm.T``); the configured schedule only sets how
the network sees x and sigma and must be continuous.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .precond import PREDICTIONS, skip_out_coefficients
from .schedules import DiscreteSchedule, Schedule, VPSchedule
from .utils import LOG2, append_dims, check_choice, rand, randn_like
from .variance import ImportanceSampler, schedule_log_variance, vlb_term
from .vdm import VDMConfig, VDMLoss, check_vdm_config

LOSSES = ("l2", "l1", "huber")
WEIGHTINGS = ("uniform", "min_snr", "vlb")
KINDS = ("simple", "hybrid", "vlb", "vdm")  # the loss, + lambda L_vlb, L_vlb alone (Nichol & Dhariwal 2021), VDM
LEARNED_VARIANCE_KINDS = ("hybrid", "vlb")  # the kinds that train the network's variance channels
MAE_VAR_EPS = 1e-6  # added to a target patch's variance before normalising it (MaskDiT, as MAE's norm_pix_loss)


@dataclass
class ObjectiveConfig:
    loss: str = "l2"                # l2, l1 or huber, applied in the network's output space
    weighting: str = "uniform"      # uniform (L_simple), min_snr or vlb
    min_snr_gamma: float = 5.0      # gamma of min-SNR weighting
    huber_delta: float = 1.0        # transition point of the Huber loss
    cond_drop_prob: float = 0.0     # replace class labels by the null class with this probability (for CFG)
    low_res: int = 0                # super-resolution: condition on x0 area-downsampled to this side (0: off)
    cond_aug_max_sigma: float = 0.0  # noise the low-res image at a level drawn uniformly in [0, this]
    mask_ratio: float = 0.0         # MaskDiT: drop this fraction of the patch tokens in training (0: off; kind dit)
    mae_weight: float = 0.0         # MaskDiT: weight of the reconstruction loss of the dropped patches (paper: 0.1)
    kind: str = "simple"            # simple (the loss above), hybrid (+ vlb_weight L_vlb) or vlb (L_vlb, importance
                                    # sampled t); hybrid and vlb need a discrete schedule and model.*.learn_sigma;
                                    # vdm: VDM's ELBO with a learned schedule (a continuous schedule, see vdm.*)
    vlb_weight: float = 0.001       # lambda of Improved DDPM's L_hybrid = L_simple + lambda L_vlb
    vdm: VDMConfig = field(default_factory=VDMConfig)  # kind vdm: the ELBO and learned schedule (docs/likelihood.md)


def low_res_condition(x: torch.Tensor, size: int, aug_sigma: torch.Tensor, *, generator=None) -> dict:
    """The conditioning of a super-resolution stage (Ho et al. 2021, "Cascaded diffusion models", sec. 3.2):
    x (N, C, H, W) area-downsampled to size x size (unchanged if already that size), plus Gaussian noise of
    std aug_sigma (N,) (conditioning augmentation). Returns the U-Net's kwargs {low_res, low_res_sigma}."""
    low = x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(x, size=(size, size), mode="area")
    low = low + append_dims(aug_sigma, low.ndim) * randn_like(low, generator=generator)  # (N, C, size, size)
    return {"low_res": low, "low_res_sigma": aug_sigma}


def add_noise(schedule: Schedule, x0: torch.Tensor, *, generator=None, sigma: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x = x0 + sigma n, sigma (N,)): the noised input every objective trains on. sigma is drawn from the
    schedule's training distribution and n ~ N(0, I) from `generator` unless given (validation, tests)."""
    if sigma is None:
        sigma = schedule.sample_sigmas(x0.shape[0], generator=generator, device=x0.device)
    if noise is None:
        noise = randn_like(x0, generator=generator)
    return x0 + append_dims(sigma, x0.ndim) * noise, sigma


class DiffusionObjective:
    """Denoising score matching loss; call as ``objective(denoiser, x0, cond, generator=None)``.

    `prediction` is what the trained network predicts (eps, x0, v, velocity, edm); it fixes the space the error
    is measured in. None takes it from the denoiser (a Precond, or any transform of one, declares it); a denoiser
    that declares another one is refused."""

    def __init__(self, schedule: Schedule, cfg: ObjectiveConfig | None = None, *, prediction: str | None = None,
                 num_classes: int | None = None, patch_size: int | None = None, **kwargs):
        cfg = cfg or ObjectiveConfig(**kwargs)
        if prediction is not None:
            check_choice("prediction", prediction, PREDICTIONS)
        check_choice("loss", cfg.loss, LOSSES)
        check_choice("weighting", cfg.weighting, WEIGHTINGS)
        if cfg.weighting == "vlb" and not isinstance(schedule, (DiscreteSchedule, VPSchedule)):
            raise ValueError("weighting 'vlb' needs a schedule that samples t uniformly: "
                             "a discrete schedule (linear, cosine, sigmoid) or 'vp'")
        if cfg.min_snr_gamma <= 0 or cfg.huber_delta <= 0:
            raise ValueError("min_snr_gamma and huber_delta must be positive")
        if cfg.low_res < 0 or cfg.cond_aug_max_sigma < 0:
            raise ValueError(f"low_res and cond_aug_max_sigma must be non-negative, got {cfg.low_res}, "
                             f"{cfg.cond_aug_max_sigma}")
        if not 0.0 <= cfg.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cfg.cond_drop_prob}")
        _check_masking(cfg, patch_size)
        _check_kind(cfg, schedule)
        self.importance = ImportanceSampler(schedule.T) if cfg.kind == "vlb" else None
        self.vdm = VDMLoss(cfg.vdm) if cfg.kind == "vdm" else None  # VDM's ELBO (Kingma et al. 2021)
        self.last_terms: dict = {}
        self.patch_size = patch_size  # the network's patch side (MaskDiT's token grid)
        self.schedule = schedule
        self.cfg = cfg
        self.prediction = prediction
        self.sigma_data = float(getattr(schedule, "sigma_data", 0.5))
        self.num_classes = num_classes  # null class index for condition dropout

    # ---------------------------------------------------------------------------------------- weights
    def vlb_weight_x0(self, sigma: torch.Tensor) -> torch.Tensor:
        """x0-space weight (SNR(s) - SNR(t)) / 2 * (number of terms), s the next smaller level."""
        sch = self.schedule
        t = sch.sigma_to_t(sigma.double())
        if isinstance(sch, DiscreteSchedule):
            t = torch.where(t < 0.5, torch.ones_like(t), t)  # first step: use the second step's weight
            t_prev = t - 1
            n_terms, dt = sch.T, 1.0
        else:  # continuous VP: derivative of SNR times the length of the time interval
            dt = 1e-4
            t_prev = (t - dt).clamp(min=sch.eps_t / 2)
            dt_eff = t - t_prev
            snr = lambda tt: 1 / sch.t_to_sigma(tt) ** 2
            return ((snr(t_prev) - snr(t)) / 2 / dt_eff * (1 - sch.eps_t)).float()
        snr_t = 1 / sch.t_to_sigma(t) ** 2
        snr_s = 1 / sch.t_to_sigma(t_prev) ** 2
        return ((snr_s - snr_t) / 2 * n_terms / dt).float()

    def weight(self, sigma: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the network-output-space loss, shape (N,)."""
        w = self.cfg.weighting
        if w == "uniform":
            return torch.ones_like(sigma)
        if w == "min_snr":
            snr = 1 / sigma**2
            return snr.clamp(max=self.cfg.min_snr_gamma) * out_scale**2
        return self.vlb_weight_x0(sigma) * out_scale**2

    @staticmethod
    def element_weights(denoiser, x0: torch.Tensor) -> torch.Tensor | None:
        """Weights of the elementwise loss that the denoiser declares (`loss_weights(x0)`, broadcastable to x0;
        edit.PlaneMean's label_weight), or None. They weight the simple loss only: kinds vlb, hybrid and vdm and
        masked training refuse them (config.check_joint)."""
        fn = getattr(denoiser, "loss_weights", None)
        return fn(x0) if fn is not None else None

    def elementwise(self, err: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "l2":
            return err**2
        if self.cfg.loss == "l1":
            return err.abs()
        return F.huber_loss(err, torch.zeros_like(err), reduction="none", delta=self.cfg.huber_delta)

    # ------------------------------------------------------------------------------------ conditioning
    def drop_condition(self, cond: dict | None, *, generator=None) -> dict | None:
        """Condition dropout for classifier-free guidance (Ho & Salimans 2021, Alg. 1): each class label is
        replaced by the null class (index num_classes) with probability cond_drop_prob."""
        p = self.cfg.cond_drop_prob
        if p <= 0 or not cond or cond.get("class_labels") is None:
            return cond
        if self.num_classes is None:
            raise ValueError("cond_drop_prob > 0 needs the number of classes: DiffusionObjective(..., num_classes=K)")
        y = cond["class_labels"]
        drop = rand(y.shape, generator=generator, device=y.device) < p  # (N,)
        return {**cond, "class_labels": torch.where(drop, torch.full_like(y, self.num_classes), y)}

    # --------------------------------------------------------------------------------------------- loss
    def prediction_of(self, denoiser) -> str:
        """The prediction type the loss is measured in: this objective's, checked against the denoiser's."""
        declared = getattr(denoiser, "prediction", None)
        if self.prediction is None:
            if declared is None:
                raise ValueError("the denoiser declares no prediction type: build the objective with "
                                 f"prediction= one of {', '.join(PREDICTIONS)} (e.g. 'x0' for a plain function)")
            return declared
        if declared is not None and declared != self.prediction:
            raise ValueError(f"the objective measures {self.prediction!r}-prediction errors but the denoiser wraps "
                             f"a {declared!r}-prediction network")
        return self.prediction

    def out_scale(self, denoiser, sigma: torch.Tensor) -> torch.Tensor:
        """|c_out(sigma)| of the prediction type: x0 errors divided by it are network-output errors."""
        return skip_out_coefficients(self.prediction_of(denoiser), sigma.float(), self.sigma_data)[1].abs()

    def per_sample(self, denoiser, x0: torch.Tensor, cond: dict | None = None, *, generator=None,
                   sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   masked: bool = False) -> torch.Tensor:
        """Weighted loss per sample (N,). `sigma` and `noise` may be given (tests); else they are drawn. `masked`:
        MaskDiT's loss with mask_ratio of the patch tokens dropped (the training loss; see the module docstring);
        kind vdm: the ELBO in bits/dim, in training (`masked`) with the variance-minimising schedule gradient."""
        if self.vdm is not None:
            return self.vdm.per_sample(denoiser, x0, cond, generator=generator, sigma=sigma, noise=noise,
                                       training=masked)
        n = x0.shape[0]
        x, sigma = add_noise(self.schedule, x0, generator=generator, sigma=sigma, noise=noise)
        if self.cfg.low_res:  # super-resolution: the conditioning image is made from x0 itself
            aug = rand((n,), generator=generator, device=x0.device) * self.cfg.cond_aug_max_sigma
            cond = {**(cond or {}), **low_res_condition(x0, self.cfg.low_res, aug, generator=generator)}
        cond = dict(cond or {})
        if self.cfg.kind != "simple":
            simple, term = self.learned_terms(denoiser, x0, x, sigma, cond)
            vlb = self.schedule.T * term  # uniform t: T L_t estimates L_vlb = sum_t L_t
            return simple + self.cfg.vlb_weight * vlb if self.cfg.kind == "hybrid" else vlb
        mask = self.token_mask(x0, generator=generator) if masked and self.cfg.mask_ratio > 0 else None
        if mask is not None:
            cond["token_mask"] = mask  # (N, L) bool, True = dropped
        denoised = denoiser(x, sigma, **cond)
        out_scale = self.out_scale(denoiser, sigma)
        err = (denoised - x0) / append_dims(out_scale, x0.ndim)
        if mask is None:
            per = self.elementwise(err)
            weights = self.element_weights(denoiser, x0)
            per = per if weights is None else per * weights
            return per.flatten(1).mean(1) * self.weight(sigma, out_scale)
        kept = ~mask
        per = _patch_means(self.elementwise(err), self.patch_size)  # (N, L)
        loss = (per * kept).sum(1) / kept.sum(1) * self.weight(sigma, out_scale)  # (N,)
        if self.cfg.mae_weight > 0:  # the network's own output F = (D - c_skip x) / c_out reconstructs the patches
            c_skip, c_out = skip_out_coefficients(self.prediction_of(denoiser), sigma.float(), self.sigma_data)
            raw = (denoised - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)
            loss = loss + self.cfg.mae_weight * mae_loss(raw, x, mask, self.patch_size)
        return loss

    def token_mask(self, x0: torch.Tensor, *, generator=None) -> torch.Tensor:
        """MaskDiT's random token mask (N, L) bool, True = dropped: each example keeps floor(L (1 - mask_ratio))
        of the L = (H / p)(W / p) patches (row-major), the kept set uniform among all such sets, from ranks of
        uniform scores drawn from the example's generator (Zheng et al. 2023)."""
        p = self.patch_size
        h, w = x0.shape[-2:]
        if x0.ndim != 4 or h % p or w % p:
            raise ValueError(f"masked-patch training needs images (N, C, H, W) with sides divisible by the patch "
                             f"size {p}, got {tuple(x0.shape)}")
        n_tok = (h // p) * (w // p)
        keep = max(1, int(n_tok * (1 - self.cfg.mask_ratio)))
        scores = rand((x0.shape[0], n_tok), generator=generator, device=x0.device)  # (N, L)
        return scores.argsort(1).argsort(1) >= keep  # rank >= keep: dropped

    def learned_terms(self, denoiser, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                      cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the simple loss (N,), the bound's term L_t of each sample's step in bits/dim (N,)) for a denoiser with
        learned variance (Nichol & Dhariwal 2021, eq. 15); kind hybrid stops the mean's gradient in L_t."""
        if not getattr(denoiser, "learns_variance", False):
            raise ValueError(f"diffusion.objective.kind {self.cfg.kind!r} trains a learned variance: build the "
                             "network with model.unet.learn_sigma=true (or model.dit.learn_sigma=true)")
        sch = self.schedule
        t = sch.sigma_to_t(sigma.double()).round().long().clamp(0, sch.T - 1).cpu()  # (N,) step indices
        x0_hat, v = denoiser.with_variance(x, sigma, **cond)
        out_scale = self.out_scale(denoiser, sigma)
        err = (x0_hat - x0) / append_dims(out_scale, x0.ndim)
        simple = self.elementwise(err).flatten(1).mean(1) * self.weight(sigma, out_scale)
        xt = x * append_dims(sch.alpha_bar[t].to(x), x.ndim).sqrt()  # VP coordinates
        mean_x0 = x0_hat.detach() if self.cfg.kind == "hybrid" else x0_hat  # hybrid: only v learns from L_vlb
        term = vlb_term(sch, x0, xt, t, mean_x0, schedule_log_variance(sch, t, v))  # t on the CPU, as the tables
        return simple, term / (x0[0].numel() * LOG2)

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        """Training loss: condition dropout (if configured), then the mean of :meth:`per_sample` (masked when
        mask_ratio > 0); kind vlb draws t by importance sampling, weights L_t by 1 / p_t and records L_t."""
        cond = self.drop_condition(cond, generator=generator)
        if self.vdm is not None:
            loss = self.per_sample(denoiser, x0, cond, generator=generator, masked=True).mean()
            self.last_terms = self.vdm.last_terms
            return loss
        if self.importance is None:
            return self.per_sample(denoiser, x0, cond, generator=generator, masked=True).mean()
        t, w = self.importance.sample(x0.shape[0], generator=generator)  # (N,), 1 / (T p_t), on the CPU
        x, sigma = add_noise(self.schedule, x0, generator=generator, sigma=self.schedule.sigmas[t].to(x0))
        simple, term = self.learned_terms(denoiser, x0, x, sigma, dict(cond or {}))
        self.importance.update(t, term)
        self.last_terms = {"simple": simple.detach().mean(), "vlb_term": term.detach().mean()}
        return (self.schedule.T * term * w.to(term)).mean()

    def state_dict(self) -> dict:
        """Kind vlb: the importance sampler's history (what an exact resume needs); else nothing."""
        return {} if self.importance is None else self.importance.state_dict()

    def load_state_dict(self, state: dict, module=None) -> None:
        if self.importance is not None and state:
            self.importance.load_state_dict(state)


def _check_masking(cfg: ObjectiveConfig, patch_size: int | None) -> None:
    """MaskDiT's options: a ratio in [0, 1), a non-negative weight, a patch network; the MAE term needs masking."""
    if not 0.0 <= cfg.mask_ratio < 1.0 or cfg.mae_weight < 0:
        raise ValueError(f"mask_ratio must be in [0, 1) and mae_weight >= 0, got {cfg.mask_ratio}, {cfg.mae_weight}")
    if cfg.mask_ratio > 0 and not patch_size:
        raise ValueError("mask_ratio > 0 (masked-patch training) needs a patch-based network: model.kind=dit "
                         "(the objective is told its patch_size)")
    if cfg.mae_weight > 0 and cfg.mask_ratio == 0:
        raise ValueError("mae_weight > 0 reconstructs dropped patches: set mask_ratio > 0 too (MaskDiT: 0.5)")


def _check_kind(cfg: ObjectiveConfig, schedule: Schedule) -> None:
    """The objective's kind; hybrid and vlb need a discrete DDPM schedule, unmasked training and lambda >= 0."""
    check_choice("diffusion.objective.kind", cfg.kind, KINDS)
    if cfg.kind == "simple":
        return
    if cfg.kind == "vdm":
        _check_vdm(cfg, schedule)
        return
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"diffusion.objective.kind {cfg.kind!r} learns the variance of DDPM's discrete steps: use a "
                         "discrete schedule (diffusion.schedule linear, cosine or sigmoid)")
    if cfg.mask_ratio > 0:
        raise ValueError(f"diffusion.objective.kind {cfg.kind!r} does not combine with masked-patch training: "
                         "set mask_ratio=0")
    if not 0 <= cfg.vlb_weight < float("inf"):
        raise ValueError(f"diffusion.objective.vlb_weight must be a finite number >= 0, got {cfg.vlb_weight}")


def _check_vdm(cfg: ObjectiveConfig, schedule: Schedule) -> None:
    """Kind vdm: a continuous base schedule (the network's view of sigma), no setting that the ELBO would ignore."""
    check_vdm_config(cfg.vdm)
    if isinstance(schedule, DiscreteSchedule):
        raise ValueError("diffusion.objective.kind 'vdm' learns its own schedule; the configured one only fixes how "
                         "the network sees x and sigma, which needs a continuous schedule: diffusion.schedule vp, edm "
                         "or rf")
    if cfg.loss != "l2" or cfg.weighting != "uniform" or cfg.mask_ratio > 0 or cfg.low_res:
        raise ValueError("diffusion.objective.kind 'vdm' trains the ELBO, whose loss and weighting are fixed: leave "
                         f"loss=l2, weighting=uniform, mask_ratio=0 and low_res=0 (got {cfg.loss}, {cfg.weighting}, "
                         f"{cfg.mask_ratio}, {cfg.low_res})")


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, C p^2): the p x p patches in row-major order (the network's token order)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), -1)


def _patch_means(per_element: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L): the mean over each patch (channels and pixels)."""
    return _patches(per_element, p).mean(-1)


def mae_loss(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """MaskDiT's reconstruction loss (Zheng et al. 2023; MAE's normalised-pixel target, He et al. 2022):
    mean over the dropped patches (mask True) of mean((F_patch - (x_patch - mean) / sqrt(var + eps))^2), F the
    network's output (N, C, H, W), x the noisy input, var the unbiased variance within the patch. Returns (N,).
    The paper compares its EDM-preconditioned D, bounded at every noise level; the objective passes the raw
    output (D - c_skip x) / c_out instead, bounded for every prediction type (for eps, D = x - sigma eps_hat grows
    with sigma and would swamp the denoising term); for x0 prediction the two are the same."""
    target = _patches(x, p)  # (N, L, P)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + MAE_VAR_EPS).sqrt()
    per = (_patches(out, p) - target).pow(2).mean(-1)  # (N, L)
    return (per * mask).sum(1) / mask.sum(1).clamp_min(1)


class ClassifierObjective:
    """Cross-entropy of a noise-conditional classifier on x = x0 + sigma n, sigma ~ schedule.sample_sigmas
    (Dhariwal & Nichol 2021, sec. 4.1); call as ``objective(model, x0, {"class_labels": y}, generator=None)``
    with `model` a :class:`~torchdiffusion.precond.SigmaClassifier`. Same interface as the diffusion objective,
    so the trainer runs either."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def per_sample(self, model, x0: torch.Tensor, cond: dict | None = None, *, generator=None,
                   sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy per sample (N,). `sigma` and `noise` may be given (validation); else they are drawn."""
        y = (cond or {}).get("class_labels")
        if y is None:
            raise ValueError("the classifier objective needs class labels: cond={'class_labels': y}")
        x, sigma = add_noise(self.schedule, x0, generator=generator, sigma=sigma, noise=noise)
        return F.cross_entropy(model(x, sigma), y.long(), reduction="none")  # (N,)

    def __call__(self, model, x0: torch.Tensor, cond: dict | None = None, *, generator=None) -> torch.Tensor:
        return self.per_sample(model, x0, cond, generator=generator).mean()
