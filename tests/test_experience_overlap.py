"""`make_experience` in two parts (`experience_forwards`, then `experience_from_forwards` with the
scores): the same experience as the one jit, also when rows are masked after the forwards; and the
`rl` stage dispatches the forwards before it scores, so they run while the host scores."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import PolicyModel, PolicyValueModel, ValueModel, init_params
from rlhfjax.parallel import axes, create_mesh, shard_batch
from rlhfjax.train.rl import AlgoConfig, RLModels, make_experience_fn, make_experience_fns, pack_rollout

CASES = {
    "ppo": dict(algo="ppo", group_size=1, minibatch_size=8, epochs=2, kl_coef=0.1),
    "ppo_shared_trunk": dict(algo="ppo", group_size=1, minibatch_size=8, shared_trunk=True, kl_coef=0.1),
    "grpo_on_policy_shared_prompt": dict(algo="grpo", group_size=4, minibatch_size=16, share_prompt=True,
                                         kl_coef=0.1),
    "rloo_packed_tis": dict(algo="rloo", group_size=4, minibatch_size=16, pack=True, epochs=2, tis_cap=2.0),
    "ppo_sampler_logprobs": dict(algo="ppo", group_size=1, minibatch_size=8, epochs=2, kl_coef=0.1,
                                 sampler_logprobs=True),
    "grpo_no_forwards": dict(algo="grpo", group_size=4, minibatch_size=16, kl_coef=0.0),  # on-policy, no KL
}


def _setup(kw, tiny_cfg, random_rollout, mesh):
  algo = AlgoConfig(**kw)
  models = RLModels(policy=PolicyModel(tiny_cfg), critic=ValueModel(tiny_cfg) if algo.separate_critic else None,
                    actor_critic=PolicyValueModel(tiny_cfg) if algo.shared_trunk else None)
  policy = init_params(models.actor_critic or models.policy, jax.random.key(0))
  ref = init_params(models.policy, jax.random.key(1))
  value = init_params(models.critic, jax.random.key(2)) if algo.separate_critic else None
  rollout, scores = random_rollout(group=algo.group_size)
  rollout = rollout.replace(logprobs=np.random.default_rng(3).normal(size=rollout.response_ids.shape)
                            .astype(np.float32) * 0.1 - 2.0)
  rollout = pack_rollout(shard_batch(rollout, mesh, axes.DEFAULT_RULES), algo, mesh, axes.DEFAULT_RULES)
  return algo, models, (policy, ref, value), rollout, jnp.asarray(scores)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_parts_equal_the_one_jit(case, tiny_cfg, random_rollout):
  mesh = create_mesh((2, 1, 1), jax.devices()[:2])
  algo, models, params, rollout, scores = _setup(CASES[case], tiny_cfg, random_rollout, mesh)
  kl = jnp.float32(0.1)
  want = make_experience_fn(algo, models, mesh, axes.DEFAULT_RULES)(*params, rollout, scores, kl)
  forwards, finish = make_experience_fns(algo, models, mesh, axes.DEFAULT_RULES)
  got = finish(forwards(*params, rollout), rollout, scores, kl)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  exp = got[0]
  assert np.abs(np.asarray(exp.advantages)).max() > 0.1 and set(got[1]) == set(want[1])
  if algo.uses_reference:
    assert np.asarray(exp.ref_logprobs).min() < -1.0
  if case == "grpo_no_forwards":  # nothing to run before the scores
    assert not jax.tree.leaves(forwards(*params, rollout))


def test_rows_masked_after_the_forwards(tiny_cfg, random_rollout):
  """Rows masked after the forwards (unscored: `rl_loop.nan_reward=mask`) leave the experience as
  if they had been masked before (padded rows; a packed rollout keeps their tokens in its packing)."""
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  algo, models, params, rollout, scores = _setup(CASES["ppo"], tiny_cfg, random_rollout, mesh)
  valid = jnp.asarray(np.arange(16) % 3 != 0, jnp.float32)
  masked = rollout.replace(response_mask=rollout.response_mask * valid[:, None])
  kl = jnp.float32(0.1)
  want = make_experience_fn(algo, models, mesh, axes.DEFAULT_RULES)(*params, masked, scores, kl)
  forwards, finish = make_experience_fns(algo, models, mesh, axes.DEFAULT_RULES)
  got = finish(forwards(*params, rollout), masked, scores, kl)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  assert not np.asarray(got[0].old_logprobs)[::3].any() and np.asarray(got[0].old_logprobs)[1].any()


def test_rl_stage_runs_the_forwards_while_it_scores(tmp_path, monkeypatch):
  """Every iteration dispatches the experience forwards before the scorer runs, and combines them
  with the scores after: the order the overlap needs (its time is measured in benchmarks)."""
  from rlhfjax.train import rl_stage
  from rlhfjax.train.pipeline import train_and_evaluate
  from tests.test_rl_stage import _tiny_rl_config
  events = []
  orig_fns, orig_scorer = rl_stage.make_experience_fns, rl_stage.RLStage.make_scorer

  def fns(*a, **k):
    forwards, finish = orig_fns(*a, **k)
    return (lambda *x: events.append("forwards") or forwards(*x),
            lambda *x: events.append("finish") or finish(*x))

  def make_scorer(self):
    scorer = orig_scorer(self)
    return lambda *x: events.append("score") or scorer(*x)

  monkeypatch.setattr(rl_stage, "make_experience_fns", fns)
  monkeypatch.setattr(rl_stage.RLStage, "make_scorer", make_scorer)
  c = _tiny_rl_config()
  train_and_evaluate(c, str(tmp_path))
  assert events == ["forwards", "score", "finish"] * c.rl_loop.iterations
