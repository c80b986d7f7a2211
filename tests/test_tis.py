"""Sampler/trainer mismatch: truncated importance sampling (`rl.tis_cap`) against a NumPy
reference, in the update, and a bfloat16 sampler (`rl_sampling.dtype`) for a float32 policy; the
old log-probs taken from the sampler (`rl.sampler_logprobs`) against recomputed ones."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rl
from rlhfjax.models import PolicyModel, TransformerConfig, init_params
from rlhfjax.models.sequence import response_logprobs
from rlhfjax.parallel import create_mesh
from rlhfjax.parallel import axes
from rlhfjax.sampling import Rollout, SamplingConfig, generate
from rlhfjax.train.rl import AlgoConfig, RLModels, make_experience_fn
from rlhfjax.train.rl_stage import sampler_model
from tests.conftest import _random_rollout


def test_truncated_is_weights_match_numpy():
  trainer = np.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]], np.float32)
  sampler = np.array([[-1.5, -3.0, -0.5], [-3.2, -2.0, -1.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  want = np.minimum(np.exp(trainer - sampler), 2.0) * mask + (1 - mask)  # 1 on padding
  for f in (rl.truncated_is_weights, jax.jit(rl.truncated_is_weights, static_argnums=3)):
    np.testing.assert_allclose(f(trainer, sampler, mask, 2.0), want, rtol=1e-6)
  np.testing.assert_allclose(want[0], [np.exp(0.5), 2.0, 1.0], rtol=1e-6)  # the cap bites at e^1
  with pytest.raises(ValueError, match="cap must be > 0"):
    rl.truncated_is_weights(trainer, sampler, mask, 0.0)


def test_weighted_policy_loss_matches_numpy():
  rng = np.random.default_rng(0)
  lp, old = rng.normal(size=(2, 4, 5)).astype(np.float32) * 0.1 - 1.0
  adv = rng.normal(size=(4, 5)).astype(np.float32)
  mask = (rng.random((4, 5)) > 0.3).astype(np.float32)
  w = rng.uniform(0.5, 2.0, (4, 5)).astype(np.float32)
  r = np.exp(lp - old)
  per = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2)) * w
  want = (per * mask).sum() / mask.sum()
  loss, _ = rl.ppo_policy_loss(jnp.asarray(lp), old, adv, mask, clip_eps=0.2, is_weights=w)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # the weights scale each token's gradient and carry none themselves
  g = jax.grad(lambda x: rl.ppo_policy_loss(x, old, adv, mask, clip_eps=0.2, is_weights=w)[0])(jnp.asarray(lp))
  g1 = jax.grad(lambda x: rl.ppo_policy_loss(x, old, adv, mask, clip_eps=0.2)[0])(jnp.asarray(lp))
  np.testing.assert_allclose(g, g1 * w, rtol=1e-5, atol=1e-7)


def _with_sampler_logprobs(shift, cfg, **kw):
  """`_random_rollout` with sampler log-probs = the start policy's own (`rl_loop`: key 0) + `shift`."""
  rollout, scores = _random_rollout(**kw)
  params = init_params(PolicyModel(cfg), jax.random.key(0))
  lp = response_logprobs(params, cfg, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                         rollout.response_mask)
  return rollout.replace(logprobs=np.asarray(lp + shift * rollout.response_mask)), scores


@pytest.mark.parametrize("epochs", [1, 2])
def test_tis_in_the_update(epochs, rl_loop, tiny_cfg):
  """Sampler log-probs equal to the trainer's: weights 1, the same update as without TIS (on-policy
  and with recomputed old log-probs). Sampler log-probs lower by 0.3 nats: weights e^0.3 = 1.35 on
  every token, so the GRPO update is that of a 1.35x larger advantage."""
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  base = dict(algo="grpo", group_size=4, minibatch_size=16, epochs=epochs, kl_coef=0.0)
  same = functools.partial(_with_sampler_logprobs, 0.0, tiny_cfg)
  plain, mp = rl_loop(AlgoConfig(**base), mesh, iters=1, rollout_fn=same)
  tis, mt = rl_loop(AlgoConfig(tis_cap=2.0, **base), mesh, iters=1, rollout_fn=same)
  chex.assert_trees_all_close(plain.policy.params, tis.policy.params, atol=1e-5)
  np.testing.assert_allclose(mt[0]["tis_weight_mean"], 1.0, atol=1e-5)
  assert mt[0]["tis_capped_frac"] == 0.0

  low = functools.partial(_with_sampler_logprobs, -0.3, tiny_cfg)
  _, ml = rl_loop(AlgoConfig(tis_cap=2.0, **base), mesh, iters=1, rollout_fn=low)
  np.testing.assert_allclose(ml[0]["tis_weight_mean"], np.exp(0.3), rtol=1e-4)
  _, mc = rl_loop(AlgoConfig(tis_cap=1.2, **base), mesh, iters=1, rollout_fn=low)
  np.testing.assert_allclose(mc[0]["tis_weight_mean"], 1.2, rtol=1e-5)
  assert mc[0]["tis_capped_frac"] == 1.0
  if epochs == 1:  # on-policy, ratio 1: the loss is the weighted mean of -A
    np.testing.assert_allclose(ml[0]["pg_loss"], np.exp(0.3) * mp[0]["pg_loss"], rtol=1e-3, atol=1e-6)


