"""A synthetic arithmetic task family with a (possibly flawed) teacher, deterministic from a seed.

Each problem is a dict:
  prompt         "What is 47 + 38?"      (the question; wrap with tokenizer.format_prompt)
  answer         "85"                    (ALWAYS the true gold answer)
  demonstration  the teacher's response: optional <thinking> scratchpad, then "The answer is N."
  has_carry      whether the true column computation carries (or borrows, for "-") anywhere

The teacher computes column by column. With `flaw="drop_carry"` it forgets each carry (borrow for
"-") with probability `flaw_prob`, in the scratchpad and the answer: with `flaw_prob=1` it is wrong
exactly on problems with a carry — a bias an RL verifier can fix and SFT can't. `"drop_final_carry"`
forgets only the carry out of the leading column ("47 + 68 = 15"; for "*" of each partial product
and their sum); with `flaw_prob < 1` the right behaviour still appears for RL to amplify.

Style habits the simulated human dislikes: with probability `chatter` 1–3 `FILLER` sentences
around the answer, with probability `repeat` the answer said twice. Splits are disjoint: a stable
hash of the question text assigns it to "train" or "test" for any seed or size.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from typing import Iterable, Literal

SPLITS = ("train", "test")
_ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")
FLAWS = ("none", "drop_carry", "drop_final_carry")
# Chatter made only of characters the arithmetic tokenizer knows (no unk pieces); sentences end in
# "." or "?" so the labeler's sentence splitter sees them as sentences.
FILLER = ("Anyway.", "As you can see.", "That is a nice one.", "To answer this.",
          "This is a true answer.", "Trust it.", "Where to start?", "one can see this.",
          "that is it.", "sure.")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Which problems to generate and how the teacher writes demonstrations."""

  ops: tuple[str, ...] = ("+",)  # operators drawn uniformly: any of "+", "-", "*"
  min_digits: int = 2  # fewest digits per operand (1-digit operands are 0..9)
  max_digits: int = 2  # most digits per operand; digit count is drawn uniformly per operand
  min_digits_b: int = 0  # the second operand's digit range (0 = as the first's)
  max_digits_b: int = 0
  thinking: bool = True  # demonstrations carry a <thinking> column-by-column scratchpad
  thinking_prob: float = 1.0  # with thinking, the share of demonstrations that show it (others answer directly)
  # the teacher's systematic weakness: forget any carry, or only the carry out of the leading column
  flaw: Literal["none", "drop_carry", "drop_final_carry"] = "none"
  flaw_prob: float = 1.0  # probability the flawed teacher forgets each carry of its class
  test_fraction: float = 0.1  # share of the question space hashed into the test split
  chatter: float = 0.0  # probability a demonstration pads its answer with 1-3 FILLER sentences
  repeat: float = 0.0  # probability a demonstration states its final answer twice

  def __post_init__(self):
    if not self.ops or any(op not in ("+", "-", "*") for op in self.ops):
      raise ValueError(f"ops must be a non-empty subset of ('+', '-', '*'), got {self.ops!r}")
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
    if self.flaw not in FLAWS:
      raise ValueError(f"flaw must be one of {FLAWS}, got {self.flaw!r}")
    if not 0.0 <= self.flaw_prob <= 1.0:
      raise ValueError(f"flaw_prob must be in [0, 1], got {self.flaw_prob}")
    if not 1 <= (self.min_digits_b or self.min_digits) <= (self.max_digits_b or self.max_digits):
      raise ValueError(f"need 1 <= min_digits_b <= max_digits_b, got {self.min_digits_b}, {self.max_digits_b}")
    for name in ("chatter", "repeat", "thinking_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def _digits(x: int) -> list[int]:
  """Least-significant digit first."""
  return [int(c) for c in reversed(str(x))]


def _from_digits(ds: list[int]) -> int:
  return int("".join(str(d) for d in reversed(ds))) if ds else 0


class _Teacher:
  """Column arithmetic that may forget carries. `drop()` decides, per carry, whether to forget.

  With `final_only`, only a carry out of the leading column is ever offered to `drop()`.
  """

  def __init__(self, drop, final_only: bool = False):
    self.drop = drop
    self.final_only = final_only
    self.carried = False  # whether any carry/borrow occurred (before deciding to drop it)

  def forget(self, leading: bool) -> bool:
    return (leading or not self.final_only) and self.drop()

  def add(self, a: int, b: int) -> tuple[int, list[str]]:
    da, db = _digits(a), _digits(b)
    n = max(len(da), len(db))
    da += [0] * (n - len(da))
    db += [0] * (n - len(db))
    out, steps, carry = [], [], 0
    for i, (x, y) in enumerate(zip(da, db)):
      s = x + y + carry
      expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
      carry = s // 10
      if carry:
        self.carried = True
        if self.forget(i == n - 1):
          carry = 0
          steps.append(f"{expr}={s}.")
        else:
          steps.append(f"{expr}={s} carry {carry}.")
      else:
        steps.append(f"{expr}={s}.")
      out.append(s % 10)
    if carry:
      out += _digits(carry)
    return _from_digits(out), steps

  def sub(self, a: int, b: int) -> tuple[int, list[str]]:
    """a - b with a >= b; a forgotten borrow is not subtracted from the next column."""
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    out, steps, borrow = [], [], 0
    for i, (x, y) in enumerate(zip(da, db)):
      s = x - borrow - y
      expr = f"{x}-{borrow}-{y}" if borrow else f"{x}-{y}"
      borrow = 0
      if s < 0:
        self.carried = True
        s += 10
        expr = f"1{expr}"  # e.g. 15-8: the borrowed ten
        if self.forget(i == len(da) - 1):  # (a >= b: never a borrow out of the leading column)
          steps.append(f"{expr}={s}.")
        else:
          borrow = 1
          steps.append(f"{expr}={s} borrow 1.")
      else:
        steps.append(f"{expr}={s}.")
      out.append(s)
    return _from_digits(out), steps

  def mul(self, a: int, b: int) -> tuple[int, list[str]]:
    """Partial products a*(digit*10^j), each by columns, then their column sum."""
    da = _digits(a)
    partials, steps = [], []
    for j, y in enumerate(_digits(b)):
      out, carry = [], 0
      for i, x in enumerate(da):
        p = x * y + carry
        carry = p // 10
        if carry:
          self.carried = True
          if self.forget(i == len(da) - 1):
            carry = 0
        out.append(p % 10)
      if carry:
        out += _digits(carry)
      pp = _from_digits(out) * 10**j
      partials.append(pp)
      steps.append(f"{a}*{y * 10**j}={pp}.")
    if len(partials) == 1:
      return partials[0], steps
    # Column sum of all partial products; a dropped carry vanishes.
    cols = [_digits(p) for p in partials]
    n = max(len(c) for c in cols)
    out, carry = [], 0
    for i in range(n):
      s = sum(c[i] for c in cols if i < len(c)) + carry
      carry = s // 10
      if carry:
        self.carried = True
        if self.forget(i == n - 1):
          carry = 0
      out.append(s % 10)
    if carry:
      out += _digits(carry)
    total = _from_digits(out)
    steps.append("+".join(str(p) for p in partials) + f"={total}.")
    return total, steps


def _solve(a: int, op: str, b: int, drop, final_only: bool = False) -> tuple[int, list[str], bool]:
  t = _Teacher(drop, final_only)
  fn = {"+": t.add, "-": t.sub, "*": t.mul}[op]
  value, steps = fn(a, b)
  return value, steps, t.carried


def _split_of(question: str, test_fraction: float) -> str:
  bucket = zlib.crc32(question.encode()) % 10_000
  return "test" if bucket < int(round(test_fraction * 10_000)) else "train"


def _sample_operand(rng: random.Random, lo: int, hi: int) -> int:
  d = rng.randint(lo, hi)
  return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)


