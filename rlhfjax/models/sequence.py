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

A module whose class sets `takes_out_from = True` (the built-in ones) also takes `out_from=k` in
its no-cache `apply` (and `hidden`) and then returns the outputs of columns >= k only; the
functions below pass `P - 1`, the first column predicting a response token, so the last layer
runs only there (`Trunk`'s `out_from`). Others run every column and are cut after.

Each function below accepts a `TransformerConfig` in place of the policy module (the built-in
`PolicyModel`).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.models.heads import as_policy
from rlhfjax.models.init import positions_from_mask
from rlhfjax.models.transformer import ACTIVATIONS, SEGMENT_GROUP
from rlhfjax.rl.losses import entropy_from_logits
from rlhfjax.rl.losses import logprobs_from_logits as token_logprobs

LOGIT_CHUNK = 128  # response positions per LM-head chunk (response_token_stats)


def width_buckets(n: int, minimum: int = 16, steps: tuple[int, ...] = (2, 3)) -> list[int]:
  """The widths an `n`-token axis is cut to: `minimum` * 2^k and, with `steps` (2, 3), the
  midpoints 1.5 * 2^k between them (16, 24, 32, 48, 64, 96, ...), capped at `n`; the last is `n`.
  A length cut to the next bucket wastes at most a third of the columns (a power of two: half)."""
  out, k = {n}, 0
  while (minimum << k) < n:
    out |= {min(n, (minimum << k) * m // 2) for m in steps}
    k += 1
  return sorted(out)


def bucket_width(length: int, n: int, **kw) -> int:
  """The smallest of `width_buckets(n, **kw)` that holds `length` columns."""
  return next(w for w in width_buckets(n, **kw) if w >= length)


@flax.struct.dataclass
class Packing:
  """Where each sequence of a `[B, P + N]` batch sits in `R` packed rows of `P + N` slots (first-fit
  decreasing, from `pack_plan`), so a forward runs over the real tokens only: about B x (prompt +
  response - 1) slots instead of B x (P + N) when responses stop early.

  The packed rows' mask holds segment ids (row b + 1; 0 = empty), which the built-in attention reads
  as "attend within your segment"; positions stay each sequence's own."""

  src: jax.Array  # [R, L] int32: flat index into the [B, P + N] batch of each packed slot, -1 = empty
  dst: jax.Array  # [B, N] int32: flat index into the [R, L] rows of the slot predicting response token i; -1 = padding
  segments: jax.Array  # [R, L] int32: each slot's segment id (the attention mask), 0 = empty


def packed_row_counts(b: int, rows_multiple: int = 1) -> list[int]:
  """Every row count `pack_plan` can give a batch of `b` sequences: `rows_multiple` (the batch
  shards) times a bucket of `width_buckets(b // rows_multiple)` (1, 2, 3, 4, 6, 8, 12, ...)."""
  if b % rows_multiple:
    raise ValueError(f"pack_plan: batch {b} is not a multiple of rows_multiple={rows_multiple}")
  return [rows_multiple * k for k in width_buckets(b // rows_multiple, minimum=1)]


def pack_plan(prompt_mask, response_mask, rows_multiple: int = 1) -> Packing:
  """A `Packing` (host NumPy arrays) for left-padded prompts and right-padded responses ([B, P],
  [B, N] host masks; each prompt with a real token); see `pack_lengths`."""
  prompt_mask, response_mask = np.asarray(prompt_mask) > 0, np.asarray(response_mask) > 0
  (b, p), n = prompt_mask.shape, response_mask.shape[1]
  pl, rl = prompt_mask.sum(1), response_mask.sum(1)
  if (prompt_mask != (np.arange(p)[None] >= p - pl[:, None])).any() or (
      response_mask != (np.arange(n)[None] < rl[:, None])).any():
    raise ValueError("pack_plan: prompts must be left-padded and responses right-padded")
  return pack_lengths(pl, rl, p, n, rows_multiple)


def pack_lengths(pl, rl, p: int, n: int, rows_multiple: int = 1) -> Packing:
  """A `Packing` of sequences with prompt lengths `pl` (each >= 1, left-padded to `p`) and response
  lengths `rl` (right-padded to `n`): each sequence's tokens but its last (pl + rl - 1 slots, every
  one predicting a response token but the prompt's first pl - 1; none without a response), first-fit
  decreasing into rows of p + n slots, the row count the smallest of `packed_row_counts` that holds
  them, so only a few shapes are ever compiled."""
  pl, rl = np.asarray(pl, np.int64), np.asarray(rl, np.int64)
  b = pl.shape[0]
  if (pl < 1).any():
    raise ValueError("pack_plan: every prompt needs a real token")
  if b >= SEGMENT_GROUP:  # segment ids b + 1 must stay below the shared-prompt ids' range
    raise ValueError(f"pack_plan: batch {b} exceeds the segment-id range ({SEGMENT_GROUP - 1})")
  counts = packed_row_counts(b, rows_multiple)
  # a sequence's slots: its prompt and response but the last response token, which predicts nothing
  # (none at all without a response)
  length, width = np.where(rl > 0, pl + rl - 1, 0), p + n
  rows, where = [], np.zeros((b, 2), np.int64)  # (row, offset) of each sequence
  for i in np.argsort(-length, kind="stable"):  # first-fit decreasing
    r = next((r for r, used in enumerate(rows) if used + length[i] <= width), len(rows))
    if r == len(rows):
      rows.append(0)
    where[i] = r, rows[r]
    rows[r] += length[i]
  n_rows = next(c for c in counts if c >= len(rows))
  src = np.full((n_rows, width), -1, np.int32)
  dst = np.full((b, n), -1, np.int32)
  for i in range(b):
    r, o = where[i]
    src[r, o:o + length[i]] = i * width + p - pl[i] + np.arange(length[i])
    dst[i, :rl[i]] = r * width + o + pl[i] - 1 + np.arange(rl[i])
  return Packing(src=src, dst=dst, segments=np.where(src >= 0, src // width + 1, 0).astype(np.int32))


def share_lengths(pl, rl, p: int, n: int, group: int, rows_multiple: int = 1) -> Packing:
  """A `Packing` with each group's prompt computed once: the `group` consecutive sequences of a group
  share their prompt (length `pl`, left-padded to `p`; response lengths `rl`, right-padded to `n`).

  One row per group: `[prompt minus its last token | last prompt token + response 1 minus its last
  token | ... | last prompt token + response G minus its last token]`, so every slot predicts a
  response token and the prompt's other tokens appear once, not G times. Segment ids tell the
  attention (`rlhfjax.models.transformer.SEGMENT_GROUP`): the prompt part is `k * SEGMENT_GROUP`
  for the row's group k >= 1, response j's part `k * SEGMENT_GROUP + j`, and a response sees its
  own part and its group's prompt. The row width is the longest group's, rounded up to a bucket
  of `width_buckets` (few compiled shapes); the row count is the groups, rounded up to a multiple
  of `rows_multiple` with empty rows."""
  pl, rl = np.asarray(pl, np.int64), np.asarray(rl, np.int64)
  b = pl.shape[0]
  if group < 2 or b % group:
    raise ValueError(f"share_prompt: batch {b} is not whole groups of {group} (group >= 2)")
  if (pl < 1).any():
    raise ValueError("share_prompt: every prompt needs a real token")
  groups, width = b // group, p + n
  if group >= SEGMENT_GROUP or groups >= 2 ** 31 // SEGMENT_GROUP - 1:
    raise ValueError(f"share_prompt: {groups} groups of {group} exceed the segment-id range")
  lead = pl[::group]  # each group's prompt length (the rows of a group share the prompt)
  row_len = lead - 1 + rl.reshape(groups, group).sum(1)
  cols = bucket_width(max(int(row_len.max()), 1), p - 1 + group * n)
  rows = -(-groups // rows_multiple) * rows_multiple
  src = np.full((rows, cols), -1, np.int32)
  seg = np.zeros((rows, cols), np.int32)
  dst = np.full((b, n), -1, np.int32)
  for g in range(groups):
    first, k, tag = g * group, lead[g] - 1, (g + 1) * SEGMENT_GROUP
    src[g, :k] = first * width + p - lead[g] + np.arange(k)  # the prompt but its last token
    seg[g, :k] = tag
    o = k
    for j in range(group):
      i = first + j  # its own copy of the last prompt token, then its response but the last token
      src[g, o:o + rl[i]] = i * width + p - 1 + np.arange(rl[i])
      seg[g, o:o + rl[i]] = tag + j + 1
      dst[i, :rl[i]] = g * cols + o + np.arange(rl[i])
      o += rl[i]
  return Packing(src=src, dst=dst, segments=seg)


def _packable(model):
  from rlhfjax.models.heads import PolicyModel, PolicyValueModel, ValueModel

  if not isinstance(model, (PolicyModel, PolicyValueModel, ValueModel)):
    raise ValueError(f"rl.pack needs a built-in model (its attention reads segment ids); got "
                     f"{type(model).__name__}")


def _packed_inputs(packing: Packing, tokens, positions):
  """(tokens, positions, segment ids, next tokens) of the packed rows [R, L]."""
  src, real = jnp.maximum(packing.src, 0), packing.src >= 0
  flat_tok, flat_pos = tokens.reshape(-1), positions.reshape(-1)
  take = lambda flat, idx: jnp.where(real, flat[idx], 0)  # noqa: E731
  return (take(flat_tok, src), take(flat_pos, src), packing.segments,
          take(flat_tok, jnp.minimum(src + 1, flat_tok.shape[0] - 1)))


def _unpack(packing: Packing, x):
  """Packed [R, L] per-slot values -> [B, N] per response token (0 on padding)."""
  return jnp.where(packing.dst >= 0, x.reshape(-1)[jnp.maximum(packing.dst, 0)], 0).astype(x.dtype)


def concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
  """-> (tokens [B, P+N], mask [B, P+N], positions [B, P+N])."""
  tokens = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  return tokens, mask, positions_from_mask(mask)


def predicting_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
  """(tokens, mask, positions) [B, P + N - 1] of the columns whose outputs predict the N response
  tokens: the prompt and the response but its last token, which predicts nothing (a causal model's
  outputs at the other columns do not depend on it; every policy and critic must be causal, as a
  policy that samples token by token is). Output columns P - 1 ... P + N - 2 predict response
  tokens 0 ... N - 1."""
  n = max(response_ids.shape[1] - 1, 0)
  return concat_prompt_response(prompt_ids, prompt_mask, response_ids[:, :n], response_mask[:, :n])


def logits_of(output):
  """The logits of a policy's output (`logits` or `(logits, cache)`)."""
  return output[0] if isinstance(output, tuple) else output


def _predicting_apply(model, params, prompt_ids, prompt_mask, response_ids, response_mask, **kw):
  """(output, cut): `model.apply` (`kw`: e.g. `method`) on `predicting_inputs`, and the function
  that cuts an output array to the columns predicting each response token ([B, N, ...]). A module
  that `takes_out_from` computes only those columns (and `cut` keeps N of them)."""
  tokens, mask, positions = predicting_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
  p, n = prompt_ids.shape[1], response_ids.shape[1]
  if getattr(type(model), "takes_out_from", False) and p:
    out = model.apply({"params": params}, tokens, positions, mask, out_from=p - 1, **kw)
    return out, lambda x: x[:, :n]
  return model.apply({"params": params}, tokens, positions, mask, **kw), lambda x: x[:, p - 1:p - 1 + n]


def _apply_predicting(model, params, prompt_ids, prompt_mask, response_ids, response_mask):
  """The model's outputs at the columns predicting each response token ([B, N, ...]; the model's
  output, or a (logits, cache) pair's logits)."""
  out, cut = _predicting_apply(model, params, prompt_ids, prompt_mask, response_ids, response_mask)
  return cut(logits_of(out))


def response_logits(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                    temperature: float = 1.0):
  """Policy logits that predict each response token: [B, N, vocab] (float32, divided by temperature)."""
  out = _apply_predicting(as_policy(model), params, prompt_ids, prompt_mask, response_ids, response_mask)
  return out.astype(jnp.float32) / temperature


def response_values(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                    packing: Packing | None = None):
  """Critic: V(s_i) for each response token i (state = prompt + response[:i]): [B, N] float32
  (with `packing`: 0 on padding)."""
  if packing is not None:
    _packable(model)
    tokens, _, positions = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    tok, pos, seg, _ = _packed_inputs(packing, tokens, positions)
    return _unpack(packing, model.apply({"params": params}, tok, pos, seg).astype(jnp.float32))
  return _apply_predicting(model, params, prompt_ids, prompt_mask, response_ids,
                           response_mask).astype(jnp.float32)


def response_token_stats(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                         temperature: float = 1.0, *, entropy: bool = True, values: bool = False,
                         chunk: int = LOGIT_CHUNK, packing: Packing | None = None):
  """(log-probs [B, N] (not masked), entropy [B, N] or None, values [B, N] or None — an
  actor-critic's, with `values=True`) of the response tokens at `temperature`.

  A model with `hidden` / `head` methods (the built-in ones) runs its LM head on the response
  positions only, `chunk` positions at a time (`lax.map`, each chunk rematerialized in the backward
  pass), so no [B, N, vocab] float32 logits exist; any other model goes through its full logits.
  With `packing` (built-in models only) the forward and the head run over the packed rows and the
  results come back to [B, N] (0 on padding).
  """
  model = as_policy(model)
  stats = lambda logits, ids: (token_logprobs(logits, ids),  # noqa: E731
                               entropy_from_logits(logits) if entropy else None)
  if packing is not None:
    _packable(model)
    tokens, _, positions = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    tokens, positions, mask, targets = _packed_inputs(packing, tokens, positions)
    h = model.apply({"params": params}, tokens, positions, mask, method="hidden")  # [R, L, D]
    lp, ent = _chunked_head(params, model, h, targets, stats, temperature, chunk)
    vals = model.apply({"params": params}, h, method="values") if values else None
    return tuple(None if x is None else _unpack(packing, x) for x in (lp, ent, vals))
  predicting = lambda **kw: _predicting_apply(model, params, prompt_ids, prompt_mask,  # noqa: E731
                                              response_ids, response_mask, **kw)
  if not hasattr(model, "head"):
    out, cut = predicting()
    lp, ent = stats(cut(logits_of(out)).astype(jnp.float32) / temperature, response_ids)
    return lp, ent, cut(out[1]).astype(jnp.float32) if values else None
  h, cut = predicting(method="hidden")
  h = cut(h)
  vals = model.apply({"params": params}, h, method="values") if values else None
  lp, ent = _chunked_head(params, model, h, response_ids, stats, temperature, chunk)
  return lp, ent, vals


def _chunked_head(params, model, h, ids, stats, temperature, chunk):
  """`stats(logits / temperature, ids)` of hidden states [B, T, D], the LM head `chunk` positions at
  a time (each chunk rematerialized in the backward pass): ([B, T], [B, T] or None)."""
  (b, n), c = h.shape[:2], min(chunk, h.shape[1])
  k = -(-n // c)  # chunks; the last one padded
  split = lambda x: jnp.pad(x, [(0, 0), (0, k * c - n)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
      b, k, c, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(chunk_args):
    hc, ids = chunk_args
    hc = nn.with_logical_constraint(hc, ACTIVATIONS)
    return stats(model.apply({"params": params}, hc, method="head").astype(jnp.float32) / temperature, ids)

  lp, ent = jax.lax.map(one, (split(h), split(ids)))
  join = lambda x: None if x is None else x.swapaxes(0, 1).reshape(b, k * c)[:, :n]  # noqa: E731
  return join(lp), join(ent)


def response_logprobs(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                      temperature: float = 1.0):
  """Log-probabilities of the response tokens under the policy: [B, N] (0 where mask is 0)."""
  return response_token_stats(params, model, prompt_ids, prompt_mask, response_ids, response_mask,
                              temperature, entropy=False)[0] * response_mask
