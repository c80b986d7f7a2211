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

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhfjax.models.heads import as_policy
from rlhfjax.models.init import positions_from_mask
from rlhfjax.models.transformer import ACTIVATIONS
from rlhfjax.rl.losses import entropy_from_logits
from rlhfjax.rl.losses import logprobs_from_logits as token_logprobs

LOGIT_CHUNK = 128  # response positions per LM-head chunk (response_token_stats)


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


def response_values(params, model, prompt_ids, prompt_mask, response_ids, response_mask):
  """Critic: V(s_i) for each response token i (state = prompt + response[:i]): [B, N] float32."""
  values = _apply_on_sequence(model, params, prompt_ids, prompt_mask, response_ids, response_mask)
  p = prompt_ids.shape[1]
  return values[:, p - 1:-1].astype(jnp.float32)


def response_token_stats(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                         temperature: float = 1.0, *, entropy: bool = True, values: bool = False,
                         chunk: int = LOGIT_CHUNK):
  """(log-probs [B, N] (not masked), entropy [B, N] or None, values [B, N] or None — an
  actor-critic's, with `values=True`) of the response tokens at `temperature`.

  A model with `hidden` / `head` methods (the built-in ones) runs its LM head on the response
  positions only, `chunk` positions at a time (`lax.map`, each chunk rematerialized in the backward
  pass), so no [B, N, vocab] float32 logits exist; any other model goes through its full logits.
  """
  model = as_policy(model)
  tokens, mask, positions = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
  cut = lambda x: x[:, prompt_ids.shape[1] - 1:-1]  # noqa: E731  columns predicting response tokens
  stats = lambda logits, ids: (token_logprobs(logits, ids),  # noqa: E731
                               entropy_from_logits(logits) if entropy else None)
  if not hasattr(model, "head"):
    out = model.apply({"params": params}, tokens, positions, mask)
    lp, ent = stats(cut(logits_of(out)).astype(jnp.float32) / temperature, response_ids)
    return lp, ent, cut(out[1]).astype(jnp.float32) if values else None
  h = cut(model.apply({"params": params}, tokens, positions, mask, method="hidden"))
  vals = model.apply({"params": params}, h, method="values") if values else None
  (b, n), c = h.shape[:2], min(chunk, h.shape[1])
  k = -(-n // c)  # chunks; the last one padded
  split = lambda x: jnp.pad(x, [(0, 0), (0, k * c - n)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
      b, k, c, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(chunk_args):
    hc, ids = chunk_args
    hc = nn.with_logical_constraint(hc, ACTIVATIONS)
    return stats(model.apply({"params": params}, hc, method="head").astype(jnp.float32) / temperature, ids)

  lp, ent = jax.lax.map(one, (split(h), split(response_ids)))
  join = lambda x: None if x is None else x.swapaxes(0, 1).reshape(b, k * c)[:, :n]  # noqa: E731
  return join(lp), join(ent), vals


def response_logprobs(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                      temperature: float = 1.0):
  """Log-probabilities of the response tokens under the policy: [B, N] (0 where mask is 0)."""
  return response_token_stats(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                              temperature, entropy=False)[0] * response_mask
