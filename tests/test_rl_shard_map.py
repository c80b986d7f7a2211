"""The shard_map data-parallel RL update == the jit (GSPMD) update == one device (8 CPU devices)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import PolicyModel, ValueModel, init_params
from rlhfjax.parallel import axes, create_mesh, replicated, shard_batch
from rlhfjax.train.rl import (AlgoConfig, RLModels, RLOptimConfig, init_rl_state, make_experience_fn,
                              make_rl_update, minibatch_grads)
from rlhfjax.train.rl_shard_map import make_rl_update_shard_map, shard_map_grad_fn

RULES = axes.DEFAULT_RULES
BASE = dict(group_size=4, minibatch_size=8, epochs=2)


def _close(a, b):
  chex.assert_trees_all_close(a[0].policy.params, b[0].policy.params, atol=1e-5)
  if a[0].value is not None:
    chex.assert_trees_all_close(a[0].value.params, b[0].value.params, atol=1e-5)
  chex.assert_trees_all_close(a[0].kl.value, b[0].kl.value, atol=1e-6)
  cont = lambda ms: [{k: v for k, v in m.items() if "clipfrac" not in k} for m in ms]  # noqa: E731
  frac = lambda ms: [{k: v for k, v in m.items() if "clipfrac" in k} for m in ms]  # noqa: E731
  chex.assert_trees_all_close(cont(a[1]), cont(b[1]), atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(frac(a[1]), frac(b[1]), atol=0.02)


PPO = dict(algo="ppo", adaptive_kl=True, kl_target=0.1, kl_horizon=100.0)


def test_shard_map_grads_equal_whole_minibatch_grads(tiny_cfg, random_rollout):
  # one minibatch with ragged masks (devices hold different token counts): the unit-weighted psum
  # is the whole-minibatch gradient, not a mean of per-device gradients
  cfg = AlgoConfig(**PPO, **BASE)
  models = RLModels(policy=PolicyModel(tiny_cfg), critic=ValueModel(tiny_cfg))
  one = create_mesh((1, 1, 1), jax.devices()[:1])
  mesh = create_mesh((8, 1, 1))
  ptx, vtx = RLOptimConfig(learning_rate=1e-3, warmup_steps=0).optimizers(10)
  sft = init_params(models.policy, jax.random.key(0))
  state = init_rl_state(models, cfg, ptx, vtx, one, RULES, jax.random.key(1), sft)
  rollout, scores = random_rollout(seed=3)
  exp, _ = make_experience_fn(cfg, models, one, RULES)(state.policy.params, sft, state.value.params,
                                                       rollout, jnp.asarray(scores), state.kl.value)
  mb = jax.tree.map(lambda x: x[:8], exp)
  assert len(set(np.asarray(mb.response_mask).sum(1).tolist())) > 1
  g1 = jax.jit(lambda s, m: minibatch_grads(s, m, algo=cfg, models=models))(state, mb)
  s8 = jax.device_put(state, replicated(mesh))
  m8 = shard_batch(mb, mesh, RULES)
  g8 = jax.jit(shard_map_grad_fn(cfg, models, mesh))(s8, m8)
  chex.assert_trees_all_close(jax.device_get(g1[:2]), jax.device_get(g8[:2]), atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(g1[2]), jax.device_get(g8[2]), atol=1e-5, rtol=1e-5)


def test_shard_map_update_equals_jit_and_single_device(rl_loop):
  cfg = AlgoConfig(**PPO, **BASE)
  single = rl_loop(cfg, create_mesh((1, 1, 1), jax.devices()[:1]), make_update=make_rl_update)
  jitted = rl_loop(cfg, create_mesh((8, 1, 1)), make_update=make_rl_update)
  smap = rl_loop(cfg, create_mesh((8, 1, 1)), make_update=make_rl_update_shard_map)
  _close(single, smap)
  _close(jitted, smap)
  assert float(smap[0].kl.value) != pytest.approx(0.05)  # the adaptive controller moved beta


def test_shard_map_microbatches_sequence_aggregation(rl_loop):
  # GRPO, k3 KL in the loss, per-sequence aggregation, 2 micro-steps per device
  cfg = AlgoConfig(algo="grpo", aggregation="sequence", microbatch_size=4, **BASE)
  single = rl_loop(AlgoConfig(algo="grpo", aggregation="sequence", **BASE),
                   create_mesh((1, 1, 1), jax.devices()[:1]), iters=1)
  smap = rl_loop(cfg, create_mesh((2, 1, 1), jax.devices()[:2]), iters=1,
                 make_update=make_rl_update_shard_map)
  chex.assert_trees_all_close(single[0].policy.params, smap[0].policy.params, atol=1e-5)
  np.testing.assert_allclose(single[1][0]["kl_loss"], smap[1][0]["kl_loss"], atol=1e-6)
