"""Model pieces: heads, remat/untied/bf16 variants, logical axis names, trunk transplant, KV cache."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import (PolicyModel, RewardModel, TransformerConfig, ValueModel, init_cache,
                            init_params, last_token_index, positions_from_mask, transplant_trunk)
from rlhfjax.models.init import logical_specs

def apply(module, *args, **kw):
  """Jitted `module.apply` (one compile per module config and shapes)."""
  return jax.jit(module.apply, static_argnames=tuple(kw))(*args, **kw)


CFG = TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=64, max_len=16)


def _inputs():
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 32, (2, 8)), jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  return tokens * mask, positions_from_mask(mask), mask


def test_every_parameter_has_logical_axes():
  for module in (PolicyModel(CFG), ValueModel(CFG), RewardModel(CFG)):
    specs = logical_specs(module)
    params = jax.eval_shape(lambda: init_params(module, jax.random.key(0)))  # shapes only
    for spec, p in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                       jax.tree.leaves(params)):
      assert len(spec) == p.ndim  # a name for every dimension
    layer_specs = specs["trunk"]["layers"]["attn"]["wq"]
    assert layer_specs == jax.sharding.PartitionSpec("layers", "embed", "heads", "kv")


def test_positions_from_left_padding():
  _, pos, _ = _inputs()
  np.testing.assert_array_equal(pos[0], [0, 0, 0, 1, 2, 3, 4, 4])


def test_padding_does_not_change_real_tokens():
  # the same sequence with and without extra left padding gives the same logits on real tokens
  params = init_params(PolicyModel(CFG), jax.random.key(1))
  toks = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
  a, _ = apply(PolicyModel(CFG), {"params": params}, toks, positions_from_mask(jnp.ones_like(toks)),
                                jnp.ones_like(toks))
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], 1)
  m = (padded > 0).astype(jnp.int32)
  b, _ = apply(PolicyModel(CFG), {"params": params}, padded, positions_from_mask(m), m)
  chex.assert_trees_all_close(a, b[:, 3:], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_grads(policy):
  tokens, pos, mask = _inputs()
  params = init_params(PolicyModel(CFG), jax.random.key(2))
  def loss(p, cfg):
    logits, _ = apply(PolicyModel(cfg), {"params": p}, tokens, pos, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
  remat = TransformerConfig(**{**CFG.__dict__, "remat": True, "remat_policy": policy})
  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, CFG)
  g2 = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
  chex.assert_trees_all_close(g1, g2, atol=1e-6)


def test_remat_policy_names_its_choices():
  with pytest.raises(ValueError, match=r"remat_policy must be one of \['dots', 'full'\], got 'some'"):
    TransformerConfig(**{**CFG.__dict__, "remat_policy": "some"})


def test_untied_head_and_bf16_compute():
  tokens, pos, mask = _inputs()
  untied = TransformerConfig(**{**CFG.__dict__, "tie_embeddings": False})
  p = init_params(PolicyModel(untied), jax.random.key(0))
  assert p["lm_head"].shape == (32, 32)
  bf16 = TransformerConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  p16 = init_params(PolicyModel(bf16), jax.random.key(0))
  assert jax.tree.leaves(p16)[0].dtype == jnp.float32  # params stay f32
  logits16, _ = apply(PolicyModel(bf16), {"params": p16}, tokens, pos, mask)
  logits32, _ = apply(PolicyModel(CFG), {"params": p16}, tokens, pos, mask)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, atol=0.15)  # bf16 rounding, same function


def test_value_head_starts_at_zero_and_reward_reads_last_token():
  tokens, pos, mask = _inputs()
  v = apply(ValueModel(CFG), {"params": init_params(ValueModel(CFG), jax.random.key(0))}, tokens, pos, mask)
  assert v.shape == (2, 8) and float(jnp.abs(v).max()) == 0.0
  np.testing.assert_array_equal(last_token_index(mask), [6, 7])
  rp = init_params(RewardModel(CFG), jax.random.key(0))
  score, raw = apply(RewardModel(CFG), {"params": rp}, tokens, pos, mask, per_token=True)
  np.testing.assert_allclose(score, [raw[0, 6], raw[1, 7]], atol=1e-6)
  rp = {**rp, "norm_gain": jnp.float32(2.0), "norm_bias": jnp.float32(-1.0)}
  s2 = apply(RewardModel(CFG), {"params": rp}, tokens, pos, mask)
  np.testing.assert_allclose(s2, 2.0 * score - 1.0, atol=1e-5)


def test_transplant_trunk():
  pol = init_params(PolicyModel(CFG), jax.random.key(0))
  val = init_params(ValueModel(CFG), jax.random.key(1))
  moved = transplant_trunk(val, pol)
  chex.assert_trees_all_equal(moved["trunk"], pol["trunk"])
  chex.assert_trees_all_equal(moved["head_kernel"], val["head_kernel"])
  with pytest.raises(ValueError):
    transplant_trunk({"x": 1}, pol)


def test_cached_decoding_matches_full_forward():
  tokens, pos, mask = _inputs()
  params = init_params(PolicyModel(CFG), jax.random.key(3))
  full, _ = apply(PolicyModel(CFG), {"params": params}, tokens, pos, mask)
  cache = init_cache(CFG, 2, 8)
  # prefill 5 columns, then feed the last 3 one at a time
  m5 = jnp.concatenate([mask[:, :5], jnp.zeros((2, 3), jnp.int32)], 1)
  out, cache = apply(PolicyModel(CFG), {"params": params}, tokens[:, :5], pos[:, :5], m5, cache, 0)
  chex.assert_trees_all_close(out[0, 2:], full[0, 2:5], atol=1e-5)
  for t in range(5, 8):
    m = jnp.concatenate([mask[:, :t + 1], jnp.zeros((2, 7 - t), jnp.int32)], 1)
    step, cache = apply(PolicyModel(CFG), {"params": params}, tokens[:, t:t + 1], pos[:, t:t + 1], m,
                                         cache, t)
    chex.assert_trees_all_close(step[1, 0], full[1, t], atol=1e-5)


def test_bad_head_config():
  with pytest.raises(ValueError, match="multiple of n_kv_heads"):
    TransformerConfig(vocab_size=8, n_heads=3, n_kv_heads=2)


@pytest.mark.parametrize("jit", [False, True])
def test_chunked_response_logprobs_equal_the_full_log_softmax(jit):
  """The LM head on response positions in chunks of 2 (5 positions: one padded chunk) == NumPy's
  log-softmax / entropy of the full logits, the values, and (jitted) the log-probs' gradient."""
  from rlhfjax.models import PolicyValueModel
  from rlhfjax.models.sequence import response_token_stats
  model = PolicyValueModel(dataclasses.replace(CFG, tie_embeddings=False))
  params = init_params(model, jax.random.key(0))
  tokens, positions, mask = _inputs()
  args = (tokens[:, :3], mask[:, :3], tokens[:, 3:], mask[:, 3:].astype(jnp.float32), 0.7)
  stats = lambda p, chunk: response_token_stats(p, model, *args, values=True, chunk=chunk)  # noqa: E731
  lp, ent, values = (jax.jit(stats, static_argnums=1) if jit else stats)(params, 2)
  logits, full_values = model.apply({"params": params}, tokens, positions, mask)
  z = np.asarray(logits, np.float64)[:, 2:-1] / 0.7
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ids = np.asarray(tokens[:, 3:])
  np.testing.assert_allclose(lp, np.take_along_axis(logp, ids[..., None], -1)[..., 0], atol=1e-5)
  np.testing.assert_allclose(ent, -(np.exp(logp) * logp).sum(-1), atol=1e-5)
  np.testing.assert_allclose(values, full_values[:, 2:-1], atol=1e-6)
  if jit:  # the rematerialized chunks' gradient == the full logits' log-softmax's
    def plain(p):
      z = model.apply({"params": p}, tokens, positions, mask)[0][:, 2:-1] / 0.7
      return jnp.take_along_axis(jax.nn.log_softmax(z), ids[..., None], -1)[..., 0]
    grad = lambda f: jax.jit(jax.grad(lambda p: (f(p) * args[3]).sum()))(params)  # noqa: E731
    chex.assert_trees_all_close(grad(lambda p: stats(p, 2)[0]), grad(plain), atol=1e-5)


