"""Math verifier, format reward, thinking stats, and the reward contract / combination."""
import numpy as np
import pytest

from rlhfjax import rewards
from rlhfjax.rewards import (answers_match, combine_rewards, extract_answer, format_reward, get_reward_fn,
                             math_reward, math_reward_fn, thinking_stats)

# (completion, gold answer, expected reward)
COMPLETIONS = [
    # thinking template
    ("<thinking>3000 + 151 = 3151</thinking>\nThe answer is 3,151.", "3151", 1.0),
    ("<thinking>first I thought 12, but 12+3=15</thinking> 15", "15", 1.0),
    ("<thinking>first I thought 12, but 12+3=15</thinking> 15", "12", 0.0),  # thinking number ignored
    ("<thinking>The answer is 8.</thinking>\nThe answer is 9.", "9", 1.0),
    ("<thinking>The answer is 8.</thinking>\nThe answer is 9.", "8", 0.0),
    ("<thinking>so it is 41</thinking>", "41", 1.0),  # nothing after: fall back to the whole text
    ("<thinking>a</thinking><thinking>b 3</thinking> so \\boxed{4}", "4", 1.0),
    ("<thinking>5 apples and 7 pears</thinking>\nI could not solve it.", "7", 0.0),
    # \boxed
    ("So the result is \\boxed{-12}.", "-12", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("We get \\boxed{1,000}", "1000", 1.0),
    ("\\boxed{5} then later \\boxed{6}", "6", 0.0),  # two different final answers: a hedge
    ("\\boxed{5} then later \\boxed{6}", "5", 0.0),
    ("nested \\boxed{\\frac{\\sqrt{4}}{1}} hmm", "\\frac{\\sqrt{4}}{1}", 1.0),
    ("\\boxed{x = 7}", "7", 1.0),
    ("The final answer is $\\boxed{42}$.", "42", 1.0),
    ("\\boxed{\\text{B}}", "B", 1.0),
    # "The answer is ..."
    ("The answer is 7.", "7", 1.0),
    ("Therefore, the answer is 7 apples.", "7", 1.0),
    ("The answer is: 12.0", "12", 1.0),
    ("The answer is $18.", "18", 1.0),
    ("The answer is \u22125.", "-5", 1.0),
    ("So the answer is +3", "3", 1.0),
    ("The answer is 0.5 and not 1/3.", "1/2", 1.0),
    ("The answer is B.", "b", 1.0),
    ("The answer is 2. Then 3 more sentences with 99.", "2", 1.0),
    # "Answer:"
    ("Answer: 3,151.", "3151", 1.0),
    ("**Answer:** 64", "64", 1.0),
    ("Final answer: 1/4", "0.25", 1.0),
    ("Answer: 100", "101", 0.0),
    # GSM8K
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18", 1.0),
    ("#### 42", "42", 1.0),
    ("#### 1,234,567", "1234567", 1.0),
    ("#### 42", "24", 0.0),
    # last number fallback
    ("She has 3 cats and 4 dogs, so 7 pets", "7", 1.0),
    ("She has 3 cats and 4 dogs, so 7 pets", "3", 0.0),
    ("Total: 2,500 dollars", "2500", 1.0),
    ("It is -0.75", "-3/4", 1.0),
    ("we get 1,2,3", "3", 1.0),
    # no answer / garbage
    ("I don't know.", "5", 0.0),
    ("", "5", 0.0),
    ("The answer is", "5", 0.0),
    ("\\boxed{}", "0", 0.0),
    ("The answer is 12.5", "12", 0.0),
    ("The answer is 12", "12.5", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", COMPLETIONS)
def test_math_reward_table(completion, gold, expected):
  assert math_reward([completion], [gold])[0] == expected, extract_answer(completion)


def test_table_is_broad():
  assert len(COMPLETIONS) >= 40


@pytest.mark.parametrize("completion,gold,expected", [
    # several different final answers: none counts
    ("The answer is 12 \u2026 no wait, 13. The answer is 13", "12", 0.0),
    ("The answer is 12 \u2026 no wait, 13. The answer is 13", "13", 0.0),
    ("The answer is 8.\n#### 9", "9", 0.0),
    ("\\boxed{12}. Hmm, actually the answer is 13.", "12", 0.0),
    ("Answer: 7. Or maybe \\boxed{8}", "8", 0.0),
    ("The answer is B. No, the answer is C.", "C", 0.0),
    ("The answer is 12 or 13.", "12", 0.0),  # a list is not a number
    ("\\boxed{12, 13}", "12", 0.0),
    ("<thinking>x</thinking> The answer is 4. The answer is 5.", "5", 0.0),
    # restating the same answer, commentary, hedges inside the thinking: fine
    ("The answer is 3151. So the final answer is \\boxed{3,151}.", "3151", 1.0),
    ("#### 1/2\nThe answer is 0.5", "0.5", 1.0),
    ("<thinking> 7+8=15 </thinking> The answer is 85. The answer is 85.", "85", 1.0),  # arithmetic `repeat`
    ("The answer is 42. I am sure the answer is correct.", "42", 1.0),
    ("The answer isn't 41. The answer is 42.", "42", 1.0),
    ("The answer isn't 4.", "4", 0.0),
    ("<thinking>The answer is 12? No, the answer is 13.</thinking> The answer is 13.", "13", 1.0),
    ("The answer is 2. Then 3 more sentences with 99.", "2", 1.0),
])
def test_hedged_answers(completion, gold, expected):
  assert math_reward([completion], [gold])[0] == expected, extract_answer(completion)


@pytest.mark.parametrize("completion", [
    "<thinking>2+2=4. The answer is 4.",
    "<thinking>\\boxed{4}",
    "<thinking>4",
    "The answer is 4. <thinking>let me check that",
    "<thinking>a</thinking> The answer is 4. <thinking>hmm, or 5",
    "<thinking>a</thinking><thinking>b, so 4",
])
def test_unclosed_thinking_has_no_answer(completion):
  assert extract_answer(completion) is None
  assert math_reward([completion], ["4"])[0] == 0.0


@pytest.mark.parametrize("completion", [
    "<thinking>a<thinking>b</thinking></thinking> The answer is 4.",  # last open tag is closed
    "steps 2+2</thinking> The answer is 4.",  # the prompt opened the block
    "<thinking> 2+2 </thinking> The answer is 4. <thinking> 3 </thinking>",  # nothing after: whole text
])
def test_closed_thinking_has_an_answer(completion):
  assert math_reward([completion], ["4"])[0] == 1.0


@pytest.mark.parametrize("text,expected", [
    ("<thinking>maybe 5</thinking> The answer is 3,151.", "3,151"),
    ("\\boxed{-12}", "-12"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("#### 42", "42"),
    ("The answer is 7.", "7"),
    ("Answer: **B**", "B"),
    ("no digits here", None),
    ("", None),
    (None, None),
    ("<thinking>12</thinking>   ", "12"),
    ("x = 3 and y = -4", "-4"),
    ("unbalanced \\boxed{12", "12"),
])
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("3,151.", "3151", True),
    ("3151", 3151, True),
    ("12.0", "12", True),
    ("12", 12.0, True),
    ("1/2", "0.5", True),
    ("0.5", "1/2", True),
    ("2/4", "1/2", True),
    ("\\frac{1}{2}", ".5", True),
    ("\u22125", "-5", True),
    ("+7", "7", True),
    ("$18", "18", True),
    ("$1,000.50", "1000.5", True),
    (" 42 ", "42", True),
    ("50%", "50", True),
    ("x = 5", "5", True),
    ("12\\text{ cm}", "12", True),  # a unit after a number
    ("90^{\\circ}", "90", True),
    ("12\\text{ cm}", "13", False),
    ("0.3333333", "1/3", True),  # rounded decimal vs non-terminating rational: rel tol 1e-6
    ("0.33", "1/3", False),
    ("0.5000001", "0.5", False),  # both exact: no tolerance
    ("1e3", "1000", True),
    ("12", "12.5", False),
    ("-5", "5", False),
    ("B", "b", True),  # non-numeric: normalized string equality
    ("B", "C", False),
    ("abc", "12", False),
    ("12", "abc", False),
    (None, "12", False),
    ("12", None, False),
    ("", "", False),
    ("1/0", "1", False),
    ("nan", "nan", False),
    ("inf", "inf", False),
    ("1" * 400, "1" * 400, True),
    (object(), "1", False),
])
def test_answers_match(pred, gold, expected):
  assert answers_match(pred, gold) is expected


def test_math_reward_vectorized():
  completions = [c for c, _, _ in COMPLETIONS]
  golds = [g for _, g, _ in COMPLETIONS]
  out = math_reward(completions, golds)
  assert out.dtype == np.float32 and out.shape == (len(COMPLETIONS),)
  np.testing.assert_array_equal(out, [e for _, _, e in COMPLETIONS])
  with pytest.raises(ValueError):
    math_reward(["1"], ["1", "2"])


def test_math_reward_fn_contract():
  out = math_reward_fn(["p"] * 3, ["#### 4", "#### 4", "#### 4"], answer=["4", None, "5"], tests=None)
  np.testing.assert_array_equal(out[[0, 2]], [1.0, 0.0])
  assert np.isnan(out[1])
  assert np.isnan(math_reward_fn(["p"], ["1"])).all()  # no answers at all: could not score


@pytest.mark.parametrize("completion,expected", [
    ("<thinking>2+2=4</thinking>The answer is 4.", 1.0),
    ("  <thinking>\nsteps\n</thinking>\n\\boxed{4}", 1.0),
    ("<thinking>x</thinking> 4", 1.0),
    ("The answer is 4.", 0.0),  # no thinking
    ("<thinking>2+2=4 The answer is 4.", 0.0),  # unclosed
    ("2+2=4</thinking> 4", 0.0),  # close without open
    ("</thinking>steps<thinking> 4", 0.0),  # mis-nested
    ("<thinking>a</thinking><thinking>b</thinking> 4", 0.0),  # multiple blocks
    ("<thinking>a<thinking>b</thinking></thinking> 4", 0.0),  # nested
    ("<thinking>2+2=4</thinking>", 0.0),  # nothing after
    ("<thinking>2+2=4</thinking>   \n ", 0.0),  # only whitespace after
    ("<thinking>2+2</thinking> no idea", 0.0),  # nothing extractable after
    ("<thinking>   </thinking> 4", 0.0),  # empty thinking
    ("Sure! <thinking>x</thinking> 4", 0.0),  # text before the block
])
def test_format_reward(completion, expected):
  assert format_reward([completion])[0] == expected
  assert get_reward_fn("format")(["p"], [completion])[0] == expected


def test_format_reward_with_open_tag_in_prompt():
  out = format_reward(["steps</thinking> 4", "<thinking>steps</thinking> 4", "steps 4"], open_tag_in_prompt=True)
  np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])


