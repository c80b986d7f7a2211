"""Deterministic, resumable, host-sharded batch iteration and the SFT / RL collate functions.

Batch layout (all NumPy, built with one vectorized scatter per field, never row by row):

    prompt_ids     int32 [B, P]    left-padded:  pad … pad bos q1 q2 … qn
    response_ids   int32 [B, R]    right-padded: r1 r2 … rm eos pad … pad
    tokens         int32 [B, P+R]  concatenation of the two
    mask           int32 [B, P+R]  1 on real tokens (prompt and response, incl. bos and eos)
    loss_mask    float32 [B, P+R]  1 on response tokens incl. eos: the SFT next-token targets
                                   (the logit at position t-1 predicts tokens[:, t])
    positions      int32 [B, P+R]  cumsum(mask) - 1 clipped at 0 — explicit because prompts are
                                   left-padded, so the first real token gets position 0
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from rlhfjax.tokenizer import Tokenizer


class DataIterator:
  """Epoch-shuffled batches over a random-access dataset, resumable exactly from `get_state()`.

  Epoch `e`'s order is a permutation seeded by (seed, e) of which host `i` of `n` takes positions
  i, i+n, … (the last `len % n` dropped): disjoint shards, hosts in lockstep. The state `{"epoch",
  "index"}` (taken after a step's batches) makes `set_state` continue with exactly the next batch.

  `batch_size` is per host; `process_index` / `process_count` default to JAX's; `collate` turns a
  list of examples into a batch (default: the list); `num_epochs=None` iterates forever;
  `drop_remainder` drops an epoch's short last batch (static shapes under jit).
  """

  def __init__(self, examples: Sequence[Any], batch_size: int, *, seed: int, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int | None = None,
               process_count: int | None = None, collate: Callable[[list[Any]], Any] | None = None,
               num_epochs: int | None = None):
    if process_index is None or process_count is None:
      import jax  # only needed for multi-host defaults
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(examples)
    if n == 0:
      raise ValueError("DataIterator got an empty dataset; check the data path / split")
    self._shard_len = n // process_count
    if self._shard_len == 0 or (drop_remainder and self._shard_len < batch_size):
      raise ValueError(
          f"dataset of {n} examples gives {self._shard_len} per host over {process_count} host(s), "
          f"fewer than batch_size={batch_size}; use more data or a smaller batch")
    self._examples = examples
    self._n = n
    self.batch_size = batch_size
    self._seed = seed
    self._shuffle = shuffle
    self._drop_remainder = drop_remainder
    self._process_index = process_index
    self._process_count = process_count
    self._collate = collate
    self._num_epochs = num_epochs
    self._epoch = 0
    self._index = 0
    self._order_epoch = -1
    self._order = None

  def reseeded(self, seed: int) -> "DataIterator":
    """The same iterator (examples, batch, host shard, collate) with another shuffle `seed`, at
    the start of its first epoch."""
    out = copy.copy(self)
    out._seed, out._epoch, out._index, out._order_epoch, out._order = seed, 0, 0, -1, None
    return out

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def steps_per_epoch(self) -> int:
    full, rest = divmod(self._shard_len, self.batch_size)
    return full + (0 if self._drop_remainder or rest == 0 else 1)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """This host's example indices for `epoch`, in reading order."""
    if self._order_epoch != epoch:
      if self._shuffle:
        perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      else:
        perm = np.arange(self._n)
      stop = self._shard_len * self._process_count
      self._order = perm[self._process_index:stop:self._process_count]
      self._order_epoch = epoch
    return self._order

  def get_state(self) -> dict:
    """JSON-serializable position of the next batch."""
    return {"epoch": int(self._epoch), "index": int(self._index)}

  def set_state(self, state: dict) -> None:
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= self._shard_len:
      raise ValueError(f"bad data iterator state {state}; this host's shard has {self._shard_len} examples")
    self._epoch, self._index = epoch, index

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    remaining = self._shard_len - self._index
    if remaining <= 0 or (self._drop_remainder and remaining < self.batch_size):
      self._epoch += 1
      self._index = 0
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    order = self.epoch_order(self._epoch)
    idx = order[self._index:self._index + self.batch_size]
    self._index += len(idx)
    getitems = getattr(self._examples, "__getitems__", None)
    batch = getitems(idx.tolist()) if getitems else [self._examples[int(i)] for i in idx]
    return self._collate(batch) if self._collate else list(batch)


def _response_text(ex: dict) -> str:
  if "response" in ex:
    return ex["response"]
  if "demonstration" in ex:
    return ex["demonstration"]
  raise KeyError(f"SFT example needs a 'response' or 'demonstration' field, got keys {sorted(ex)}")


def collate_sft(examples: Sequence[dict], tokenizer: Tokenizer, max_prompt_len: int,
                max_response_len: int) -> dict[str, np.ndarray]:
  """Prompt + response batch for SFT (layout in the module docstring).

  Examples need "prompt" (the question) and "response" (or "demonstration", the arithmetic
  teacher's text). Prompts longer than `max_prompt_len` raise; responses longer than
  `max_response_len` are truncated (eos dropped) with a logged count.
  """
  prompt_ids, prompt_mask = tokenizer.encode_prompts([ex["prompt"] for ex in examples], max_prompt_len)
  response_ids, response_mask = tokenizer.encode_responses(
      [_response_text(ex) for ex in examples], max_response_len)
  tokens = np.concatenate([prompt_ids, response_ids], axis=1)
  mask = np.concatenate([prompt_mask, response_mask], axis=1)
  loss_mask = np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=1).astype(np.float32)
  positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)
  return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
          "response_mask": response_mask, "tokens": tokens, "mask": mask, "loss_mask": loss_mask,
          "positions": positions}


def collate_prompts(examples: Sequence[dict], tokenizer: Tokenizer, max_prompt_len: int) -> dict:
  """Prompt-only batch for RL: left-padded `prompt_ids`/`prompt_mask` int32 [B, P], plus the
  host-side lists `prompts` (question text) and `answers` (gold answer str, or None if absent)."""
  prompts = [ex["prompt"] for ex in examples]
  prompt_ids, prompt_mask = tokenizer.encode_prompts(prompts, max_prompt_len)
  return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompts": prompts,
          "answers": [ex.get("answer") for ex in examples]}


def encode_sequences(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                     max_prompt_len: int, max_response_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`[left-padded prompt | right-padded response + eos]` tokens and mask [M, P+R], e.g. for scoring."""
  pi, pm = tokenizer.encode_prompts(prompts, max_prompt_len)
  ri, rm = tokenizer.encode_responses(responses, max_response_len)
  return np.concatenate([pi, ri], 1), np.concatenate([pm, rm], 1)
