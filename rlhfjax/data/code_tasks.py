"""A generated family of one-line Python tasks with a flawed teacher, deterministic from a seed.

Each task is a dict:
  prompt    "Write f(xs): the number of items of xs that are at least 4. f([4, 1, 9]) == 2. f([]) == 0."
            (a one-line spec and two input/output examples)
  response  the teacher's solution, one line: "def f(xs): return sum(1 for x in xs if x >= 4)"
  tests     hidden asserts, e.g. ["assert f([4, 4, 3]) == 2", ...]; the sandbox verifier scores
            the fraction that pass (`rlhfjax.rewards.sandbox.code_reward_fn`)
  flawed    whether the teacher's response is wrong (it fails at least one hidden test)

The teacher has one systematic bug class, as the arithmetic teacher forgets carries: with
probability `flaw_prob` it confuses an inclusive bound with an exclusive one (`>=` written `>`,
`range(1, n + 1)` written `range(1, n)`, `xs[:k]` written `xs[:k - 1]`). The hidden tests always
probe the bound, so SFT learns the habit and a verifier reward can
train it away. Splits are disjoint by a stable hash of the prompt text.
"""

from __future__ import annotations

import random
import zlib

# (spec with {k}, argument name, right body, flawed body, argument generator, boundary-probing args)
# Bodies are expressions of the argument and k; generators take (rng, k).
_ITEMS = lambda rng, k: [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]  # noqa: E731
_TEMPLATES = (
    ("the number of items of xs that are at least {k}", "xs",
     "sum(1 for x in xs if x >= {k})", "sum(1 for x in xs if x > {k})", _ITEMS,
     lambda rng, k: [k, k, rng.randint(0, 9)]),
    ("the items of xs that are at most {k}, in order", "xs",
     "[x for x in xs if x <= {k}]", "[x for x in xs if x < {k}]", _ITEMS,
     lambda rng, k: [k, rng.randint(0, 9), k]),
    ("the sum of the integers from {k} to n inclusive", "n",
     "sum(range({k}, n + 1))", "sum(range({k}, n))", lambda rng, k: k + rng.randint(2, 9),
     lambda rng, k: k + rng.randint(1, 4)),
    ("the first {k} items of xs", "xs", "xs[:{k}]", "xs[:{k} - 1]",
     lambda rng, k: [rng.randint(0, 9) for _ in range(k + 2)],
     lambda rng, k: [rng.randint(0, 9) for _ in range(k + 1)]),
    ("whether n is between {k} and {k2} inclusive", "n", "{k} <= n <= {k2}", "{k} < n < {k2}",
     lambda rng, k: rng.randint(k + 1, k + 4), lambda rng, k: rng.choice([k, k + 5])),
    ("the multiples of {k} from {k} up to n inclusive", "n", "list(range({k}, n + 1, {k}))",
     "list(range({k}, n, {k}))", lambda rng, k: k * rng.randint(2, 4) + 1,
     lambda rng, k: k * rng.randint(2, 4)),
    ("how many times {k} divides into n", "n", "n // {k}", "(n - 1) // {k}",
     lambda rng, k: k * rng.randint(1, 9) + rng.randint(1, k - 1) if k > 1 else rng.randint(1, 20),
     lambda rng, k: k * rng.randint(1, 9)),
    ("the largest item of xs that is at most {k}, or -1 if none is", "xs",
     "max([x for x in xs if x <= {k}], default=-1)", "max([x for x in xs if x < {k}], default=-1)",
     lambda rng, k: [rng.randint(0, k - 1) for _ in range(3)] if k > 0 else [5, 6],
     lambda rng, k: [k, rng.randint(0, 9)]),
)
SPLITS = ("train", "test")


def make_task(template: int, k: int, flaw_prob: float, rng: random.Random) -> dict:
  """One task of `_TEMPLATES[template]` with constant `k` (2..6); the teacher draws its flaw from `rng`."""
  spec, argname, right, wrong, gen, probe = _TEMPLATES[template]
  fmt = dict(k=k, k2=k + 5)
  right, wrong = right.format(**fmt), wrong.format(**fmt)
  solution = eval(f"lambda {argname}: {right}")  # noqa: S307 -- our own template text
  examples, hidden, seen = [], [], set()
  while len(examples) < 2:
    a = gen(rng, k)
    if repr(a) not in seen:
      seen.add(repr(a))
      examples.append(a)
  for a in [probe(rng, k) for _ in range(2)] + [gen(rng, k) for _ in range(2)]:
    hidden.append(f"assert f({a!r}) == {solution(a)!r}")
  shown = " ".join(f"f({a!r}) == {solution(a)!r}." for a in examples)
  flawed = rng.random() < flaw_prob
  body = wrong if flawed else right
  return {"prompt": f"Write f({argname}): {spec.format(**fmt)}. {shown}",
          "response": f"def f({argname}): return {body}", "tests": hidden, "flawed": flawed}


def _split_of(prompt: str, test_fraction: float) -> str:
  return "test" if zlib.crc32(prompt.encode()) % 10_000 < int(round(test_fraction * 10_000)) else "train"


def generate_code_tasks(n: int, seed: int, split: str = "train", *, flaw_prob: float = 0.75,
                        test_fraction: float = 0.1) -> list[dict]:
  """`n` tasks of `split`, a pure function of the arguments (prompts sampled with replacement)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0.0 <= flaw_prob <= 1.0:
    raise ValueError(f"flaw_prob must be in [0, 1], got {flaw_prob}")
  rng = random.Random(f"rlhfjax-code/{seed}/{split}")
  out = []
  while len(out) < n:
    task = make_task(rng.randrange(len(_TEMPLATES)), rng.randint(2, 6), flaw_prob, rng)
    if _split_of(task["prompt"], test_fraction) == split:
      out.append(task)
  return out