def test_thinking_stats():
  completions = ["<thinking>one two three</thinking> 4", "<thinking>a b</thinking>", "no thinking 5", "x"]
  stats = thinking_stats(completions)
  assert stats["frac_thinking"] == 0.5
  assert stats["frac_well_formed"] == 0.25
  assert stats["mean_thinking_words"] == pytest.approx(2.5)
  assert stats["mean_thinking_chars"] == pytest.approx((13 + 3) / 2)
  assert stats["mean_completion_chars"] == pytest.approx(np.mean([len(c) for c in completions]))
  assert stats["mean_completion_words"] == pytest.approx(np.mean([4, 2, 3, 1]))
  assert thinking_stats([])["frac_thinking"] == 0.0


def test_registry():
  assert {"math", "format", "code"} <= set(rewards.list_reward_fns())
  assert get_reward_fn("math") is math_reward_fn
  with pytest.raises(KeyError, match="registered"):
    get_reward_fn("nope")
  with pytest.raises(ValueError):
    rewards.register_reward("math", lambda p, c, **kw: None)


def _const(value):
  def fn(prompts, completions, **unused):
    return np.full([len(completions)], value, np.float32)
  return fn


def test_combine_rewards_weights_and_logging():
  prompts = ["p"] * 3
  completions = ["<thinking>t</thinking> 4", "#### 4", "5"]
  total, per_fn, nan_counts = combine_rewards({"math": 1.0, "format": 0.5}, prompts, completions,
                                              answer=["4", "4", "4"])
  np.testing.assert_allclose(total, [1.5, 1.0, 0.0])
  np.testing.assert_array_equal(per_fn["math"], [1, 1, 0])
  np.testing.assert_array_equal(per_fn["format"], [1, 0, 0])
  assert nan_counts == {"math": 0, "format": 0}
  total, per_fn, _ = combine_rewards([(_const(2.0), 0.25), ("bonus", _const(1.0), -1.0)], prompts, completions)
  np.testing.assert_allclose(total, [-0.5] * 3)
  assert set(per_fn) == {"fn", "bonus"}


