"""Bradley–Terry and K-wise ranking losses against NumPy references, jitted and not."""

import itertools

import jax
import numpy as np
import pytest

from rlhfjax.train.reward import bradley_terry_loss, ranking_loss


def _softplus(x):
  return np.logaddexp(0.0, x)


def np_bt(c, r, margin=0.0, coef=0.0, w=None):
  w = np.ones_like(c) if w is None else w
  per = _softplus(-(c - r - margin)) + coef * (c + r) ** 2
  return np.sum(w * per) / np.sum(w)


def np_ranking(rew, valid=None, margin=None, coef=0.0, w=None):
  """Plain loops: mean over each ranking's valid pairs (i above j), then weighted mean of rankings."""
  b, k = rew.shape
  valid = np.ones_like(rew) if valid is None else valid
  margin = np.zeros(b) if margin is None else margin
  w = np.ones(b) if w is None else w
  per_rank, correct, n_all = [], 0.0, 0.0
  for n in range(b):
    terms = []
    for i, j in itertools.combinations(range(k), 2):
      if valid[n, i] and valid[n, j]:
        d = rew[n, i] - rew[n, j]
        terms.append(_softplus(-(d - margin[n])) + coef * (rew[n, i] + rew[n, j]) ** 2)
        correct += w[n] * (d > 0)
        n_all += w[n]
    per_rank.append(np.mean(terms) if terms else 0.0)
  return np.sum(w * np.asarray(per_rank)) / np.sum(w), correct / n_all


@pytest.mark.parametrize("jit", [False, True])
def test_bradley_terry_matches_numpy(jit):
  rng = np.random.default_rng(0)
  c, r = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
  m, w = rng.uniform(0, 1, 16).astype(np.float32), rng.poisson(1.0, 16).astype(np.float32)
  fn = jax.jit(bradley_terry_loss, static_argnames=("center_coef",)) if jit else bradley_terry_loss
  loss, met = fn(c, r)
  np.testing.assert_allclose(loss, np_bt(c, r), rtol=1e-6)
  np.testing.assert_allclose(met["accuracy"], np.mean(c > r), rtol=1e-6)
  np.testing.assert_allclose(met["margin"], np.mean(c - r), rtol=1e-5, atol=1e-6)
  loss, met = fn(c, r, margin=m, center_coef=0.01, weights=w)
  np.testing.assert_allclose(loss, np_bt(c, r, m, 0.01, w), rtol=1e-6)
  np.testing.assert_allclose(met["center"], np.sum(w * 0.01 * (c + r) ** 2) / w.sum(), rtol=1e-5)
  # hand value: equal rewards -> log 2
  np.testing.assert_allclose(fn(np.zeros(3), np.zeros(3))[0], np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_ranking_loss_matches_numpy(jit):
  rng = np.random.default_rng(1)
  rew = rng.normal(size=(6, 4)).astype(np.float32)
  valid = np.ones((6, 4), np.float32)
  valid[1, 3] = 0
  valid[4, 2:] = 0  # a ranking of 2 padded to 4
  margin = rng.uniform(0, 0.5, 6).astype(np.float32)
  w = np.asarray([1, 0, 2, 1, 3, 1], np.float32)
  fn = jax.jit(ranking_loss, static_argnames=("center_coef",)) if jit else ranking_loss
  loss, met = fn(rew)
  ref, acc = np_ranking(rew)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(met["accuracy"], acc, rtol=1e-6)
  loss, met = fn(rew, valid=valid, margin=margin, center_coef=0.05, weights=w)
  ref, acc = np_ranking(rew, valid, margin, 0.05, w)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(met["accuracy"], acc, rtol=1e-6)


def test_ranking_of_two_is_bradley_terry():
  rng = np.random.default_rng(2)
  rew = rng.normal(size=(9, 2)).astype(np.float32)
  a, ma = ranking_loss(rew, margin=0.3, center_coef=0.01)
  b, mb = bradley_terry_loss(rew[:, 0], rew[:, 1], margin=0.3, center_coef=0.01)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for k in ("accuracy", "margin", "nll", "center"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7)


def test_ranking_gradient_pushes_order():
  rew = np.zeros((1, 3), np.float32)
  g = jax.grad(lambda r: ranking_loss(r)[0])(rew)
  assert g[0, 0] < 0 < g[0, 2] and abs(g[0, 1]) < 1e-7  # best up, worst down, middle balanced
