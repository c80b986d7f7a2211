"""A model that is not the built-in transformer plugs into the sampler, experience and update.

`TinyLM` is this test's own linen module: a causal running mean of token embeddings and a dense
readout — no attention, no KV cache, plain logits out. The sampler re-runs it over the whole
sequence each step (it has no `init_cache`), and one GRPO step on a verifiable reward ("say 5")
makes the rewarded responses likelier.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.models import init_params
from rlhfjax.models.sequence import response_logprobs
from rlhfjax.parallel import axes, create_mesh, shard_batch
from rlhfjax.sampling import Rollout, SamplingConfig, generate
from rlhfjax.train.rl import (AlgoConfig, RLModels, RLOptimConfig, init_rl_state, make_experience_fn,
                              make_rl_update, rl_state_shardings)

VOCAB, EOS, TARGET = 12, 1, 5


class TinyLM(nn.Module):
  """Causal: position t sees the mean embedding of the real tokens at positions <= t."""

  vocab: int = VOCAB
  width: int = 16

  @nn.compact
  def __call__(self, tokens, positions, mask):
    del positions
    m = mask.astype(jnp.float32)[..., None]
    e = nn.Embed(self.vocab, self.width)(tokens) * m  # [B, T, W]
    mean = jnp.cumsum(e, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
    return nn.Dense(self.vocab)(jnp.tanh(nn.Dense(self.width)(mean)))  # [B, T, V]


def _prompts(n=8, p=4):
  rng = np.random.default_rng(0)
  ids = rng.integers(2, VOCAB, (n, p)).astype(np.int32)
  mask = np.ones((n, p), np.int32)
  mask[::2, 0] = 0  # left padding on half the rows
  return ids * mask, mask


def test_sampler_runs_a_cacheless_module_and_matches_its_forward():
  model = TinyLM()
  params = init_params(model, jax.random.key(0))
  ids, mask = _prompts()
  out = generate(params, ids, mask, jax.random.key(1),
                 SamplingConfig(model=model, max_new_tokens=6, eos_id=EOS, temperature=1.0))
  assert out.tokens.shape == (8, 6)
  # the sampler's log-probs are the module's own, recomputed over the whole sequence
  full = response_logprobs(params, model, ids, mask, out.tokens, out.mask)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(full), atol=1e-5)


def test_one_grpo_step_on_a_custom_module_makes_rewarded_responses_likelier():
  model = TinyLM()
  models = RLModels(policy=model)
  algo = AlgoConfig(algo="grpo", group_size=4, minibatch_size=16, kl_coef=0.0)
  mesh, rules = create_mesh((2, 1, 1), jax.devices()[:2]), axes.DEFAULT_RULES
  ptx, vtx = RLOptimConfig(learning_rate=3e-2, warmup_steps=0).optimizers(1)
  params = init_params(model, jax.random.key(0))
  state = init_rl_state(models, algo, ptx, vtx, mesh, rules, jax.random.key(1), params)
  _, shardings = rl_state_shardings(models, algo, ptx, vtx, mesh, rules)

  ids, mask = _prompts(4)
  ids, mask = np.repeat(ids, 4, 0), np.repeat(mask, 4, 0)  # 4 prompts x a group of 4
  ids, mask = shard_batch((ids, mask), mesh, rules)
  out = generate(state.policy.params, ids, mask, jax.random.key(2),
                 SamplingConfig(model=model, max_new_tokens=6, eos_id=EOS))
  rollout = Rollout.from_sample(ids, mask, out)
  said = (np.asarray(out.tokens) == TARGET) * np.asarray(out.mask)
  scores = said.sum(1) / np.maximum(np.asarray(out.mask).sum(1), 1)  # share of "5"s: a verifier
  assert scores.std() > 0

  exp, _ = make_experience_fn(algo, models, mesh, rules)(state.policy.params, params, None, rollout,
                                                         jnp.asarray(scores, jnp.float32),
                                                         state.kl.value)
  state, metrics = make_rl_update(algo, models, ptx, vtx, shardings, mesh, rules)(
      state, exp, jax.random.key(3))
  assert np.isfinite(float(metrics["policy_loss"])) and float(metrics["policy_grad_norm"]) > 0

  # log-likelihood of each sampled response before and after the step: the surrogate (advantage-
  # weighted log-likelihood) rose, and responses with a positive advantage gained on the others
  args = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
  before = np.asarray(response_logprobs(params, model, *args)).sum(1)
  after = np.asarray(response_logprobs(jax.device_get(state.policy.params), model, *args)).sum(1)
  lengths = np.asarray(rollout.response_mask).sum(1)
  adv = np.asarray(exp.advantages).sum(1) / lengths  # GRPO: one advantage per response
  assert np.sum(adv * (after - before)) > 0
  assert (after - before)[adv > 0].mean() > (after - before)[adv < 0].mean()
