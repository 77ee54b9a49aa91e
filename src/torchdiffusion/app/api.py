"""The Python API in one object: ``model = torchdiffusion.load(path)`` then ``model.sample(...)``, ``.inpaint(...)``,
``.img2img(...)``, ``.invert(...)``, ``.evaluate(...)``. A text checkpoint (task ``text``) loads as a
:class:`TextModel` instead: ``.generate(...)`` (prompting, infilling), ``.score(text)`` (bits per character of any
text), ``.evaluate()``.

`path` is a checkpoint of ``torchdiffusion train`` (or its checkpoints folder) or a diffusers model folder. Every
method starts from the run's own sample configuration and takes its fields as keyword arguments (``sampler``,
``steps``, ``spacing``, ``guidance``, ``guidance_scale``, ``seed``, ``clip_x0``, ...; see
:class:`~torchdiffusion.sampling.SampleConfig`), plus ``options`` for the sampler's own. Images are float tensors in
[-1, 1] of shape (N, C, H, W); results come back the same way, on the CPU.
"""
from __future__ import annotations

import dataclasses

import torch

from ..build import codec_for, load_denoiser, load_noisy_classifier, load_text_model
from ..checkpoint import read_meta
from ..edit import edit_plan
from ..evaluate.report import evaluate_checkpoint
from ..evaluate.text import TEXT_EVAL_SEED, evaluate_text_checkpoint, score_text
from ..interop.diffusers import is_diffusers_folder
from ..latent.edit import Edits
from ..sampling import SampleConfig, generate
from ..utils import sample_generators
from .prompts import sample_prompts
from .text import generate_with


