"""Packed rows (`rl.pack`): the plan places every token once, and the forwards, the experience and
the update over packed rows equal the padded ones (1e-5, float32), on one device and on 8."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import PolicyModel, TransformerConfig, init_params
from rlhfjax.models.heads import PolicyValueModel, ValueModel
from rlhfjax.models.sequence import pack_plan, response_token_stats, response_values
from rlhfjax.parallel import create_mesh
from rlhfjax.train.rl import AlgoConfig

CFG = TransformerConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=64, max_len=64)


def _batch(b=8, p=6, n=20, seed=0):
  rng = np.random.default_rng(seed)
  pl, rl = rng.integers(1, p + 1, b), rng.integers(0, 6, b)
  rl[0] = n  # one full-budget response: the others are short and pack around it
  pm = (np.arange(p)[None] >= p - pl[:, None]).astype(np.int32)
  rm = (np.arange(n)[None] < rl[:, None]).astype(np.float32)
  return (rng.integers(4, 37, (b, p)) * pm).astype(np.int32), pm, (
      rng.integers(4, 37, (b, n)) * rm).astype(np.int32), rm


def test_pack_plan_places_every_token_once():
  pid, pm, rid, rm = _batch()
  rm[1], rid[1] = 0, 0  # a row without a response
  plan = pack_plan(pm, rm, rows_multiple=2)
  b, t = pm.shape[0], pm.shape[1] + rm.shape[1]
  src = plan.src[plan.src >= 0]
  # each real token in exactly one slot, but a response's last (it predicts nothing) and the
  # prompts of rows without a response (nothing to predict)
  rl = rm.sum(1).astype(int)
  kept = np.concatenate([pm, rm], 1) * (rl > 0)[:, None]
  kept[np.arange(b)[rl > 0], pm.shape[1] + rl[rl > 0] - 1] = 0
  assert (rl == 0).any() and kept.sum() == (pm.sum(1) + rl - 1)[rl > 0].sum()
  np.testing.assert_array_equal(np.sort(src), np.flatnonzero(kept.reshape(-1)))
  assert plan.src.shape[1] == t and plan.src.shape[0] % 2 == 0 and plan.src.shape[0] < b
  # dst[b, i] is the slot of the token just before response token i of row b
  flat = plan.src.reshape(-1)
  for row in range(b):
    for i in range(int(rm[row].sum())):
      assert flat[plan.dst[row, i]] == row * t + pm.shape[1] - 1 + i
  assert (plan.dst[rm == 0] == -1).all()
  with pytest.raises(ValueError, match="left-padded"):
    pack_plan(pm[:, ::-1], rm)


def _plan(kind):
  """(prompt ids, prompt mask, response ids, response mask, Packing) of a batch, packed (`pack_plan`)
  or with shared prompts (`share_lengths`, groups of 4)."""
  from rlhfjax.models.sequence import share_lengths
  if kind == "pack":
    pid, pm, rid, rm = _batch()
    return pid, pm, rid, rm, jax.tree.map(jnp.asarray, pack_plan(pm, rm))
  pid, pm, rid, rm = _grouped()
  return pid, pm, rid, rm, jax.tree.map(jnp.asarray, share_lengths(pm.sum(1), rm.sum(1), 6, 12, 4))


@pytest.mark.parametrize("kind,model,cfg", [("pack", PolicyModel, "CFG"), ("pack", PolicyValueModel, "CFG"),
                                            ("share", PolicyModel, "CFG"), ("share", PolicyValueModel, "CFG"),
                                            ("share", PolicyModel, "LOCAL")])
def test_packed_token_stats_equal_padded(kind, model, cfg):
  """Log-probs, entropy (and an actor-critic's values) and their gradients over packed or
  shared-prompt rows equal the padded forward's (1e-5), jitted; a sliding window counts positions,
  not slots."""
  pid, pm, rid, rm, packing = _plan(kind)
  m = model(globals()[cfg])
  params = init_params(m, jax.random.key(0))
  values = model is PolicyValueModel
  f = lambda p, pk: response_token_stats(p, m, pid, pm, rid, rm, 0.7, values=values,  # noqa: E731
                                         packing=pk)
  for padded, packed in zip(f(params, None), jax.jit(f)(params, packing)):
    if padded is not None:
      np.testing.assert_allclose(packed * rm, padded * rm, atol=1e-5)
  loss = lambda p, pk: (f(p, pk)[0] * rm).sum()  # noqa: E731
  chex.assert_trees_all_close(jax.jit(jax.grad(loss))(params, packing), jax.grad(loss)(params, None),
                              atol=1e-5)


def test_packed_values_equal_padded():
  pid, pm, rid, rm = _batch(seed=1)
  packing = jax.tree.map(jnp.asarray, pack_plan(pm, rm))
  vm = ValueModel(CFG)
  params = jax.tree.map(lambda x: x + 0.1, init_params(vm, jax.random.key(1)))  # a non-zero head
  padded = response_values(params, vm, pid, pm, rid, rm)
  np.testing.assert_allclose(response_values(params, vm, pid, pm, rid, rm, packing) * rm, padded * rm,
                             atol=1e-5)
  assert np.abs(padded * rm).max() > 0.1


@pytest.mark.parametrize("model", [PolicyModel, PolicyValueModel, ValueModel])
def test_padded_forward_without_the_last_token_equals_the_whole_sequence(model):
  """The padded forwards run over the prompt and the response but its last token: log-probs,
  entropy, values and their gradients equal a forward over the whole sequence read at the columns
  predicting each response token (1e-5; jitted)."""
  from rlhfjax.models.sequence import concat_prompt_response, logits_of, token_logprobs
  pid, pm, rid, rm = _batch(seed=2)
  m = model(CFG)
  params = jax.tree.map(lambda x: x + 0.05, init_params(m, jax.random.key(3)))  # a non-zero value head
  p, n = pid.shape[1], rid.shape[1]

  def whole(params):  # as before: every column, then the ones predicting response tokens
    tokens, mask, positions = concat_prompt_response(pid, pm, rid, rm)
    out = m.apply({"params": params}, tokens, positions, mask)
    if model is ValueModel:
      return (out[:, p - 1:-1],)
    lp = token_logprobs(logits_of(out)[:, p - 1:-1].astype(jnp.float32) / 0.7, rid)
    return (lp, out[1][:, p - 1:-1]) if model is PolicyValueModel else (lp,)

  def now(params):
    if model is ValueModel:
      return (response_values(params, m, pid, pm, rid, rm),)
    lp, _, v = response_token_stats(params, m, pid, pm, rid, rm, 0.7, entropy=False,
                                    values=model is PolicyValueModel)
    return (lp, v) if model is PolicyValueModel else (lp,)

  for a, b in zip(jax.jit(now)(params), whole(params)):
    assert a.shape == (pid.shape[0], n)
    np.testing.assert_allclose(a * rm, b * rm, atol=1e-5)
  loss = lambda f: lambda params: sum((x * rm).sum() for x in f(params))  # noqa: E731
  chex.assert_trees_all_close(jax.jit(jax.grad(loss(now)))(params), jax.grad(loss(whole))(params),
                              atol=1e-5)


def test_pack_needs_a_builtin_model():
  """A user's module may not read segment ids from the mask: packing it is refused."""
  pid, pm, rid, rm = _batch()
  packing = jax.tree.map(jnp.asarray, pack_plan(pm, rm))
  with pytest.raises(ValueError, match="built-in"):
    response_values({}, object(), pid, pm, rid, rm, packing)
  with pytest.raises(ValueError, match="built-in"):
    response_token_stats({}, object(), pid, pm, rid, rm, packing=packing)


@pytest.mark.parametrize("kw", [dict(algo="grpo"), dict(algo="ppo"), dict(algo="ppo", shared_trunk=True)])
def test_packed_update_equals_padded(kw, rl_loop):
  """Two iterations of experience + update (2 epochs over one minibatch of 16): packed rows on a
  2x2x2 mesh give the padded single-device run's parameters and metrics."""
  base = dict(group_size=4, minibatch_size=16, epochs=2, **kw)
  padded, mp = rl_loop(AlgoConfig(**base), create_mesh((1, 1, 1), jax.devices()[:1]))
  packed, mk = rl_loop(AlgoConfig(pack=True, **base), create_mesh((2, 2, 2)))
  chex.assert_trees_all_close(padded.policy.params, packed.policy.params, atol=1e-5)
  if padded.value is not None:
    chex.assert_trees_all_close(padded.value.params, packed.value.params, atol=1e-5)
  cont = lambda ms: [{k: v for k, v in m.items() if "clipfrac" not in k} for m in ms]  # noqa: E731
  chex.assert_trees_all_close(cont(mp), cont(mk), atol=1e-4, rtol=1e-4)


def test_pack_config_errors():
  with pytest.raises(ValueError, match="microbatch"):
    AlgoConfig(pack=True, microbatch_size=2)


@pytest.mark.parametrize("packing", ["pack", "share_prompt"])
def test_rl_stage_packed_equals_padded(tmp_path, packing):
  """The `rl` stage with `rl.pack` or `rl.share_prompt` on (one minibatch of the whole rollout):
  from the same SFT checkpoint, the same samples and the same losses, KL and rewards as without."""
  import json
  import shutil

  from rlhfjax.train.pipeline import train_and_evaluate
  from tests.test_rl_stage import _tiny_rl_config
  c = _tiny_rl_config()
  c.stages = "sft"
  train_and_evaluate(c, str(tmp_path / "padded"))
  shutil.copytree(tmp_path / "padded", tmp_path / "packed")
  c.stages = "rl"
  rows = {}
  for name, on in (("padded", False), ("packed", True)):
    c.rl[packing] = on
    train_and_evaluate(c, str(tmp_path / name))
    rows[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    rows[name] = [r for r in rows[name] if r["stage"] == "rl"]
  assert len(rows["packed"]) == 2
  for a, b in zip(rows["padded"], rows["packed"]):
    for key in ("reward_mean", "policy_loss", "kl_seq_mean", "entropy", "response_length"):
      np.testing.assert_allclose(b[key], a[key], atol=1e-4, rtol=1e-4, err_msg=key)
  c.rl.minibatch_size = 4
  with pytest.raises(ValueError, match="one minibatch"):
    train_and_evaluate(c, str(tmp_path / "packed"))


# --- shared prompts (`rl.share_prompt`): one row per group, its prompt once ---------------------

def _grouped(groups=3, group=4, p=6, n=12, seed=3):
  """`_batch`'s arrays with each prompt repeated over `group` consecutive rows."""
  pid, pm, rid, rm = _batch(b=groups * group, p=p, n=n, seed=seed)
  return np.repeat(pid[::group], group, 0), np.repeat(pm[::group], group, 0), rid, rm


def test_share_plan_puts_each_prompt_once():
  from rlhfjax.models.sequence import share_lengths
  from rlhfjax.models.transformer import SEGMENT_GROUP
  pid, pm, rid, rm = _grouped()
  (b, p), n, g = pm.shape, rm.shape[1], 4
  pl, rl = pm.sum(1), rm.sum(1).astype(int)
  plan = share_lengths(pl, rl, p, n, g, rows_multiple=2)
  assert plan.src.shape[0] == 4  # 3 groups, rounded up to the 2 batch shards: one empty row
  assert (plan.src[3] == -1).all() and (plan.segments[3] == 0).all()
  t, flat = p + n, plan.src.reshape(-1)
  for k in range(3):
    row, seg = plan.src[k], plan.segments[k]
    prompt = row[seg == (k + 1) * SEGMENT_GROUP]
    np.testing.assert_array_equal(prompt, k * g * t + p - pl[k * g] + np.arange(pl[k * g] - 1))
    for j in range(g):  # response j: its row's last prompt token, then its tokens but the last
      i = k * g + j
      np.testing.assert_array_equal(row[seg == (k + 1) * SEGMENT_GROUP + j + 1], i * t + p - 1 + np.arange(rl[i]))
      np.testing.assert_array_equal(flat[plan.dst[i, :rl[i]]], i * t + p - 1 + np.arange(rl[i]))
  assert (plan.dst[rm == 0] == -1).all()
  assert (plan.src >= 0).sum() == (pl[::g] - 1).sum() + rl.sum()  # < the padded b x (p + n)
  with pytest.raises(ValueError, match="whole groups"):
    share_lengths(pl[:-1], rl[:-1], p, n, g)


LOCAL = TransformerConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                          d_ff=64, max_len=64, layer_types=("local", "global"), sliding_window=3)


def test_shared_prompt_values_equal_padded():
  from rlhfjax.models.sequence import share_lengths
  pid, pm, rid, rm = _grouped(seed=4)
  packing = jax.tree.map(jnp.asarray, share_lengths(pm.sum(1), rm.sum(1), 6, 12, 4))
  vm = ValueModel(CFG)
  params = jax.tree.map(lambda x: x + 0.1, init_params(vm, jax.random.key(1)))
  padded = response_values(params, vm, pid, pm, rid, rm)
  np.testing.assert_allclose(response_values(params, vm, pid, pm, rid, rm, packing) * rm, padded * rm,
                             atol=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_shared_prompt_update_equals_padded(algo, rl_loop):
  """Two iterations of experience + update (2 epochs over one minibatch of 16, groups of 4): shared
  prompts on a 2x2x2 mesh give the padded single-device run's parameters and metrics."""
  import functools
  from tests.conftest import _random_rollout
  base = dict(algo=algo, group_size=4, minibatch_size=16, epochs=2)
  grouped = functools.partial(_random_rollout, group=4)
  padded, mp = rl_loop(AlgoConfig(**base), create_mesh((1, 1, 1), jax.devices()[:1]), rollout_fn=grouped)
  shared, ms = rl_loop(AlgoConfig(share_prompt=True, **base), create_mesh((2, 2, 2)), rollout_fn=grouped)
  chex.assert_trees_all_close(padded.policy.params, shared.policy.params, atol=1e-5)
  cont = lambda ms: [{k: v for k, v in m.items() if "clipfrac" not in k} for m in ms]  # noqa: E731
  chex.assert_trees_all_close(cont(mp), cont(ms), atol=1e-4, rtol=1e-4)


def test_shared_prompt_errors(rl_loop):
  with pytest.raises(ValueError, match="two packings"):
    AlgoConfig(pack=True, share_prompt=True)
  with pytest.raises(ValueError, match="group_size"):
    AlgoConfig(algo="ppo", group_size=1, share_prompt=True)
  with pytest.raises(ValueError, match="microbatch"):
    AlgoConfig(share_prompt=True, microbatch_size=2)
  # rows of one group with different prompts: refused, not silently mixed
  with pytest.raises(ValueError, match="share one prompt"):
    rl_loop(AlgoConfig(group_size=4, minibatch_size=16, share_prompt=True), create_mesh((1, 1, 1), jax.devices()[:1]))


@pytest.mark.parametrize("cfg", [CFG, LOCAL])
def test_dot_product_attention_equals_einsum(cfg):
  """`attention="dot_product"` (`jax.nn.dot_product_attention`) gives the einsum path's log-probs and
  gradients (1e-5) on padded rows, packed rows and shared-prompt rows, jitted and not."""
  import dataclasses

  from rlhfjax.models.sequence import share_lengths
  pid, pm, rid, rm = _grouped()
  plans = [None, pack_plan(pm, rm), share_lengths(pm.sum(1), rm.sum(1), 6, 12, 4)]
  params = init_params(PolicyModel(cfg), jax.random.key(2))
  dpa = dataclasses.replace(cfg, attention="dot_product")
  f = lambda c, p, pk: (response_token_stats(p, c, pid, pm, rid, rm, entropy=False,  # noqa: E731
                                             packing=pk)[0] * rm).sum()
  for plan in plans:
    pk = None if plan is None else jax.tree.map(jnp.asarray, plan)
    want = jax.value_and_grad(f, argnums=1)(cfg, params, pk)
    got = jax.jit(jax.value_and_grad(f, argnums=1), static_argnums=0)(dpa, params, pk)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="attention must be"):
    dataclasses.replace(cfg, attention="flash")


@pytest.mark.parametrize("t, want", [(18, ["cudnn", "xla"]), (17, ["xla"]), (18.5, ["xla"])])
def test_dot_product_attention_asks_cudnn_on_gpu_only_where_it_takes_the_shapes(monkeypatch, t, want):
  """On GPU in bf16 `dot_product_attention` asks cuDNN first (here it refuses: no cuDNN on the CPU)
  and falls back to XLA's kernel; odd lengths (cuDNN's masked backward refuses them only when
  differentiated) and float32 (18.5: t=18 in f32) go to XLA directly. The result is XLA's."""
  from rlhfjax.models.transformer import dot_product_attention
  asked, orig = [], jax.nn.dot_product_attention

  def spy(*a, implementation=None, **kw):
    asked.append(implementation)
    return orig(*a, implementation=implementation, **kw)

  dt = jnp.float32 if t == 18.5 else jnp.bfloat16
  t = int(t)
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (2, t, n, 8), dt) for key, n in zip(ks, (4, 2, 2)))
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None].repeat(2, 0)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  got = jax.jit(dot_product_attention, static_argnums=4)(q, k, v, mask, 0.5)
  assert asked == want
  np.testing.assert_array_equal(got, orig(q, k, v, mask=mask, scale=0.5, implementation="xla"))


