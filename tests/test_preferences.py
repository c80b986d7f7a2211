"""Preference records: validation counts and skips, JSONL / Parquet readers, TFDS array_record round
trip, collate layout."""

import json
import sys
import types

import ml_collections
import numpy as np
import pytest

from rlhfjax.data.preferences import (collate_preferences, load_preferences, make_pair, make_ranking,
                                      read_pairs, read_preferences, read_rankings, validate_records,
                                      write_jsonl)
from rlhfjax.tokenizer import Tokenizer, train_tokenizer

Q = "What is 12 + 30?"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from rlhfjax.data import ArithmeticConfig, generate_problems
  from rlhfjax.tokenizer import template_texts
  path = tmp_path_factory.mktemp("tok") / "t.model"
  probs = generate_problems(ArithmeticConfig(), 200, seed=0)
  train_tokenizer(template_texts(probs), str(path), vocab_size=64)
  return Tokenizer.load(str(path))


def test_invalid_pairs_counted_and_skipped(tokenizer):
  recs = [
      make_pair(Q, "The answer is 42.", "The answer is 43.", margin=1.0, answer="42"),  # ok
      make_pair(Q, "The answer is 42.", "The answer is 42."),  # chosen == rejected
      make_pair(Q, "", "The answer is 43."),  # empty response
      make_pair("  ", "a", "b"),  # empty prompt
      {"prompt": Q, "chosen": "x"},  # missing rejected
      make_pair(Q, "The answer is 42.", "The answer is 4" + "2" * 60 + "."),  # overlong response
      make_pair("What is " + "1" * 40 + " + 1?", "a", "b"),  # overlong prompt
      make_pair(Q, "a", "b", margin=float("nan")),
  ]
  kept, rep = validate_records(recs, "pairs", tokenizer=tokenizer, max_prompt_len=16,
                               max_response_len=24)
  assert len(kept) == 1 and kept[0]["margin"] == 1.0 and kept[0]["answer"] == "42"
  assert rep.kept == 1 and rep.total_skipped == 7
  assert rep.skipped == {"chosen == rejected": 1, "empty response": 1, "empty prompt": 1,
                         "missing chosen/rejected": 1, "response too long": 1, "prompt too long": 1,
                         "non-finite margin": 1}
  d = rep.as_dict()
  assert d["kept"] == 1 and d["skipped"] == 7 and d["skipped_chosen_eqeq_rejected"] == 1


def test_invalid_rankings_counted_and_skipped():
  recs = [
      make_ranking(Q, ["a", "b", "c"]),  # ok
      make_ranking(Q, ["a"]),  # K < 2
      make_ranking(Q, ["a", "b", "a"]),  # duplicates
      make_ranking(Q, ["a", ""]),  # empty response
      {"prompt": Q, "responses": "a"},  # not a list
      make_ranking(Q, ["a", "b", "c", "d", "e"]),  # more than max_k
  ]
  kept, rep = validate_records(recs, "rankings", max_k=4)
  assert [r["responses"] for r in kept] == [["a", "b", "c"]]
  assert rep.skipped == {"K < 2": 1, "duplicate responses": 1, "empty response": 1,
                         "missing responses": 1, "K > 4": 1}


def test_jsonl_readers_skip_bad_lines(tmp_path, caplog):
  p = tmp_path / "pairs.jsonl"
  p.write_text("\n".join([
      json.dumps({"q": Q, "good": "The answer is 42.", "bad": "The answer is 41.", "m": 2}),
      "{not json",
      json.dumps([1, 2]),
      json.dumps({"q": Q, "good": "same", "bad": "same"}),
      "",
  ]))
  with caplog.at_level("WARNING", logger="rlhfjax"):
    recs, rep = read_pairs(str(p), prompt_key="q", chosen_key="good", rejected_key="bad",
                                 margin_key="m")
  assert recs == [make_pair(Q, "The answer is 42.", "The answer is 41.", 2.0)]
  assert rep.skipped == {"invalid JSON": 1, "not an object": 1, "chosen == rejected": 1}
  assert "skipped 3" in caplog.text
  r = tmp_path / "rank.jsonl"
  write_jsonl(str(r), [make_ranking(Q, ["a", "b", "c"], "42"), make_ranking(Q, ["a"])])
  recs, rep = read_rankings(str(r))
  assert recs == [make_ranking(Q, ["a", "b", "c"], "42")] and rep.total_skipped == 1
  bad = tmp_path / "bad.jsonl"
  bad.write_text("{}\n")
  with pytest.raises(ValueError, match="no valid"):
    read_rankings(str(bad))


