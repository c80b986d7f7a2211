"""Review gaps in the RL math: gradients next to -inf / inf / nan entries, bf16 inputs, KL and DPO
gradients, each vs a NumPy reference, jitted and not."""

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


def bf16(x):
  """``x`` as bfloat16, and the same rounded values in float64 for the reference."""
  x = jnp.asarray(x, jnp.bfloat16)
  return x, np.asarray(x, np.float64)


@JIT
def test_entropy_gradient_finite_and_exact_with_masked_vocabulary(jit):
  # dH/dz_i = -p_i (log p_i + H); a -inf logit (masked vocabulary) has p = 0 and gradient 0.
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, size=(2, 3, 6)).astype(np.float32)
  logits[0, 1, [1, 4]] = -np.inf
  logits[1, 2, 0] = -np.inf
  grad = np.asarray(call(jax.grad(lambda z: rl.entropy_from_logits(z).sum()), jit, logits))
  z = logits.astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(logp)
  plogp = p * np.where(p > 0, logp, 0.0)
  ent = -plogp.sum(-1, keepdims=True)
  ref = -(plogp + p * ent)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_allclose(grad, ref, atol=1e-5)
  assert np.all(grad[np.isneginf(logits)] == 0.0)


@JIT
def test_masked_var_and_whiten_gradients_ignore_padding(jit):
  # d var / d x_i = 2 (x_i - mean) / (n - 1) on masked entries, 0 elsewhere, whatever is on padding.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  mask[0, :2] = 1.0
  dirty = np.where(mask > 0, x, np.inf).astype(np.float32)
  dirty[2, mask[2] == 0] = np.nan
  sel = x[mask > 0].astype(np.float64)
  ref = np.where(mask > 0, 2 * (x - sel.mean()) / (sel.size - 1), 0.0)
  for inp in (x, dirty):
    grad = np.asarray(call(jax.grad(lambda v: rl.masked_var(v, mask)), jit, inp))
    np.testing.assert_allclose(grad, ref, atol=1e-6)
  # whiten: a weighted sum's gradient is the same for clean and dirty padding, and finite.
  w = rng.normal(size=x.shape).astype(np.float32)
  f = jax.grad(lambda v: jnp.sum(rl.whiten(v, mask) * w))
  clean, grad = call(f, jit, x), call(f, jit, dirty)
  chex.assert_tree_all_finite(grad)
  chex.assert_trees_all_close(grad, clean, atol=1e-6)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)


@JIT
def test_kl_estimator_gradients_match_closed_form(jit):
  # d/dlogp with log_r = ref - logp: k1 -> 1, k2 -> -log_r, k3 -> 1 - exp(log_r).
  rng = np.random.default_rng(2)
  logp = np.log(rng.uniform(0.05, 0.9, size=(3, 4))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, size=logp.shape)).astype(np.float32)
  log_r = ref.astype(np.float64) - logp
  expected = {"k1": np.ones_like(log_r), "k2": -log_r, "k3": 1.0 - np.exp(log_r)}
  for kind, want in expected.items():
    g_logp, g_ref = call(jax.grad(lambda a, b, k=kind: rl.kl_estimate(a, b, k).sum(), argnums=(0, 1)),
                         jit, logp, ref)
    np.testing.assert_allclose(g_logp, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_ref, -want, rtol=1e-5, atol=1e-6)


@JIT
def test_kl_estimate_bf16_inputs_computed_in_float32(jit):
  # Small log-ratios: k3 = expm1(d) - d ~ d^2 / 2 cancels to rounding noise in bf16.
  logp, logp64 = bf16([-2.0, -0.5, -3.0, -1.25])
  ref, ref64 = bf16([-1.9921875, -0.49, -3.03125, -1.25])
  d = ref64 - logp64
  want = {"k1": -d, "k2": 0.5 * d * d, "k3": np.expm1(d) - d}
  for kind, ref_val in want.items():
    out = call(rl.kl_estimate, jit, logp, ref, kind=kind)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_val, rtol=1e-4, atol=1e-9)


@JIT
def test_losses_bf16_inputs_match_float64(jit):
  rng = np.random.default_rng(3)
  shape = (3, 5)
  old, old64 = bf16(np.log(rng.uniform(0.1, 0.9, size=shape)))
  new, new64 = bf16(np.asarray(old64) + rng.normal(0, 0.05, size=shape))
  adv, adv64 = bf16(rng.normal(size=shape))
  mask = np.ones(shape, np.float32)
  mask[2, 3:] = 0.0
  loss, m = call(rl.ppo_policy_loss, jit, new, old, adv, mask, clip_eps=0.2)
  ratio = np.exp(new64 - old64)
  per_tok = np.maximum(-adv64 * ratio, -adv64 * np.clip(ratio, 0.8, 1.2))
  n = mask.sum()
  np.testing.assert_allclose(loss, (per_tok * mask).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(m["approx_kl"], (((ratio - 1) - np.log(ratio)) * mask).sum() / n, rtol=1e-4)
  np.testing.assert_allclose(m["ratio_mean"], (ratio * mask).sum() / n, rtol=1e-6)
  w = call(rl.truncated_is_weights, jit, new, old, mask, cap=2.0)
  np.testing.assert_allclose(w, np.where(mask > 0, np.minimum(ratio, 2.0), 1.0), rtol=1e-6)
  # Value loss: bf16 values near 10 with small errors (their square is rounding in bf16).
  values, v64 = bf16(10 + rng.normal(0, 0.1, size=shape))
  returns, r64 = bf16(10 + rng.normal(0, 0.1, size=shape))
  vloss, _ = call(rl.value_loss, jit, values, values, returns, mask, clip=None)
  np.testing.assert_allclose(vloss, 0.5 * (((v64 - r64) ** 2) * mask).sum() / n, rtol=1e-5)


@JIT
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_gradients_and_bf16_inputs_match_numpy(jit, loss_type, eps):
  rng = np.random.default_rng(4)
  c, r = rng.normal(-30, 3, size=(2, 5))
  rc, rr = rng.normal(-30, 3, size=(2, 5))
  wts = np.array([1.0, 0.5, 0.0, 2.0, 1.0])
  beta = 0.1
  h = (c - r) - (rc - rr)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  if loss_type == "sigmoid":
    dh = beta * (-(1 - eps) * sig(-beta * h) + eps * sig(beta * h))
  else:
    dh = 2 * (h - 1 / (2 * beta))
  dh = dh * wts / wts.sum()
  f = lambda *a: rl.dpo_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=eps,  # noqa: E731
                             weights=wts)[0]
  args = [jnp.asarray(a, jnp.float32) for a in (c, r, rc, rr)]
  gc, gr, grc, grr = call(jax.grad(f, argnums=(0, 1, 2, 3)), jit, *args)
  np.testing.assert_allclose(gc, dh, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gr, -dh, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(grc) == 0) and np.all(np.asarray(grr) == 0)  # the reference is frozen
  # bf16 summed log-probs: h from the rounded values exactly, not from bf16 differences.
  (cb, c64), (rb, r64), (rcb, rc64), (rrb, rr64) = (bf16(a) for a in (c - 0.3, r, rc, rr - 0.7))
  hb = (c64 - r64) - (rc64 - rr64)
  if loss_type == "sigmoid":
    per = (1 - eps) * np.logaddexp(0, -beta * hb) + eps * np.logaddexp(0, beta * hb)
  else:
    per = (hb - 1 / (2 * beta)) ** 2
  out = call(f, jit, cb, rb, rcb, rrb)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, (per * wts).sum() / wts.sum(), rtol=1e-5)
