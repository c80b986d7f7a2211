"""`filter_logits` keeps the tokens transformers' `TopKLogitsWarper` then `TopPLogitsWarper` keep.

The reference is transformers' own warpers on float32 torch scores (its `generate` casts the
next-token logits to float32 before them). The one deliberate difference: a token tied with the
least likely token the nucleus keeps is kept too (transformers splits that tie by sort order).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rlhfjax.sampling import SamplingConfig, filter_logits


def _hf_keep(logits, top_k, top_p):
  """The tokens transformers keeps (finite after its warpers), on float32 scores."""
  scores = torch.tensor(np.asarray(logits, np.float32))
  if top_k:
    scores = TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1.0:
    scores = TopPLogitsWarper(top_p)(None, scores)
  return np.isfinite(scores.numpy())


def _keep(logits, top_k, top_p):
  """The tokens `filter_logits` keeps: neither filtered (the dtype's lowest value) nor -inf."""
  logits = jnp.asarray(logits)
  out = filter_logits(logits, top_k, top_p)
  assert out.dtype == logits.dtype and out.shape == logits.shape
  out = np.asarray(out.astype(jnp.float32))
  return np.isfinite(out) & (out > float(jnp.finfo(logits.dtype).min))


def _with_edge_ties(logits, hf_keep):
  """transformers' kept set plus every token tied with its least likely kept token, per row."""
  x = np.asarray(logits, np.float32)
  edge = np.min(np.where(hf_keep, x, np.inf), axis=-1, keepdims=True)
  return hf_keep | (x == edge)


@pytest.mark.parametrize("vocab", [2, 5, 8, 37, 1000])
def test_kept_set_equals_transformers_on_random_logits(vocab):
  """Random float32 logits (no ties) from flat (scale 1e-3) to very peaked (scale 100): the same
  kept set as transformers for every top_k (off, 1, 3, = vocab, > vocab) and top_p (incl. 1.0)."""
  rng = np.random.default_rng(vocab)
  scales = np.repeat([1e-3, 0.3, 1.0, 5.0, 30.0, 100.0], 16)[:, None]
  logits = (rng.normal(size=(scales.size, vocab)) * scales).astype(np.float32)
  for top_k in (0, 1, 3, vocab, vocab + 5):
    for top_p in (0.05, 0.5, 0.9, 0.99, 0.999, 1.0):
      np.testing.assert_array_equal(_keep(logits, top_k, top_p), _hf_keep(logits, top_k, top_p),
                                    err_msg=f"top_k={top_k} top_p={top_p}")


def test_top_p_near_one_sums_the_tail_first():
  """top_p=0.999 over 1000 tokens: the nucleus edge sits in the tail, whose small masses a
  descending float32 cumsum rounds away. The kept set equals transformers' (ascending cumsum) and
  the float64 one; the old descending cumsum was one token off on rows 47, 52 and 56 here."""
  logits = (np.random.default_rng(0).normal(size=(64, 1000)) * 5).astype(np.float32)
  kept = _keep(logits, 0, 0.999)
  np.testing.assert_array_equal(kept, _hf_keep(logits, 0, 0.999))
  scores = torch.tensor(logits.astype(np.float64))
  np.testing.assert_array_equal(kept, np.isfinite(TopPLogitsWarper(0.999)(None, scores).numpy()))


def test_top_p_mass_hitting_the_threshold_exactly():
  """Dyadic probabilities, exact in float32: the nucleus is the smallest set with mass >= top_p, so
  mass exactly top_p stops it (0.5 + 0.25 = 0.75 keeps two), as transformers' `cum <= 1 - top_p`."""
  logits = np.log(np.array([[0.5, 0.25, 0.125, 0.0625, 0.0625],
                            [0.0625, 0.125, 0.5, 0.0625, 0.25]], np.float32))
  for top_p, n in ((0.5, 1), (0.75, 2), (0.875, 3), (0.8, 3), (0.7, 2), (0.4, 1)):
    kept = _keep(logits, 0, top_p)
    np.testing.assert_array_equal(kept, _hf_keep(logits, 0, top_p), err_msg=f"top_p={top_p}")
    assert (kept.sum(-1) == n).all(), (top_p, kept)
  # the classic example: 0.5 + 0.2 = 0.7 < 0.8 keeps the third token too, on both sides
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  np.testing.assert_array_equal(_keep(logits, 0, 0.8), _hf_keep(logits, 0, 0.8))
  assert _keep(logits, 0, 0.8).sum() == 3


def test_top_k_ties_at_the_kth_value_are_kept_as_transformers():
  logits = np.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0], [1.0] * 6, [5.0, 5.0, 1.0, 0.0, 5.0, -1.0]],
                    np.float32)
  for top_k in (1, 2, 3, 5):
    np.testing.assert_array_equal(_keep(logits, top_k, 1.0), _hf_keep(logits, top_k, 1.0))
  np.testing.assert_array_equal(_keep(logits, 2, 1.0)[0], [1, 0, 1, 1, 1, 0])  # all three 2.0s
  assert _keep(logits, 1, 1.0)[1].all()  # a flat row keeps everything at top_k=1


