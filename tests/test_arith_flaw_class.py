"""The flawed teacher's narrow weakness: it forgets only the carry out of the leading column."""

import pytest

from rlhfjax.data.arithmetic import (ArithmeticConfig, generate_problems, in_flaw_class, make_problem,
                                     parse_answer, teacher_accuracy)


def test_drops_only_the_leading_carry():
  cfg = ArithmeticConfig(flaw="drop_final_carry")
  # inner carry kept, leading carry forgotten
  assert make_problem(47, "+", 68, cfg)["demonstration"] == (
      "<thinking> 7+8=15 carry 1. 4+6+1=11. </thinking> The answer is 15.")
  # only an inner carry: right
  assert make_problem(47, "+", 38, cfg)["demonstration"] == (
      "<thinking> 7+8=15 carry 1. 4+3+1=8. </thinking> The answer is 85.")
  # subtraction never borrows out of the leading column: always right
  assert make_problem(45, "-", 38, cfg)["demonstration"].endswith("The answer is 7.")
  assert in_flaw_class("What is 47 + 68?", "drop_final_carry")
  assert not in_flaw_class("What is 47 + 38?", "drop_final_carry")
  assert in_flaw_class("What is 47 + 38?", "drop_carry")
  assert not in_flaw_class("What is 47 + 68?", "none")


@pytest.mark.parametrize("ops", [("+",), ("+", "-", "*")])
def test_wrong_exactly_on_the_class(ops):
  cfg = ArithmeticConfig(ops=ops, min_digits=1, max_digits=3, flaw="drop_final_carry", flaw_prob=1.0)
  probs = generate_problems(cfg, 1500, seed=0)
  member = [in_flaw_class(p, cfg.flaw) for p in probs]
  assert 0 < sum(member) < len(probs)
  inner_only = 0
  for p, m in zip(probs, member):
    assert (parse_answer(p["demonstration"]) == p["answer"]) != m, p
    inner_only += p["has_carry"] and not m
  assert inner_only > 0  # problems with carries the teacher handles right exist
  assert teacher_accuracy(probs) == pytest.approx(1 - sum(member) / len(probs))
  clean = generate_problems(ArithmeticConfig(ops=ops, min_digits=1, max_digits=3), 1500, seed=0)
  assert [(p["prompt"], p["answer"]) for p in probs] == [(p["prompt"], p["answer"]) for p in clean]
  # the class of "drop_carry" is exactly the problems with a carry
  assert [in_flaw_class(p, "drop_carry") for p in probs] == [p["has_carry"] for p in probs]


def test_flaw_prob_within_the_class():
  base = dict(ops=("+",), flaw="drop_final_carry")
  in_class = lambda q: [p for p in generate_problems(ArithmeticConfig(**base, flaw_prob=q), 2000, 0)
                        if in_flaw_class(p, "drop_final_carry")]
  assert teacher_accuracy(in_class(0.0)) == 1.0
  assert 0.15 < teacher_accuracy(in_class(0.75)) < 0.35  # right on ~25% of its weak class
  out = [p for p in generate_problems(ArithmeticConfig(**base, flaw_prob=0.75), 2000, 0)
         if not in_flaw_class(p, "drop_final_carry")]
  assert teacher_accuracy(out) == 1.0
