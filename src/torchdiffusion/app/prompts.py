"""Sampling a text-conditioned checkpoint (``captions.enabled``) from prompts: ``torchdiffusion sample CKPT --prompt
"a thick slanted seven"`` and ``torchdiffusion.load(CKPT).sample(prompt=...)``.

The prompts are encoded by the sentence encoder the checkpoint records (its weights' SHA-256 is checked) into the
context the network was trained on, and classifier-free guidance (``guidance cfg``) runs against the empty caption
(:class:`~torchdiffusion.guidance.ContextFreeGuidance`). Sample i gets prompt i mod P; no prompt (or '') is the
unconditional model.
"""
from __future__ import annotations

import dataclasses

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError, RunConfig
from ..guidance import ContextFreeGuidance
from ..sampling import SampleConfig, generate
from ..sampling.generate import guidance_interval
from ..text_encoder import SentenceEncoder, prompt_condition, require_encoder, shared_encoder

TEXT_GUIDANCES = ("none", "cfg")  # what a text-conditioned model samples with


def recorded_encoder(meta: dict, path="the checkpoint") -> dict:
    """The encoder a captioned run's checkpoint records (name, dim, max_tokens, sha256)."""
    enc = ((meta.get("data") or {}).get("captions") or {}).get("encoder")
    if not enc:
        raise CheckpointError(f"{path} is a text-conditioned run but records no text encoder")
    return enc


def prompt_encoder(meta: dict, path="the checkpoint") -> SentenceEncoder:
    """The recorded sentence encoder, loaded (once per process); refused when the installed weights differ from
    the recorded ones."""
    enc = recorded_encoder(meta, path)
    require_encoder(enc["name"])
    encoder = shared_encoder(enc["name"], int(enc["max_tokens"]))
    have = encoder.identity()["sha256"]
    if enc.get("sha256") and have != enc["sha256"]:
        raise CheckpointError(f"{path} was trained with {enc['name']} weights of SHA-256 {enc['sha256'][:12]}..., "
                              f"but the installed ones are {have[:12]}...: install the package version it used")
    return encoder


def prompts_for(n: int, prompts) -> list[str]:
    """n prompts: sample i gets prompts[i mod P]; None or [] : the empty caption (unconditional) for all."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [""])
    return [str(prompts[i % len(prompts)]) for i in range(n)]


def check_prompt_spec(cfg: RunConfig, spec: SampleConfig, prompts) -> None:
    """Refuse prompts for a model without captions, and a guidance a text-conditioned model cannot take."""
    if not cfg.captions.enabled:
        if prompts:
            raise ConfigError("--prompt needs a text-conditioned checkpoint (trained with captions.enabled: true, "
                              "e.g. --config mnist-text); this one is not")
        return
    if spec.guidance not in TEXT_GUIDANCES:
        raise ConfigError(f"a text-conditioned model samples with guidance {' or '.join(TEXT_GUIDANCES)} (cfg: against "
                          f"the empty caption), not {spec.guidance!r}")
    if spec.class_label is not None and getattr(getattr(cfg.model, cfg.model.kind), "num_classes", None) is None:
        raise ConfigError("this text-conditioned model takes no class labels: leave --class-label out (or 'none')")


def sample_prompts(denoiser, cfg: RunConfig, meta: dict, shape: tuple, spec: SampleConfig, prompts=None, *,
                   encoder: SentenceEncoder | None = None, device="cpu", progress: bool = False) -> torch.Tensor:
    """spec.n samples (n, *shape) of a text-conditioned denoiser, sample i from prompt i mod P, guided by
    classifier-free guidance against the empty caption when spec.guidance is 'cfg'."""
    check_prompt_spec(cfg, spec, prompts)
    encoder = encoder or prompt_encoder(meta)
    texts = prompts_for(spec.n, prompts)
    cond = prompt_condition(encoder, texts, cfg.captions.pooled_token)  # (n, L, C), (n, L)
    guided = denoiser
    if spec.guidance == "cfg":
        guided = ContextFreeGuidance(denoiser, spec.guidance_scale, interval=guidance_interval(spec),
                                     rescale=spec.guidance_rescale)
    plain = dataclasses.replace(spec, guidance="none", guidance_scale=1.0, guidance_rescale=0.0)
    return generate(guided, shape, plain, n=spec.n, cond=cond, device=device, progress=progress)
