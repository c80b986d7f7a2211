"""`generate` against transformers' sampling semantics, on tiny hand-made policy modules.

`ConstLM` emits the same logits (a parameter) at every position: each sampled column is a batch of
independent draws from temperature -> top-k -> top-p (transformers' warper order). `SuccLM` makes
token t + 1 (mod vocab) near-certain after token t, with or without a KV cache, so where a row
emits EOS is known in advance.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from rlhfjax.models.sequence import response_logprobs
from rlhfjax.sampling import SamplingConfig, generate

V = 8
BIAS = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02], np.float32))


class ConstLM(nn.Module):
  dtype: str = "float32"

  @nn.compact
  def __call__(self, tokens, positions, mask):
    bias = self.param("bias", nn.initializers.zeros, (V,))
    return jnp.broadcast_to(bias, tokens.shape + (V,)).astype(self.dtype)


class SuccLM(nn.Module):
  """Logits 40 on (token + 1) % V, 0 elsewhere; no KV cache (the sampler re-runs the sequence)."""

  @nn.compact
  def __call__(self, tokens, positions, mask):
    return 40.0 * jax.nn.one_hot((tokens + 1) % V, V) + self.param("w", nn.initializers.zeros, ())


class CachedSuccLM(nn.Module):
  """`SuccLM` behind the KV-cache interface (a dummy cache): the sampler's cached decode path."""

  @nn.compact
  def __call__(self, tokens, positions, mask, cache=None, cache_index=0):
    return 40.0 * jax.nn.one_hot((tokens + 1) % V, V) + self.param("w", nn.initializers.zeros, ()), cache

  def init_cache(self, batch, length):
    return jnp.zeros((batch, length), jnp.float32)


def _hf_probs(logits, temperature, top_k, top_p):
  """The distribution transformers samples from: its warpers in its order, then softmax."""
  scores = torch.tensor(np.asarray(logits, np.float32))[None]
  scores = TemperatureLogitsWarper(float(temperature))(None, scores)
  if top_k:
    scores = TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1.0:
    scores = TopPLogitsWarper(top_p)(None, scores)
  return torch.softmax(scores, -1)[0].numpy().astype(np.float64)


def _draws(model, bias, rows, cfg_kw, seed=0):
  """`rows` x 2 draws from `ConstLM`, with the sampler's output."""
  ids = jnp.ones((rows, 1), jnp.int32)
  cfg = SamplingConfig(model=model, max_new_tokens=2, eos_id=-1, **cfg_kw)
  out = generate({"bias": jnp.asarray(bias)}, ids, jnp.ones_like(ids), jax.random.key(seed), cfg)
  return out, np.asarray(out.tokens).ravel()


def _assert_follows(tokens, probs):
  """No draw outside the support, and a chi-square within its 1e-4 tail on the support."""
  counts = np.bincount(tokens, minlength=V)
  assert (counts[probs == 0] == 0).all(), (counts, probs)
  support = probs > 0
  if support.sum() == 1:
    return
  expected = probs[support] * tokens.size
  chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
  assert chi2 < stats.chi2.ppf(1 - 1e-4, support.sum() - 1), (chi2, counts, expected)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.5, 0, 0.8),
                                                     (0.5, 0, 0.8), (2.0, 5, 0.9), (1.0, 1, 1.0)])
def test_draws_follow_transformers_distribution_and_logprobs_are_untruncated(temperature, top_k, top_p):
  """20k draws per config (fixed key) follow transformers' warped distribution; temperature comes
  first (at 0.5 the top-p=0.8 nucleus is 3 tokens, at 1.5 it is 5). The log-probs are what the
  module docstring promises: log_softmax(logits / temperature), before truncation."""
  out, tokens = _draws(ConstLM(), BIAS, 10_000, dict(temperature=temperature, top_k=top_k, top_p=top_p))
  _assert_follows(tokens, _hf_probs(BIAS, temperature, top_k, top_p))
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(BIAS) / temperature))
  np.testing.assert_allclose(np.asarray(out.logprobs), logp[np.asarray(out.tokens)], atol=1e-5)
  assert (np.asarray(out.mask) == 1).all() and not np.asarray(out.finished).any()


