"""KL estimators (hand values, Monte Carlo unbiasedness) and the KL controllers."""

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


@JIT
def test_kl_estimators_hand_computed(jit):
  logp = np.log(np.array([0.5, 0.25, 0.1], np.float32))
  logref = np.log(np.array([0.25, 0.5, 0.1], np.float32))
  d = np.log(0.5 / 0.25)  # log pi - log ref for the first token
  k1 = call(rl.kl_estimate, jit, logp, logref, kind="k1")
  k2 = call(rl.kl_estimate, jit, logp, logref, kind="k2")
  k3 = call(rl.kl_estimate, jit, logp, logref, kind="k3")
  chex.assert_trees_all_close(k1, np.array([d, -d, 0.0]), atol=1e-6)
  chex.assert_trees_all_close(k2, np.array([0.5 * d * d, 0.5 * d * d, 0.0]), atol=1e-6)
  # k3 = r - 1 - log r with r = ref / pi.
  chex.assert_trees_all_close(k3, np.array([0.5 - 1 + d, 2.0 - 1 - d, 0.0]), atol=1e-6)
  assert rl.kl_estimate(logp, logref).shape == (3,)  # default kind is k1
  chex.assert_trees_all_close(rl.kl_estimate(logp, logref), k1)


def test_kl_estimate_bad_kind():
  with pytest.raises(ValueError, match="k1"):
    rl.kl_estimate(jnp.zeros(2), jnp.zeros(2), kind="k4")


def test_kl_estimators_unbiased_on_categorical_samples():
  p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
  q = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
  true_kl = float(np.sum(p * np.log(p / q)))
  samples = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
  logp, logq = jnp.log(p)[samples], jnp.log(q)[samples]
  k1 = rl.kl_estimate(logp, logq, "k1")
  k3 = rl.kl_estimate(logp, logq, "k3")
  np.testing.assert_allclose(float(k1.mean()), true_kl, rtol=0.1)
  np.testing.assert_allclose(float(k3.mean()), true_kl, rtol=0.05)
  assert float(k3.min()) >= 0.0 and float(k1.min()) < 0.0
  assert float(k3.std()) < float(k1.std())  # the point of k3: same mean, less variance


def ref_adaptive(beta, kls, n_steps, target, horizon):
  out = []
  for kl in kls:
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    beta *= 1.0 + err * n_steps / horizon
    out.append(beta)
  return np.array(out)


@JIT
def test_adaptive_controller_matches_formula_with_saturation(jit):
  ctrl = rl.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000.0)
  kls = [6.0, 7.0, 100.0, 0.0, 5.0, 6.6, 1e9, 4.0]  # includes errors past +0.2 and -0.2
  n_steps = 64
  update = functools.partial(ctrl.update, n_steps=n_steps)
  update = jax.jit(update) if jit else update
  state = ctrl.init()
  got = []
  for kl in kls:
    state = update(state, jnp.float32(kl))
    got.append(float(state.value))
  expected = ref_adaptive(0.2, kls, n_steps, 6.0, 1000.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Saturation: 100 and 1e9 move beta by the same factor 1 + 0.2 * 64 / 1000.
  np.testing.assert_allclose(got[2] / got[1], 1 + 0.2 * n_steps / 1000, rtol=1e-6)
  np.testing.assert_allclose(got[6] / got[5], 1 + 0.2 * n_steps / 1000, rtol=1e-6)
  np.testing.assert_allclose(got[3] / got[2], 1 - 0.2 * n_steps / 1000, rtol=1e-6)
  assert got[0] == pytest.approx(0.2)  # on target: unchanged


def test_controllers_are_pytrees_usable_in_scan():
  ctrls = [rl.AdaptiveKLController(0.1, 6.0, 100.0), rl.FixedKLController(0.05)]
  kls = jnp.array([12.0, 12.0, 3.0])
  for ctrl in ctrls:
    hash(ctrl)  # static config: hashable
    state = ctrl.init()
    assert isinstance(state, rl.KLState) and len(jax.tree.leaves(state)) == 1

    @jax.jit
    def run(state, kls, ctrl=ctrl):
      return jax.lax.scan(lambda s, kl: (ctrl.update(s, kl, 10), s.value), state, kls)

    final, trace = run(state, kls)
    if isinstance(ctrl, rl.FixedKLController):
      chex.assert_trees_all_close(trace, jnp.full(3, 0.05))
      assert float(final.value) == pytest.approx(0.05)
    else:
      expected = np.concatenate([[0.1], ref_adaptive(0.1, [12.0, 12.0, 3.0], 10, 6.0, 100.0)])
      chex.assert_trees_all_close(trace, expected[:3], rtol=1e-6)
      assert float(final.value) == pytest.approx(expected[3], rel=1e-6)