LINEAR_SPECS = {  # every contraction the built-in models run through `linear`: (spec, x shape, w shape)
    "q/k/v": ("BTD,DNH->BTNH", (3, 5, 8), (8, 2, 4)),
    "out": ("BTNH,NHD->BTD", (3, 5, 2, 4), (2, 4, 8)),
    "mlp in": ("BTD,DF->BTF", (3, 5, 8), (8, 16)),
    "mlp out": ("BTF,FD->BTD", (3, 5, 16), (16, 8)),
    "tied head": ("BTD,VD->BTV", (3, 5, 8), (6, 8)),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(LINEAR_SPECS))
def test_linear_matches_einsum_values_and_grads(name, dtype, jit):
  # `linear` only reorders the weight gradient's operands: values, dx and dw equal jnp.einsum's
  from rlhfjax.models.transformer import linear
  spec, xs, ws = LINEAR_SPECS[name]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=xs), dtype)
  w = jnp.asarray(rng.normal(size=ws), dtype)
  cot = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
  loss = lambda f: lambda x, w: (f(x, w).astype(jnp.float32) * cot).sum()  # noqa: E731
  ours = jax.value_and_grad(loss(lambda x, w: linear(spec, x, w)), argnums=(0, 1))
  ref = jax.value_and_grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))
  if jit:
    ours, ref = jax.jit(ours), jax.jit(ref)
  (v, (dx, dw)), (rv, (rdx, rdw)) = ours(x, w), ref(x, w)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype and dx.shape == x.shape and dw.shape == w.shape
  tol = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(v, rv, rtol=tol)
  for a, b in ((dx, rdx), (dw, rdw)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_matches_the_plain_product_values_and_grads(activation, dtype, jit):
  # `gated` only changes what the backward pass keeps: values and both gradients equal act(g) * u's
  from rlhfjax.models.transformer import gated
  act = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[activation]
  rng = np.random.default_rng(1)
  gate, up = (jnp.asarray(rng.normal(size=(3, 5, 16)) * 3, dtype) for _ in range(2))
  cot = jnp.asarray(rng.normal(size=(3, 5, 16)), dtype)
  loss = lambda f: lambda g, u: (f(g, u) * cot).astype(jnp.float32).sum()  # noqa: E731
  ours = jax.value_and_grad(loss(lambda g, u: gated(activation, g, u)), argnums=(0, 1))
  ref = jax.value_and_grad(loss(lambda g, u: act(g) * u), argnums=(0, 1))
  if jit:
    ours, ref = jax.jit(ours), jax.jit(ref)
  (v, (dg, du)), (rv, (rdg, rdu)) = ours(gate, up), ref(gate, up)
  assert dg.dtype == gate.dtype and du.dtype == up.dtype
  tol = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(v, rv, rtol=tol)
  for a, b in ((dg, rdg), (du, rdu)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_model_grads_equal_the_plain_einsum_model(monkeypatch):
  # the whole policy's parameter gradient with `linear` and `gated` equals the one with plain
  # einsums and the plain gated product (1e-5)
  import rlhfjax.models.heads as heads
  import rlhfjax.models.transformer as transformer
  cfg = dataclasses.replace(CFG, tie_embeddings=False)
  tokens, pos, mask = _inputs()
  params = init_params(PolicyModel(cfg), jax.random.key(3))
  # fresh module instances per call so the patched function is looked up at trace time
  loss = lambda p: jnp.sum(jnp.tanh(PolicyModel(cfg).apply({"params": p}, tokens, pos, mask)[0]))  # noqa: E731
  ours = jax.jit(jax.grad(loss))(params)
  plain = lambda spec, x, w: jnp.einsum(spec, x, w)  # noqa: E731
  monkeypatch.setattr(transformer, "linear", plain)
  monkeypatch.setattr(heads, "linear", plain)
  monkeypatch.setattr(transformer, "gated", lambda a, g, u: transformer.GATE_ACTIVATIONS[a](g) * u)
  ref = jax.jit(jax.grad(loss))(params)
  chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=1e-5)
