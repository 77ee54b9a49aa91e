"""The autoencoder's objective (Rombach et al. 2022, app. G; Esser et al. 2021, eq. 4-7):

    L = sum_pixels |x - x_hat| / exp(l) + l  +  w_p P(x, x_hat)  +  w_kl KL(q(z|x) || N(0, I))
        + lambda * d(step) * L_G,     L_G = -mean D(x_hat)
    L_D = d(step) * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2          (hinge)

per example (sums over pixels and latent entries, then the batch mean), with l a learned scalar log-scale of the
Laplace likelihood, P a perceptual distance (:mod:`.perceptual`), d(step) = 0 before `disc_start` and 1 after, and
the adaptive weight lambda = w_d ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4) at the decoder's last layer W. Both
losses are summed into one scalar: the discriminator's logits in L_G come from a frozen copy of its weights and the
reconstructions in L_D are detached (see :class:`~torchdiffusion.nets.autoencoder.AutoencoderNet`), so one backward
gives each network the gradient of its own loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import check_choice

REC_LOSSES = ("l1", "l2")
ADAPTIVE_EPS = 1e-4         # LDM's guard in the adaptive weight's denominator
ADAPTIVE_MAX = 1e4          # and its clamp


@dataclass
class AutoencoderLossConfig:
    rec_loss: str = "l1"            # pixel loss: l1 (LDM) or l2
    kl_weight: float = 1e-6         # w_kl: weight of KL(q(z|x) || N(0, I)) against the per-example pixel sum
    perceptual_weight: float = 1.0  # w_p: weight of the perceptual distance (0: off)
    perceptual: str = "own"         # 'own' (a network trained for it, see latent.perceptual) or an LPIPS folder
    disc_weight: float = 0.5        # w_d: scale of the adaptive adversarial weight
    disc_start: int = 1000          # step from which the adversarial terms count (needs a discriminator)


class AutoencoderObjective:
    """``objective(module, x0, cond, generator=None, step=0) -> loss`` for the 'autoencoder' task; `module.net` is
    an :class:`~torchdiffusion.nets.autoencoder.AutoencoderNet`. `perceptual` is a callable P(x, y) -> (N,) or
    None."""

    takes_step = True  # the trainer passes the step (the adversarial terms start at cfg.disc_start)

    def __init__(self, cfg: AutoencoderLossConfig | None = None, perceptual=None):
        cfg = cfg or AutoencoderLossConfig()
        check_choice("autoencoder rec_loss", cfg.rec_loss, REC_LOSSES)
        for name in ("kl_weight", "perceptual_weight", "disc_weight"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"autoencoder.{name} must be non-negative, got {getattr(cfg, name)}")
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual distance (see torchdiffusion.latent.perceptual)")
        self.cfg = cfg
        self.perceptual = perceptual
        self.last_terms: dict = {}

    def terms(self, net, x0: torch.Tensor, *, generator=None, step: int = 0) -> dict:
        """Every term of the loss (0-d tensors) and the total, from one forward of `net`."""
        out = net(x0, generator=generator)
        recon, post = out["recon"], out["posterior"]
        err = self.pixel_error(x0, recon)
        logvar = _inner(net).logvar
        nll = (err / torch.exp(logvar) + logvar).flatten(1).sum(1).mean()
        kl = post.kl().mean()
        terms = {"rec": err.flatten(1).sum(1).mean().detach(), "nll": nll, "kl": kl, "logvar": logvar.detach()}
        total = nll + self.cfg.kl_weight * kl
        if "logits_gen" in out:
            on = 1.0 if step >= self.cfg.disc_start else 0.0
            g_loss = -out["logits_gen"].mean()
            d_loss = 0.5 * (F.relu(1.0 - out["logits_real"]).mean() + F.relu(1.0 + out["logits_fake"]).mean())
            weight = self.adaptive_weight(nll, g_loss, _inner(net)) if on else torch.zeros(())
            total = total + on * weight * g_loss + on * d_loss  # zero before disc_start, but in the graph (DDP)
            terms.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), adaptive_weight=weight)
        terms["loss"] = total
        return terms

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, net) -> torch.Tensor:
        """w_d ||grad_W nll|| / (||grad_W L_G|| + eps), W the decoder's last layer, clamped and detached (LDM)."""
        if not torch.is_grad_enabled():
            return torch.ones(()) * self.cfg.disc_weight
        w = net.autoencoder.decoder.last_layer
        g_nll = torch.autograd.grad(nll, w, retain_graph=True)[0]
        g_g = torch.autograd.grad(g_loss, w, retain_graph=True)[0]
        lam = (g_nll.norm() / (g_g.norm() + ADAPTIVE_EPS)).clamp(0.0, ADAPTIVE_MAX).detach()
        return lam * self.cfg.disc_weight

    def pixel_error(self, x0: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """|x - x_hat| (or its square) plus w_p P(x, x_hat) at every pixel, as LDM adds its LPIPS term."""
        err = (recon - x0).abs() if self.cfg.rec_loss == "l1" else (recon - x0) ** 2
        if self.cfg.perceptual_weight > 0:
            err = err + self.cfg.perceptual_weight * self.perceptual(x0, recon)[:, None, None, None]
        return err

    def per_sample(self, module, x0: torch.Tensor, cond: dict | None = None, *, generator=None, sigma=None,
                   noise=None) -> torch.Tensor:
        """Reconstruction (from the posterior mean, so it is deterministic) plus w_kl KL, per example (N,): what
        validation compares; the adversarial terms are left out."""
        ae = _inner(module.net).autoencoder
        post = ae.encode(x0)
        err = self.pixel_error(x0, ae.decode(post.mode()))
        return err.flatten(1).sum(1) + self.cfg.kl_weight * post.kl()

    def __call__(self, module, x0: torch.Tensor, cond: dict | None = None, *, generator=None,
                 step: int = 0) -> torch.Tensor:
        self.last_terms = self.terms(module.net, x0, generator=generator, step=step)
        return self.last_terms["loss"]


class AutoencoderModule(torch.nn.Module):
    """What the trainer trains for task 'autoencoder': `.net` is the AutoencoderNet (or its data-parallel wrapper);
    calling the module is calling the autoencoder's reconstruction of its posterior mean."""

    num_classes = None

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ae = _inner(self.net).autoencoder
        return ae.decode(ae.encode(x).mode())


def _inner(net):
    """The AutoencoderNet under a data-parallel or compiled wrapper (for its attributes; calls go through `net`)."""
    while hasattr(net, "module") or hasattr(net, "_orig_mod"):
        net = getattr(net, "module", None) or net._orig_mod
    return net
