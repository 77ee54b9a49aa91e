"""Bits per character of a text checkpoint (what ``torchdiffusion evaluate CKPT`` runs for a task-text run).

Every non-overlapping window of data.seq_len tokens of a split is read once (``TextWindows.eval_batches``; the last
``n mod L`` tokens are left out). For mdlm and d3pm the figure is the diffusion bound (MDLM's continuous-time NELBO or
the absorbing chain's T-step ELBO; D3PM's L_vb, the hybrid loss without its cross-entropy term) estimated with
`draws` independent Monte Carlo time draws per window, with its standard error across windows; for ar it is the
exact negative log-likelihood. Both cover the same L tokens of each window, so they compare directly.
"""
from __future__ import annotations

import math
import time

import torch

from ..build import load_text_model, text_characters, text_dataset, text_objective, window_nats
from ..discrete import NextTokenObjective, bits_per_character
from ..utils import LOG2

TEXT_EVAL_SPLITS = ("test", "valid")
TEXT_EVAL_SEED = 0xB17C  # the time draws of an evaluation (one generator per window and draw)


@torch.no_grad()
def split_bits(module, cfg, tokenizer, split: str, *, draws: int, batch_size: int = 64,
               seed: int = TEXT_EVAL_SEED) -> dict:
    """Bits per character (and per token) of the windows of one split, with the standard error across windows."""
    windows = text_dataset(cfg, split, tokenizer, verbose=False)
    objective = text_objective(cfg, evaluation=True)
    exact = isinstance(objective, NextTokenObjective)
    draws = 1 if exact else draws
    per, t0 = [], time.time()
    for x in windows.eval_batches(batch_size):
        per.append(window_nats(objective, module, x, draws=draws, seed=seed, offset=sum(len(p) for p in per)))
    per = torch.cat(per)  # (W,) nats per window
    tokens, chars = windows.eval_counts()
    n, length = len(per), windows.seq_len
    nats_per_token = float(per.sum()) / tokens
    se = float(per.std()) / math.sqrt(n) * n / tokens if n > 1 else 0.0  # of nats per token
    return {"bits_per_character": bits_per_character(nats_per_token, tokens=tokens, characters=chars),
            "bits_per_character_se": se * tokens / (chars * LOG2),
            "bits_per_token": nats_per_token / LOG2, "nats_per_token": nats_per_token,
            "windows": n, "seq_len": length, "tokens": tokens, "characters": chars,
            "draws_per_window": draws, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def score_text(module, cfg, tokenizer, text: str, *, draws: int, batch_size: int = 64,
               seed: int = TEXT_EVAL_SEED) -> dict:
    """Bits per character of any text under a loaded text model: the text is encoded and cut into consecutive
    windows of data.seq_len tokens, the last one shorter when the length is not a multiple (every token is scored
    once); each window's bound (mdlm, d3pm: `draws` Monte Carlo draws, window i seeded by (seed, draw, i)) or exact
    NLL (ar) is summed over the windows. A diffusion bound is an upper bound on -log p of each window; the AR figure
    is -log p of each window (a window's first token is scored without the text before it)."""
    if not isinstance(text, str) or not text:
        raise ValueError("score needs a non-empty str of text")
    ids = tokenizer.encode(text)  # (n,); an unknown character raises with the remedies
    length = cfg.model.text_transformer.seq_len
    objective = text_objective(cfg, evaluation=True)
    full = len(ids) // length
    nats = torch.zeros(0, dtype=torch.float64)
    if full:
        windows = ids[:full * length].view(full, length)  # (W, L)
        nats = torch.cat([window_nats(objective, module, x, draws=draws, seed=seed, offset=i * batch_size)
                          for i, x in enumerate(windows.split(batch_size))])
    if len(ids) % length:
        tail = ids[full * length:][None]  # (1, n mod L)
        nats = torch.cat([nats, window_nats(objective, module, tail, draws=draws, seed=seed, offset=full)])
    chars = text_characters(ids, tokenizer)
    total = float(nats.sum())
    return {"bits_per_character": total / (chars * LOG2), "bits_per_token": total / (len(ids) * LOG2),
            "nats": total, "tokens": len(ids), "characters": chars, "windows": len(nats),
            "draws_per_window": 1 if isinstance(objective, NextTokenObjective) else draws,
            "estimate": "exact" if isinstance(objective, NextTokenObjective) else "bound"}


def evaluate_text_checkpoint(path, *, draws: int | None = None, batch_size: int = 64, splits=TEXT_EVAL_SPLITS,
                             seed: int = TEXT_EVAL_SEED, use_ema: bool = True) -> dict:
    """Bits per character of a text checkpoint on the test and validation splits of its data set, read with the
    tokeniser stored in the checkpoint (the EMA weights by default). `draws`: Monte Carlo time draws per window for
    mdlm / d3pm (default: the run's text.eval_draws); ar is exact."""
    module, cfg, meta, tokenizer = load_text_model(path, use_ema=use_ema)
    draws = cfg.text.eval_draws if draws is None else int(draws)
    if draws < 1:
        raise ValueError(f"draws must be at least 1 (Monte Carlo time draws per window), got {draws}")
    objective = cfg.text.objective
    bound = {"ar": "exact negative log-likelihood (next-token cross-entropy)",
             "mdlm": ("MDLM continuous-time NELBO" if not cfg.text.loss.steps else
                      f"{cfg.text.loss.steps}-step ELBO of the absorbing chain"),
             "d3pm": f"D3PM's {cfg.text.loss.steps}-step L_vb of the uniform process"}
    out = {"checkpoint": str(path), "step": meta.get("step"), "objective": objective, "estimate": bound[objective],
           "dataset": cfg.data.dataset, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
           "weights": "ema" if use_ema else "model", "seed": seed}
    for split in splits:
        out[split] = split_bits(module, cfg, tokenizer, split, draws=draws, batch_size=batch_size, seed=seed)
    return out


def format_text_table(result: dict) -> str:
    """The splits' bits per character as a small table."""
    lines = [f"{result['checkpoint']} (step {result['step']}, {result['objective']}: {result['estimate']})",
             "split  bits/char   +-se     bits/token  windows  draws"]
    for split in TEXT_EVAL_SPLITS:
        r = result.get(split)
        if r:
            lines.append(f"{split:<6} {r['bits_per_character']:.4f}    {r['bits_per_character_se']:.4f}   "
                         f"{r['bits_per_token']:.4f}      {r['windows']:<7}  {r['draws_per_window']}")
    return "\n".join(lines)
