"""The shared RL update: sharded == single device, micro-batching exact, algorithms' advantages."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rl
from rlhfjax.models import PolicyModel, ValueModel, init_params
from rlhfjax.parallel import axes, create_mesh
from rlhfjax.train.rl import AlgoConfig, RLModels, make_experience_fn

RULES = axes.DEFAULT_RULES
BASE = dict(group_size=4, minibatch_size=8, epochs=2)


@pytest.mark.parametrize("algo", ["ppo"])  # policy + critic + adaptive KL; grpo shares the update
def test_sharded_update_equals_single_device(algo, rl_loop, tiny_cfg):
  cfg = AlgoConfig(algo=algo, adaptive_kl=algo == "ppo", kl_target=0.1, kl_horizon=100.0, **BASE)
  single, m1 = rl_loop(cfg, create_mesh((1, 1, 1), jax.devices()[:1]))
  sharded, m8 = rl_loop(cfg, create_mesh((2, 2, 2)))
  chex.assert_trees_all_close(single.policy.params, sharded.policy.params, atol=1e-5)
  # continuous metrics agree tightly; clip fractions count tokens at a threshold, so a token sitting
  # within float noise of the clip boundary may flip
  cont = lambda ms: [{k: v for k, v in m.items() if "clipfrac" not in k} for m in ms]  # noqa: E731
  frac = lambda ms: [{k: v for k, v in m.items() if "clipfrac" in k} for m in ms]  # noqa: E731
  chex.assert_trees_all_close(cont(m1), cont(m8), atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(frac(m1), frac(m8), atol=0.02)
  if algo == "ppo":
    chex.assert_trees_all_close(single.value.params, sharded.value.params, atol=1e-5)
    assert float(single.kl.value) != pytest.approx(0.05)  # adaptive controller moved beta
  # the update really changed the policy
  p0 = init_params(PolicyModel(tiny_cfg), jax.random.key(0))
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0, single.policy.params)
  assert max(jax.tree.leaves(diff)) > 1e-4


@pytest.mark.parametrize("aggregation", ["sequence"])
def test_grpo_sharded_and_microbatched_equals_single_device(aggregation, rl_loop):
  # GRPO with the k3 KL in the loss and per-sequence aggregation: on a 2x2x2 mesh with micro-batches
  # weighted by their share of sequences, the update reproduces the single-device whole-minibatch one
  kw = dict(algo="grpo", aggregation=aggregation, **BASE)
  whole, mw = rl_loop(AlgoConfig(**kw), create_mesh((1, 1, 1), jax.devices()[:1]), iters=1)
  micro, mm = rl_loop(AlgoConfig(microbatch_size=2, **kw), create_mesh((2, 2, 2)), iters=1)
  chex.assert_trees_all_close(whole.policy.params, micro.policy.params, atol=1e-5)
  np.testing.assert_allclose(mw[0]["kl_loss"], mm[0]["kl_loss"], atol=1e-6)


def test_experience_advantages_per_algorithm(random_rollout, tiny_cfg):
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  rollout, scores = random_rollout()
  models = RLModels(policy=PolicyModel(tiny_cfg))
  params = init_params(models.policy, jax.random.key(0))
  mask = rollout.response_mask
  for algo, expect in [
      ("grpo", np.asarray(rl.group_advantages(jnp.asarray(scores), 4))),
      ("rloo", None),
      ("best_of_n", np.asarray(rl.best_of_n_select(jnp.asarray(scores), 4, 1))),
  ]:
    cfg = AlgoConfig(algo=algo, kl_mode="none", whiten_advantages=False, **BASE)
    exp, _ = make_experience_fn(cfg, models, mesh, RULES)(params, params, None, rollout,
                                                          jnp.asarray(scores), jnp.float32(0.1))
    adv = np.asarray(exp.advantages)
    if algo == "rloo":
      g = scores.reshape(4, 4)
      expect = (g - (g.sum(1, keepdims=True) - g) / 3).reshape(-1)
    np.testing.assert_allclose(adv, expect[:, None] * mask, atol=1e-5)
    # the policy equals the reference: log-probs recomputed identically
    np.testing.assert_allclose(exp.old_logprobs, exp.ref_logprobs, atol=1e-6)


def test_ppo_rewards_put_score_on_last_token_and_kl_everywhere(random_rollout, tiny_cfg):
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  rollout, scores = random_rollout()
  models = RLModels(policy=PolicyModel(tiny_cfg), critic=ValueModel(tiny_cfg))
  pol = init_params(models.policy, jax.random.key(0))
  ref = init_params(models.policy, jax.random.key(5))
  val = init_params(models.critic, jax.random.key(6))
  cfg = AlgoConfig(algo="ppo", whiten_advantages=False, gamma=1.0, lam=1.0, **BASE)
  exp, m = make_experience_fn(cfg, models, mesh, RULES)(pol, ref, val, rollout, jnp.asarray(scores),
                                                        jnp.float32(0.1))
  mask = rollout.response_mask
  kl = (np.asarray(exp.old_logprobs) - np.asarray(exp.ref_logprobs)) * mask
  # with gamma = lam = 1 and a zero-initialized value head: return_t = score - beta * sum_{s>=t} kl_s
  ret = scores[:, None] * mask - 0.1 * np.cumsum(kl[:, ::-1], 1)[:, ::-1] * mask
  np.testing.assert_allclose(np.asarray(exp.returns), ret, atol=1e-4)
  np.testing.assert_allclose(float(m["kl_seq_mean"]), kl.sum(1).mean(), atol=1e-4)


def test_rollout_batch_must_split_into_minibatches(rl_loop):
  with pytest.raises(ValueError, match="not a multiple of rl.minibatch_size=5"):
    rl_loop(AlgoConfig(algo="grpo", group_size=4, minibatch_size=5), create_mesh((1, 1, 1),
                                                                                jax.devices()[:1]))


def test_trimmed_width_experience_equals_the_full_width(random_rollout, tiny_cfg):
  """Responses of at most 10 tokens in a 24-token budget: `trim_rollout` cuts to 16 columns and
  PPO's experience (policy, reference, critic, GAE, KL in the reward) is the full width's there."""
  from rlhfjax.train.rl import trim_rollout
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  rollout, scores = random_rollout(n=10)
  pad = lambda x: np.pad(x, ((0, 0), (0, 14)))  # noqa: E731
  full = rollout.replace(response_ids=pad(rollout.response_ids), response_mask=pad(rollout.response_mask))
  algo = AlgoConfig(algo="ppo", **BASE)
  trimmed = trim_rollout(full, algo)
  assert trimmed.response_ids.shape == (16, 16)
  assert trim_rollout(full, AlgoConfig(aggregation="fixed")) is full
  models = RLModels(policy=PolicyModel(tiny_cfg), critic=ValueModel(tiny_cfg))
  params, ref = (init_params(models.policy, jax.random.key(k)) for k in (0, 1))
  vparams = init_params(models.critic, jax.random.key(2))
  fn = make_experience_fn(algo, models, mesh, RULES)
  (wide, wide_m), (narrow, narrow_m) = (fn(params, ref, vparams, r, jnp.asarray(scores), jnp.float32(0.1))
                                        for r in (full, trimmed))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[:, :16], wide), narrow, atol=1e-5)
  chex.assert_trees_all_close(wide_m, narrow_m, atol=1e-5)
  assert not np.asarray(wide.advantages[:, 16:]).any() and not np.asarray(wide.old_logprobs[:, 16:]).any()
