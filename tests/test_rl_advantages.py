"""Advantage estimators vs plain NumPy loops and hand-computed values, jitted and not."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rl

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, jit, *args, **static):
  """Calls ``fn(*args, **static)``, through ``jax.jit`` with ``static`` closed over if ``jit``."""
  f = functools.partial(fn, **static)
  return (jax.jit(f) if jit else f)(*args)


def ragged_mask(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
  """Rows of [left pad zeros][ones, with an occasional hole][right pad zeros]; row 0 all zeros."""
  mask = np.zeros((batch, length), np.float32)
  for b in range(1, batch):
    left = rng.integers(0, length // 2)
    n = rng.integers(1, length - left + 1)
    mask[b, left:left + n] = 1.0
    if n > 3 and rng.random() < 0.4:
      mask[b, left + 1 + rng.integers(0, n - 2)] = 0.0  # a masked-out token inside the response
  return mask


def gae_ref(rewards, values, mask, gamma, lam):
  """Python loop over the masked positions of each row, last to first."""
  adv = np.zeros_like(rewards, np.float64)
  for b in range(rewards.shape[0]):
    next_v, next_a = 0.0, 0.0
    for t in reversed(np.flatnonzero(mask[b])):
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = values[b, t]
      adv[b, t] = next_a
  return adv, np.where(mask > 0, adv + values, 0.0)


@JIT
def test_gae_hand_computed_left_and_right_padding(jit):
  mask = np.array([[0, 0, 1, 1, 1, 0.0]])
  rewards = np.array([[0, 0, 0, 0, 1.0, 5.0]])  # the 5 is on padding: ignored
  values = np.array([[9, 9, 0.1, 0.2, 0.3, 9.0]])  # the 9s are on padding: ignored
  adv, ret = call(rl.gae, jit, rewards, values, mask, gamma=1.0, lam=1.0)
  chex.assert_trees_all_close(adv, np.array([[0, 0, 0.9, 0.8, 0.7, 0]]), atol=1e-6)
  chex.assert_trees_all_close(ret, np.array([[0, 0, 1.0, 1.0, 1.0, 0]]), atol=1e-6)
  # gamma=0.5, lam=0.5: deltas are [0.5*0.2-0.1, 0.5*0.3-0.2, 1-0.3] = [0, -0.05, 0.7].
  adv, _ = call(rl.gae, jit, rewards, values, mask, gamma=0.5, lam=0.5)
  a4 = 0.7
  a3 = -0.05 + 0.25 * a4
  a2 = 0.0 + 0.25 * a3
  chex.assert_trees_all_close(adv, np.array([[0, 0, a2, a3, a4, 0]]), atol=1e-6)


@JIT
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop_on_ragged_masks(jit, gamma, lam):
  rng = np.random.default_rng(0)
  mask = ragged_mask(rng, 7, 12)
  assert mask[0].sum() == 0 and (mask[:, 0] == 0).any()
  rewards = rng.normal(size=mask.shape).astype(np.float32)
  values = rng.normal(size=mask.shape).astype(np.float32)
  adv, ret = call(rl.gae, jit, rewards, values, mask, gamma=gamma, lam=lam)
  adv_ref, ret_ref = gae_ref(rewards, values, mask, gamma, lam)
  chex.assert_trees_all_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(ret, ret_ref, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[0] == 0)


@JIT
def test_gae_ignores_garbage_on_padding(jit):
  rng = np.random.default_rng(1)
  mask = ragged_mask(rng, 5, 9)
  rewards = rng.normal(size=mask.shape).astype(np.float32)
  values = rng.normal(size=mask.shape).astype(np.float32)
  clean = call(rl.gae, jit, rewards, values, mask, gamma=0.9, lam=0.9)
  dirty = call(rl.gae, jit, np.where(mask > 0, rewards, np.nan), np.where(mask > 0, values, 1e6),
               mask, gamma=0.9, lam=0.9)
  chex.assert_trees_all_close(clean, dirty)


def test_gae_traced_hyperparameters_and_1d():
  rng = np.random.default_rng(2)
  mask = ragged_mask(rng, 4, 6)
  rewards = rng.normal(size=mask.shape).astype(np.float32)
  values = rng.normal(size=mask.shape).astype(np.float32)
  adv, _ = jax.jit(lambda g, l: rl.gae(rewards, values, mask, gamma=g, lam=l))(0.9, 0.7)
  chex.assert_trees_all_close(adv, gae_ref(rewards, values, mask, 0.9, 0.7)[0], atol=1e-5)
  adv1, _ = rl.gae(rewards[3], values[3], mask[3], gamma=0.9, lam=0.7)
  chex.assert_trees_all_close(adv1, adv[3], atol=1e-6)
  with pytest.raises(ValueError):
    rl.gae(rewards, values[:, :3], mask, gamma=1.0, lam=1.0)


@JIT
def test_discounted_returns_and_reinforce_pp(jit):
  rng = np.random.default_rng(3)
  mask = ragged_mask(rng, 6, 10)
  token_rewards = rng.normal(size=mask.shape).astype(np.float32)
  gamma = 0.9
  ret_ref = np.zeros_like(token_rewards, np.float64)
  for b in range(mask.shape[0]):
    g = 0.0
    for t in reversed(np.flatnonzero(mask[b])):
      g = token_rewards[b, t] + gamma * g
      ret_ref[b, t] = g
  ret = call(rl.discounted_returns, jit, token_rewards, mask, gamma=gamma)
  chex.assert_trees_all_close(ret, ret_ref, atol=1e-5)
  sel = ret_ref[mask > 0]
  adv_ref = np.where(mask > 0, (ret_ref - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)
  adv = call(rl.reinforce_pp_advantages, jit, token_rewards, mask, gamma=gamma)
  chex.assert_trees_all_close(adv, adv_ref, atol=1e-5)


def group_ref(rewards, g, scale, eps):
  r = rewards.reshape(-1, g).astype(np.float64)
  c = r - r.mean(1, keepdims=True)
  if scale == "group":
    c = c / (r.std(1, ddof=1, keepdims=True) + eps)
  elif scale == "batch":
    c = c / (r.std(ddof=1) + eps)
  return c.reshape(-1)


@JIT
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_matches_numpy(jit, scale):
  rng = np.random.default_rng(4)
  rewards = rng.normal(size=12).astype(np.float32)
  rewards[8:] = 1.0  # a constant group: zero advantage, no division blow-up
  adv = call(rl.group_advantages, jit, rewards, scale=scale, group_size=4)
  chex.assert_trees_all_close(adv, group_ref(rewards, 4, scale, 1e-6), atol=1e-5)
  chex.assert_trees_all_close(np.asarray(adv)[8:], np.zeros(4), atol=1e-6)
  # Grouping is contiguous: each group of 4 sums to zero.
  chex.assert_trees_all_close(np.asarray(adv).reshape(3, 4).sum(1), np.zeros(3), atol=1e-5)


def test_group_advantages_hand_computed_and_errors():
  adv = rl.group_advantages(jnp.array([0.0, 1.0, 1.0, 2.0]), 2, scale="group", eps=0.0)
  chex.assert_trees_all_close(adv, jnp.array([-1, 1, -1, 1]) / np.sqrt(2.0), atol=1e-6)
  with pytest.raises(ValueError):
    rl.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError):
    rl.group_advantages(jnp.zeros(6), 3, scale="std")


@JIT
def test_rloo_matches_loop(jit):
  rng = np.random.default_rng(5)
  g = 5
  rewards = rng.normal(size=3 * g).astype(np.float32)
  ref = np.zeros(3 * g)
  for i in range(3 * g):
    group = range((i // g) * g, (i // g + 1) * g)
    ref[i] = rewards[i] - np.mean([rewards[j] for j in group if j != i])
  adv = call(rl.rloo_advantages, jit, rewards, group_size=g)
  chex.assert_trees_all_close(adv, ref, atol=1e-5)
  chex.assert_trees_all_close(adv, g / (g - 1) * group_ref(rewards, g, "none", 0.0), atol=1e-5)
  with pytest.raises(ValueError):
    rl.rloo_advantages(jnp.zeros(4), 1)


@JIT
@pytest.mark.parametrize("g,k", [(4, 1), (4, 2), (6, 2)])
def test_best_of_n_selects_top_and_bottom_k(jit, g, k):
  rng = np.random.default_rng(6)
  rewards = rng.integers(0, 3, size=5 * g).astype(np.float32)  # many ties
  w = np.asarray(call(rl.best_of_n_select, jit, rewards, group_size=g, k=k))
  for p in range(5):
    r = rewards[p * g:(p + 1) * g]
    order = sorted(range(g), key=lambda i: (-r[i], i))
    expected = np.zeros(g)
    expected[order[:k]] = 1.0
    expected[order[g - k:]] = -1.0
    np.testing.assert_array_equal(w[p * g:(p + 1) * g], expected)
    assert (w[p * g:(p + 1) * g] == 1).sum() == k and (w[p * g:(p + 1) * g] == -1).sum() == k
    assert r[w[p * g:(p + 1) * g] == 1].min() >= r[w[p * g:(p + 1) * g] == -1].max()


def test_best_of_n_hand_computed_and_errors():
  w = rl.best_of_n_select(jnp.array([0.3, 0.9, 0.1, 0.5, 1.0, 1.0, 0.0, 0.0]), 4, 1)
  np.testing.assert_array_equal(w, [0, 1, -1, 0, 1, 0, 0, -1])
  with pytest.raises(ValueError):
    rl.best_of_n_select(jnp.zeros(8), 4, 3)
  with pytest.raises(ValueError):
    rl.best_of_n_select(jnp.zeros(8), 4, 0)


@JIT
def test_broadcast_sequence_advantage(jit):
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0.0]])
  out = call(rl.broadcast_sequence_advantage, jit, np.array([2.0, -1.0, 7.0]), mask)
  chex.assert_trees_all_close(out, np.array([[0, 2, 2, 0], [-1, -1, -1, -1], [0, 0, 0, 0.0]]))