@pytest.mark.parametrize("chunk", [4, 16])
def test_banded_attention_equals_a_dense_numpy_reference(chunk):
  """`banded_attention` over a shared-prompt row layout (a 5-slot prompt, then responses of at most
  12 slots, padding at the end) equals a dense masked softmax attention in NumPy (1e-5)."""
  from rlhfjax.models.transformer import SEGMENT_GROUP, banded_attention
  rng = np.random.default_rng(0)
  b, t, k, g, h, prefix, window = 2, 50, 2, 2, 8, 5, 11
  seg = np.zeros((b, t), np.int32)
  for r, (lead, lengths) in enumerate([(5, [12, 3, 7, 12]), (2, [9, 12, 1, 5])]):  # prompt slots, responses
    tag = (r + 1) * SEGMENT_GROUP
    seg[r, :lead], o = tag, lead
    for j, n in enumerate(lengths):
      seg[r, o:o + n], o = tag + j + 1, o + n
  q, keys, values = (rng.normal(size=s).astype(np.float32) for s in ((b, t, k, g, h), (b, t, k, h), (b, t, k, h)))

  def allowed(qs, ks):  # [M, Q], [M, S] slots -> [B, M, Q, S], as the built-in attention: causal,
    # a query's own segment or its group's prompt
    sq, sk = seg[:, np.maximum(qs, 0)][..., None], seg[:, np.maximum(ks, 0)][:, :, None, :]
    return (((ks[:, None] <= qs[..., None]) & (ks >= 0)[:, None] & (qs >= 0)[..., None])[None] & (sk > 0)
            & ((sk == sq) | (sq == 0) | (sk == sq // SEGMENT_GROUP * SEGMENT_GROUP)))

  ok = allowed(np.arange(t)[None], np.arange(t)[None])[:, 0]  # [B, T, S]
  scores = np.einsum("btkgh,bskh->bkgts", q, keys) / np.sqrt(h)
  scores = np.where(ok[:, None, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True))
  want = np.einsum("bkgts,bskh->btkgh", probs, values)
  real = seg > 0
  got = banded_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                         lambda qs, ks: jnp.asarray(allowed(qs, ks)), prefix, window, h ** -0.5,
                         chunk=chunk)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, LOCAL])
