"""Prompt + response sequences: one layout shared by the sampler, SFT, reward models and RL.

A sequence is `[left-padded prompt (P) | right-padded response (N)]`, `mask` 1 on real tokens and
`positions = cumsum(mask) - 1`. Logits at column `P - 1 + i` predict response token `i`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhfjax.models.heads import PolicyModel, PolicyValueModel
from rlhfjax.models.init import positions_from_mask
from rlhfjax.models.transformer import TransformerConfig


def concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
  """-> (tokens [B, P+N], mask [B, P+N], positions [B, P+N])."""
  tokens = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  return tokens, mask, positions_from_mask(mask)


def response_logits(params, cfg: TransformerConfig, prompt_ids, prompt_mask, response_ids,
                    response_mask, temperature: float = 1.0):
  """Policy logits that predict each response token: [B, N, vocab] (float32, divided by temperature)."""
  tokens, mask, positions = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
  logits, _ = PolicyModel(cfg).apply({"params": params}, tokens, positions, mask)
  p = prompt_ids.shape[1]
  return logits[:, p - 1:-1] / temperature


def response_logits_values(params, cfg: TransformerConfig, prompt_ids, prompt_mask, response_ids,
                           response_mask, temperature: float = 1.0):
  """Shared-trunk actor-critic (`PolicyValueModel`), one forward: (logits [B, N, vocab] / temperature,
  values [B, N]); both at column `P - 1 + i`, i.e. for the state before response token `i`."""
  tokens, mask, positions = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
  logits, values = PolicyValueModel(cfg).apply({"params": params}, tokens, positions, mask)
  p = prompt_ids.shape[1]
  return logits[:, p - 1:-1] / temperature, values[:, p - 1:-1]


def token_logprobs(logits, tokens):
  """log softmax(logits)[tokens]: [B, T, V], [B, T] -> [B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def response_logprobs(params, cfg: TransformerConfig, prompt_ids, prompt_mask, response_ids,
                      response_mask, temperature: float = 1.0):
  """Log-probabilities of the response tokens under the policy: [B, N] (0 where mask is 0)."""
  logits = response_logits(params, cfg, prompt_ids, prompt_mask, response_ids, response_mask,
                           temperature)
  return token_logprobs(logits, response_ids) * response_mask
