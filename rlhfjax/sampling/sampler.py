"""Jitted KV-cache sampler: prefill the prompt, then decode one token per `lax.while_loop` step.

`generate` compiles once per (shape, config) and stops when every row has emitted EOS or after
`max_new_tokens`. It returns the sampled tokens, their log-probabilities under the *sampling
distribution before truncation* — `log_softmax(logits / temperature)` (temperature 1 when greedy) —
and the response mask (1 up to and including EOS). Those log-probabilities equal a full no-cache
forward pass over the same sequence (see tests/test_sampling.py), so RL can use them as the
behaviour policy's.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from rlhfjax.models.heads import PolicyModel
from rlhfjax.models.init import positions_from_mask
from rlhfjax.models.transformer import TransformerConfig, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampler settings (hashable: a jit static argument)."""

  model: TransformerConfig
  max_new_tokens: int  # response budget; rows that never emit EOS are truncated here
  eos_id: int
  pad_id: int = 0
  temperature: float = 1.0  # softmax temperature (> 0)
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # nucleus sampling: smallest set with mass >= top_p; 1.0 = off
  greedy: bool = False  # argmax decoding (temperature, top_k, top_p ignored)

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array  # [batch, max_new_tokens] int32, pad after EOS
  logprobs: jax.Array  # [batch, max_new_tokens] float32, 0 where mask is 0
  mask: jax.Array  # [batch, max_new_tokens] float32, 1 on response tokens incl. EOS
  lengths: jax.Array  # [batch] int32 response lengths
  finished: jax.Array  # [batch] bool: emitted EOS (False = truncated)


@flax.struct.dataclass
class _State:
  step: jax.Array
  cache: dict
  logits: jax.Array  # [B, V] logits for the next token
  key_mask: jax.Array  # [B, S] 1 on slots holding real tokens
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  done: jax.Array
  rng: jax.Array


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Set logits outside the top-k / nucleus to -inf. [B, V] -> [B, V]."""
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # the smallest logit still inside the nucleus; the top token is always kept
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def _pick(logits, rng, config: SamplingConfig):
  """Choose next tokens and their log-probs under the (untruncated) sampling distribution."""
  if config.greedy:
    token = jnp.argmax(logits, axis=-1)
    scaled = logits
  else:
    scaled = logits / config.temperature
    token = jax.random.categorical(rng, filter_logits(scaled, config.top_k, config.top_p), axis=-1)
  logp = jax.nn.log_softmax(scaled, axis=-1)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("config",))
def generate(params, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
             config: SamplingConfig) -> SampleOutput:
  """Sample responses for left-padded prompts.

  Args:
    params: policy parameters (`PolicyModel(config.model)`).
    prompt_ids: [batch, prompt_len] int32, left-padded; every row needs at least one real token.
    prompt_mask: [batch, prompt_len], 1 on real prompt tokens.
    rng: PRNG key.
    config: `SamplingConfig` (static).

  Returns:
    `SampleOutput` with `[batch, max_new_tokens]` tokens, log-probs and mask.
  """
  model = PolicyModel(config.model)
  b, p = prompt_ids.shape
  n = config.max_new_tokens
  if p + n > config.model.max_len:
    raise ValueError(f"prompt_len {p} + max_new_tokens {n} exceeds the model's max_len "
                     f"{config.model.max_len}")
  prompt_mask = prompt_mask.astype(jnp.int32)
  key_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), jnp.int32)], axis=1)
  cache = init_cache(config.model, b, p + n)
  logits, cache = model.apply({"params": params}, prompt_ids.astype(jnp.int32),
                              positions_from_mask(prompt_mask), key_mask, cache, 0)
  prompt_len = jnp.sum(prompt_mask, axis=1)  # [B] position of the first response token

  def cond(s: _State):
    return (s.step < n) & ~jnp.all(s.done)

  def body(s: _State):
    rng, sub = jax.random.split(s.rng)
    token, logp = _pick(s.logits, sub, config)
    live = ~s.done
    token = jnp.where(live, token, config.pad_id)
    tokens = s.tokens.at[:, s.step].set(token)
    logprobs = s.logprobs.at[:, s.step].set(jnp.where(live, logp, 0.0))
    mask = s.mask.at[:, s.step].set(live.astype(jnp.float32))
    key_mask = s.key_mask.at[:, p + s.step].set(live.astype(jnp.int32))
    done = s.done | (token == config.eos_id)
    logits, cache = model.apply({"params": params}, token[:, None], (prompt_len + s.step)[:, None],
                                key_mask, s.cache, p + s.step)
    return _State(step=s.step + 1, cache=cache, logits=logits[:, 0], key_mask=key_mask,
                  tokens=tokens, logprobs=logprobs, mask=mask, done=done, rng=rng)

  state = _State(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1], key_mask=key_mask,
                 tokens=jnp.full((b, n), config.pad_id, jnp.int32),
                 logprobs=jnp.zeros((b, n), jnp.float32), mask=jnp.zeros((b, n), jnp.float32),
                 done=jnp.zeros((b,), bool), rng=rng)
  state = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, mask=state.mask,
                      lengths=jnp.sum(state.mask, axis=1).astype(jnp.int32),
                      finished=jnp.any((state.tokens == config.eos_id) & (state.mask > 0), axis=1))
