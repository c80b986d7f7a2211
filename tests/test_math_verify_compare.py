"""Our math verifier against HF math-verify on realistic completions: both verdicts are pinned, and
every disagreement says why. README's table: `python tests/test_math_verify_compare.py`."""
import pytest
from math_verify import parse, verify

from rlhfjax.rewards import math_reward

E = "\u2026"
# (completion, gold, ours, math-verify, why they differ: "" where they agree)
CASES = [
    # GSM8K-style: "####", "The answer is", commas, dollars, wrong answers
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.\n#### 72", "72", 1, 1, ""),
    ("Weng earns 12/60 = $0.2 per minute, so 0.2 x 50 = $10.\n#### 10", "10", 1, 1, ""),
    ("She needs 100 - 50 - 15 - 30 = 5 more dollars. The answer is 5.", "5", 1, 1, ""),
    ("The total is 1,250 + 750 = 2,000.\nThe answer is 2,000.", "2000", 1, 1, ""),
    ("The town grew to 1,234,567 people.\n#### 1,234,567", "1234567", 1, 1, ""),
    ("She pays $1,234.50 in total.\n#### 1234.50", "1234.5", 1, 1, ""),
    ("So she has 3 cats and 4 dogs, 7 pets in total.", "7", 1, 1, ""),
    ("The answer is 71.", "72", 0, 0, ""),
    ("#### 1,000", "100", 0, 0, ""),
    ("I could not solve this problem.", "5", 0, 0, ""),
    ("Answer: 42", "42", 1, 1, ""),
    ("Final answer: 1/4", "0.25", 1, 1, ""),
    # boxed, fractions, decimals
    ("So the final answer is $\\boxed{\\frac{3}{4}}$.", "3/4", 1, 1, ""),
    ("We simplify to get \\boxed{0.75}.", "\\frac{3}{4}", 1, 1, ""),
    ("The probability is \\boxed{\\dfrac{1}{3}}.", "1/3", 1, 1, ""),
    ("The probability is 0.3333333.", "1/3", 1, 1, ""),
    ("The answer is $\\frac{6}{8}$.", "0.75", 1, 1, ""),
    ("The answer is 0.5000001.", "0.5", 0, 1,
     "math-verify rounds to 6 decimals; we compare two finite decimals exactly"),
    ("\\boxed{\\sqrt{16}}", "4", 0, 1,
     "we compare numbers and strings, math-verify evaluates expressions (sympy)"),
    ("\\boxed{2^{3}}", "8", 0, 1, "we do not evaluate powers; math-verify does (sympy)"),
    ("The answer is 3,5.", "3.5", 0, 1,
     "math-verify reads a decimal comma; we read `3,5` as a list, not a number"),
    # units, negative numbers, percent, equations
    ("The answer is 12.50 dollars.", "12.5", 1, 1, ""),
    ("He walked 5 km, so the answer is 5 km.", "5", 1, 1, ""),
    ("The rope is \\boxed{12 \\text{ cm}} long.", "12", 1, 1, ""),
    ("The angle is \\boxed{90^\\circ}.", "90", 1, 1, ""),
    ("\\boxed{\\$18}", "18", 1, 1, ""),
    ("The temperature dropped to \\boxed{-7} degrees.", "-7", 1, 1, ""),
    ("The answer is \u22127.", "-7", 1, 0, "math-verify does not read the unicode minus sign"),
    ("\\boxed{25\\%}", "25", 1, 1, ""),
    ("Therefore \\boxed{x = 4}.", "4", 1, 1, ""),
    # hedging: several final answers
    (f"The answer is 12 {E} no wait, 13. The answer is 13.", "13", 0, 1,
     "two different final answers: we give 0 (a hedge), math-verify credits the last"),
    (f"The answer is 12 {E} no wait, 13. The answer is 13.", "12", 0, 0, ""),
    ("The answer is 8.\n#### 9", "8", 0, 1,
     "two different final answers: math-verify ranks \"The answer is\" above `####`"),
    ("\\boxed{12}. Hmm, actually the answer is 13.", "12", 0, 1,
     "two different final answers: math-verify ranks a box above the last statement"),
    ("The answer is 12 or 13.", "12", 0, 1,
     "math-verify takes the first number after \"The answer is\"; we read a list"),
    ("\\boxed{5} or maybe \\boxed{6}", "6", 0, 0, ""),
    ("The answer is 3151. So the final answer is \\boxed{3,151}.", "3151", 1, 1, ""),
    ("The answer is 42. I am sure the answer is correct.", "42", 1, 1, ""),
    # thinking blocks
    ("<thinking> 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8 </thinking> The answer is 85. The answer is 85.", "85",
     1, 1, ""),
    ("<thinking>first I guessed 12, but 12 + 3 = 15</thinking> The answer is 15.", "12", 0, 0, ""),
    ("<thinking>The answer is 8.</thinking>\nThe answer is 9.", "9", 1, 1, ""),
    ("<thinking>so it is 41</thinking>", "41", 1, 1, ""),
    ("<thinking>7 + 8 = 15, so the answer is 15", "15", 0, 1,
     "unclosed thinking: we read no final answer, math-verify has no notion of thinking"),
    ("<thinking>a</thinking> The answer is 4. <thinking>hmm, maybe 5", "4", 0, 1,
     "unclosed thinking after the answer: we read no final answer"),
]


def math_verify_reward(completion: str, gold: str) -> int:
  """HF math-verify as its docs use it; no signal-based timeouts (our inputs are small)."""
  return int(verify(parse(gold, parsing_timeout=None), parse(completion, parsing_timeout=None),
                    timeout_seconds=None))


@pytest.mark.parametrize("completion,gold,ours,theirs,why", CASES)
def test_against_math_verify(completion, gold, ours, theirs, why):
  assert (math_reward([completion], [gold])[0], math_verify_reward(completion, gold)) == (ours, theirs)
  assert bool(why) == (ours != theirs)  # a disagreement is documented, an agreement has no reason


def test_table_is_broad():
  assert len(CASES) >= 40 and sum(bool(c[-1]) for c in CASES) >= 8


if __name__ == "__main__":  # the README table
  print(f"{sum(not c[-1] for c in CASES)} of {len(CASES)} completions scored alike; the others:\n")
  print("| completion | gold | ours | math-verify | why they differ |\n|---|---|---|---|---|")
  for completion, gold, ours, theirs, why in CASES:
    if why:
      text = completion.replace("\n", "\\n").replace("|", "\\|")
      print(f"| `{text}` | `{gold}` | {ours} | {theirs} | {why} |")
