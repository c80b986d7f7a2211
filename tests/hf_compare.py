"""Logits of a transformers model and of ours on the same left-padded batch, shared by the Hugging Face
checkpoint tests (tests/test_hf_models.py, tests/test_review_hf_config_keys.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from rlhfjax.models import PolicyModel, positions_from_mask


def from_pretrained(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


def hf_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def our_logits(cfg, params, ids, mask):
  mask = jnp.asarray(mask, jnp.int32)
  logits, _ = jax.jit(PolicyModel(cfg).apply)({"params": params}, jnp.asarray(ids, jnp.int32),
                                               positions_from_mask(mask), mask)
  return np.asarray(logits)


def max_diff(a, b, mask):
  return float(np.abs(a - b)[mask > 0].max())


def left_padded_batch(vocab: int, length: int, pad_row2: int):
  """3 rows of random ids >= 3: row 0 with 4 pads on the left, row 2 with `pad_row2`. (ids, mask)."""
  rng = np.random.default_rng(1)
  ids = rng.integers(3, vocab, (3, length)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[0, :4] = 0  # left padding
  mask[2, :pad_row2] = 0
  return ids * mask, mask


def fast_settings():
  """A module fixture's body (test time only): XLA without most optimizations compiles these tiny
  programs faster, and one torch thread avoids torch's thread pool fighting XLA's for the cores (50x
  slower transformers calls)."""
  old_opt, old_threads = jax.config.read("jax_disable_most_optimizations"), torch.get_num_threads()
  jax.config.update("jax_disable_most_optimizations", True)
  torch.set_num_threads(1)
  yield
  jax.config.update("jax_disable_most_optimizations", old_opt)
  torch.set_num_threads(old_threads)


def randomize(model):
  """Random weights everywhere (HF inits biases at 0 and norms at 1 / 0, which would hide mapping bugs).
  Tied heads get a small embedding, or greedy decoding just repeats the last token."""
  g = torch.Generator().manual_seed(0)
  tied = model.config.tie_word_embeddings
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)  # Gemma: scale 1 + w ~ 2
      elif "bias" in name:
        p.copy_(0.3 * noise)
      elif "embed_tokens" in name or "lm_head" in name:
        p.copy_((0.1 if tied else 0.5) * noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))
  return model
