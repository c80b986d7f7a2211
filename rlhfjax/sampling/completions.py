"""Decoded completions for text prompts: the sampler in fixed-shape batches, then the tokenizer."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from rlhfjax.sampling.sampler import SamplingConfig, generate


def pad_to_multiple(items: list, multiple: int) -> tuple[list, int]:
  """Repeat the last item so len is a multiple (one compiled shape); returns (items, real count)."""
  n = len(items)
  if n == 0:
    raise ValueError("nothing to evaluate: empty list")
  return items + [items[-1]] * (-n % multiple), n


def generate_completions(params, model, tokenizer, questions: Sequence[str], *,
                         max_prompt_len: int, max_new_tokens: int, batch_size: int, rng,
                         greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0) -> list[str]:
  """Decoded responses, one per question, sampled in fixed-shape batches.

  `model` is the policy module (or a `TransformerConfig` for the built-in transformer).
  """
  cfg = SamplingConfig(model=model, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       greedy=greedy)
  padded, n = pad_to_multiple(list(questions), batch_size)
  texts = []
  for i in range(0, len(padded), batch_size):
    ids, mask = tokenizer.encode_prompts(padded[i:i + batch_size], max_prompt_len)
    out = generate(params, ids, mask, jax.random.fold_in(rng, i), cfg)
    texts += tokenizer.decode_batch(np.asarray(out.tokens), np.asarray(out.mask))
  return texts[:n]
