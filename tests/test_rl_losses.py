"""PPO policy / value losses and logit helpers vs NumPy references, jitted and not."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rl

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, jit, *args, **static):
  f = functools.partial(fn, **static)
  return (jax.jit(f) if jit else f)(*args)


def make(seed=0, shape=(4, 6)):
  rng = np.random.default_rng(seed)
  old = np.log(rng.uniform(0.05, 0.9, size=shape)).astype(np.float32)
  new = (old + rng.normal(0.0, 0.4, size=shape)).astype(np.float32)
  adv = rng.normal(size=shape).astype(np.float32)
  mask = np.zeros(shape, np.float32)
  mask[0, 1:5] = 1.0
  mask[1, :] = 1.0
  mask[2, 4:] = 1.0  # left padded
  # row 3: all padding
  return new, old, adv, mask


def policy_ref(new, old, adv, mask, clip_eps, clip_high=None, dual_clip=None,
               aggregation="token", fixed_length=None):
  clip_high = clip_eps if clip_high is None else clip_high
  ratio = np.exp(new.astype(np.float64) - old)
  per_tok = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_eps, 1 + clip_high))
  if dual_clip is not None:
    per_tok = np.where(adv < 0, np.minimum(per_tok, -dual_clip * adv), per_tok)
  if aggregation == "token":
    return (per_tok * mask).sum() / mask.sum()
  if aggregation == "sequence":
    rows = [(per_tok[b] * mask[b]).sum() / mask[b].sum() for b in range(len(mask)) if mask[b].sum()]
    return np.mean(rows)
  return (per_tok * mask).sum() / (mask.shape[0] * fixed_length)


@JIT
def test_policy_loss_hand_computed(jit):
  # Tokens: (A=+1, r=1.5) clipped at 1.2; (A=-1, r=0.5) clipped at 0.8; (A=-1, r=5) unclipped 5,
  # dual-clipped to 3; (A=+1, r=1.25) inside clip-high 1.28; (A=+2, r=1.0).
  ratio = np.array([[1.5, 0.5, 5.0, 1.25, 1.0]], np.float32)
  adv = np.array([[1.0, -1.0, -1.0, 1.0, 2.0]], np.float32)
  old = np.full_like(ratio, -1.0)
  new = old + np.log(ratio)
  mask = np.ones_like(ratio)
  loss, m = call(rl.ppo_policy_loss, jit, new, old, adv, mask, clip_eps=0.2)
  chex.assert_trees_all_close(loss, np.mean([-1.2, 0.8, 5.0, -1.2, -2.0]), atol=1e-5)
  chex.assert_trees_all_close(m["clipfrac"], 0.6, atol=1e-6)  # tokens 0, 1 and 3
  loss, m = call(rl.ppo_policy_loss, jit, new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28,
                 dual_clip=3.0)
  chex.assert_trees_all_close(loss, np.mean([-1.28, 0.8, 3.0, -1.25, -2.0]), atol=1e-5)
  chex.assert_trees_all_close(m["clipfrac"], 0.6, atol=1e-6)  # 0 and 1 clipped, 2 dual-clipped
  chex.assert_trees_all_close(m["dual_clipfrac"], 0.2, atol=1e-6)
  chex.assert_trees_all_close(m["ratio_max"], 5.0, rtol=1e-5)
  chex.assert_trees_all_close(m["ratio_min"], 0.5, rtol=1e-5)
  chex.assert_trees_all_close(m["ratio_mean"], ratio.mean(), rtol=1e-5)
  chex.assert_trees_all_close(m["pg_loss"], loss)


@JIT
@pytest.mark.parametrize("aggregation,clip_high,dual_clip", [
    ("token", None, None), ("token", 0.3, 3.0), ("sequence", 0.28, None), ("fixed", None, 2.0)])
def test_policy_loss_matches_numpy(jit, aggregation, clip_high, dual_clip):
  new, old, adv, mask = make(1)
  kw = dict(clip_eps=0.2, clip_eps_high=clip_high, dual_clip=dual_clip, aggregation=aggregation,
            fixed_length=8 if aggregation == "fixed" else None)
  new_pad = np.where(mask > 0, new, -np.inf)  # padded log-probs may be -inf
  loss, m = call(rl.ppo_policy_loss, jit, new_pad, old, adv, mask, **kw)
  ref = policy_ref(new, old, adv, mask, 0.2, clip_high, dual_clip, aggregation, kw["fixed_length"])
  chex.assert_trees_all_close(loss, ref, rtol=1e-5, atol=1e-6)
  log_ratio = (new - old)[mask > 0].astype(np.float64)
  ratio = np.exp(log_ratio)
  chex.assert_trees_all_close(m["approx_kl"], np.mean(ratio - 1 - log_ratio), rtol=1e-4)
  chex.assert_trees_all_close(m["ratio_mean"], ratio.mean(), rtol=1e-5)
  chex.assert_trees_all_close(m["ratio_max"], ratio.max(), rtol=1e-5)
  chex.assert_trees_all_close(m["ratio_min"], ratio.min(), rtol=1e-5)
  chex.assert_tree_all_finite(m)


def test_policy_loss_aggregations_differ_as_defined():
  # Two sequences of lengths 1 and 3 with per-token losses 4 and 0 (ratio 1, adv -4 / 0).
  new = np.zeros((2, 3), np.float32)
  adv = np.array([[-4.0, 0, 0], [0, 0, 0]], np.float32)
  mask = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
  kw = dict(clip_eps=0.2)
  tok, _ = rl.ppo_policy_loss(new, new, adv, mask, aggregation="token", **kw)
  seq, _ = rl.ppo_policy_loss(new, new, adv, mask, aggregation="sequence", **kw)
  fix, _ = rl.ppo_policy_loss(new, new, adv, mask, aggregation="fixed", fixed_length=10, **kw)
  np.testing.assert_allclose([tok, seq, fix], [4 / 4, (4 / 1 + 0) / 2, 4 / 20], rtol=1e-6)


def test_policy_loss_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError):
    rl.ppo_policy_loss(x, x, x, x, clip_eps=0.2, aggregation="fixed")
  with pytest.raises(ValueError):
    rl.ppo_policy_loss(x, x, x, x, clip_eps=0.2, aggregation="mean")
  with pytest.raises(ValueError):
    rl.ppo_policy_loss(x, x, x, x, clip_eps=0.2, dual_clip=1.0)


@JIT
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_policy_gradient_zero_exactly_on_clipped_tokens(jit, dual_clip):
  new, old, adv, mask = make(2)
  new = (old + np.random.default_rng(3).normal(0, 0.8, size=new.shape)).astype(np.float32)
  kw = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=dual_clip)
  grad_fn = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask, **kw)[0])
  grad = np.asarray((jax.jit(grad_fn) if jit else grad_fn)(np.where(mask > 0, new, -np.inf)))
  ratio = np.exp(new.astype(np.float64) - old)
  clipped = ((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))
  if dual_clip is not None:
    clipped |= (adv < 0) & (ratio > dual_clip)
  assert clipped[mask > 0].any() and (~clipped)[mask > 0].any()
  chex.assert_tree_all_finite(grad)
  assert np.all(grad[(mask == 0) | clipped] == 0.0)
  # Unclipped tokens: d/dlogp (-A r) / N = -A r / N.
  free = (mask > 0) & ~clipped
  np.testing.assert_allclose(grad[free], (-adv * ratio / mask.sum())[free], rtol=1e-4)
  _, m = rl.ppo_policy_loss(new, old, adv, mask, **kw)
  np.testing.assert_allclose(m["clipfrac"], clipped[mask > 0].mean(), rtol=1e-6)


@JIT
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_value_loss_matches_numpy_and_clip_gradients(jit, clip, aggregation):
  rng = np.random.default_rng(4)
  _, _, _, mask = make(4)
  old_v = rng.normal(size=mask.shape).astype(np.float32)
  values = (old_v + rng.normal(0, 0.5, size=mask.shape)).astype(np.float32)
  returns = rng.normal(size=mask.shape).astype(np.float32)
  unclipped = (values - returns) ** 2
  if clip is None:
    per_tok, is_clipped = unclipped, np.zeros(mask.shape, bool)
  else:
    clipped = (old_v + np.clip(values - old_v, -clip, clip) - returns) ** 2
    per_tok, is_clipped = np.maximum(unclipped, clipped), clipped > unclipped
  if aggregation == "token":
    ref = 0.5 * (per_tok * mask).sum() / mask.sum()
  else:
    ref = 0.5 * np.mean([(per_tok[b] * mask[b]).sum() / mask[b].sum() for b in range(3)])
  f = functools.partial(rl.value_loss, clip=clip, aggregation=aggregation)
  loss, m = call(f, jit, values, old_v, returns, mask)
  chex.assert_trees_all_close(loss, ref, rtol=1e-5)
  chex.assert_trees_all_close(m["vf_clipfrac"], is_clipped[mask > 0].mean(), atol=1e-6)
  chex.assert_trees_all_close(m["value_mean"], values[mask > 0].mean(), rtol=1e-5)
  if clip is not None:
    assert is_clipped[mask > 0].any()
    grad = np.asarray(jax.grad(lambda v: f(v, old_v, returns, mask)[0])(values))
    assert np.all(grad[is_clipped | (mask == 0)] == 0.0)
    assert np.all(grad[~is_clipped & (mask > 0) & (values != returns)] != 0.0)


def test_explained_variance():
  rng = np.random.default_rng(5)
  returns = rng.normal(size=(3, 5)).astype(np.float32)
  mask = np.ones_like(returns)
  mask[0, :2] = 0.0
  chex.assert_trees_all_close(rl.explained_variance(returns, returns, mask), 1.0, atol=1e-6)
  const = np.full_like(returns, 10.0)
  chex.assert_trees_all_close(rl.explained_variance(const, returns, mask), 0.0, atol=1e-5)
  values = returns + rng.normal(0, 0.5, size=returns.shape).astype(np.float32)
  r, v = returns[mask > 0], values[mask > 0]
  ev = jax.jit(rl.explained_variance)(values, returns, mask)
  chex.assert_trees_all_close(ev, 1 - np.var(r - v) / np.var(r), rtol=1e-4)
  assert np.isnan(rl.explained_variance(values, np.ones_like(returns), mask))


@JIT
def test_logprobs_and_entropy_from_logits(jit):
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 3, size=(2, 3, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 3))
  logits64 = logits.astype(np.float64)
  logp_ref = logits64 - np.log(np.exp(logits64).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp_ref, tokens[..., None], -1)[..., 0]
  chex.assert_trees_all_close(call(rl.logprobs_from_logits, jit, logits, tokens), picked,
                              atol=1e-5)
  ent_ref = -(np.exp(logp_ref) * logp_ref).sum(-1)
  chex.assert_trees_all_close(call(rl.entropy_from_logits, jit, logits), ent_ref, atol=1e-5)
  # Uniform -> log V; -inf entries (masked vocabulary) and large / bf16 logits stay finite.
  edge = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -jnp.inf, -jnp.inf]]])
  chex.assert_trees_all_close(call(rl.entropy_from_logits, jit, edge), np.log([[4.0, 2.0]]),
                              atol=1e-6)
  big = jnp.array([[[1e4, 0.0, -1e4]]], jnp.bfloat16)
  out = call(rl.entropy_from_logits, jit, big)
  assert out.dtype == jnp.float32
  chex.assert_trees_all_close(out, np.zeros((1, 1)), atol=1e-6)
  chex.assert_trees_all_close(call(rl.logprobs_from_logits, jit, big, jnp.array([[0]])),
                              np.zeros((1, 1)), atol=1e-6)