def test_combine_rewards_nan_policies():
  prompts, completions = ["p"] * 3, ["#### 4"] * 3
  answers = ["4", None, "5"]
  total, per_fn, nan_counts = combine_rewards({"math": 2.0}, prompts, completions, answer=answers)
  np.testing.assert_allclose(total, [2.0, 0.0, 0.0])
  assert nan_counts == {"math": 1} and np.isnan(per_fn["math"][1])
  total, _, _ = combine_rewards({"math": 2.0}, prompts, completions, nan_policy="propagate", answer=answers)
  assert np.isnan(total[1]) and total[0] == 2.0
  with pytest.raises(ValueError, match="could not score"):
    combine_rewards({"math": 2.0}, prompts, completions, nan_policy="raise", answer=answers)
  with pytest.raises(ValueError):
    combine_rewards({"math": 1.0}, prompts, completions, nan_policy="bogus")


def test_combine_rewards_infinite_scores_are_unscored():
  def blowup(prompts, completions, **unused):
    return np.array([1.0, np.inf, -np.inf, 1e39])  # 1e39: inf in float32

  total, per_fn, nan_counts = combine_rewards([(blowup, 2.0), (_const(1.0), 1.0)], ["p"] * 4, ["c"] * 4)
  np.testing.assert_allclose(total, [3.0, 1.0, 1.0, 1.0])
  assert nan_counts == {"blowup": 3, "fn": 0} and np.isnan(per_fn["blowup"][1:]).all()
  total, _, _ = combine_rewards([(blowup, 1.0)], ["p"] * 4, ["c"] * 4, nan_policy="propagate")
  assert total[0] == 1.0 and np.isnan(total[1:]).all()
  with pytest.raises(ValueError, match="could not score 3 of 4"):
    combine_rewards([(blowup, 1.0)], ["p"] * 4, ["c"] * 4, nan_policy="raise")


def test_combine_rewards_survives_broken_functions():
  def broken(prompts, completions, **unused):
    raise RuntimeError("verifier down")

  def wrong_shape(prompts, completions, **unused):
    return np.zeros([2])

  prompts, completions = ["p"] * 3, ["1"] * 3
  total, per_fn, nan_counts = combine_rewards([(broken, 1.0), (wrong_shape, 1.0), (_const(1.0), 1.0)],
                                              prompts, completions)
  np.testing.assert_allclose(total, [1.0] * 3)
  assert nan_counts == {"broken": 3, "wrong_shape": 3, "fn": 0}
  with pytest.raises(RuntimeError):
    combine_rewards([(broken, 1.0)], prompts, completions, nan_policy="raise")
