"""Evaluation metrics over several sampled answers per problem (host-side NumPy)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence

import numpy as np


def pass_at_k(n, c, k: int) -> np.ndarray:
  """Unbiased pass@k (Chen et al. 2021, eq. 1): ``1 - C(n - c, k) / C(n, k)`` per problem.

  ``n`` samples, ``c`` correct (broadcastable int arrays ``[problems]``), ``1 <= k <= min(n)``.
  Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``; float64, to be averaged over problems.
  """
  n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
  if k < 1 or np.any(n < k) or np.any(c < 0) or np.any(c > n):
    raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got k={k}.")
  out = np.empty(n.shape, np.float64)
  for idx in np.ndindex(n.shape):
    ni, ci = int(n[idx]), int(c[idx])
    if ni - ci < k:
      out[idx] = 1.0
    else:
      out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
  return out


def maj_at_k(
    answers_per_problem: Sequence[Sequence[Hashable | None]],
    gold_per_problem: Sequence[Hashable],
    k: int,
    *,
    match: Callable[[Hashable, Hashable], bool] | None = None,
) -> float:
  """Majority-vote accuracy (maj@k, self-consistency; Wang et al. 2023), 0.0 for no problems.

  Per problem the first ``k`` extracted answers vote (``None`` does not); ties go to the answer
  seen first; the winner is right if ``match(winner, gold)`` (default ``==``; votes always count
  by equality). No votes: wrong.
  """
  if k < 1:
    raise ValueError(f"maj_at_k needs k >= 1, got {k}.")
  if len(answers_per_problem) != len(gold_per_problem):
    raise ValueError(f"{len(answers_per_problem)} answer lists for {len(gold_per_problem)} golds.")
  match = match or (lambda pred, gold: pred == gold)
  correct = 0
  for answers, gold in zip(answers_per_problem, gold_per_problem):
    votes = collections.Counter(a for a in list(answers)[:k] if a is not None)
    if votes:
      # Counter preserves insertion order, and max returns the first maximal element.
      winner = max(votes, key=votes.__getitem__)
      correct += bool(match(winner, gold))
  return correct / len(gold_per_problem) if len(gold_per_problem) else 0.0
