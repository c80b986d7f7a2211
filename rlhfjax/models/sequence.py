"""Prompt + response sequences and the model interfaces the sampler and the RL core take.

A sequence is `[left-padded prompt (P) | right-padded response (N)]`, `mask` 1 on real tokens and
`positions = cumsum(mask) - 1`. Logits at column `P - 1 + i` predict response token `i`.

The sampler and the RL core never build a model; they take linen modules with these interfaces
(the built-in transformer's modules in `rlhfjax.models.heads` are one implementation each):

* a **policy**: `model.apply({"params": p}, tokens, positions, mask) -> logits [B, T, V]` or
  `(logits, anything)`. With a KV cache it also takes `(cache, cache_index)` and returns
  `(logits, new_cache)`, and has a method `init_cache(batch, length)` (see `PolicyModel`); without
  `init_cache` the sampler re-runs the whole sequence each step. An optional `max_len` attribute
  bounds prompt + response.
* a **critic**: `model.apply({"params": p}, tokens, positions, mask) -> values [B, T]`.
* an **actor-critic** (one shared trunk): `apply(...) -> (logits [B, T, V], values [B, T])`; its
  parameters must also be readable by the policy module (as `PolicyValueModel`'s are by
  `PolicyModel`'s: the extra `value_head` subtree is ignored).

Each function below accepts a `TransformerConfig` in place of the policy module (the built-in
`PolicyModel`).
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhfjax.models.heads import as_policy
from rlhfjax.models.init import positions_from_mask
from rlhfjax.rl.losses import logprobs_from_logits as token_logprobs


def concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
  """-> (tokens [B, P+N], mask [B, P+N], positions [B, P+N])."""
  tokens = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  return tokens, mask, positions_from_mask(mask)


def logits_of(output):
  """The logits of a policy's output (`logits` or `(logits, cache)`)."""
  return output[0] if isinstance(output, tuple) else output


def _apply_on_sequence(model, params, prompt_ids, prompt_mask, response_ids, response_mask):
  tokens, mask, positions = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
  return model.apply({"params": params}, tokens, positions, mask)


def response_logits(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                    temperature: float = 1.0):
  """Policy logits that predict each response token: [B, N, vocab] (float32, divided by temperature)."""
  out = _apply_on_sequence(as_policy(model), params, prompt_ids, prompt_mask, response_ids, response_mask)
  p = prompt_ids.shape[1]
  return logits_of(out)[:, p - 1:-1].astype(jnp.float32) / temperature


def response_logits_values(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                           temperature: float = 1.0):
  """Actor-critic, one forward: (logits [B, N, vocab] / temperature, values [B, N]); both at column
  `P - 1 + i`, i.e. for the state before response token `i`."""
  logits, values = _apply_on_sequence(model, params, prompt_ids, prompt_mask, response_ids,
                                      response_mask)
  p = prompt_ids.shape[1]
  return logits[:, p - 1:-1].astype(jnp.float32) / temperature, values[:, p - 1:-1]


def response_values(params, model, prompt_ids, prompt_mask, response_ids, response_mask):
  """Critic: V(s_i) for each response token i (state = prompt + response[:i]): [B, N] float32."""
  values = _apply_on_sequence(model, params, prompt_ids, prompt_mask, response_ids, response_mask)
  p = prompt_ids.shape[1]
  return values[:, p - 1:-1].astype(jnp.float32)


def response_logprobs(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                      temperature: float = 1.0):
  """Log-probabilities of the response tokens under the policy: [B, N] (0 where mask is 0)."""
  logits = response_logits(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                           temperature)
  return token_logprobs(logits, response_ids) * response_mask