def test_tis_needs_sampler_logprobs(rl_loop):
  with pytest.raises(ValueError, match="sampler's log-probs"):
    rl_loop(AlgoConfig(group_size=4, minibatch_size=16, tis_cap=2.0), create_mesh((1, 1, 1), jax.devices()[:1]))
  with pytest.raises(ValueError, match="tis_cap"):
    AlgoConfig(tis_cap=-1.0)


def test_bfloat16_sampler_for_a_float32_policy():
  """`rl_sampling.dtype='bfloat16'`: the same float32 parameters decode in bfloat16 with a bfloat16
  KV cache; the log-probs stay within bfloat16 rounding of the float32 trainer's, and differ."""
  cfg = TransformerConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                          d_ff=64, max_len=32)
  policy = PolicyModel(cfg)
  params = init_params(policy, jax.random.key(0))
  bf16 = sampler_model(policy, "bfloat16")
  assert bf16.cfg.dtype == "bfloat16" and policy.cfg.dtype == "float32" and sampler_model(policy, "") is policy
  assert bf16.init_cache(2, 8)["k"][0].dtype == jnp.bfloat16
  ids = jnp.asarray([[0, 5, 6, 7], [4, 9, 10, 11]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32)
  out = generate(params, ids, mask, jax.random.key(1), SamplingConfig(model=bf16, max_new_tokens=10, eos_id=-1))
  trainer = response_logprobs(params, cfg, ids, mask, out.tokens, out.mask)
  diff = np.abs(np.asarray(out.logprobs - trainer))
  assert 0 < diff.max() < 0.1
  with pytest.raises(ValueError, match="built-in policy"):
    sampler_model(object(), "bfloat16")
  with pytest.raises(ValueError, match="rl_sampling.dtype"):
    sampler_model(policy, "float16")


def test_rl_stage_bfloat16_sampler_with_tis(tmp_path):
  """The `rl` stage sampling in bfloat16 from a float32 policy with TIS on: the weights are logged,
  finite and not all 1 (the two precisions disagree), and the run finishes."""
  import json

  from rlhfjax.train.pipeline import train_and_evaluate
  from tests.test_rl_stage import _tiny_rl_config
  c = _tiny_rl_config()
  c.stages = "sft,rl"
  c.rl_sampling.dtype = "bfloat16"
  c.rl.tis_cap = 2.0
  train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  rows = [r for r in rows if r["stage"] == "rl" and "tis_weight_mean" in r]
  assert len(rows) == 2
  for r in rows:
    assert 0.5 < r["tis_weight_mean"] < 2.0 and r["tis_weight_mean"] != 1.0
    assert 0.0 <= r["tis_capped_frac"] < 0.5


def test_trimming_cuts_the_sampler_logprobs():
  """`trim_rollout` (and the bench warm-up's `cut_responses`) cut the sampler's log-probs with the
  responses, so experience sees matching [B, width] arrays and one jit signature per width."""
  from rlhfjax.train.rl import cut_responses, trim_rollout
  rollout, _ = _random_rollout(b=4, n=40)
  rollout = rollout.replace(response_mask=rollout.response_mask * (np.arange(40) < 10),
                            logprobs=np.arange(160, dtype=np.float32).reshape(4, 40))
  cut = trim_rollout(jax.tree.map(jnp.asarray, rollout), AlgoConfig(group_size=4))
  assert cut.response_ids.shape == cut.logprobs.shape == (4, 16)
  np.testing.assert_array_equal(cut.logprobs, rollout.logprobs[:, :16])
  assert cut_responses(rollout.replace(logprobs=None), 24).logprobs is None


def _sampled(params, cfg, seed, b=16, p=5, n=8):
  """A rollout sampled from the policy `params` (ragged prompts, EOS id 3) with the sampler's
  log-probs, and random scores [b]."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(p)[None] >= rng.integers(0, 3, b)[:, None]).astype(np.int32)
  ids = rng.integers(4, cfg.vocab_size, (b, p)).astype(np.int32) * mask
  out = generate(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                 SamplingConfig(model=cfg, max_new_tokens=n, eos_id=3))
  return Rollout.from_sample(jnp.asarray(ids), jnp.asarray(mask), out), rng.normal(size=b).astype(np.float32)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_sampler_logprobs_give_the_recomputed_update(algo, rl_loop, tiny_cfg):
  """Two epochs x two minibatches (off-policy: the old log-probs matter) on a rollout the start
  policy sampled: taking its log-probs from the sampler gives the update that recomputes them.
  (The reference is the start policy here, so the KL is 0; the next test has a KL.)"""
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  base = dict(algo=algo, group_size=1 if algo == "ppo" else 4, minibatch_size=8, epochs=2, kl_coef=0.1)
  start = init_params(PolicyModel(tiny_cfg), jax.random.key(0))  # `rl_loop`'s start policy
  sampled = lambda seed: _sampled(start, tiny_cfg, seed)  # noqa: E731
  sampler, ms = rl_loop(AlgoConfig(sampler_logprobs=True, **base), mesh, iters=1, rollout_fn=sampled)
  recomputed, mr = rl_loop(AlgoConfig(**base), mesh, iters=1, rollout_fn=sampled)
  chex.assert_trees_all_close(sampler.policy.params, recomputed.policy.params, atol=1e-5)
  if algo == "ppo":
    chex.assert_trees_all_close(sampler.value.params, recomputed.value.params, atol=1e-5)
  assert sorted(ms[0]) == sorted(mr[0])
  chex.assert_trees_all_close({k: v for k, v in ms[0].items() if k != "entropy"},
                              {k: v for k, v in mr[0].items() if k != "entropy"}, atol=1e-5, rtol=1e-5)
  assert mr[0]["ratio_max"] > 1.0 + 1e-4  # the later steps' ratios moved off 1: the old log-probs mattered
  # the update's mean entropy over its steps, near the rollout's (the policy moves a little)
  assert abs(ms[0]["entropy"] - mr[0]["entropy"]) < 0.05 and ms[0]["entropy"] > 1.0


def test_sampler_logprobs_skip_the_policy_forward(tiny_cfg):
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  models = RLModels(policy=PolicyModel(tiny_cfg))
  params, ref = (init_params(models.policy, jax.random.key(k)) for k in (0, 1))
  rollout, scores = _sampled(params, tiny_cfg, 0)
  args = (params, ref, None, rollout, jnp.asarray(scores), jnp.float32(0.1))
  out, flops = {}, {}
  for on in (True, False):
    fn = make_experience_fn(AlgoConfig(group_size=4, minibatch_size=8, sampler_logprobs=on), models, mesh,
                            axes.DEFAULT_RULES)
    out[on] = fn(*args)
    cost = fn.lower(*args).compile().cost_analysis()
    flops[on] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert flops[True] < 0.6 * flops[False]  # the reference forward only
  (exp, m), (exp_old, m_old) = out[True], out[False]
  np.testing.assert_array_equal(exp.old_logprobs, rollout.logprobs * rollout.response_mask)
  np.testing.assert_allclose(exp.old_logprobs, exp_old.old_logprobs, atol=1e-5)  # cached decode = forward
  assert np.asarray(exp_old.old_logprobs).min() < -1.0
  assert "entropy" not in m and "entropy" in m_old
  np.testing.assert_allclose(m["kl_seq_mean"], m_old["kl_seq_mean"], atol=1e-5)
  fn = make_experience_fn(AlgoConfig(group_size=4, minibatch_size=8, sampler_logprobs=True), models, mesh,
                          axes.DEFAULT_RULES)
  with pytest.raises(ValueError, match="sampler_logprobs needs the sampler's log-probs"):
    fn(params, ref, None, rollout.replace(logprobs=None), jnp.asarray(scores), jnp.float32(0.1))
  with pytest.raises(ValueError, match="rl.shared_trunk needs"):
    AlgoConfig(algo="ppo", shared_trunk=True, sampler_logprobs=True)
  with pytest.raises(ValueError, match="none are recomputed"):
    AlgoConfig(sampler_logprobs=True, tis_cap=2.0)
