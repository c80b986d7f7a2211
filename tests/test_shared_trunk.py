"""The shared-trunk actor-critic: one trunk with LM + value heads, one optimizer, joint PPO loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rl
from rlhfjax.models import PolicyModel, PolicyValueModel, ValueModel, init_params
from rlhfjax.models.sequence import response_logits, response_values
from rlhfjax.parallel import create_mesh
from rlhfjax.train.rl import AlgoConfig, RLModels, make_experience, policy_loss
from rlhfjax.train.rl_shard_map import make_rl_update_shard_map

BASE = dict(algo="ppo", group_size=4, minibatch_size=8, epochs=2, adaptive_kl=True, kl_target=0.1,
            kl_horizon=100.0, shared_trunk=True, vf_coef=0.5)


@pytest.fixture
def models(tiny_cfg):
  return RLModels(policy=PolicyModel(tiny_cfg), actor_critic=PolicyValueModel(tiny_cfg))


def _shared_params(tiny_cfg, seed=0):
  params = init_params(PolicyValueModel(tiny_cfg), jax.random.key(seed))
  # a non-zero value head, so values (and their gradient into the trunk) are not trivially zero
  params["value_head"]["head_kernel"] = jax.random.normal(jax.random.key(7), (tiny_cfg.d_model,)) * 0.1
  return params


def test_policy_value_model_matches_separate_heads(tiny_cfg):
  params = _shared_params(tiny_cfg)
  assert set(params) == {"trunk", "value_head"}
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, tiny_cfg.vocab_size, (3, 12)), jnp.int32)
  mask = jnp.ones_like(tokens).at[0, :4].set(0)
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  logits, values = PolicyValueModel(tiny_cfg).apply({"params": params}, tokens, pos, mask)
  # the sampler / reference apply PolicyModel to the same tree (extra value head ignored)
  ref_logits, _ = PolicyModel(tiny_cfg).apply({"params": params}, tokens, pos, mask)
  vparams = {"trunk": params["trunk"], **params["value_head"]}
  ref_values = ValueModel(tiny_cfg).apply({"params": vparams}, tokens, pos, mask)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  np.testing.assert_allclose(values, ref_values, atol=1e-6)


def test_joint_loss_is_policy_loss_plus_weighted_value_loss(tiny_cfg, models, random_rollout):
  cfg = AlgoConfig(**BASE)
  params = _shared_params(tiny_cfg)
  rollout, scores = random_rollout()
  exp, _ = make_experience(params, params, None, rollout, jnp.asarray(scores), 0.05, algo=cfg,
                           models=models)
  vparams = {"trunk": params["trunk"], **params["value_head"]}
  args = (exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.response_mask)
  # experience values come from the value head on the shared trunk
  np.testing.assert_allclose(exp.old_values,
                             response_values(vparams, ValueModel(tiny_cfg), *args) * exp.response_mask,
                             atol=1e-6)
  # perturb the advantages' reference so the surrogate and value terms are both non-trivial
  exp = exp.replace(old_logprobs=exp.old_logprobs - 0.1 * exp.response_mask,
                    returns=exp.returns + exp.response_mask)
  loss, m = jax.jit(lambda p: policy_loss(p, exp, 0.05, algo=cfg, models=models))(params)
  lp = jnp.take_along_axis(jax.nn.log_softmax(response_logits(params, tiny_cfg, *args)),
                           exp.response_ids[..., None], -1)[..., 0]
  pg, _ = rl.ppo_policy_loss(lp, exp.old_logprobs, exp.advantages, exp.response_mask, clip_eps=0.2)
  values = response_values(vparams, ValueModel(tiny_cfg), *args)
  vl, _ = rl.value_loss(values, exp.old_values, exp.returns, exp.response_mask, clip=0.2)
  np.testing.assert_allclose(loss, pg + 0.5 * vl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["vf_loss"], vl, rtol=1e-5)
  # the trunk receives gradient from the value term: grads differ from the pure policy loss's
  g_joint = jax.grad(lambda p: policy_loss(p, exp, 0.05, algo=cfg, models=models)[0])(params)
  cfg_pg = AlgoConfig(**{**BASE, "vf_coef": 0.0})
  g_pg = jax.grad(lambda p: policy_loss(p, exp, 0.05, algo=cfg_pg, models=models)[0])(params)
  emb = lambda g: g["trunk"]["embedding"]  # noqa: E731
  assert float(jnp.abs(emb(g_joint) - emb(g_pg)).max()) > 1e-6
  assert float(jnp.abs(g_joint["value_head"]["head_kernel"]).max()) > 0.0


@pytest.mark.parametrize("mesh_shape,variant,micro", [((2, 2, 2), "jit", 4), ((8, 1, 1), "shard_map", 0)])
def test_shared_trunk_update_sharded_equals_single_device(mesh_shape, variant, micro, tiny_cfg, models,
                                                          rl_loop):
  cfg = AlgoConfig(**BASE, microbatch_size=micro)
  params = _shared_params(tiny_cfg)
  single, m1 = rl_loop(AlgoConfig(**BASE), create_mesh((1, 1, 1), jax.devices()[:1]), models=models,
                       policy_params=params)
  make = make_rl_update_shard_map if variant == "shard_map" else None
  multi, m8 = rl_loop(cfg, create_mesh(mesh_shape), models=models, policy_params=params,
                      make_update=make)
  assert multi.value is None
  chex.assert_trees_all_close(single.policy.params, multi.policy.params, atol=1e-5)
  keep = lambda ms: [{k: v for k, v in m.items() if "clipfrac" not in k} for m in ms]  # noqa: E731
  chex.assert_trees_all_close(keep(m1), keep(m8), atol=1e-4, rtol=1e-4)
  # one optimizer moved both heads and the trunk
  p0 = _shared_params(tiny_cfg)
  for path in (("value_head", "head_kernel"), ("trunk", "embedding")):
    a, b = p0, single.policy.params
    for k in path:
      a, b = a[k], b[k]
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-5, path
  assert np.isfinite(m1[-1]["vf_loss"]) and np.isfinite(m1[-1]["explained_variance"])


def test_shared_trunk_needs_a_critic():
  with pytest.raises(ValueError, match="shared_trunk needs a critic"):
    AlgoConfig(**{**BASE, "algo": "grpo"})
