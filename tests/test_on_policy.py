"""On-policy log-prob reuse (`AlgoConfig.on_policy`): with one epoch over one minibatch the update's
own forward gives the old log-probs (stop_gradient) and make_experience skips the policy forward.
The update, the KL controller and the metrics equal the path that recomputes them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import PolicyModel, ValueModel, init_params
from rlhfjax.parallel import axes, create_mesh
from rlhfjax.train.rl import AlgoConfig, RLModels, make_experience_fn, make_rl_update
from rlhfjax.train.rl_shard_map import make_rl_update_shard_map

ONE = dict(group_size=4, minibatch_size=16, epochs=1)  # the random rollouts have 16 rows


def _mesh(shape):
  return create_mesh(shape, jax.devices()[:int(np.prod(shape))])


CASES = {
    # GRPO, k3 KL in the loss, adaptive beta: the controller steps on the update's KL
    "grpo_adaptive": (dict(algo="grpo", adaptive_kl=True, kl_coef=0.1, kl_target=0.01, kl_horizon=10.0),
                      (1, 1, 1), make_rl_update),
    # micro-batches on a 2x2x2 mesh, sequence aggregation: per-unit sums recombined exactly
    "grpo_micro_sharded": (dict(algo="grpo", microbatch_size=4, aggregation="sequence"), (2, 2, 2),
                           make_rl_update),
    "grpo_shard_map": (dict(algo="grpo", microbatch_size=8), (8, 1, 1), make_rl_update_shard_map),
    "ppo_no_kl": (dict(algo="ppo", kl_coef=0.0), (1, 1, 1), make_rl_update),  # critic, no reference
    "rloo_fixed_entropy": (dict(algo="rloo", kl_coef=0.0, aggregation="fixed", entropy_coef=0.01),
                           (1, 1, 1), make_rl_update),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_on_policy_update_equals_the_recomputed_one(case, rl_loop):
  kw, shape, make = CASES[case]
  reuse, recompute = AlgoConfig(**ONE, **kw), AlgoConfig(reuse_logprobs=False, **ONE, **kw)
  assert reuse.on_policy(16) and not recompute.on_policy(16)
  # 3 iterations: from the second on the policy differs from the reference (the initial policy)
  a, ma = rl_loop(reuse, _mesh(shape), iters=3, make_update=make)
  b, mb = rl_loop(recompute, _mesh(shape), iters=3, make_update=make)
  chex.assert_trees_all_close(a.policy.params, b.policy.params, atol=1e-5)
  if reuse.separate_critic:
    chex.assert_trees_all_close(a.value.params, b.value.params, atol=1e-5)
  chex.assert_trees_all_close(a.kl, b.kl, atol=1e-5)
  assert [sorted(m) for m in ma] == [sorted(m) for m in mb]
  chex.assert_trees_all_close(ma, mb, atol=1e-5, rtol=1e-5)
  assert ma[-1]["entropy"] > 0.1 and ma[-1]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
  if reuse.uses_reference:
    assert ma[-1]["kl_seq_mean"] > 1e-4  # a real KL, not a zero both paths share
    assert float(a.kl.value) != pytest.approx(0.1)  # the adaptive controller moved beta


def test_when_the_old_log_probs_are_reused():
  grpo = AlgoConfig(**ONE)
  assert grpo.on_policy(16) and not grpo.on_policy(32)  # two minibatches: the second is off-policy
  assert not AlgoConfig(group_size=4, minibatch_size=16, epochs=2).on_policy(16)
  assert not AlgoConfig(algo="ppo", **ONE).on_policy(16)  # KL in the reward needs them first
  assert AlgoConfig(algo="ppo", kl_coef=0.0, **ONE).on_policy(16)
  assert not AlgoConfig(algo="ppo", kl_coef=0.0, shared_trunk=True, **ONE).on_policy(16)  # values
  assert not AlgoConfig(algo="rloo", adaptive_kl=True, **ONE).on_policy(16)


def test_make_experience_skips_the_policy_forward(random_rollout, tiny_cfg):
  """On-policy, make_experience runs the reference forward only: half the FLOPs, zero old log-probs."""
  mesh = _mesh((1, 1, 1))
  rollout, scores = random_rollout()
  models = RLModels(policy=PolicyModel(tiny_cfg), critic=ValueModel(tiny_cfg))
  params = init_params(models.policy, jax.random.key(0))
  ref = init_params(models.policy, jax.random.key(1))
  args = (params, ref, None, rollout, jnp.asarray(scores), jnp.float32(0.1))
  out, flops = {}, {}
  for reuse in (True, False):
    fn = make_experience_fn(AlgoConfig(reuse_logprobs=reuse, **ONE), models, mesh, axes.DEFAULT_RULES)
    out[reuse] = fn(*args)
    cost = fn.lower(*args).compile().cost_analysis()
    flops[reuse] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert flops[True] < 0.6 * flops[False]
  (exp, m), (exp_old, m_old) = out[True], out[False]
  assert not np.asarray(exp.old_logprobs).any() and np.asarray(exp_old.old_logprobs).any()
  assert "kl_seq_mean" not in m and "entropy" not in m and {"kl_seq_mean", "entropy"} <= set(m_old)
  chex.assert_trees_all_close(exp.ref_logprobs, exp_old.ref_logprobs, atol=1e-6)
  chex.assert_trees_all_close(exp.advantages, exp_old.advantages, atol=1e-6)
