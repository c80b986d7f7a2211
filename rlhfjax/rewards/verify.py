"""Correctness of completions for evaluation, whatever the task: math answers or code tests."""

import numpy as np


def verify(texts: list[str], examples: list[dict]) -> np.ndarray:
  """1.0 where a completion is right, else 0.0: the math verifier against each example's "answer",
  or, for code tasks (examples with "tests" and no "answer"), every hidden test passing."""
  if "answer" in examples[0]:
    from rlhfjax.rewards.math import math_reward
    return math_reward(texts, [e["answer"] for e in examples])
  from rlhfjax.rewards.sandbox import code_reward_fn
  tests = [e["tests"] for e in examples]
  return (code_reward_fn([""] * len(texts), texts, tests=tests) == 1.0).astype(np.float32)