def make_problem(a: int, op: str, b: int, config: ArithmeticConfig,
                 rng: random.Random | None = None) -> dict:
  """One problem `a op b` with the config's teacher (rng drives flaw_prob < 1)."""
  if op == "-" and a < b:
    a, b = b, a
  question = f"What is {a} {op} {b}?"
  gold, _, has_carry = _solve(a, op, b, drop=lambda: False)
  if config.flaw in ("drop_carry", "drop_final_carry"):
    rng = rng or random.Random(0)
    drop = (lambda: True) if config.flaw_prob >= 1.0 else (lambda: rng.random() < config.flaw_prob)
  else:
    drop = lambda: False  # noqa: E731
  value, steps, _ = _solve(a, op, b, drop, final_only=config.flaw == "drop_final_carry")
  demo = f"The answer is {value}."
  if config.chatter > 0 or config.repeat > 0:
    demo = chatty(demo, config, rng or random.Random(0))
  if config.thinking and (config.thinking_prob >= 1.0 or (rng or random.Random(0)).random() < config.thinking_prob):
    demo = f"<thinking> {' '.join(steps)} </thinking> {demo}"
  return {"prompt": question, "answer": str(gold), "demonstration": demo, "has_carry": has_carry}


def chatty(answer: str, config: ArithmeticConfig, rng: random.Random) -> str:
  """The teacher's style habits around its answer sentence (module docstring)."""
  out = [answer]
  if rng.random() < config.repeat:
    out.append(answer)
  if rng.random() < config.chatter:
    for phrase in rng.sample(FILLER, rng.randint(1, 3)):
      out.insert(rng.randint(0, len(out)), phrase)
  return " ".join(out)


