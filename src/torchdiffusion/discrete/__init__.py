"""Discrete diffusion for token sequences (docs/text.md): masking schedules and the absorbing and uniform
processes (`processes`), MDLM's NELBO, the discrete-time ELBO and D3PM's hybrid loss (`objective`), and the
samplers: MDLM ancestral with caching, LLaDA's low-confidence remasking, BD3-LM blocks, D3PM (`sampling`).

Sequences are LongTensors (N, L) over K tokens 0..K-1; the absorbing process adds the mask, id K. A model is any
``model(x_t, t, **cond) -> logits`` with t a float32 (N,) tensor in [0, 1] and logits (N, L, K + 1) for the
absorbing process (the mask's column last, overwritten by SUBS) or (N, L, K) for the uniform one. Imports only
torch and :mod:`torchdiffusion.utils`.
"""
from .objective import (DiscreteObjective, DiscreteObjectiveConfig, D3PMTerms, NextTokenObjective,
                        absorbing_elbo_discrete, bits_per_character, bits_per_token, bos_shift, d3pm_hybrid_loss,
                        d3pm_terms, mdlm_nelbo, subs_logits)
from .processes import (MASK_SCHEDULES, CosineSchedule, LogLinearSchedule, MaskSchedule, absorbing_posterior,
                        absorbing_probs, absorbing_sample, get_mask_schedule, sample_categorical, uniform_posterior,
                        uniform_probs, uniform_sample)
from .sampling import (DiscreteSample, prefix_fixed, sample_blocks, sample_causal, sample_d3pm, sample_mdlm,
                       sample_remask, time_grid, transfer_counts)
