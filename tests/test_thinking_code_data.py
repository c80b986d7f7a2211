"""The data and metrics behind the thinking and code chapters: a teacher that thinks half of the time,
per-operand digit ranges, accuracy split by thinking, the length cost, and the generated code tasks."""
import numpy as np
import pytest

from rlhfjax.data import ArithmeticConfig
from rlhfjax.data.arithmetic import generate_problems, parse_answer
from rlhfjax.data.code_tasks import _TEMPLATES, generate_code_tasks, make_task
from rlhfjax.rewards import get_reward_fn, thinking_stats
from rlhfjax.rewards.verify import verify


def test_teacher_thinks_at_the_configured_rate_and_is_always_right():
  cfg = ArithmeticConfig(ops=("*",), min_digits=3, max_digits=3, min_digits_b=1, max_digits_b=2,
                         thinking_prob=0.5)
  probs = generate_problems(cfg, 400, seed=0)
  thinks = np.array([p["demonstration"].startswith("<thinking>") for p in probs])
  assert 0.43 < thinks.mean() < 0.57
  assert all(parse_answer(p["demonstration"]) == p["answer"] for p in probs)
  for p in probs:
    a, b = p["prompt"][len("What is "):-1].split(" * ")
    assert len(a) == 3 and 1 <= len(b) <= 2
  assert generate_problems(cfg, 50, seed=0) == probs[:50]
  # the default (thinking_prob=1) draws nothing extra: every demonstration thinks, the stream unchanged
  full = generate_problems(ArithmeticConfig(), 30, seed=0)
  assert all(p["demonstration"].startswith("<thinking>") for p in full)
  with pytest.raises(ValueError, match="thinking_prob"):
    ArithmeticConfig(thinking_prob=1.5)
  with pytest.raises(ValueError, match="min_digits_b"):
    ArithmeticConfig(min_digits_b=3, max_digits_b=2)


def test_thinking_stats_split_accuracy_by_thinking():
  texts = ["<thinking> 2*3=6. </thinking> The answer is 6.", "<thinking> x </thinking> The answer is 5.",
           "The answer is 7.", "The answer is 1."]
  stats = thinking_stats(texts, answers=["6", "6", "7", None])
  assert stats["accuracy_thinking"] == 0.5  # 1 of the 2 thinking completions is right
  assert stats["accuracy_direct"] == 1.0  # the None-answer row is skipped
  assert stats["frac_thinking"] == 0.5
  assert np.isnan(thinking_stats(texts[2:3], answers=["7"])["accuracy_thinking"])
  assert "accuracy_direct" not in thinking_stats(texts)


def test_length_reward_is_minus_the_word_count():
  fn = get_reward_fn("length")
  np.testing.assert_array_equal(fn(["q", "q"], ["a b c", ""]), [-3.0, 0.0])


def test_code_tasks_flawed_teacher_fails_hidden_tests_and_the_right_one_passes():
  tasks = generate_code_tasks(300, seed=0, split="train", flaw_prob=0.75)
  assert 0.68 < np.mean([t["flawed"] for t in tasks]) < 0.82
  test_prompts = {t["prompt"] for t in generate_code_tasks(100, seed=0, split="test")}
  assert not test_prompts & {t["prompt"] for t in tasks}
  assert generate_code_tasks(20, seed=0) == tasks[:20]
  rng = __import__("random").Random(0)
  pairs = [(make_task(i, 3, 0.0, rng), make_task(i, 3, 1.0, rng)) for i in range(len(_TEMPLATES))]
  exs = [e for pair in pairs for e in pair]
  # each flawed solution run against its own task's tests, and each right one
  correct = verify([e["response"] for e in exs], exs)
  np.testing.assert_array_equal(correct, [1.0, 0.0] * len(_TEMPLATES))
  with pytest.raises(ValueError, match="flaw_prob"):
    generate_code_tasks(1, seed=0, flaw_prob=2.0)


def test_verify_math_examples():
  exs = [{"prompt": "q", "answer": "12"}, {"prompt": "q", "answer": "3"}]
  np.testing.assert_array_equal(verify(["The answer is 12.", "The answer is 4."], exs), [1.0, 0.0])
