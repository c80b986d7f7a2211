"""Red-team review of the math / format verifiers and `verify`: reward hacks (a reward the answer does not
earn), false negatives (a right answer refused), and inputs that must not hang the verifier."""
from fractions import Fraction

import numpy as np
import pytest
from math_verify import parse, verify as mv_verify

from rlhfjax.rewards import answers_match, extract_answer, format_reward, math_reward
from rlhfjax.rewards import math as math_module
from rlhfjax.rewards import sandbox
from rlhfjax.rewards.verify import verify


def reward(completion: str, gold: str) -> float:
  return float(math_reward([completion], [gold])[0])


@pytest.mark.parametrize("completion,gold", [
    # the "x = " prefix used to be dropped whatever stood left of the last "=": comparisons, hedges, false claims
    ("\\boxed{x != 4}", "4"),
    ("\\boxed{x <= 4}", "4"),
    ("\\boxed{x >= 4}", "4"),
    ("\\boxed{3 = 4}", "4"),
    ("\\boxed{x = 3 \\text{ or } x = 4}", "4"),
    ("\\boxed{x = 3 or x = 4}", "4"),
    ("\\boxed{x=3, y=4}", "4"),
    ("\\boxed{x=3;x=4}", "4"),
    ("\\boxed{x = 3 \\quad x = 4}", "4"),
    ("\\boxed{x = 3 \\vee x = 4}", "4"),
    ("\\boxed{x = 3 = 4}", "4"),
    ("The answer is x = 3 or x = 4.", "4"),
    ("\\boxed{4}", "x=3, y=4"),  # half of a two-variable gold
])
def test_equations_that_hedge_or_compare_earn_nothing(completion, gold):
  assert reward(completion, gold) == 0.0, extract_answer(completion)


@pytest.mark.parametrize("completion,gold", [
    ("\\boxed{x = 7}", "7"),
    ("\\boxed{x = 10/2 = 5}", "5"),
    ("\\boxed{f(3) = 5}", "5"),
    ("\\boxed{\\theta = 30^\\circ}", "30"),
    ("The answer is 2^{10} = 1024.", "1024"),
    ("The answer is 6 - 2 = 4", "4"),
    ("\\boxed{x = 3, y = 4}", "x=3, y=4"),
    ("\\boxed{y = 2x + 3}", "y=2x+3"),
])
def test_plain_equations_still_score(completion, gold):
  assert reward(completion, gold) == 1.0, extract_answer(completion)


@pytest.mark.parametrize("completion,gold", [
    # lists: reading the first value rewarded a hedge for whichever value was gold
    ("The answer is 3.5 or 4", "3"),  # used to backtrack to the "3" of "3.5"
    ("The answer is 3 and 4.", "3"),
    ("The answer is 3; 4.", "3"),
    ("The answer is 3 or maybe 4.", "3"),
    ("The answer is 3, or 4.", "3"),
    ("The answer is 3 (or 4).", "3"),
    ("The answer is 3 to 4.", "3"),
    ("The answer is 3 or\n4.", "3"),
    # expressions: their leading number is not their value
    ("The answer is 1e6.", "1"),
    ("The answer is 2^{10}.", "2"),
    ("The answer is 3\\sqrt{2}.", "3"),
    ("The answer is 2\\pi.", "2"),
    ("The answer is 3 \\times 10^5.", "3"),
    ("The answer is 3 x 10^5.", "3"),
    ("The answer is 3 * 4.", "3"),
    ("The answer is 5 - 2 = 3.", "5"),
])
def test_phrase_does_not_read_the_first_number_of_a_list_or_expression(completion, gold):
  assert reward(completion, gold) == 0.0, extract_answer(completion)


@pytest.mark.parametrize("completion,gold", [
    ("The answer is 1e6.", "1000000"),
    ("The answer is 1.5e3", "1500"),
    ("The answer is 3\\sqrt{2}.", "3\\sqrt{2}"),
    ("The answer is 2\\pi.", "2\\pi"),
    ("The answer is 5 - 2 = 3.", "3"),
    # the leading number is still read where nothing continues it
    ("The answer is **5** apples.", "5"),
    ("The answer is 90^{\\circ} because it is a right angle.", "90"),
    ("The answer is 25, since 5 x 5 = 25.", "25"),
    ("The answer is 12, which is even.", "12"),
    ("The answer is 7 apples and 3 pears.", "7"),
    ("The answer is \\(5\\) apples.", "5"),
    ("The answer is 5%.", "5"),
    ("The answer is 12 - the rest is change.", "12"),
])
def test_phrase_reads_whole_expressions_and_plain_leading_numbers(completion, gold):
  assert reward(completion, gold) == 1.0, extract_answer(completion)


@pytest.mark.parametrize("pred,gold,expected", [
    ("5\\text{ or more}", "5", False),  # a "unit" that hedges
    ("5 \\text{ is wrong}", "5", False),
    ("3\\text{ or }4", "34", False),  # not at the end: no unit
    ("5\\text{ apples}", "5", True),
    ("12\\text{ cm}^2", "12", True),
    ("12 \\text{ cm}.", "12", True),
])
def test_units_are_trailing_and_do_not_hedge(pred, gold, expected):
  assert answers_match(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("333333", "1000000/3", False),  # an integer is no rounded decimal of a fraction (rel tol 1e-6 let it in)
    ("1000000/3", "333333", False),
    ("666667", "2000000/3", False),
    ("333333.3", "1000000/3", True),
    ("0.3333333", "1/3", True),
    ("1/2/3", "1.5", False),  # was 1 / (2/3)
    ("6/2/3", "1", False),
    ("1/2/3", "1/6", False),
])
def test_tolerance_and_fractions(pred, gold, expected):
  assert answers_match(pred, gold) is expected


