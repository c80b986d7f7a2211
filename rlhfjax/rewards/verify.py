"""Correctness of completions for evaluation, whatever the task: math answers or code tests."""

import numpy as np


def verify(texts: list[str], examples: list[dict]) -> np.ndarray:
  """1.0 where a completion is right, else 0.0: the math verifier against each example's "answer",
  or, for code tasks (examples with "tests" and no "answer", or a ``None`` one), every hidden test passing.
  Decided per example, so a batch may mix both kinds. Raises ValueError when the two lengths differ."""
  if len(texts) != len(examples):
    raise ValueError(f"{len(texts)} completions but {len(examples)} examples")
  out = np.zeros([len(texts)], np.float32)
  is_code = [e.get("answer") is None and e.get("tests") is not None for e in examples]
  code_rows = [i for i, c in enumerate(is_code) if c]
  math_rows = [i for i, c in enumerate(is_code) if not c]
  if math_rows:
    from rlhfjax.rewards.math import math_reward
    out[math_rows] = math_reward([texts[i] for i in math_rows], [examples[i].get("answer") for i in math_rows])
  if code_rows:
    from rlhfjax.rewards.sandbox import code_reward_fn
    scores = code_reward_fn([""] * len(code_rows), [texts[i] for i in code_rows],
                            tests=[examples[i]["tests"] for i in code_rows])
    out[code_rows] = (scores == 1.0).astype(np.float32)
  return out
