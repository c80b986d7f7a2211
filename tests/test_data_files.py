"""Data files with a field mapping: messages, GSM8K answers, the shipped sample, bad records, splits."""

import json
import re
import sys
from fractions import Fraction

import ml_collections
import pytest

from rlhfjax.data import load_file_data, parse_gsm8k, read_examples, sample_path, split_examples
from rlhfjax.rewards.math import extract_answer, math_reward


def _write(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_field_mapping_and_messages(tmp_path):
  path = _write(tmp_path / "d.jsonl", [
      {"question": "What is 2 + 2?", "gold": 4, "solution": "2 + 2 = 4. The answer is 4.", "t": ["a"]},
      {"question": "Name a color.", "gold": "red", "solution": "Red.", "t": {"cases": 1}}])
  exs, rep = read_examples(path, {"prompt": "question", "answer": "gold", "response": "solution",
                                  "tests": "t"})
  assert exs[0] == {"prompt": "What is 2 + 2?", "answer": "4", "response": "2 + 2 = 4. The answer is 4.",
                    "tests": ["a"]}
  assert exs[1]["tests"] == {"cases": 1} and (rep.kept, rep.total_skipped) == (2, 0)
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
  path = _write(tmp_path / "chat.jsonl", [{"m": chat + [{"role": "assistant", "content": "Hello."}]},
                                          {"m": chat}])
  exs, _ = read_examples(path, ml_collections.ConfigDict({"messages": "m"}))
  assert exs == [{"prompt": chat, "response": "Hello."}, {"prompt": chat}]
  with pytest.raises(ValueError, match="'prompt' or 'messages'"):
    read_examples(path, {"prompt": "q", "messages": "m"})
  with pytest.raises(ValueError, match="only"):
    read_examples(path, {"prompt": "q", "question": "q"})


def test_gsm8k_answers():
  text = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
          "She sold 1000+24 = <<1000+24=1024>>1,024.\n#### 1,024")
  answer, response = parse_gsm8k(text)
  assert answer == "1024"
  assert response == "Natalia sold 48/2 = 24 clips in May.\nShe sold 1000+24 = 1,024.\nThe answer is 1024."
  assert extract_answer(response) == "1024"
  with pytest.raises(ValueError, match="####"):
    parse_gsm8k("no final answer")


def test_answer_formats(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"q": "Q1", "a": "Steps.\n#### 7"}, {"q": "Q2", "a": "x = 3"}])
  fields = {"prompt": "q", "answer": "a"}
  exs, _ = read_examples(path, fields)  # auto: gsm8k only where "####" appears
  assert [e["answer"] for e in exs] == ["7", "x = 3"] and exs[0]["response"] == "Steps.\nThe answer is 7."
  assert "response" not in exs[1]
  exs, _ = read_examples(path, fields, answer_format="plain")
  assert exs[0] == {"prompt": "Q1", "answer": "Steps.\n#### 7"}
  exs, rep = read_examples(path, fields, answer_format="gsm8k", max_bad_fraction=0.5)
  assert len(exs) == 1 and rep.examples == [("line 2", "no '#### N' final answer")]
  # a mapped response wins over the one made from the GSM8K answer
  path = _write(tmp_path / "r.jsonl", [{"q": "Q1", "a": "#### 7", "r": "Seven."}])
  assert read_examples(path, {**fields, "response": "r"})[0][0]["response"] == "Seven."


def test_shipped_sample_is_right():
  exs, rep = read_examples(sample_path(), {"prompt": "question", "answer": "answer"})
  assert len(exs) >= 40 and rep.total_skipped == 0
  with open(sample_path(), encoding="utf-8") as f:
    raw = [json.loads(line)["answer"] for line in f]
  for text, ex in zip(raw, exs):
    calcs = re.findall(r"<<([^<>=]+)=([^<>]+)>>", text)
    assert calcs, text
    for expr, val in calcs:  # every calculator annotation recomputed exactly (rationals)
      assert set(expr) <= set("0123456789.+-*/() "), expr
      exact = eval(re.sub(r"\d+(?:\.\d+)?", lambda m: f"F('{m.group()}')", expr),  # noqa: S307
                   {"F": Fraction, "__builtins__": {}})
      assert exact == Fraction(val), (expr, val)
    assert Fraction(calcs[-1][1]) == Fraction(ex["answer"]), text  # the last step is the answer
    assert "<<" not in ex["response"] and ex["response"].endswith(f"The answer is {ex['answer']}.")
  assert math_reward([e["response"] for e in exs], [e["answer"] for e in exs]).tolist() == [1.0] * len(exs)