@pytest.mark.parametrize("kind", ["pairs", "rankings"])
def test_tfds_round_trip(tmp_path, kind):
  if kind == "pairs":
    train = [make_pair(f"What is {i} + 1?", f"The answer is {i + 1}.", f"The answer is {i}.", 0.5 * i,
                       str(i + 1)) for i in range(5)]
    test = [make_pair(Q, "x", "y")]
  else:
    train = [make_ranking(f"What is {i} + 1?", ["a", "b", "c"][: 2 + i % 2], str(i)) for i in range(5)]
    test = [make_ranking(Q, ["x", "y", "z", "w"])]
  bad = dict(train[0], prompt="")  # invalid: skipped by the builder too
  tr, te = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
  write_jsonl(str(tr), train + [bad])
  write_jsonl(str(te), test)
  src_train, src_test = load_preferences(str(tmp_path / "tfds"), kind, str(tr), str(te))
  assert len(src_train) == 5 and len(src_test) == 1
  got = sorted(src_train[:], key=lambda r: r["prompt"])
  assert got == sorted(train, key=lambda r: r["prompt"])
  assert src_test[0] == test[0]
  # new labels -> a new build (config named by the files' hash)
  write_jsonl(str(tr), train[:3])
  assert len(load_preferences(str(tmp_path / "tfds"), kind, str(tr), str(te))[0]) == 3


def test_collate_layout(tokenizer):
  recs = [make_ranking(Q, ["The answer is 42.", "The answer is 4.", "The answer is 43."]),
          make_ranking("What is 1 + 1?", ["The answer is 2.", "The answer is 3."])]
  b = collate_preferences(recs, tokenizer, 16, 12, k=3)
  assert b["tokens"].shape == b["mask"].shape == b["positions"].shape == (2, 3, 28)
  np.testing.assert_array_equal(b["valid"], [[1, 1, 1], [1, 1, 0]])
  ids, _ = tokenizer.encode_prompts([Q], 16)
  resp, _ = tokenizer.encode_responses(["The answer is 4."], 12)
  np.testing.assert_array_equal(b["tokens"][0, 1], np.concatenate([ids[0], resp[0]]))
  m = b["mask"][1, 0]
  np.testing.assert_array_equal(b["positions"][1, 0][m > 0], np.arange(m.sum()))
  pairs = collate_preferences([make_pair(Q, "a", "b", 0.25)], tokenizer, 16, 12)
  assert pairs["tokens"].shape == (1, 2, 28) and pairs["margin"].tolist() == [0.25]


def test_file_keys_map_a_users_preference_files(tmp_path):
  theirs = tmp_path / "theirs.jsonl"
  write_jsonl(str(theirs), [{"question": Q, "better": "The answer is 42.", "worse": "It is 41."}])
  ours = tmp_path / "ours.jsonl"
  write_jsonl(str(ours), [make_pair(Q, "The answer is 42.", "It is 41.")])
  got, _ = read_preferences(str(theirs), "pairs", keys="prompt=question, chosen=better,rejected=worse")
  assert got == read_preferences(str(ours), "pairs")[0]
  ranked = tmp_path / "ranked.jsonl"
  write_jsonl(str(ranked), [{"prompt": Q, "ranked": ["The answer is 42.", "It is 41.", "No."]}])
  (rec,), _ = read_preferences(str(ranked), "rankings", keys="responses=ranked")
  assert rec["responses"] == ["The answer is 42.", "It is 41.", "No."]
  with pytest.raises(ValueError, match="ours=theirs"):
    read_preferences(str(theirs), "pairs", keys="question=prompt")


