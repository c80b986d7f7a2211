"""Scorers: verifier rewards by registered name or import path, weighted; the RM scorer on a rollout."""

import jax
import numpy as np
import pytest

from rlhfjax.models import RewardModel, init_params
from rlhfjax.rewards.scorers import reward_model_scorer, score, verifier_scorer


def shortness(prompts, completions, **unused):
  """A user reward defined outside rlhfjax: 1 / words."""
  return np.asarray([1.0 / max(len(c.split()), 1) for c in completions], np.float32)


def test_verifier_scorer_takes_import_paths_and_weights():
  texts = ["The answer is 4.", "The answer is 5. Really, it is."]
  examples = [{"prompt": "What is 2 + 2?", "answer": "4"}] * 2
  scores, metrics = verifier_scorer("math:1.0,tests.test_scorers:shortness:0.5")(texts, examples, None)
  np.testing.assert_allclose(scores, [1.0 + 0.5 / 4, 0.0 + 0.5 / 7], rtol=1e-6)
  assert metrics["reward_math"] == 0.5 and "reward_tests.test_scorers:shortness" in metrics


def test_unknown_reward_names_the_registered_ones():
  with pytest.raises(ValueError, match="registered: .*math"):
    verifier_scorer("mathh:1.0")


def test_reward_model_scorer_scores_prompt_and_response(tiny_cfg, random_rollout):
  rollout, _ = random_rollout()
  params = init_params(RewardModel(tiny_cfg), jax.random.key(0))
  scorer = reward_model_scorer(params, tiny_cfg, extra_metrics=lambda t, e: {"n": float(len(t))})
  scores, metrics = scorer(["a"] * 16, [{}] * 16, rollout)
  tokens = np.concatenate([rollout.prompt_ids, rollout.response_ids], 1)
  mask = np.concatenate([rollout.prompt_mask, rollout.response_mask.astype(np.int32)], 1)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(score(params, tokens, mask,
                                                                  model_cfg=tiny_cfg)), atol=1e-6)
  assert metrics == {"n": 16.0}
