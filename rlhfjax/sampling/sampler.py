"""Jitted KV-cache sampler: prefill the prompt, then decode one token per `lax.while_loop` step.

`generate` compiles once per (shape, config) and stops when every row has emitted EOS or after
`max_new_tokens`. Log-probabilities are under the sampling distribution before top-k/top-p
truncation, `log_softmax(logits / temperature)` (temperature 1 when greedy), and equal a full
no-cache forward pass. `SamplingConfig.model` is a policy module (`rlhfjax.models.sequence`; without
`init_cache` the whole sequence is re-run each step) or a `TransformerConfig` (`PolicyModel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhfjax.models.heads import as_policy
from rlhfjax.models.init import positions_from_mask
from rlhfjax.models.sequence import logits_of, width_buckets
from rlhfjax.parallel.mesh import data_parallel_size


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampler settings (hashable: a jit static argument)."""

  model: Any  # a policy module (hashable linen module), or a TransformerConfig for the built-in one
  max_new_tokens: int  # response budget; rows that never emit EOS are truncated here
  eos_id: int
  pad_id: int = 0
  temperature: float = 1.0  # softmax temperature (> 0)
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # nucleus sampling: smallest set with mass >= top_p; 1.0 = off
  greedy: bool = False  # argmax decoding (temperature, top_k, top_p ignored)
  layout: Any = None  # (mesh, rules): traced in `layout(...)`, so the model's activations are batch-split
  # Grow the KV cache in power-of-two stages (`cache_widths`) so each decode step reads only the
  # slots a response can have filled so far; False: one cache of the whole budget from the start.
  grow_cache: bool = True
  # Rows come in contiguous groups of this many that share one prompt (GRPO's samples per prompt):
  # a policy with a KV cache prefills each group's first row only and copies its cache and
  # next-token logits to the group's rows. 1: every row prefilled. With a `layout` whose batch
  # shards the groups (batch // prompt_group) do not split over, every row is prefilled.
  prompt_group: int = 1

  def __post_init__(self):
    if self.prompt_group < 1:
      raise ValueError(f"prompt_group must be >= 1, got {self.prompt_group}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    check_filters(self.temperature, self.top_k, self.top_p, greedy=self.greedy)


def check_filters(temperature: float, top_k: int = 0, top_p: float = 1.0, *, greedy: bool = False,
                  prefix: str = "") -> None:
  """`SamplingConfig`'s checks of the sampling settings, for callers that validate a config before
  they can build one (`prefix`: the keys' config path, e.g. "config.rl_sampling.")."""
  if not greedy and not temperature > 0:
    raise ValueError(f"{prefix}temperature must be > 0, got {temperature} (greedy=True for argmax)")
  if top_k < 0:
    raise ValueError(f"{prefix}top_k must be >= 0, got {top_k} (0 = off)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"{prefix}top_p must be in (0, 1], got {top_p}")


def cache_widths(n: int) -> list[int]:
  """The response widths the sampler's KV cache grows through for an `n`-token budget (16, 32, 64,
  ..., n): one compiled decode loop each, so few; a step attends over at most twice the filled slots."""
  return width_buckets(n, steps=(2,))


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array  # [batch, max_new_tokens] int32, pad after EOS
  logprobs: jax.Array  # [batch, max_new_tokens] float32, 0 where mask is 0
  mask: jax.Array  # [batch, max_new_tokens] float32, 1 on response tokens incl. EOS
  lengths: jax.Array  # [batch] int32 response lengths
  finished: jax.Array  # [batch] bool: emitted EOS (False = truncated)


@flax.struct.dataclass
class Rollout:
  """Sampled responses to a batch of prompts: what a scorer and `make_experience` read.

  All device arrays; B = prompts x samples per prompt, rows of one prompt contiguous.
  """

  prompt_ids: jax.Array  # [B, P] int32, left-padded
  prompt_mask: jax.Array  # [B, P] 1 on real prompt tokens
  response_ids: jax.Array  # [B, N] int32, pad after EOS
  response_mask: jax.Array  # [B, N] float32, 1 on response tokens incl. EOS
  finished: jax.Array  # [B] bool: emitted EOS (False = truncated at the budget)
  packing: Any = None  # `models.sequence.Packing` of the sequences (`train.rl.pack_rollout`), or None
  logprobs: Any = None  # [B, N] float32 the sampler's log-probs (read by `rl.tis_cap`), or None

  @classmethod
  def from_sample(cls, prompt_ids, prompt_mask, out: SampleOutput) -> "Rollout":
    return cls(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=out.tokens,
               response_mask=out.mask, finished=out.finished, logprobs=out.logprobs)


@flax.struct.dataclass
class _State:
  step: jax.Array
  cache: Any  # the policy's KV cache, or None (the whole sequence is re-run each step)
  logits: jax.Array  # [B, V] logits for the next token
  key_mask: jax.Array  # [B, S] 1 on slots holding real tokens
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  done: jax.Array
  rng: jax.Array


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Set logits outside the top-k / nucleus to the dtype's lowest value. [B, V] -> [B, V] (`logits`' dtype).

  transformers' `TopKLogitsWarper` then `TopPLogitsWarper`: the top-k keeps every token tied with the
  k-th logit; the nucleus, computed in float32 over the top-k's survivors, drops a token where the
  mass of it and every less likely token is <= 1 - top_p, and keeps the most likely token. One
  difference: a token tied with the least likely token the nucleus keeps is kept too (transformers
  splits such a tie by its sort order), so the kept set does not depend on the order of the vocab.
  """
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    # ascending, as transformers: the tail's small masses are summed first (a descending cumsum loses
    # them); in float32 (a bfloat16 cumsum stalls far below 1)
    x = logits.astype(jnp.float32)
    sorted_logits = jnp.sort(x, axis=-1)
    mass_upto = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop = (mass_upto <= 1.0 - top_p).at[..., -1].set(False)  # the top token is always kept
    threshold = jnp.min(jnp.where(drop, jnp.inf, sorted_logits), axis=-1, keepdims=True)
    logits = jnp.where(x < threshold, neg, logits)
  return logits


def _pick(logits, rng, config: SamplingConfig):
  """Choose next tokens and their log-probs under the (untruncated) sampling distribution. In float32
  whatever the model's logits (as transformers' `generate`): a bfloat16 `logits / temperature`,
  log-softmax or Gumbel noise would bias the draw and the log-probs."""
  logits = logits.astype(jnp.float32)
  if config.greedy:
    token = jnp.argmax(logits, axis=-1)
    scaled = logits
  else:
    scaled = logits / config.temperature
    token = jax.random.categorical(rng, filter_logits(scaled, config.top_k, config.top_p), axis=-1)
  logp = jax.nn.log_softmax(scaled, axis=-1)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def prefill_group(batch: int, config: SamplingConfig) -> int:
  """How many rows one prefill serves for a `batch` of rows: `config.prompt_group`, or 1 where the
  groups' first rows would not split over the `config.layout`'s batch shards."""
  g = config.prompt_group
  if batch % g:
    raise ValueError(f"batch {batch} is not a whole number of prompt groups of {g}")
  if config.layout and (batch // g) % data_parallel_size(*config.layout):
    return 1
  return g


@contextlib.contextmanager
def layout(mesh, rules):
  """The mesh and logical-axis rules a jitted function is traced in for the logical constraints in
  it (the model's batch-split activations) to take effect; outside one they are no-ops."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


@functools.partial(jax.jit, static_argnames=("config",))
def generate(params, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
             config: SamplingConfig) -> SampleOutput:
  """Responses to left-padded prompts `prompt_ids` / `prompt_mask` [batch, prompt_len] (each row
  with a real token) from the policy `config.model` with `params`: `SampleOutput`, [batch,
  max_new_tokens] arrays. Raises `ValueError` if prompt + response exceed the model's `max_len`."""
  with layout(*config.layout) if config.layout else contextlib.nullcontext():
    return _generate(params, prompt_ids, prompt_mask, rng, config)


def _generate(params, prompt_ids, prompt_mask, rng, config: SamplingConfig) -> SampleOutput:
  model = as_policy(config.model)
  b, p = prompt_ids.shape
  n = config.max_new_tokens
  max_len = getattr(model, "max_len", None)
  if max_len is not None and p + n > max_len:
    raise ValueError(f"prompt_len {p} + max_new_tokens {n} exceeds the model's max_len {max_len}")
  prompt_ids = prompt_ids.astype(jnp.int32)
  prompt_mask = prompt_mask.astype(jnp.int32)
  key_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), jnp.int32)], axis=1)
  prompt_len = jnp.sum(prompt_mask, axis=1)  # [B] position of the first response token
  apply = lambda *args: model.apply({"params": params}, *args)  # noqa: E731
  widths = [n]  # the response width the cache holds in each decode stage
  if hasattr(model, "init_cache"):
    if hasattr(model, "decode_params"):
      params = model.decode_params(params)
    # the cache holds p + n - 1 slots at most: no forward runs after the last token
    widths = cache_widths(max(n - 1, 1)) if config.grow_cache else [max(n - 1, 1)]
    g = prefill_group(b, config)
    first = slice(None, None, g)  # each group's first row; its cache and logits serve the group
    logits, cache = apply(prompt_ids[first], positions_from_mask(prompt_mask[first]),
                          key_mask[first, :p + widths[0]], model.init_cache(b // g, p + widths[0]), 0)
    if g > 1:
      logits, cache = jax.tree.map(lambda a: jnp.repeat(a, g, axis=0), (logits, cache))

    def next_logits(s: _State, token, key_mask, width):  # one new token through the cache (p + width slots)
      logits, cache = apply(token[:, None], (prompt_len + s.step)[:, None], key_mask[:, :p + width],
                            s.cache, p + s.step)
      return logits[:, 0], cache
  else:
    logits, cache = logits_of(apply(prompt_ids, positions_from_mask(prompt_mask), prompt_mask)), None
    positions = jnp.concatenate([positions_from_mask(prompt_mask),
                                 prompt_len[:, None] + jnp.arange(n)[None]], axis=1)

    def next_logits(s: _State, tokens, key_mask, width):  # the whole sequence again, read at the new slot
      out = logits_of(apply(jnp.concatenate([prompt_ids, tokens], axis=1), positions, key_mask))
      return jax.lax.dynamic_index_in_dim(out, p + s.step, axis=1, keepdims=False), None

  def pick(s: _State) -> _State:  # the next token from `s.logits`, written at `s.step`
    rng, sub = jax.random.split(s.rng)
    token, logp = _pick(s.logits, sub, config)
    live = ~s.done
    token = jnp.where(live, token, config.pad_id)
    return s.replace(tokens=s.tokens.at[:, s.step].set(token),
                     logprobs=s.logprobs.at[:, s.step].set(jnp.where(live, logp, 0.0)),
                     mask=s.mask.at[:, s.step].set(live.astype(jnp.float32)),
                     key_mask=s.key_mask.at[:, p + s.step].set(live.astype(jnp.int32)),
                     done=s.done | (token == config.eos_id), rng=rng)

  def body(s: _State, width: int):  # pick a token, then its forward: the logits for the next one
    s = pick(s)
    token = s.tokens[:, s.step]
    logits, cache = next_logits(s, token if s.cache is not None else s.tokens, s.key_mask, width)
    return s.replace(step=s.step + 1, cache=cache, logits=logits)

  state = _State(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1], key_mask=key_mask,
                 tokens=jnp.full((b, n), config.pad_id, jnp.int32),
                 logprobs=jnp.zeros((b, n), jnp.float32), mask=jnp.zeros((b, n), jnp.float32),
                 done=jnp.zeros((b,), bool), rng=rng)
  for i, width in enumerate(widths):
    if i:  # the next stage: the filled slots copied into a cache of p + width slots
      state = state.replace(cache=jax.tree.map(
          lambda new, old: jax.lax.dynamic_update_slice(new, old.astype(new.dtype), (0,) * old.ndim),
          model.init_cache(b, p + width), state.cache))
    # the last token needs no forward after it: the loops stop one step short, and it is picked below
    last = min(width, n - 1)
    state = jax.lax.while_loop(lambda s, w=last: (s.step < w) & ~jnp.all(s.done),
                               functools.partial(body, width=width), state)
  if n:
    state = pick(state)  # the last token (rows already done stay padding)
  return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, mask=state.mask,
                      lengths=jnp.sum(state.mask, axis=1).astype(jnp.int32),
                      finished=jnp.any((state.tokens == config.eos_id) & (state.mask > 0), axis=1))
