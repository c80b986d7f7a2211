"""JSONL files as users save them: byte-order marks, CRLF, bad bytes, surrogate escapes, UTF-16,
fields of the wrong type; every bad line is one counted reason naming the file and the line."""

import json

import pytest

from rlhfjax.data import iter_objects, read_examples, read_jsonl

ROWS = [{"prompt": "What is 1 + 1?", "response": "2", "gold": 2},
        {"prompt": "Hi ☃", "response": "Hello", "gold": "x"}]


def _lines(rows):
  return [json.dumps(r, ensure_ascii=False) for r in rows]


def test_bom_and_crlf_keep_every_record(tmp_path):
  """Notepad-style UTF-8 with a byte-order mark and CRLF line ends: the first line is not lost."""
  path = tmp_path / "bom.jsonl"
  path.write_bytes("\r\n".join(_lines(ROWS) + [""] + _lines(ROWS[:1])).encode("utf-8-sig") + b"\r\n")
  want = [{"prompt": r["prompt"], "response": r["response"]} for r in ROWS + ROWS[:1]]
  recs, bad = read_jsonl(str(path), return_bad=True)
  assert (recs, bad) == (want, [])
  exs, rep = read_examples(str(path), {"prompt": "prompt", "response": "response"})  # max_bad_fraction 0
  assert exs == want and rep.total_skipped == 0
  # two such files concatenated (`cat a.jsonl b.jsonl`): the inner mark is skipped too
  both = tmp_path / "both.jsonl"
  both.write_bytes(path.read_bytes() * 2)
  assert read_jsonl(str(both)) == want * 2


def test_invalid_utf8_is_one_bad_line_with_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(b"\n".join([_lines(ROWS)[0].encode(), b'{"prompt": "caf\xe9", "response": "r"}',
                               _lines(ROWS)[1].encode()]) + b"\n")
  recs, bad = read_jsonl(str(path), return_bad=True)  # was a bare UnicodeDecodeError, no file or line
  assert [r["prompt"] for r in recs] == [ROWS[0]["prompt"], ROWS[1]["prompt"]] and bad == [(2, "invalid UTF-8")]
  with pytest.raises(ValueError) as err:
    read_examples(str(path), {"prompt": "prompt"})
  msg = str(err.value)
  assert "latin1.jsonl" in msg and "1 of 3 records bad" in msg and "first: line 2: invalid UTF-8" in msg


def test_lone_surrogate_escape_is_a_bad_record_not_a_crash_at_batch_time(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models
  raw = tokenizers.Tokenizer(models.BPE())
  with pytest.raises(TypeError):  # what the batch would hit mid-training: no tokenizer encodes it
    raw.encode(json.loads('"bad \\ud800 x"'))
  path = tmp_path / "s.jsonl"
  path.write_text('{"prompt": "bad \\ud800 x"}\n'  # lone high surrogate
                  '{"prompt": "smile \\ud83d\\ude42"}\n'  # a pair, as json.dumps(ensure_ascii=True) writes
                  '{"prompt": "bad \\udc00"}\n'
                  '{"prompt": "ok", "meta": {"\\ud800": 1}}\n', encoding="utf-8")
  bad = []
  objs = list(iter_objects(str(path), lambda n, why: bad.append((n, why))))
  assert objs == [(2, {"prompt": "smile 🙂"})]
  assert bad == [(1, "lone surrogate"), (3, "lone surrogate"), (4, "lone surrogate")]
  exs, rep = read_examples(str(path), {"prompt": "prompt"}, max_bad_fraction=0.75)
  assert exs == [{"prompt": "smile 🙂"}] and rep.skipped == {"lone surrogate": 3}
  raw.encode(exs[0]["prompt"])  # what is kept encodes


def test_utf16_file_is_one_clear_error(tmp_path):
  path = tmp_path / "ps.jsonl"  # Windows PowerShell 5 `>` writes UTF-16LE with a byte-order mark
  path.write_bytes("\n".join(_lines(ROWS)).encode("utf-16"))
  for read in (lambda: read_jsonl(str(path)), lambda: read_examples(str(path), {"prompt": "prompt"})):
    with pytest.raises(ValueError, match="ps.jsonl: the file is UTF-16 encoded"):
      read()


def test_read_jsonl_counts_fields_of_the_wrong_type(tmp_path):
  """Prompts and responses must be text (not stringified Python reprs); an answer may be a number."""
  path = tmp_path / "t.jsonl"
  rows = [{"prompt": ["What", "is"], "response": "2", "gold": 1}, {"prompt": "ok", "response": True, "gold": 1},
          {"prompt": "ok", "response": {"text": "2"}, "gold": 1}, {"prompt": 5, "response": "5", "gold": 1},
          {"prompt": "Q", "response": "R", "gold": 2.5}, {"prompt": "Q2", "response": "R2", "gold": False},
          {"prompt": "Q3", "response": "R3", "gold": [1]}]
  path.write_text("\n".join(_lines(rows)) + "\n")
  recs, bad = read_jsonl(str(path), answer_key="gold", return_bad=True)
  assert recs == [{"prompt": "Q", "response": "R", "answer": "2.5"}]  # was 7 records, "['What', 'is']" ...
  assert bad == [(1, "'prompt' is list"), (2, "'response' is bool"), (3, "'response' is dict"),
                 (4, "'prompt' is int"), (6, "'gold' is bool"), (7, "'gold' is list")]
  assert read_jsonl(str(path), response_key=None) == [
      {"prompt": "ok"}, {"prompt": "ok"}, {"prompt": "Q"}, {"prompt": "Q2"}, {"prompt": "Q3"}]