def test_bad_records_counted_and_one_line_error(tmp_path):
  path = _write(tmp_path / "d.jsonl", [
      {"q": "ok 1", "a": "1"}, "{not json", {"q": "ok 2", "a": "2"}, "", {"q": "no answer"},
      ["a", "list"], {"q": 5, "a": "5"}, {"q": "ok 3", "a": "3"}, {"q": "ok 4", "a": True}])
  fields = {"prompt": "q", "answer": "a"}
  exs, rep = read_examples(path, fields, max_bad_fraction=0.75)
  assert [e["prompt"] for e in exs] == ["ok 1", "ok 2", "ok 3"]
  assert [n for n, _ in rep.examples] == ["line 2", "line 5", "line 6", "line 7", "line 9"]
  assert rep.skipped == {"invalid JSON": 1, "missing 'a'": 1, "not an object": 1, "'q' is int": 1,
                         "'a' is bool": 1}
  with pytest.raises(ValueError) as err:
    read_examples(path, fields, max_bad_fraction=0.5)
  msg = str(err.value)
  assert "\n" not in msg and "d.jsonl" in msg and "5 of 8 records bad" in msg
  assert "first: line 2: invalid JSON" in msg
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    read_examples(str(tmp_path / "missing.jsonl"), fields)


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  path = str(tmp_path / "d.parquet")
  pq.write_table(pa.table({"q": ["A?", None], "a": ["Because.\n#### 1,000", "2"]}), path)
  exs, rep = read_examples(path, {"prompt": "q", "answer": "a"}, max_bad_fraction=0.5)
  assert exs == [{"prompt": "A?", "answer": "1000", "response": "Because.\nThe answer is 1000."}]
  assert rep.examples == [("row 2", "missing 'q'")]


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # `import pyarrow.parquet` fails
  with pytest.raises(ImportError, match="pip install pyarrow"):
    read_examples(str(tmp_path / "d.parquet"), {"prompt": "q"})


def test_load_file_data_split(tmp_path):
  c = ml_collections.ConfigDict(dict(source="file", train_path=sample_path(), test_path="",
                                     fields={"prompt": "question", "answer": "answer"},
                                     max_bad_fraction=0.0, test_fraction=0.25, answer_format="auto"))
  train, test = load_file_data(c)
  assert (train, test) == load_file_data(c) and train and test  # deterministic
  assert len(train) + len(test) == len(read_examples(sample_path(), c.fields)[0])
  assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
  # a prompt's split depends on the prompt alone, not on what else is in the file
  again = split_examples(list(reversed(train + test)), 0.25)
  assert sorted(e["prompt"] for e in again[1]) == sorted(e["prompt"] for e in test)
  held = _write(tmp_path / "test.jsonl", [{"question": "Q?", "answer": "#### 3"}])
  c.test_path = held
  train, test = load_file_data(c)
  assert len(test) == 1 and test[0]["answer"] == "3" and len(train) >= 40


def test_chat_files_without_answers_reach_the_ppo_gold_score(tmp_path):
  """The ppo stage's simulated human scores a chat prompt by its user turn (and needs no answer)."""
  from rlhfjax.data.labeler import gold_scores
  from rlhfjax.train.ppo_stage import _gold_metrics
  path = _write(tmp_path / "chat.jsonl", [{"m": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": f"What is {a} + 3?"}]} for a in (2, 4)])
  exs, _ = read_examples(path, {"messages": "m"})
  texts = ["The answer is 5.", "The answer is 9."]
  want = gold_scores(["What is 2 + 3?", "What is 4 + 3?"], texts)
  assert want[0] > want[1]  # the first is right
  assert _gold_metrics(texts, exs)["gold_reward_mean"] == float(want.mean())


def test_long_prompts_fail_at_setup_or_are_dropped(tmp_path):
  """A prompt longer than data.max_prompt_len is found when the run is set up (not at the batch that
  holds it, mid-training): a one-line error, or with data.max_bad_fraction dropped with a warning."""
  from experiments import hf_grpo
  from rlhfjax.train.pipeline import setup_run
  rows = [{"question": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(40)]
  rows[7]["question"] = "What is " + " plus ".join(str(a) for a in range(60)) + "?"
  c = hf_grpo.get_config()
  c.data.train_path = _write(tmp_path / "train.jsonl", rows)
  c.data.test_path = _write(tmp_path / "test.jsonl", rows[:4] + rows[8:12])
  c.model.hf_path, c.tokenizer.path, c.tokenizer.vocab_size = "", "", 64
  c.data.max_prompt_len = 48
  with pytest.raises(ValueError, match=r"train data: 1 of 40 prompts longer than max_prompt_len=48 tokens "
                                       r"\(the longest \d+: 'What is 0 plus 1 plus 2"):
    setup_run(c, str(tmp_path / "w1"))
  c.data.max_bad_fraction = 0.05
  run = setup_run(c, str(tmp_path / "w2"))
  assert len(run.train_examples) == 39 and rows[7]["question"] not in [e["prompt"] for e in run.train_examples]
  assert len(run.test_examples) == 8
  assert max(len(run.tokenizer.prompt_ids(e["prompt"])) for e in run.train_examples) <= 48