def test_shared_prompt_band_equals_padded(cfg, monkeypatch):
  """Under `attention_band` (as `rl.share_prompt` runs its forwards) shared-prompt rows' log-probs,
  values and gradients equal the padded forward's (1e-5, jitted), and the banded path ran."""
  import rlhfjax.models.transformer as transformer
  from rlhfjax.models.sequence import share_lengths
  from rlhfjax.models.transformer import attention_band
  calls = []
  banded = transformer.banded_attention
  monkeypatch.setattr(transformer, "banded_attention", lambda *a, **k: calls.append(1) or banded(*a, **k))
  pid, pm, rid, rm = _grouped(seed=5)
  rm[:4], rid[:4] = 1.0, np.arange(4 * 12).reshape(4, 12) % 30 + 4  # group 0: four 12-token responses
  packing = jax.tree.map(jnp.asarray, share_lengths(pm.sum(1), rm.sum(1), 6, 12, 4))
  assert packing.src.shape[1] > 5 + 11 + 16  # wide enough for the band
  m = PolicyValueModel(cfg)
  params = jax.tree.map(lambda x: x + 0.05, init_params(m, jax.random.key(6)))

  def f(p, pk):
    lp, ent, v = response_token_stats(p, m, pid, pm, rid, rm, 0.7, values=True, packing=pk)
    return (lp * rm, ent * rm, v * rm)

  def banded_f(p):
    with attention_band(pid.shape[1] - 1, rid.shape[1] - 1):
      return f(p, packing)

  for a, b in zip(jax.jit(banded_f)(params), f(params, None)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert calls
  loss = lambda fn: lambda p: sum(x.sum() for x in fn(p))  # noqa: E731
  chex.assert_trees_all_close(jax.jit(jax.grad(loss(banded_f)))(params),
                              jax.grad(loss(lambda p: f(p, None)))(params), atol=1e-5)