# Right answers in common notations that used to score 0 (math-verify, the oracle, credits each).
FALSE_NEGATIVES = [
    ("The answer is \\(5\\).", "5"),
    ("The answer is \\[5\\]", "5"),
    ("The answer is \\(\\frac{1}{2}\\).", "0.5"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("\\boxed{\\frac12}", "0.5"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{\\mathbf{5}}", "5"),
    ("\\boxed{\\displaystyle 5}", "5"),
    ("The answer is 2^{10} = 1024.", "1024"),
    ("The rope is \\boxed{12\\text{ cm}^2}.", "12"),
]


@pytest.mark.parametrize("completion,gold", FALSE_NEGATIVES)
def test_false_negatives_fixed_agree_with_math_verify(completion, gold):
  theirs = mv_verify(parse(gold, parsing_timeout=None), parse(completion, parsing_timeout=None), timeout_seconds=None)
  assert (reward(completion, gold), bool(theirs)) == (1.0, True)


@pytest.mark.parametrize("completion,gold", [
    ("The answer is (B).", "B"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{B}", "(B)"),
    ("\\boxed{\\frac1{2}}", "1/2"),
])
def test_false_negatives_fixed(completion, gold):
  assert reward(completion, gold) == 1.0, extract_answer(completion)


@pytest.mark.parametrize("completion,gold", [
    ("\\boxed{1e10000000}", "1"),  # Fraction builds the 10^10000000 integer: 18 s before the fix
    ("The answer is 1e10000000.", "1"),
    ("#### 1e-10000000", "0"),
    ("x = 1e10000000", "1"),
    ("\\boxed{1e-5000}", "0"),  # and a tiny number is not zero
])
def test_exponent_bombs_are_cheap_and_score_nothing(completion, gold):
  assert reward(completion, gold) == 0.0
  assert not answers_match("1e10000000", "1e10000000")  # too large to be a number here
  # what keeps them cheap: an exponent beyond 1000 is no number, so no 10^10000000 integer is built
  assert math_module._to_fraction("1e10000000") is None and math_module._to_fraction("1e-1001") is None
  assert math_module._to_fraction("1e1000") == Fraction(10) ** 1000


@pytest.mark.parametrize("completion", ["\\boxed{" * 5000, "\\boxed{{" * 5000, "\\boxed{" * 5000 + "4}"])
def test_many_unbalanced_boxes_take_linear_time(completion, monkeypatch):
  """Each box rescanned the rest of the text (~12 s for these before the fix); now the braces of a text
  are matched in one pass, whatever the number of boxes."""
  passes = []
  one_pass = math_module._closing_braces
  monkeypatch.setattr(math_module, "_closing_braces", lambda text: passes.append(len(text)) or one_pass(text))
  assert math_reward([completion], ["4"])[0] == float(completion.endswith("4}") and "{{" not in completion)
  format_reward(["<thinking>x</thinking>" + completion])
  assert 1 <= len(passes) <= 4, passes  # a pass or two per verifier call, not one per box


def test_boxes_still_nest_after_the_linear_rewrite():
  assert extract_answer("} \\boxed{a{b{c}}d} {") == "a{b{c}}d"
  assert extract_answer("\\boxed{\\boxed{3} or \\boxed{4}}") is None  # hedge inside a box


@pytest.mark.parametrize("completion,expected", [
    ("<thinking>\u200b</thinking> 4", 0.0),  # an invisible "thought" is an empty block
    ("<thinking>\ufeff\u200d \u2060</thinking> 4", 0.0),
    ("<thinking>x</thinking>\u200b", 0.0),
    ("\u200b<thinking>2+2</thinking> 4", 1.0),
    ("<thinking>2+2</thinking> 4", 1.0),
])
def test_format_reward_blank_means_invisible_too(completion, expected):
  assert format_reward([completion])[0] == expected


def _fake_code_reward(prompts, completions, tests=None, **unused):
  return np.array([1.0 if "return 6" in c else 0.5 for c in completions], np.float32)


def test_verify_decides_math_or_code_per_example(monkeypatch):
  monkeypatch.setattr(sandbox, "code_reward_fn", _fake_code_reward)
  texts = ["The answer is 12.", "def f(): return 6", "def f(): return 5", "def f(): return 6", "The answer is 3."]
  exs = [{"answer": "12"}, {"tests": ["assert f() == 6"]}, {"tests": ["assert f() == 6"]},
         {"answer": None, "tests": ["assert f() == 6"]}, {"answer": "4", "tests": None}]
  np.testing.assert_array_equal(verify(texts, exs), [1.0, 1.0, 0.0, 1.0, 0.0])
  assert verify([], []).shape == (0,)
  with pytest.raises(ValueError):
    verify(["a"], [])
