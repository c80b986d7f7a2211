"""pass@k vs brute-force subset enumeration; maj@k on hand-made cases."""

import itertools

import numpy as np
import pytest

from rlhfjax import rl


def pass_at_k_brute(n, c, k):
  """Fraction of k-subsets of n samples (the first c correct) containing a correct one."""
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        np.testing.assert_allclose(rl.pass_at_k(n, c, k), pass_at_k_brute(n, c, k), rtol=1e-12,
                                   err_msg=f"n={n} c={c} k={k}")


def test_pass_at_k_vectorized_and_edges():
  n = np.array([5, 5, 5, 10, 200])
  c = np.array([0, 1, 5, 3, 7])
  out = rl.pass_at_k(n, c, 2)
  assert out.shape == (5,)
  expected = [pass_at_k_brute(5, 0, 2), pass_at_k_brute(5, 1, 2), 1.0, pass_at_k_brute(10, 3, 2),
              1 - (193 * 192) / (200 * 199)]
  np.testing.assert_allclose(out, expected, rtol=1e-12)
  np.testing.assert_allclose(rl.pass_at_k(np.array([4, 4]), 2, 1), [0.5, 0.5])  # broadcast c
  assert rl.pass_at_k(1000, 0, 100) == 0.0 and rl.pass_at_k(1000, 901, 100) == 1.0
  for bad in [(3, 1, 4), (3, 4, 1), (3, 1, 0), (3, -1, 1)]:
    with pytest.raises(ValueError):
      rl.pass_at_k(*bad)


def test_maj_at_k():
  answers = [
      ["1", "2", "2", "3"],      # k<=2: "1" (tie -> first seen); k>=3: "2" == gold
      [None, None, "5", "4"],    # None doesn't vote; k=4 ties 5/4 -> first seen "5" != gold "4"
      ["7", "8", "8", "8"],      # k<=2: "7"; k>=3: "8" == gold
      [None, None, None, None],  # no votes -> wrong
  ]
  gold = ["2", "4", "8", "9"]
  assert rl.maj_at_k(answers, gold, 1) == 0.0
  assert rl.maj_at_k(answers, gold, 2) == 0.0
  assert rl.maj_at_k(answers, gold, 3) == pytest.approx(2 / 4)
  assert rl.maj_at_k(answers, gold, 4) == pytest.approx(2 / 4)
  assert rl.maj_at_k(answers[1:2], ["5"], 4) == 1.0
  # Votes by exact equality, the winner is judged by `match`.
  assert rl.maj_at_k([["5.0", "x"]], ["5"], 2, match=lambda p, g: float(p) == float(g)) == 1.0
  with pytest.raises(ValueError):
    rl.maj_at_k(answers, gold, 0)
  with pytest.raises(ValueError):
    rl.maj_at_k(answers, gold[:2], 1)
