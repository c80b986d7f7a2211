"""Scorers: verifier rewards by registered name or import path, weighted; the RM scorer on a rollout."""

import json

import jax
import numpy as np
import pytest

from rlhfjax.data import read_examples
from rlhfjax.models import RewardModel, init_params
from rlhfjax.rewards import register_reward
from rlhfjax.rewards.scorers import reward_model_scorer, score, verifier_scorer


def shortness(prompts, completions, **unused):
  """A user reward defined outside rlhfjax: 1 / words."""
  return np.asarray([1.0 / max(len(c.split()), 1) for c in completions], np.float32)


SEEN = []


def typed(prompts, completions, **fields):
  """A user reward that checks the types the contract promises, keeps what it got, scores 1."""
  assert all(isinstance(p, str) for p in prompts)
  assert all(isinstance(t["role"], str) and isinstance(t["content"], str) for m in fields["messages"] for t in m)
  SEEN.append((list(prompts), fields))
  return np.ones([len(completions)], np.float32)


def test_chat_prompts_reach_rewards_as_text_and_messages(tmp_path):
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
          {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}]
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"m": chat, "a": "6", "t": ["assert f() == 6"]}) + "\n")
  examples, _ = read_examples(str(path), {"messages": "m", "answer": "a", "tests": "t"})
  examples.append({"prompt": "Name a color.", "response": "Red."})  # a plain prompt, other fields
  SEEN.clear()
  register_reward("test_typed", typed, overwrite=True)  # this module's SEEN (an import path may load a copy)
  scores, _ = verifier_scorer("test_typed:2,math:1")(["It is 6.", "Blue."], examples, None)
  np.testing.assert_array_equal(scores, [3.0, 2.0])  # math still reads the answer field (NaN -> 0)
  (prompts, fields), = SEEN
  assert prompts == ["And 3 + 3?", "Name a color."]  # a chat's last user turn
  assert fields["messages"] == [chat, [{"role": "user", "content": "Name a color."}]]
  assert fields["answer"] == ["6", None] and fields["tests"] == [["assert f() == 6"], None]
  assert fields["response"] == [None, "Red."] and set(fields) == {"messages", "answer", "tests", "response"}


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