class Model:
    """A loaded denoiser with its run's configuration. Attributes: ``denoiser`` (D(x, sigma, **cond) -> x0),
    ``config`` (the RunConfig), ``shape`` (one sample's shape: an image's, also for a model on latents),
    ``num_classes`` (None: unconditional), ``codec`` (a latent model's autoencoder, else None)."""

    def __init__(self, path, *, use_ema: bool = True, device="cpu"):
        self.path = path
        self.device = device
        self.denoiser, self.config, self.meta = load_denoiser(path, use_ema=use_ema, device=device)
        self.codec = codec_for(self.config, self.meta, path)
        self.model_shape = tuple(self.meta["data_shape"])  # what the denoiser works on (latents for a latent model)
        self.shape = self.codec.image_shape if self.codec is not None else self.model_shape
        self.num_classes = getattr(self.denoiser, "num_classes", None)
        self.edits = Edits(self.codec)

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, shape={self.shape}, num_classes={self.num_classes}, "
                f"prediction={self.denoiser.prediction!r}, schedule={self.denoiser.schedule.name!r})")

    def spec(self, options: dict | None = None, **fields) -> SampleConfig:
        """The run's sample configuration with `fields` replaced (and `options` as the sampler's options). A new
        sampler drops the run's sampler options, which belong to the run's sampler."""
        if "sampler" in fields and fields["sampler"] != self.config.sample.sampler and options is None:
            options = {}
        if options is not None:
            fields["sampler_options"] = dict(options)
        if "guidance_scale" in fields and fields["guidance_scale"] != 1.0 and "guidance" not in fields:
            fields["guidance"] = "cfg" if self.config.sample.guidance == "none" else self.config.sample.guidance
        return dataclasses.replace(self.config.sample, **fields)

    @torch.no_grad()
    def sample(self, n: int = 16, *, labels=None, prompt=None, options: dict | None = None, progress: bool = False,
               **fields) -> torch.Tensor:
        """n new samples (n, *shape). `labels`: a class for every sample (int), -1 for class i mod K, or an (n,)
        tensor; default: the run's sample.class_label. `guidance_scale` alone means classifier-free guidance.
        `prompt`: for a text-conditioned model, a caption or a list (sample i gets prompt i mod P; cfg guides
        against the empty caption)."""
        if labels is not None and not isinstance(labels, torch.Tensor):
            fields["class_label"] = int(labels)
            labels = None
        spec = self.spec(options, **fields)
        if self.config.captions.enabled or prompt:
            return sample_prompts(self.denoiser, self.config, self.meta, self.model_shape,
                                  dataclasses.replace(spec, n=n), prompt, device=self.device, progress=progress)
        classifier = load_noisy_classifier(spec.classifier, device=self.device)[0] \
            if spec.guidance == "classifier" else None
        return generate(self.denoiser, self.model_shape, spec, n=n, labels=labels, classifier=classifier,
                        device=self.device, progress=progress,
                        decode=self.codec.decode if self.codec is not None else None)

    def _edit(self, images: torch.Tensor, step_sampler: bool, options, fields):
        spec = self.spec(options, **{"class_label": None, **fields})
        den, sigmas, opts, used = edit_plan(self.denoiser, self.model_shape, spec, len(images),
                                            step_sampler=step_sampler, latent=self.codec is not None)
        return den, sigmas, opts, used, sample_generators(used.seed, len(images))

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, *, resample: int = 1, jump_length: int = 10,
                options: dict | None = None, **fields) -> torch.Tensor:
        """Fill the pixels where `mask` is 0 (mask 1 = known; broadcastable to the images); RePaint resampling with
        resample > 1. A multistep run sampler is replaced by a single-step one."""
        den, sigmas, opts, used, gens = self._edit(images, True, options, fields)
        return self.edits.inpaint(den, images, mask, sigmas, sampler=used.sampler, resample=resample,
                                  jump_length=jump_length, generator=gens, **opts)

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, strength: float = 0.5, *, options: dict | None = None,
                **fields) -> torch.Tensor:
        """SDEdit: noise the images to the level where a `strength` fraction of the grid remains, then denoise."""
        den, sigmas, opts, used, gens = self._edit(images, False, options, fields)
        return self.edits.sdedit(den, images, sigmas, strength, sampler=used.sampler, generator=gens, **opts)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, *, iters: int = 0, **fields) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM inversion: (the noise at sigma_max that deterministic DDIM maps to each image, the reconstruction)."""
        den, sigmas, _, _, _ = self._edit(images, False, None, fields)
        return self.edits.invert(den, images, sigmas, iters=iters)

    def evaluate(self, n: int = 1000, **kwargs) -> dict:
        """FD, KID, precision/recall and class accuracy of n samples against real data (see evaluate_checkpoint;
        likelihood=('vlb', 'ode') adds bits/dim)."""
        return evaluate_checkpoint(self.path, n=n, **kwargs)


class TextModel:
    """A loaded language model of task text (mdlm, d3pm or ar; docs/text.md). Attributes: ``module`` (the model,
    ``module(x_t, t) -> logits``), ``config``, ``tokenizer``, ``objective``, ``seq_len`` (tokens per sample)."""

    def __init__(self, path, *, use_ema: bool = True, device="cpu"):
        self.path = path
        self.use_ema = use_ema
        self.module, self.config, self.meta, self.tokenizer = load_text_model(path, use_ema=use_ema, device=device)
        self.objective = self.config.text.objective
        self.seq_len = self.config.model.text_transformer.seq_len

    def __repr__(self) -> str:
        return (f"TextModel({str(self.path)!r}, objective={self.objective!r}, seq_len={self.seq_len}, "
                f"vocab_size={self.tokenizer.vocab_size})")

    def generate(self, n: int | None = None, *, prompt: str = "", infill: str = "", **fields) -> list[str]:
        """n samples of seq_len tokens as text. `prompt` fixes a prefix; `infill` a template whose blank characters
        (``blank``, "_" by default) are generated (diffusion models only). `fields`: the run's text.sample fields
        (``steps``, ``sampler``, ``block_size``, ``seed``, ``blank``); sample i is seeded by (seed, i)."""
        if n is not None:
            fields["n"] = n
        return generate_with(self.module, self.config, self.tokenizer, prompt=prompt, infill=infill,
                             use_ema=self.use_ema, **fields)["samples"]

    def score(self, text: str, *, draws: int | None = None, seed: int = TEXT_EVAL_SEED) -> dict:
        """Bits per character of `text` (:func:`~torchdiffusion.evaluate.text.score_text`): the diffusion bound with
        `draws` Monte Carlo draws per window (default: the run's text.eval_draws), or the AR model's exact NLL."""
        draws = self.config.text.eval_draws if draws is None else int(draws)
        if draws < 1:
            raise ValueError(f"draws must be at least 1 (Monte Carlo time draws per window), got {draws}")
        return score_text(self.module, self.config, self.tokenizer, text, draws=draws, seed=seed)

    def evaluate(self, **kwargs) -> dict:
        """Bits per character of the test and validation splits of the run's data set (evaluate_text_checkpoint)."""
        return evaluate_text_checkpoint(self.path, use_ema=self.use_ema, **kwargs)


def load(path, *, use_ema: bool = True, device="cpu") -> Model | TextModel:
    """Load a checkpoint (or a diffusers model folder) as a :class:`Model`, a text checkpoint as a
    :class:`TextModel`."""
    if not is_diffusers_folder(path) and read_meta(path).get("config", {}).get("task") == "text":
        return TextModel(path, use_ema=use_ema, device=device)
    return Model(path, use_ema=use_ema, device=device)
