"""The shard_map data-parallel RL update == the jit (GSPMD) update == one device (8 CPU devices)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import PolicyModel, ValueModel, init_params
from rlhfjax.parallel import create_mesh, replicated, shard_batch
from rlhfjax.train.rl import (RLConfig, RLState, make_experience_fn, make_rl_update,
                              minibatch_grads)
from rlhfjax.train.rl_shard_map import make_rl_update_shard_map, shard_map_grad_fn
from rlhfjax.train.state import create_train_state, make_optimizer
from tests.test_rl_update import BASE, CFG, RULES, _rollout


def _state(cfg, mesh):
  ptx = make_optimizer(cfg.optim(), 10)
  vtx = make_optimizer(cfg.optim(value=True), 10)
  sft = init_params(PolicyModel(CFG), jax.random.key(0))
  policy, p_sh = create_train_state(PolicyModel(CFG), ptx, jax.random.key(1), mesh, RULES, params=sft)
  value, v_sh = (None, None)
  if cfg.has_critic:
    value, v_sh = create_train_state(ValueModel(CFG), vtx, jax.random.key(2), mesh, RULES)
  rep = replicated(mesh)
  kl = cfg.kl_controller().init()
  # committed to the mesh like the update's outputs, so iteration 2 reuses iteration 1's executable
  state = RLState(policy=policy, value=value, kl=jax.device_put(kl, rep),
                  iteration=jax.device_put(jnp.zeros((), jnp.int32), rep))
  shardings = RLState(policy=p_sh, value=v_sh, kl=jax.tree.map(lambda _: rep, kl), iteration=rep)
  return state, shardings, jax.device_put(sft, p_sh.params), ptx, vtx


def _run(cfg, mesh, make_update, iters=2):
  state, shardings, ref, ptx, vtx = _state(cfg, mesh)
  exp_fn = make_experience_fn(cfg, CFG, mesh, RULES)
  upd = make_update(cfg, CFG, ptx, vtx, shardings, mesh, RULES)
  metrics = []
  for i in range(iters):
    rollout, scores = _rollout(seed=i)
    rollout = shard_batch(rollout, mesh, RULES)
    vparams = state.value.params if cfg.has_critic else None
    exp, em = exp_fn(state.policy.params, ref, vparams, rollout, jnp.asarray(scores), state.kl.value)
    state, um = upd(state, exp, jax.random.key(10 + i))
    metrics.append({**em, **um})
  return jax.device_get(state), jax.device_get(metrics)


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


def test_shard_map_grads_equal_whole_minibatch_grads():
  # one minibatch with ragged masks (devices hold different token counts): the unit-weighted psum
  # is the whole-minibatch gradient, not a mean of per-device gradients
  cfg = RLConfig(**PPO, **BASE)
  one = create_mesh((1, 1, 1), jax.devices()[:1])
  mesh = create_mesh((8, 1, 1))
  state, _, ref, _, _ = _state(cfg, one)
  rollout, scores = _rollout(seed=3)
  exp, _ = make_experience_fn(cfg, CFG, one, RULES)(state.policy.params, ref, state.value.params,
                                                    rollout, jnp.asarray(scores), state.kl.value)
  mb = jax.tree.map(lambda x: x[:8], exp)
  assert len(set(np.asarray(mb.response_mask).sum(1).tolist())) > 1
  g1 = jax.jit(lambda s, m: minibatch_grads(s, m, cfg=cfg, model_cfg=CFG))(state, mb)
  s8 = jax.device_put(state, replicated(mesh))
  m8 = shard_batch(mb, mesh, RULES)
  g8 = jax.jit(shard_map_grad_fn(cfg, CFG, mesh))(s8, m8)
  chex.assert_trees_all_close(jax.device_get(g1[:2]), jax.device_get(g8[:2]), atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(g1[2]), jax.device_get(g8[2]), atol=1e-5, rtol=1e-5)


def test_shard_map_update_equals_jit_and_single_device():
  cfg = RLConfig(**PPO, **BASE)
  single = _run(cfg, create_mesh((1, 1, 1), jax.devices()[:1]), make_rl_update)
  jitted = _run(cfg, create_mesh((8, 1, 1)), make_rl_update)
  smap = _run(cfg, create_mesh((8, 1, 1)), make_rl_update_shard_map)
  _close(single, smap)
  _close(jitted, smap)
  assert float(smap[0].kl.value) != pytest.approx(0.05)  # the adaptive controller moved beta


def test_shard_map_microbatches_sequence_aggregation():
  # GRPO, k3 KL in the loss, per-sequence aggregation, 2 micro-steps per device
  cfg = RLConfig(algo="grpo", aggregation="sequence", microbatch_size=4, **BASE)
  single = _run(RLConfig(algo="grpo", aggregation="sequence", **BASE),
                create_mesh((1, 1, 1), jax.devices()[:1]), make_rl_update, iters=1)
  smap = _run(cfg, create_mesh((2, 1, 1), jax.devices()[:2]), make_rl_update_shard_map, iters=1)
  chex.assert_trees_all_close(single[0].policy.params, smap[0].policy.params, atol=1e-5)
  np.testing.assert_allclose(single[1][0]["kl_loss"], smap[1][0]["kl_loss"], atol=1e-6)