def test_top_p_ties_at_the_nucleus_edge_are_all_kept():
  """The documented difference: a flat row at top_p=0.5 is 8 tokens for rlhfjax, 4 (chosen by sort
  order) for transformers; otherwise the kept set is transformers' plus the ties at its edge."""
  flat = np.zeros((1, 8), np.float32)
  assert _hf_keep(flat, 0, 0.5).sum() == 4 and _keep(flat, 0, 0.5).all()
  rng = np.random.default_rng(1)
  logits = rng.integers(-3, 3, size=(64, 12)).astype(np.float32)  # many ties
  for top_k in (0, 4):
    for top_p in (0.3, 0.6, 0.9):
      hf = _hf_keep(logits, top_k, top_p)
      np.testing.assert_array_equal(_keep(logits, top_k, top_p), _with_edge_ties(logits, hf))


def test_peaked_flat_and_minus_inf_rows():
  peaked = np.array([[200.0, 0.0, -1.0, -2.0, 1.0]], np.float32)
  assert _keep(peaked, 0, 0.999).tolist() == [[True, False, False, False, False]]
  flat = (np.arange(8, dtype=np.float32) * 1e-4)[None]
  for top_p in (0.3, 0.5, 0.99):
    np.testing.assert_array_equal(_keep(flat, 0, top_p), _hf_keep(flat, 0, top_p))
  ninf = np.array([[1.0, -np.inf, 0.5, -np.inf, -np.inf, 0.0],
                   [-np.inf, -np.inf, 2.0, -np.inf, -np.inf, -np.inf]], np.float32)
  for top_k, top_p in ((0, 1.0), (0, 0.9), (0, 0.999), (5, 1.0), (5, 0.9), (1, 1.0), (2, 0.5)):
    kept = _keep(ninf, top_k, top_p)
    np.testing.assert_array_equal(kept, _hf_keep(ninf, top_k, top_p), err_msg=f"{top_k} {top_p}")
    assert not kept[np.isneginf(ninf)].any() and kept[1, 2]  # -inf never kept; a lone token is


def test_bfloat16_logits_match_transformers_on_their_float32_values():
  """bfloat16 logits (ties common): the kept set is transformers' on the same values in float32,
  plus the ties at the nucleus edge. The old bfloat16 softmax/cumsum stalled: on such rows it kept
  a few tokens too many at top_p=0.5 and up to a third too few at 0.99 (203 of transformers' 297)."""
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(32, 1000)) * 3, jnp.bfloat16)
  as32 = np.asarray(logits.astype(jnp.float32))
  for top_k, top_p in ((0, 0.5), (0, 0.9), (0, 0.99), (50, 0.9), (10, 1.0)):
    hf = _hf_keep(as32, top_k, top_p)
    np.testing.assert_array_equal(_keep(logits, top_k, top_p), _with_edge_ties(as32, hf),
                                  err_msg=f"top_k={top_k} top_p={top_p}")


def test_config_refuses_invalid_filters():
  with pytest.raises(ValueError, match="top_k must be >= 0"):
    SamplingConfig(model=None, max_new_tokens=1, eos_id=0, top_k=-1)
  with pytest.raises(ValueError, match="top_p must be in"):
    SamplingConfig(model=None, max_new_tokens=1, eos_id=0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    SamplingConfig(model=None, max_new_tokens=1, eos_id=0, temperature=0.0)
  SamplingConfig(model=None, max_new_tokens=1, eos_id=0, temperature=0.0, greedy=True)  # ignored
