"""DataIterator resume/sharding and the SFT / RL collate functions."""

import functools
import json

import numpy as np
import pytest

from rlhfjax.data import DataIterator, collate_prompts, collate_sft
from rlhfjax.tokenizer import Tokenizer, format_prompt, train_tokenizer


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_resume_is_exact_across_epoch_boundary():
  data = list(range(23))
  it = DataIterator(data, 5, seed=3, process_index=0, process_count=1)
  assert it.steps_per_epoch == 4  # 23 // 5, remainder dropped
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
  assert state == {"epoch": 0, "index": 15}
  expected = _take(it, 5)  # crosses into epoch 1
  assert it.get_state()["epoch"] == 1
  resumed = DataIterator(data, 5, seed=3, process_index=0, process_count=1)
  resumed.set_state(state)
  assert _take(resumed, 5) == expected
  # Within an epoch nothing repeats; across epochs the order reshuffles.
  epoch0 = first + expected[:1]
  flat0 = sum(epoch0, [])
  assert len(set(flat0)) == 20
  assert sum(expected[1:5], []) != flat0
  assert len(set(sum(expected[1:5], []))) == 20
  # A fresh iterator with the same seed repeats the same stream.
  again = DataIterator(data, 5, seed=3, process_index=0, process_count=1)
  assert _take(again, 8) == first + expected


def test_reseeded_is_a_fresh_iterator_with_that_seed():
  data = list(range(23))
  it = DataIterator(data, 5, seed=3, process_index=1, process_count=2)
  head = _take(it, 3)  # mid-stream: the copy starts over, the original goes on
  other = it.reseeded(10)
  assert other.seed == 10 and other.get_state() == {"epoch": 0, "index": 0}
  assert _take(other, 4) == _take(DataIterator(data, 5, seed=10, process_index=1, process_count=2), 4)
  assert _take(it, 2) == _take(DataIterator(data, 5, seed=3, process_index=1, process_count=2), 5)[3:]
  assert head != _take(it.reseeded(10), 3)


def test_keep_remainder_and_num_epochs():
  it = DataIterator(list(range(7)), 3, seed=0, shuffle=False, drop_remainder=False,
                    process_index=0, process_count=1, num_epochs=2)
  batches = list(it)
  assert batches == [[0, 1, 2], [3, 4, 5], [6]] * 2


def test_host_shards_disjoint():
  data = list(range(40))
  shards = []
  for i in range(2):
    it = DataIterator(data, 4, seed=11, process_index=i, process_count=2)
    assert it.steps_per_epoch == 5
    shards.append(sum(_take(it, 5), []))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == data


def test_errors():
  with pytest.raises(ValueError, match="empty dataset"):
    DataIterator([], 4, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="batch_size=8"):
    DataIterator(list(range(10)), 8, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    DataIterator(list(range(10)), 2, seed=0, process_index=2, process_count=2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [format_prompt(f"What is {a} + {b}?") for a in range(0, 100, 7) for b in range(0, 100, 9)]
  texts += ["<thinking> 7+8=15 carry 1. </thinking> The answer is 85.", "The answer is 3."]
  path = str(tmp_path_factory.mktemp("tok") / "t.model")
  return Tokenizer.load(train_tokenizer(texts, path, vocab_size=80))


def test_collate_sft_hand_built(tok):
  ex = [{"prompt": "What is 1 + 2?", "response": "The answer is 3."},
        {"prompt": "What is 47 + 38?", "demonstration": "<thinking> 7+8=15 carry 1. </thinking> The answer is 85."}]
  P, R = 24, 40
  b = collate_sft(ex, tok, P, R)
  assert b["tokens"].shape == b["mask"].shape == b["loss_mask"].shape == b["positions"].shape == (2, P + R)
  assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  for i, (q, r) in enumerate([(ex[0]["prompt"], ex[0]["response"]), (ex[1]["prompt"], ex[1]["demonstration"])]):
    p_ids, r_ids = tok.prompt_ids(q), tok.response_ids(r)
    lp, lr = len(p_ids), len(r_ids)
    tokens = [0] * (P - lp) + p_ids + r_ids + [0] * (R - lr)
    mask = [0] * (P - lp) + [1] * (lp + lr) + [0] * (R - lr)
    loss = [0] * P + [1] * lr + [0] * (R - lr)
    pos = [0] * (P - lp) + list(range(lp + lr)) + [lp + lr - 1] * (R - lr)
    assert b["tokens"][i].tolist() == tokens
    assert b["mask"][i].tolist() == mask
    assert b["loss_mask"][i].tolist() == loss
    assert b["positions"][i].tolist() == pos
    assert b["prompt_ids"][i].tolist() == tokens[:P] and b["response_ids"][i].tolist() == tokens[P:]
    assert b["prompt_mask"][i].tolist() == mask[:P] and b["response_mask"][i].tolist() == mask[P:]
  # The eos is a loss target; the first response token directly follows the prompt.
  assert b["tokens"][0][b["loss_mask"][0] > 0][-1] == tok.eos_id
  assert tok.decode_batch(b["tokens"], b["mask"]) == [
      format_prompt(ex[0]["prompt"]) + " " + ex[0]["response"],
      format_prompt(ex[1]["prompt"]) + " " + ex[1]["demonstration"]]


def test_collate_prompts_and_iterator_with_collate(tok):
  ex = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(10)]
  it = DataIterator(ex, 4, seed=0, process_index=0, process_count=1,
                    collate=functools.partial(collate_prompts, tokenizer=tok, max_prompt_len=20))
  b = next(it)
  assert b["prompt_ids"].shape == b["prompt_mask"].shape == (4, 20)
  assert [int(a) for a in b["answers"]] == [2 * int(q.split()[2]) for q in b["prompts"]]
  ids, mask = tok.encode_prompts(b["prompts"], 20)
  np.testing.assert_array_equal(b["prompt_ids"], ids)
  assert (b["prompt_ids"][:, -1] != tok.pad_id).all() and (b["prompt_mask"][:, 0] == 0).all()


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_resume_from_every_position(drop_remainder):
  data = list(range(13))
  make = lambda: DataIterator(data, 4, seed=5, drop_remainder=drop_remainder,
                              process_index=0, process_count=1)
  reference = _take(make(), 12)
  for k in range(10):
    it = make()
    _take(it, k)
    resumed = make()
    resumed.set_state(it.get_state())
    assert _take(resumed, 2) == reference[k:k + 2], k
