"""Masked reductions and whitening vs NumPy on the selected entries, jitted and not."""

import functools

import chex
import jax
import numpy as np
import pytest

from rlhfjax import rl

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, jit, *args, **static):
  f = functools.partial(fn, **static)
  return (jax.jit(f) if jit else f)(*args)


def make(seed=0, shape=(5, 8)):
  rng = np.random.default_rng(seed)
  x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
  mask = (rng.random(shape) < 0.6).astype(np.float32)
  mask[0] = 0.0  # an all-padding row
  mask[1, :3] = 1.0
  return x, mask


@JIT
def test_masked_reductions_match_numpy(jit):
  x, mask = make()
  x_pad = np.where(mask > 0, x, np.inf)  # padding may hold inf; it must not leak
  sel = x[mask > 0]
  chex.assert_trees_all_close(call(rl.masked_sum, jit, x_pad, mask), sel.sum(), rtol=1e-5)
  chex.assert_trees_all_close(call(rl.masked_mean, jit, x_pad, mask), sel.mean(), rtol=1e-5)
  chex.assert_trees_all_close(call(rl.masked_var, jit, x_pad, mask), sel.var(ddof=1), rtol=1e-5)
  chex.assert_trees_all_close(call(rl.masked_var, jit, x_pad, mask, unbiased=False), sel.var(),
                              rtol=1e-5)
  rows = [x[b][mask[b] > 0] for b in range(x.shape[0])]
  row_means = np.array([r.mean() if r.size else 0.0 for r in rows])
  chex.assert_trees_all_close(call(rl.masked_mean, jit, x_pad, mask, axis=1), row_means, rtol=1e-5)
  row_sums = np.array([r.sum() for r in rows])
  chex.assert_trees_all_close(call(rl.masked_sum, jit, x_pad, mask, axis=-1, keepdims=True),
                              row_sums[:, None], rtol=1e-5, atol=1e-5)


@JIT
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(jit, shift_mean):
  x, mask = make(1)
  sel = x[mask > 0]
  ref = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
  if not shift_mean:
    ref = ref + sel.mean()
  ref = np.where(mask > 0, ref, 0.0)
  out = call(rl.whiten, jit, np.where(mask > 0, x, np.nan), mask, shift_mean=shift_mean)
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
  w = np.asarray(out)[mask > 0]
  np.testing.assert_allclose(w.mean(), 0.0 if shift_mean else sel.mean(), atol=1e-5)
  np.testing.assert_allclose(w.std(ddof=1), 1.0, rtol=1e-5)


def test_whiten_single_token_is_finite():
  x = np.array([[3.0, 1.0]])
  out = rl.whiten(x, np.array([[1.0, 0.0]]))
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(out, np.zeros((1, 2)))


def test_bfloat16_counts_are_exact():
  n = 1001  # not representable in bfloat16 (rounds to 1000)
  x = jax.numpy.ones((1, n), jax.numpy.bfloat16)
  mask = jax.numpy.ones((1, n), jax.numpy.bfloat16)
  assert rl.masked_mean(x, mask).dtype == jax.numpy.float32
  assert float(rl.masked_sum(x, mask)) == n
  assert float(rl.masked_mean(x * 3, mask)) == 3.0