def generate_problems(config: ArithmeticConfig, n: int, seed: int, split: str = "train") -> list[dict]:
  """`n` problems of `split` ("train" | "test"), a pure function of (config, n, seed, split).

  Questions are sampled with replacement, keeping only those whose hash falls in `split`.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  rng = random.Random(f"rlhfjax-arithmetic/{seed}/{split}")
  out: list[dict] = []
  misses = 0
  while len(out) < n:
    op = rng.choice(config.ops)
    a = _sample_operand(rng, config.min_digits, config.max_digits)
    b = _sample_operand(rng, config.min_digits_b or config.min_digits, config.max_digits_b or config.max_digits)
    if op == "-" and a < b:
      a, b = b, a
    if _split_of(f"What is {a} {op} {b}?", config.test_fraction) != split:
      misses += 1
      if misses > 1000 + 100 * n:
        raise ValueError(f"could not sample {n} {split!r} problems: the question space of {config} "
                         "is too small; widen the digits or change test_fraction")
      continue
    out.append(make_problem(a, op, b, config, rng))
  return out


_QUESTION_RE = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def in_flaw_class(problem: dict | str, flaw: str) -> bool:
  """Whether `flaw` applies to this problem: it meets a carry that teacher would be offered to forget.

  `problem` is a problem dict or its question text. "drop_carry": any carry/borrow;
  "drop_final_carry": a carry out of the leading column; "none": never.
  """
  if flaw not in FLAWS:
    raise ValueError(f"flaw must be one of {FLAWS}, got {flaw!r}")
  question = problem if isinstance(problem, str) else problem["prompt"]
  m = _QUESTION_RE.fullmatch(question.strip())
  if not m:
    raise ValueError(f"not an arithmetic question: {question!r}")
  offered = []

  def probe() -> bool:  # records that a carry of the class was met, then keeps it
    offered.append(True)
    return False

  _solve(int(m[1]), m[2], int(m[3]), probe, final_only=flaw == "drop_final_carry")
  return flaw != "none" and bool(offered)


def parse_answer(text: str) -> str | None:
  """The N of the last "The answer is N." in `text`, or None."""
  m = _ANSWER_RE.findall(text)
  return m[-1] if m else None


def teacher_accuracy(problems: Iterable[dict]) -> float:
  """Fraction of demonstrations whose stated final answer equals the gold answer."""
  problems = list(problems)
  if not problems:
    return float("nan")
  return sum(parse_answer(p["demonstration"]) == p["answer"] for p in problems) / len(problems)
