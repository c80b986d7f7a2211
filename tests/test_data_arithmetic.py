"""Synthetic arithmetic: determinism, disjoint splits, gold answers, the flawed teacher."""

import re

import pytest

from rlhfjax.data import ArithmeticConfig, generate_problems, make_problem, parse_answer, teacher_accuracy

_Q = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
MIXED = ArithmeticConfig(ops=("+", "-", "*"), min_digits=1, max_digits=3)


def _true_has_carry(a, op, b):
  """Independent check: does column arithmetic carry/borrow anywhere?"""
  da = [int(c) for c in reversed(str(a))]
  db = [int(c) for c in reversed(str(b))]
  if op == "+":
    return any(x + y >= 10 for x, y in zip(da, db))  # missing digits are 0: never carry
  if op == "-":  # a >= b: the first borrow happens at the lowest column with x < y
    return any(x < y for x, y in zip(da, db))
  return None  # multiplication: checked through the flawed teacher instead


def test_deterministic_from_seed():
  assert generate_problems(MIXED, 200, seed=3) == generate_problems(MIXED, 200, seed=3)
  assert generate_problems(MIXED, 200, seed=3) != generate_problems(MIXED, 200, seed=4)
  # A prefix does not depend on n.
  assert generate_problems(MIXED, 50, seed=3) == generate_problems(MIXED, 200, seed=3)[:50]


def test_splits_disjoint_and_deterministic():
  cfg = ArithmeticConfig(ops=("+", "-"), min_digits=1, max_digits=2)
  train = generate_problems(cfg, 3000, seed=0, split="train")
  test = generate_problems(cfg, 300, seed=0, split="test")
  other_seed_train = generate_problems(cfg, 3000, seed=1, split="train")
  test_q = {p["prompt"] for p in test}
  assert len(test_q) > 50
  assert not test_q & {p["prompt"] for p in train}
  assert not test_q & {p["prompt"] for p in other_seed_train}
  assert test == generate_problems(cfg, 300, seed=0, split="test")
  with pytest.raises(ValueError, match="split must be"):
    generate_problems(cfg, 1, seed=0, split="validation")


def test_gold_answers_and_fields():
  probs = generate_problems(MIXED, 2000, seed=0)
  ops = set()
  for p in probs:
    m = _Q.fullmatch(p["prompt"])
    assert m, p["prompt"]
    a, op, b = int(m[1]), m[2], int(m[3])
    ops.add(op)
    assert 0 <= a <= 999 and 0 <= b <= 999
    assert p["answer"] == str(eval(f"{a} {op} {b}"))  # noqa: S307 - our own digits-only text
    assert int(p["answer"]) >= 0
    assert p["demonstration"].startswith("<thinking> ") and " </thinking> " in p["demonstration"]
    want = _true_has_carry(a, op, b)
    if want is not None:
      assert p["has_carry"] == want, p
  assert ops == {"+", "-", "*"}
  assert teacher_accuracy(probs) == 1.0


def test_scratchpad_format():
  cfg = ArithmeticConfig()
  assert make_problem(47, "+", 38, cfg)["demonstration"] == (
      "<thinking> 7+8=15 carry 1. 4+3+1=8. </thinking> The answer is 85.")
  flawed = ArithmeticConfig(flaw="drop_carry")
  p = make_problem(47, "+", 38, flawed)
  assert p["demonstration"] == "<thinking> 7+8=15. 4+3=7. </thinking> The answer is 75."
  assert p["answer"] == "85" and p["has_carry"]
  assert make_problem(45, "-", 38, cfg)["demonstration"].endswith("The answer is 7.")
  assert make_problem(45, "-", 38, flawed)["demonstration"].endswith("The answer is 17.")
  m = make_problem(47, "*", 38, cfg)["demonstration"]
  assert m == "<thinking> 47*8=376. 47*30=1410. 376+1410=1786. </thinking> The answer is 1786."
  nothink = ArithmeticConfig(thinking=False)
  assert make_problem(47, "+", 38, nothink)["demonstration"] == "The answer is 85."


@pytest.mark.parametrize("ops", [("+",), ("-",), ("*",), ("+", "-", "*")])
def test_flawed_teacher_wrong_exactly_on_carries(ops):
  cfg = ArithmeticConfig(ops=ops, min_digits=1, max_digits=3, flaw="drop_carry", flaw_prob=1.0)
  probs = generate_problems(cfg, 1500, seed=0)
  n_carry = sum(p["has_carry"] for p in probs)
  assert 0 < n_carry < len(probs)
  for p in probs:
    right = parse_answer(p["demonstration"]) == p["answer"]
    assert right != p["has_carry"], p
  assert teacher_accuracy(probs) == pytest.approx(1 - n_carry / len(probs))
  # Same questions and gold answers as the correct teacher: only the demonstration differs.
  clean = generate_problems(ArithmeticConfig(ops=ops, min_digits=1, max_digits=3), 1500, seed=0)
  assert [(p["prompt"], p["answer"], p["has_carry"]) for p in probs] == [
      (p["prompt"], p["answer"], p["has_carry"]) for p in clean]


def test_flaw_prob_partial():
  base = dict(ops=("+",), min_digits=3, max_digits=3, flaw="drop_carry")
  carry_probs = lambda q: [p for p in generate_problems(ArithmeticConfig(**base, flaw_prob=q), 2000, 0)
                           if p["has_carry"]]
  acc_half = teacher_accuracy(carry_probs(0.5))
  assert 0.2 < acc_half < 0.8  # wrong on some but not all carry problems
  assert teacher_accuracy(carry_probs(0.0)) == 1.0
  assert teacher_accuracy(carry_probs(1.0)) == 0.0


def test_config_validation():
  with pytest.raises(ValueError, match="ops"):
    ArithmeticConfig(ops=("/",))
  with pytest.raises(ValueError, match="flaw"):
    ArithmeticConfig(flaw="random")
  with pytest.raises(ValueError, match="too small"):
    generate_problems(ArithmeticConfig(min_digits=1, max_digits=1, ops=("+",), test_fraction=0.001),
                      5, seed=0, split="test")
