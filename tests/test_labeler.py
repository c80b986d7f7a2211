"""The simulated human: gold preference, perturbations, Bradley–Terry / Plackett–Luce noise."""

import random

import numpy as np
import pytest

from rlhfjax.data import labeler
from rlhfjax.data.labeler import (FILLER, gold_features, gold_score, label_pools, perturb,
                                  plackett_luce_order, response_pool)

Q = "What is 47 + 38?"
GOOD = "<thinking> 7+8=15 carry 1. 4+3+1=8. </thinking> The answer is 85."


def test_gold_preference_terms():
  assert gold_score(Q, GOOD, "85") == pytest.approx(2.5)
  assert gold_score(Q, GOOD) == pytest.approx(2.5)  # answer parsed from the prompt
  assert gold_score(Q, "The answer is 85.") == pytest.approx(2.0)  # no work shown
  wrong = GOOD.replace("is 85", "is 86")
  assert gold_score(Q, wrong) == pytest.approx(0.5)
  rep = GOOD + " The answer is 85."
  assert gold_features(rep, "85")["repeats"] == 1
  assert gold_score(Q, rep) == pytest.approx(2.5 - 1.0 - 0.4)
  chat = "<thinking> 7+8=15 carry 1. 4+3+1=8. </thinking> Anyway. The answer is 85. Trust it."
  assert gold_features(chat, "85")["extra_words"] == 3
  assert gold_score(Q, chat) == pytest.approx(2.5 - 0.3)
  # repeated steps inside the scratchpad are fine (44 + 33 has two identical columns)
  assert gold_score("What is 44 + 33?", "<thinking> 4+3=7. 4+3=7. </thinking> The answer is 77.") == 2.5
  assert gold_score(Q, "<thinking> 7+8=15") == 0.0  # truncated: no answer, unclosed work
  # the registered reward is the same function
  from rlhfjax.rewards import get_reward_fn
  fn = get_reward_fn("gold_preference")
  np.testing.assert_allclose(fn([Q, Q], [GOOD, wrong], answer=["85", "85"]), [2.5, 0.5])


def test_perturbations_move_gold_the_right_way():
  rng = random.Random(0)
  g = gold_score(Q, GOOD)
  assert gold_score(Q, perturb(GOOD, "wrong_answer", rng)) == pytest.approx(g - 2.0)
  assert gold_score(Q, perturb(GOOD, "repeat", rng)) < g - 1.0
  assert perturb(GOOD, "drop_thinking", rng) == "The answer is 85."
  f = perturb(GOOD, "filler", rng)
  assert f.startswith("<thinking>") and "The answer is 85." in f and gold_score(Q, f) < g
  cut = perturb(GOOD + " Anyway.", "no_answer", rng)
  assert cut == "<thinking> 7+8=15 carry 1. 4+3+1=8. </thinking> Anyway." and gold_score(Q, cut) == 0.0
  for _ in range(20):  # no_answer is applied alone (or after filler): nothing left to repeat/change
    v = labeler.perturbed_variant(GOOD, rng, ("no_answer", "repeat", "wrong_answer"))
    if "The answer is" not in v:
      assert v.startswith("<thinking>") and gold_score(Q, v) == 0.0
  pool = response_pool([GOOD, GOOD], 6, random.Random(1))
  assert pool[0] == GOOD and len(pool) == len(set(pool)) >= 3


def test_filler_uses_known_characters(tmp_path):
  from rlhfjax.data import ArithmeticConfig, generate_problems
  from rlhfjax.tokenizer import Tokenizer, template_texts, train_tokenizer
  path = tmp_path / "t.model"
  train_tokenizer(template_texts(generate_problems(ArithmeticConfig(), 300, seed=0)), str(path),
                  vocab_size=96)
  tok = Tokenizer.load(str(path))
  for phrase in FILLER:
    assert tok.unk_id not in tok.encode(phrase), phrase
    assert tok.decode(tok.encode(phrase)) == phrase


def test_bradley_terry_noise_rate():
  """Pairs labeled with P(A > B) = sigmoid((g(A) - g(B)) / T)."""
  prompts = [Q] * 4000
  a, b = GOOD, GOOD + " Anyway. Trust it."  # gold gap 0.3
  pools = [[a, b]] * 4000
  for t in (0.5, 0.0):
    recs = label_pools(prompts, ["85"] * 4000, pools, kind="pairs", k=2, temperature=t, seed=0)
    p_a = np.mean([r["chosen"] == a for r in recs])
    want = 1.0 if t == 0 else 1 / (1 + np.exp(-0.3 / t))
    assert abs(p_a - want) < 0.025, (t, p_a, want)


def test_plackett_luce_rankings():
  rng = np.random.default_rng(0)
  g = np.array([1.0, 0.0, 0.5])
  firsts = np.bincount([plackett_luce_order(g, 1.0, rng)[0] for _ in range(6000)], minlength=3) / 6000
  np.testing.assert_allclose(firsts, np.exp(g) / np.exp(g).sum(), atol=0.02)  # first choice ~ softmax
  # K = 2 reduces to Bradley–Terry
  top = np.mean([plackett_luce_order(np.array([0.4, 0.0]), 0.5, rng)[0] == 0 for _ in range(6000)])
  assert abs(top - 1 / (1 + np.exp(-0.8))) < 0.02
  np.testing.assert_array_equal(plackett_luce_order(g, 0.0, rng), [0, 2, 1])  # noiseless = sorted
  recs = label_pools([Q], ["85"], [[GOOD, "The answer is 85.", "The answer is 86.", GOOD + " Anyway."]],
                     kind="rankings", k=4, temperature=0.0, seed=0)
  assert recs[0]["responses"] == [GOOD, GOOD + " Anyway.", "The answer is 85.", "The answer is 86."]


def test_perturbation_kinds_restrict_the_variants():
  rng = random.Random(0)
  for _ in range(50):
    v = labeler.perturbed_variant(GOOD, rng, ("filler", "repeat"))
    f = gold_features(v, "85")
    assert f["correct"] == 1.0 and f["shows_work"] == 1.0 and v != GOOD
  with pytest.raises(ValueError, match="perturbation_kinds"):
    labeler.LabelerConfig(perturbation_kinds="repeat,typo")
  assert labeler.LabelerConfig(perturbation_kinds=" repeat , filler").kinds() == ("repeat", "filler")


def test_chatty_teacher_demonstrations_lose_gold_for_style_only():
  from rlhfjax.data import ArithmeticConfig, generate_problems
  plain = generate_problems(ArithmeticConfig(), 400, seed=3)
  chatty = generate_problems(ArithmeticConfig(chatter=0.8, repeat=0.6), 400, seed=3)
  feats = [gold_features(p["demonstration"], p["answer"]) for p in chatty]
  assert all(f["correct"] == 1.0 and f["shows_work"] == 1.0 for f in feats)
  repeated = np.mean([f["repeats"] >= 1 for f in feats])
  padded = np.mean([any(f in p["demonstration"] for f in FILLER) for p in chatty])
  assert abs(repeated - 0.6) < 0.08 and abs(padded - 0.8) < 0.08
  assert all(gold_score(p["prompt"], p["demonstration"]) == pytest.approx(2.5) for p in plain)
  with pytest.raises(ValueError, match="chatter"):
    ArithmeticConfig(chatter=1.5)

