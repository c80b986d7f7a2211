"""TFDS array_record builder: builds without TensorFlow and reads back exactly what was generated."""

import sys

import pytest

from rlhfjax.data import (
    ArithmeticBuilder,
    ArithmeticConfig,
    builder_config_for,
    generate_problems,
    load_arithmetic,
)


def _key(p):
  return (p["prompt"], p["answer"], p["demonstration"], p["has_carry"])


def test_builder_round_trip(tmp_path):
  cfg = ArithmeticConfig(ops=("+", "-", "*"), min_digits=1, max_digits=2, flaw="drop_carry")
  bcfg = builder_config_for(cfg, num_train=2000, num_test=200, seed=7)
  train = load_arithmetic(tmp_path, bcfg, "train")
  test = load_arithmetic(tmp_path, bcfg, "test")
  assert "tensorflow" not in sys.modules
  assert len(train) == 2000 and len(test) == 200
  rec = train[0]
  assert set(rec) == {"prompt", "answer", "demonstration", "has_carry"}
  assert all(isinstance(rec[k], str) for k in ("prompt", "answer", "demonstration"))
  assert isinstance(rec["has_carry"], bool)
  # Identical records (TFDS stores them in hashed-key order, so compare as multisets).
  for split, ds, n in (("train", train, 2000), ("test", test, 200)):
    want = sorted(map(_key, generate_problems(cfg, n, seed=7, split=split)))
    assert sorted(map(_key, ds)) == want
  assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
  # Random access and slicing.
  assert train[-1] == train[1999] and train[3:5] == [train[3], train[4]]
  with pytest.raises(IndexError):
    train[2000]
  # A second load reuses the prepared files (same data, no rebuild).
  again = load_arithmetic(tmp_path, bcfg, "train")
  assert [again[i] for i in range(10)] == [train[i] for i in range(10)]


def test_named_config_and_builder_api(tmp_path):
  b = ArithmeticBuilder(data_dir=str(tmp_path), config="add2_flawed")
  assert b.builder_config.arithmetic.flaw == "drop_carry"
  assert str(tmp_path) in str(b.data_dir)
  with pytest.raises(ValueError, match="unknown arithmetic config"):
    load_arithmetic(tmp_path, "add7", "train")
