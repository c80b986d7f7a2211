"""JSONL reader: good lines kept, bad lines counted, clear errors."""

import json

import pytest

from rlhfjax.data import read_jsonl


def test_read_jsonl_with_bad_lines(tmp_path, caplog):
  path = tmp_path / "d.jsonl"
  lines = [json.dumps({"prompt": "What is 1 + 1?", "response": "The answer is 2.", "gold": 2}),
           "{not json",
           "",
           json.dumps({"prompt": "only a prompt"}),
           json.dumps(["a", "list"]),
           json.dumps({"q": "Hi ☃", "prompt": "Hi ☃", "response": "Hello", "gold": "x"})]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with caplog.at_level("WARNING"):
    recs, bad = read_jsonl(str(path), answer_key="gold", return_bad=True)
  assert recs == [{"prompt": "What is 1 + 1?", "response": "The answer is 2.", "answer": "2"},
                  {"prompt": "Hi ☃", "response": "Hello", "answer": "x"}]
  assert [n for n, _ in bad] == [2, 4, 5]
  assert "skipped 3 bad line(s) of 5" in caplog.text
  # Prompt-only (RL) reading keeps the line that lacked a response.
  prompts = read_jsonl(str(path), prompt_key="q", response_key=None)
  assert prompts == [{"prompt": "Hi ☃"}]


def test_read_jsonl_errors(tmp_path):
  missing = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    read_jsonl(missing)
  empty = tmp_path / "bad.jsonl"
  empty.write_text("nope\n")
  with pytest.raises(ValueError, match="no valid records"):
    read_jsonl(str(empty))