def test_bfloat16_logits_are_sampled_and_scored_in_float32():
  """A module with bfloat16 logits: 100k draws follow the softmax of those logits (the old sampler's
  bfloat16 Gumbel noise starved the 2% token: chi-square 137 here), and the log-probs equal the
  float32 ones the trainer recomputes (`response_logprobs`), not a bfloat16 log-softmax (~1e-2 off)."""
  model = ConstLM(dtype="bfloat16")
  bias32 = np.asarray(jnp.asarray(BIAS, jnp.bfloat16).astype(jnp.float32))
  out, tokens = _draws(model, BIAS, 50_000, dict(temperature=0.9), seed=1)
  _assert_follows(tokens, _hf_probs(bias32, 0.9, 0, 1.0))
  ids = jnp.ones((50_000, 1), jnp.int32)
  full = response_logprobs({"bias": jnp.asarray(BIAS)}, model, ids, jnp.ones_like(ids), out.tokens,
                           out.mask, 0.9)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(full), atol=1e-5)


def test_greedy_takes_the_first_argmax_and_scores_at_temperature_one():
  bias = np.array([0.0, 2.0, 1.0, 2.0, -1.0, 0.0, 0.0, 0.0], np.float32)  # a tie: index 1 (as torch)
  out, tokens = _draws(ConstLM(), bias, 4, dict(greedy=True, temperature=0.3, top_k=2, top_p=0.1))
  assert (tokens == int(torch.tensor(bias).argmax())).all() and (tokens == 1).all()
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(jax.nn.log_softmax(bias))[1], atol=1e-6)


@pytest.mark.parametrize("model", [SuccLM(), CachedSuccLM()], ids=["no_cache", "cache"])
@pytest.mark.parametrize("greedy", [True, False])
def test_eos_pads_and_masks_the_rest_of_each_row(model, greedy):
  """EOS = 5, pad = 7, 6 new tokens. Prompts ending in 4 emit EOS first (length 1), in 2 emit
  3, 4, 5 (length 3), in 6 emit 7, 0, 1, 2, 3, 4 and hit the budget unfinished; after EOS a row is
  pad with mask 0 and log-prob 0. With EOS disabled (-1) every row runs the whole budget."""
  ids = jnp.asarray([[0, 1, 4], [1, 1, 2], [2, 3, 6], [0, 0, 4]], jnp.int32)
  mask = jnp.asarray([[0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1]], jnp.int32)
  cfg = SamplingConfig(model=model, max_new_tokens=6, eos_id=5, pad_id=7, greedy=greedy)
  out = generate({"w": jnp.zeros(())}, ids, mask, jax.random.key(0), cfg)
  np.testing.assert_array_equal(out.tokens, [[5, 7, 7, 7, 7, 7], [3, 4, 5, 7, 7, 7],
                                             [7, 0, 1, 2, 3, 4], [5, 7, 7, 7, 7, 7]])
  np.testing.assert_array_equal(out.lengths, [1, 3, 6, 1])
  np.testing.assert_array_equal(out.finished, [True, True, False, True])
  want_mask = np.arange(6)[None] < np.array([1, 3, 6, 1])[:, None]
  np.testing.assert_array_equal(out.mask, want_mask.astype(np.float32))
  logp = np.asarray(out.logprobs)
  assert (logp[~want_mask] == 0).all()
  np.testing.assert_allclose(logp[want_mask], np.log(np.exp(40.0) / (np.exp(40.0) + V - 1)), atol=1e-6)

  off = generate({"w": jnp.zeros(())}, ids, mask, jax.random.key(0),
                 SamplingConfig(model=model, max_new_tokens=6, eos_id=-1, pad_id=7, greedy=greedy))
  np.testing.assert_array_equal(off.tokens[1], [3, 4, 5, 6, 7, 0])
  assert (np.asarray(off.mask) == 1).all() and (np.asarray(off.lengths) == 6).all()
  assert not np.asarray(off.finished).any()


def test_pad_equal_to_eos_still_reports_lengths_and_finished():
  """Many HF tokenizers pad with EOS: lengths and `finished` come from the mask, not the tokens."""
  ids = jnp.asarray([[1, 4], [1, 2], [2, 6]], jnp.int32)
  cfg = SamplingConfig(model=SuccLM(), max_new_tokens=4, eos_id=5, pad_id=5, greedy=True)
  out = generate({"w": jnp.zeros(())}, ids, jnp.ones_like(ids), jax.random.key(0), cfg)
  np.testing.assert_array_equal(out.tokens, [[5, 5, 5, 5], [3, 4, 5, 5], [7, 0, 1, 2]])
  np.testing.assert_array_equal(out.lengths, [1, 3, 4])
  np.testing.assert_array_equal(out.finished, [True, True, False])
