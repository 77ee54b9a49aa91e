"""Generating text from a text checkpoint (what ``torchdiffusion generate-text`` runs; docs/text.md).

The diffusion models (mdlm, d3pm) generate every position that is not fixed: ``--prompt`` fixes a prefix,
``--infill`` a template in which the blank character (text.sample.blank, ``_`` by default) marks a
position to generate and every other character is kept. The autoregressive model (ar) generates left to right
after its prompt (ancestral sampling of p(x_i | x_<i)) and cannot infill. Sample i draws from its own generator,
seeded by (seed, i), so a sample does not depend on how many are drawn.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..build import load_text_model
from ..config import TEXT_SAMPLERS, TextSampleConfig
from ..discrete import (prefix_fixed, sample_blocks, sample_causal, sample_d3pm, sample_mdlm, sample_remask,
                        time_grid)
from ..utils import check_choice, sample_generators


def template_tokens(template: str, tokenizer, blank: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (L,), fixed (L,) bool) of an infill template: each blank character is one position to generate
    (id 0 as filler), every other character is encoded and fixed (a byte tokeniser may give several ids)."""
    ids, fixed = [], []
    for ch in template:
        if ch == blank:
            ids.append(0)
            fixed.append(False)
        else:
            enc = tokenizer.encode(ch).tolist()
            ids.extend(enc)
            fixed.extend([True] * len(enc))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(fixed, dtype=torch.bool)


def start(cfg, tokenizer, n: int, *, prompt: str = "", infill: str = "", blank: str = "_"):
    """The starting tokens (N, L) and the fixed positions (N, L) of a request, checked against the network."""
    length = cfg.model.text_transformer.seq_len
    if prompt and infill:
        raise ValueError("give --prompt or --infill, not both (an infill template may start with fixed text)")
    if infill:
        if cfg.text.objective == "ar":
            raise ValueError("an autoregressive (ar) model generates left to right and cannot infill: use --prompt, "
                             "or a diffusion checkpoint (mdlm, d3pm) for --infill")
        if blank not in infill:
            raise ValueError(f"the infill template has no blank {blank!r}: mark the positions to "
                             "generate with it (or choose another with --blank)")
        ids, fixed = template_tokens(infill, tokenizer, blank)
    else:
        given = tokenizer.encode(prompt) if prompt else torch.zeros(0, dtype=torch.long)
        if len(given) >= length:
            raise ValueError(f"the prompt has {len(given)} tokens; the model writes {length}: give a prompt shorter "
                             f"than {length} tokens")
        ids = torch.cat([given, torch.zeros(length - len(given), dtype=torch.long)])
        fixed = prefix_fixed(ids[None], len(given))[0]
    if len(ids) > length:
        raise ValueError(f"the template is {len(ids)} tokens long; the model takes at most {length}")
    return ids.expand(n, -1).clone(), fixed.expand(n, -1).clone()


@torch.no_grad()
def draw(module, cfg, x, fixed, spec: TextSampleConfig, generator):
    """Run the requested sampler: (tokens (N, L), model calls)."""
    objective, k = cfg.text.objective, cfg.model.text_transformer.vocab_size
    check_choice("sampler", spec.sampler, TEXT_SAMPLERS)
    steps = spec.steps or int((~fixed).sum(1).max())  # 0: one step per generated token
    if objective == "ar" or objective == "d3pm":
        if spec.sampler != "ancestral":
            raise ValueError(f"the {objective} model samples with 'ancestral' only; {spec.sampler!r} needs the "
                             "absorbing process (an mdlm checkpoint)")
        if objective == "ar":
            out = sample_causal(module, x, fixed, bos_id=k, generator=generator)
            return out.tokens, out.model_calls
        out = sample_d3pm(module, x, time_grid(max(steps, 1)), num_tokens=k, generator=generator, fixed=fixed)
        return out.tokens, out.model_calls
    common = dict(mask_id=k, generator=generator, fixed=fixed, cache=not cfg.model.text_transformer.time_cond)
    if spec.sampler == "ancestral":
        out = sample_mdlm(module, x, time_grid(max(steps, 1)), **common)
    elif spec.sampler == "remask":
        out = sample_remask(module, x, max(steps, 1), **common)
    else:
        out = sample_blocks(module, x, block_size=spec.block_size, steps=max(spec.steps or spec.block_size, 1),
                            **common)
    return out.tokens, out.model_calls


def generate_text(path, *, prompt: str = "", infill: str = "", use_ema: bool = True, **options) -> dict:
    """Samples of a text checkpoint as a dict: the texts, the settings (the run's text.sample with `options`
    applied), the model calls and the fixed positions. See the module docstring."""
    module, cfg, meta, tokenizer = load_text_model(path, use_ema=use_ema)
    return {"checkpoint": str(path), "step": meta.get("step"),
            **generate_with(module, cfg, tokenizer, prompt=prompt, infill=infill, use_ema=use_ema, **options)}


def generate_with(module, cfg, tokenizer, *, prompt: str = "", infill: str = "", use_ema: bool = True,
                  **options) -> dict:
    """:func:`generate_text` on a loaded model (module, config, tokeniser), without the checkpoint's fields."""
    spec = dataclasses.replace(cfg.text.sample, **options)
    if spec.n < 1 or spec.steps < 0 or spec.block_size < 1 or len(spec.blank) != 1:
        raise ValueError(f"--n and --block-size must be >= 1, --steps >= 0 and --blank one character, got "
                         f"{spec.n}, {spec.block_size}, {spec.steps}, {spec.blank!r}")
    x, fixed = start(cfg, tokenizer, spec.n, prompt=prompt, infill=infill, blank=spec.blank)
    tokens, calls = draw(module, cfg, x, fixed, spec, sample_generators(spec.seed, spec.n))
    texts = tokenizer.decode(tokens)
    return {"objective": cfg.text.objective,
            "settings": {**dataclasses.asdict(spec), "prompt": prompt, "infill": infill, "use_ema": use_ema},
            "model_calls": calls, "length": tokens.shape[1], "samples": texts,
            "fixed_positions": int(fixed[0].sum())}


def write_text_samples(result: dict, out: Path) -> tuple[Path, Path]:
    """samples.txt (the samples, one block each) and samples.json (settings, model calls, samples) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    txt, js = out / "samples.txt", out / "samples.json"
    txt.write_text("".join(f"=== sample {i} ===\n{s}\n" for i, s in enumerate(result["samples"])))
    js.write_text(json.dumps(result, indent=2))
    return txt, js
