"""Sampler: cached decode log-probs equal a full no-cache forward; stopping; truncation filters."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.models import PolicyModel, TransformerConfig, init_params
from rlhfjax.models.sequence import response_logprobs
from rlhfjax.models.transformer import stack_layers
from rlhfjax.sampling import SamplingConfig, filter_logits, generate
from rlhfjax.models.sequence import bucket_width, width_buckets
from rlhfjax.sampling.sampler import cache_widths

CFG = TransformerConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=64, max_len=32)
EOS = 3


def _prompts():
  ids = np.array([[0, 0, 5, 6, 7], [4, 9, 10, 11, 12], [0, 0, 0, 0, 8]], np.int32)
  return jnp.asarray(ids), jnp.asarray((ids != 0).astype(np.int32))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_logprobs_match_full_forward(temperature, top_k, top_p):
  params = init_params(PolicyModel(CFG), jax.random.key(0))
  ids, mask = _prompts()
  cfg = SamplingConfig(model=CFG, max_new_tokens=12, eos_id=EOS, temperature=temperature,
                       top_k=top_k, top_p=top_p)
  out = generate(params, ids, mask, jax.random.key(1), cfg)
  full = response_logprobs(params, CFG, ids, mask, out.tokens, out.mask, temperature)
  chex.assert_trees_all_close(out.logprobs, full, atol=1e-5)
  assert float(out.mask.sum()) > 3
  # mask is 1 up to and including the first EOS and 0 after it
  for row_tok, row_mask in zip(np.asarray(out.tokens), np.asarray(out.mask)):
    n = int(row_mask.sum())
    assert (row_mask[:n] == 1).all() and (row_mask[n:] == 0).all()
    assert EOS not in row_tok[: n - 1]


@pytest.mark.parametrize("n", [1, 2, 9])
def test_samples_equal_a_plain_loop(n):
  """The sampled tokens and log-probs equal a plain loop's: a whole no-cache forward per token, the
  key split once per token, rows padded after their EOS. The sampler runs no forward after the last
  token (it picks that one after its decode loop): one that dropped or repeated a pick, or drew from
  another key, differs."""
  params = init_params(PolicyModel(CFG), jax.random.key(0))
  ids, mask = _prompts()
  out = generate(params, ids, mask, jax.random.key(3), SamplingConfig(model=CFG, max_new_tokens=n,
                                                                      eos_id=EOS))
  model, rng = PolicyModel(CFG), jax.random.key(3)
  tokens, live = np.zeros((3, 0), np.int32), np.ones(3, bool)
  logps, masks = [], []
  for _ in range(n):
    seq = jnp.concatenate([ids, jnp.asarray(tokens)], 1)
    seq_mask = jnp.concatenate([mask, jnp.asarray(np.asarray(masks, np.int32).T.reshape(3, -1))], 1)
    positions = jnp.maximum(jnp.cumsum(seq_mask, 1) - 1, 0)
    logits = model.apply({"params": params}, seq, positions, seq_mask)[0][:, -1]
    rng, sub = jax.random.split(rng)
    tok = np.asarray(jax.random.categorical(sub, logits, axis=-1))
    lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tok[:, None], 1)[:, 0]
    tok = np.where(live, tok, 0)
    logps.append(np.where(live, lp, 0.0))
    masks.append(live.astype(np.int32))
    tokens = np.concatenate([tokens, tok[:, None]], 1)
    live = live & (tok != EOS)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.mask, np.asarray(masks).T)
  np.testing.assert_allclose(out.logprobs, np.asarray(logps).T, atol=1e-5)


def test_growing_cache_matches_one_cache():
  """A 40-token budget decodes through caches of 16, 32 and 39 response slots: the same tokens and
  log-probs (1e-5) as one 39-slot cache, and the log-probs of a full no-cache forward; some rows
  stop early (EOS), the rest run through every stage."""
  cfg_model = dataclasses.replace(CFG, max_len=48)
  params = init_params(PolicyModel(cfg_model), jax.random.key(4))
  ids, mask = _prompts()
  assert cache_widths(39) == [16, 32, 39]  # no forward after the 40th token: 39 slots
  outs = [generate(params, ids, mask, jax.random.key(5),
                   SamplingConfig(model=cfg_model, max_new_tokens=40, eos_id=EOS, grow_cache=grow))
          for grow in (True, False)]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_array_equal(outs[0].mask, outs[1].mask)
  chex.assert_trees_all_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
  full = response_logprobs(params, cfg_model, ids, mask, outs[0].tokens, outs[0].mask, 1.0)
  chex.assert_trees_all_close(outs[0].logprobs, full, atol=1e-5)
  assert int(outs[0].lengths.max()) > 32  # the last stage ran


def test_prompt_groups_prefill_once_with_the_same_samples():
  """Three prompts x 4 samples, contiguous groups: prefilling each group's first row and copying
  its cache gives the same tokens, mask and log-probs (1e-5) as prefilling all 12 rows, on one
  cache and on a growing one; the log-probs still match a full no-cache forward. A batch that is
  not whole groups, or a group size below 1, is refused in one line."""
  cfg_model = dataclasses.replace(CFG, max_len=48)
  params = init_params(PolicyModel(cfg_model), jax.random.key(6))
  ids, mask = (jnp.repeat(a, 4, axis=0) for a in _prompts())
  for grow in (True, False):
    outs = [generate(params, ids, mask, jax.random.key(7),
                     SamplingConfig(model=cfg_model, max_new_tokens=40, eos_id=EOS, grow_cache=grow,
                                    prompt_group=g)) for g in (1, 4)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].mask, outs[1].mask)
    chex.assert_trees_all_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
    assert len({tuple(r) for r in np.asarray(outs[1].tokens)}) > 3  # the group's rows differ
    full = response_logprobs(params, cfg_model, ids, mask, outs[1].tokens, outs[1].mask, 1.0)
    chex.assert_trees_all_close(outs[1].logprobs, full, atol=1e-5)
  with pytest.raises(ValueError, match="batch 12 is not a whole number of prompt groups of 5"):
    generate(params, ids, mask, jax.random.key(7),
             SamplingConfig(model=cfg_model, max_new_tokens=4, eos_id=EOS, prompt_group=5))
  with pytest.raises(ValueError, match="prompt_group must be >= 1, got 0"):
    SamplingConfig(model=cfg_model, max_new_tokens=4, eos_id=EOS, prompt_group=0)


def test_prefill_group_falls_back_where_groups_do_not_split_over_the_batch_shards():
  from rlhfjax.parallel import axes, create_mesh
  from rlhfjax.sampling.sampler import prefill_group
  cfg = lambda layout: SamplingConfig(model=CFG, max_new_tokens=4, eos_id=EOS, prompt_group=4,  # noqa: E731
                                      layout=layout)
  mesh = (create_mesh((8, 1, 1)), axes.DEFAULT_RULES)
  assert [prefill_group(b, cfg(mesh)) for b in (32, 12)] == [4, 1]  # 8 groups split over 8; 3 do not
  assert prefill_group(12, cfg(None)) == 4


def test_width_buckets():
  assert width_buckets(256) == [16, 24, 32, 48, 64, 96, 128, 192, 256]
  assert width_buckets(40) == [16, 24, 32, 40] and width_buckets(8) == [8]
  assert cache_widths(256) == [16, 32, 64, 128, 256]
  assert [bucket_width(k, 256) for k in (1, 16, 17, 25, 74, 200)] == [16, 16, 24, 32, 96, 256]


def test_greedy_is_argmax_and_stops_at_eos():
  params = init_params(PolicyModel(CFG), jax.random.key(2))
  ids, mask = _prompts()
  cfg = SamplingConfig(model=CFG, max_new_tokens=6, eos_id=EOS, greedy=True)
  out = generate(params, ids, mask, jax.random.key(0), cfg)
  # step-by-step argmax with a full forward pass each time
  seq_ids, seq_mask = np.asarray(ids), np.asarray(mask)
  apply = jax.jit(PolicyModel(CFG).apply)
  for i in range(6):
    pos = np.maximum(np.cumsum(seq_mask, 1) - 1, 0)
    logits, _ = apply({"params": params}, seq_ids, pos, seq_mask)
    nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
    live = np.asarray(out.mask[:, i]) > 0
    np.testing.assert_array_equal(np.asarray(out.tokens[:, i])[live], nxt[live])
    seq_ids = np.concatenate([seq_ids, np.where(live, nxt, 0)[:, None]], 1)
    seq_mask = np.concatenate([seq_mask, live[:, None].astype(np.int32)], 1)


def test_eos_stops_each_row():
  params = init_params(PolicyModel(CFG), jax.random.key(2))
  ids, mask = _prompts()
  free = generate(params, ids, mask, jax.random.key(0),
                  SamplingConfig(model=CFG, max_new_tokens=8, eos_id=CFG.vocab_size - 1, greedy=True))
  eos = int(free.tokens[0, 2])  # declare row 0's third greedy token to be EOS
  out = generate(params, ids, mask, jax.random.key(0),
                 SamplingConfig(model=CFG, max_new_tokens=8, eos_id=eos, greedy=True))
  for row in range(3):
    toks = list(np.asarray(free.tokens[row]))
    expect = toks.index(eos) + 1 if eos in toks else 8
    assert int(out.lengths[row]) == expect
    assert bool(out.finished[row]) == (eos in toks)
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :expect]), toks[:expect])
    np.testing.assert_array_equal(np.asarray(out.tokens[row, expect:]), 0)
  assert int(out.lengths[0]) <= 3


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  k2 = np.asarray(filter_logits(logits, 2, 1.0))
  assert np.isfinite(k2[0, :2]).all() and (k2[0, 2:] < -1e30).all()
  p = np.asarray(filter_logits(logits, 0, 0.8))  # 0.5 + 0.2 = 0.7 < 0.8 -> keep third too
  assert (p[0, :3] > -1e30).all() and (p[0, 3:] < -1e30).all()


def test_overlong_prompt_errors():
  params = init_params(PolicyModel(CFG), jax.random.key(0))
  ids = jnp.ones((1, 30), jnp.int32)
  with pytest.raises(ValueError, match="exceeds the model's max_len"):
    generate(params, ids, jnp.ones_like(ids), jax.random.key(0),
             SamplingConfig(model=CFG, max_new_tokens=8, eos_id=EOS))


def test_decode_params_match_stacked():
  """The sampler's per-layer parameter layout (`PolicyModel.decode_params`) gives the cached forward
  the same logits and cache as the scan's stacked parameters, jitted and not, and so does the
  no-cache forward (the layers one by one); `stack_layers` undoes it exactly."""
  model = PolicyModel(CFG)
  params = init_params(model, jax.random.key(6))
  per_layer = model.decode_params(params)
  assert len(per_layer["trunk"]["layers"]["unstacked"]) == CFG.n_layers
  ids, mask = _prompts()
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  key_mask = jnp.concatenate([mask, jnp.zeros((3, 4), jnp.int32)], 1)

  def run(p):
    return model.apply({"params": p}, ids, pos, key_mask, model.init_cache(3, 9), 0)

  def no_cache(p):
    return model.apply({"params": p}, ids, pos, mask)

  for f in (run, jax.jit(run), no_cache, jax.jit(no_cache)):
    chex.assert_trees_all_close(f(per_layer), f(params), atol=1e-6)
  chex.assert_trees_all_equal(stack_layers(per_layer["trunk"]), params["trunk"])