def test_parquet_preference_files(tmp_path, monkeypatch):
  """Parquet pairs and rankings read as their JSONL twins, with `rm.file_keys` and bad rows counted."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pairs = [{"question": Q, "better": "The answer is 42.", "worse": "It is 41.", "m": 1.5},
           {"question": Q, "better": "same", "worse": "same", "m": 0.0},
           {"question": None, "better": "a", "worse": "b", "m": 0.0}]
  pq.write_table(pa.Table.from_pylist(pairs), str(tmp_path / "p.parquet"))
  write_jsonl(str(tmp_path / "p.jsonl"), pairs)
  keys = "prompt=question,chosen=better,rejected=worse,margin=m"
  got, rep = read_preferences(str(tmp_path / "p.parquet"), "pairs", keys=keys)
  assert got == [make_pair(Q, "The answer is 42.", "It is 41.", 1.5)]
  assert got == read_preferences(str(tmp_path / "p.jsonl"), "pairs", keys=keys)[0]
  assert rep.skipped == {"chosen == rejected": 1, "missing prompt": 1}
  ranked = [{"prompt": Q, "ranked": ["The answer is 42.", "It is 41.", "No."], "answer": "42"}]
  pq.write_table(pa.Table.from_pylist(ranked), str(tmp_path / "r.parquet"))
  (rec,), _ = read_preferences(str(tmp_path / "r.parquet"), "rankings", keys="responses=ranked")
  assert rec == make_ranking(Q, ["The answer is 42.", "It is 41.", "No."], "42")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # `import pyarrow.parquet` fails
  with pytest.raises(ImportError, match="pip install pyarrow"):
    read_preferences(str(tmp_path / "r.parquet"), "rankings")


def test_rm_stage_reads_a_users_parquet_preferences(tmp_path, tokenizer):
  """The rm stage's own path for user files (rm.train_file / test_file / file_keys): validated with
  the tokenizer, stored as array_record, read back."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  from rlhfjax.data.labeler import LabelerConfig
  from rlhfjax.train.reward import RMConfig
  from rlhfjax.train.rm_stage import prepare_preferences, preference_files
  rows = [{"q": f"What is {i} + 1?", "good": f"The answer is {i + 1}.", "bad": f"The answer is {i}."}
          for i in range(4)] + [{"q": Q, "good": "The answer is 4" + "2" * 60 + ".", "bad": "No."}]  # too long
  for name, part in (("train", rows[:3] + rows[4:]), ("test", rows[3:4])):
    pq.write_table(pa.Table.from_pylist(part), str(tmp_path / f"{name}.parquet"))
  cfg = RMConfig(train_file=str(tmp_path / "train.parquet"), test_file=str(tmp_path / "test.parquet"),
                 file_keys="prompt=q,chosen=good,rejected=bad")
  run = types.SimpleNamespace(workdir=str(tmp_path / "w"), tokenizer=tokenizer, config=ml_collections.ConfigDict(
      {"data": {"max_prompt_len": 16, "max_response_len": 24, "data_dir": ""}}))
  *paths, simulated = preference_files(run, cfg, LabelerConfig(), None)
  train, test, reports = prepare_preferences(run, cfg, paths, simulated)
  assert not simulated and reports["train"].skipped == {"response too long": 1}
  assert sorted(train[:], key=lambda r: r["prompt"]) == [
      make_pair(r["q"], r["good"], r["bad"]) for r in rows[:3]]
  assert test[:] == [make_pair(rows[3]["q"], rows[3]["good"], rows[3]["bad"])]
