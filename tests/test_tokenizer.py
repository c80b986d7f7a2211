"""Tokenizer: training determinism, special pieces, template, padding, errors."""

import numpy as np
import pytest

from rlhfjax import tokenizer as tok_lib
from rlhfjax.data.arithmetic import ArithmeticConfig, generate_problems
from rlhfjax.tokenizer import Tokenizer, format_prompt, train_tokenizer


def _corpus(n=500):
  cfg = ArithmeticConfig(ops=("+", "-", "*"), min_digits=1, max_digits=3)
  return list(tok_lib.template_texts(generate_problems(cfg, n, seed=0)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "arith.model")
  return Tokenizer.load(train_tokenizer(_corpus(), path, vocab_size=128))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(tmp_path, model_type):
  texts = _corpus(300)
  a = train_tokenizer(iter(texts), str(tmp_path / "a.model"), vocab_size=96, model_type=model_type)
  b = train_tokenizer(iter(texts), str(tmp_path / "b.model"), vocab_size=96, model_type=model_type)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  t = Tokenizer.load(a)
  assert t.vocab_size <= 96
  assert (t.pad_id, t.bos_id, t.eos_id) == (0, 2, 3)


def test_vocab_too_small_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=10 is too small"):
    train_tokenizer(_corpus(50), str(tmp_path / "x.model"), vocab_size=10)


def test_special_pieces_and_digits(tok):
  assert tok.id_to_piece(tok.thinking_start_id) == "<thinking>"
  assert tok.id_to_piece(tok.thinking_end_id) == "</thinking>"
  text = "<thinking> 7+8=15 carry 1. 4+3+1=8. </thinking> The answer is 1085."
  ids = tok.encode(text)
  assert ids.count(tok.thinking_start_id) == 1 and ids.count(tok.thinking_end_id) == 1
  pieces = [tok.id_to_piece(i) for i in ids]
  # Every digit is its own piece, and no piece mixes a digit with anything else.
  digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
  assert all(len(p) == 1 for p in digit_pieces), digit_pieces
  assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode("<thinking>a</thinking>")) == "<thinking>a</thinking>"
  assert tok.unk_id in tok.encode("x")  # unseen character, no byte fallback


def test_round_trip_keeps_newline_and_template(tok):
  p = format_prompt("What is 47 + 38?")
  assert p == "Question: What is 47 + 38?\nAnswer:"
  assert tok.decode(tok.encode(p)) == p
  ids = tok.prompt_ids("What is 47 + 38?")
  assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
  r = tok.response_ids("The answer is 85.")
  assert r[-1] == tok.eos_id
  # decode stops at eos and skips pad/bos.
  assert tok.decode([0, 0] + ids + [tok.eos_id] + ids) == p
  assert tok.decode(r + tok.encode("junk")) == "The answer is 85."
  assert tok.decode(tok.encode("The") + [tok.vocab_size + 5]) == "The ⁇ "  # padded-vocab id -> unk


def test_encode_prompts_left_padded(tok):
  qs = ["What is 1 + 2?", "What is 123 * 456?"]
  ids, mask = tok.encode_prompts(qs, max_len=32)
  assert ids.shape == mask.shape == (2, 32) and ids.dtype == np.int32
  for row, m, q in zip(ids, mask, qs):
    want = tok.prompt_ids(q)
    n = len(want)
    assert m.tolist() == [0] * (32 - n) + [1] * n
    assert row.tolist() == [tok.pad_id] * (32 - n) + want
  assert tok.decode_batch(ids, mask) == [format_prompt(q) for q in qs]


def test_encode_responses_right_padded_and_truncated(tok, caplog):
  rs = ["The answer is 3.", "<thinking> 6*4=24 carry 2. </thinking> The answer is 56088."]
  ids, mask = tok.encode_responses(rs, max_len=40)
  for row, m, r in zip(ids, mask, rs):
    want = tok.response_ids(r)
    n = len(want)
    assert row.tolist() == want + [tok.pad_id] * (40 - n)
    assert m.tolist() == [1] * n + [0] * (40 - n)
  assert tok.decode_batch(ids) == rs
  # Truncation: exactly max_len tokens kept, eos dropped, reported.
  n_long = len(tok.response_ids(rs[1]))
  with caplog.at_level("WARNING"):
    ids, mask, trunc = tok.encode_responses_with_stats(rs, max_len=n_long - 2)
  assert trunc.tolist() == [False, True]
  assert ids[1].tolist() == tok.response_ids(rs[1])[: n_long - 2]
  assert tok.eos_id not in ids[1].tolist() and mask[1].all()
  assert "1 of 2 responses truncated" in caplog.text
  with pytest.raises(ValueError, match="exceed max_response_len"):
    tok.encode_responses(rs, max_len=n_long - 2, overflow="error")


def test_overlong_prompt_error(tok):
  q = "What is " + " + ".join(["123"] * 20) + "?"
  n = len(tok.prompt_ids(q))
  with pytest.raises(ValueError) as e:
    tok.encode_prompts(["What is 1 + 1?", q], max_len=16)
  msg = str(e.value)
  assert f"prompt of {n} tokens exceeds max_prompt_len=16" in msg
  assert "config.data.max_prompt_len" in msg and "\n" not in msg.replace("\\n", "")


def test_missing_model_file(tmp_path):
  path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError) as e:
    Tokenizer.load(path)
  msg = str(e.value)
  assert path in msg and "train_tokenizer" in msg and "\n" not in msg


def test_from_proto_equivalent(tok):
  t2 = Tokenizer.from_proto(tok.model_proto)
  s = "Question: What is 9 - 4?\nAnswer:"
  assert t2.encode(s) == tok.encode(s)
  assert tok_lib.PAD_ID == t2.pad_id
