"""The verifier-reward `rl` stage end to end on a tiny config, and its host-side reward handling."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.train.pipeline import train_and_evaluate
from rlhfjax.rewards.scorers import verifier_scorer
from rlhfjax.train.rl_stage import mask_unscored


def _tiny_rl_config():
  from tests import tiny
  c = tiny.get_config()
  c.stages = "sft,rl"
  c.data.flaw = "drop_final_carry"
  c.data.flaw_prob = 0.75
  c.sft.steps = 6
  c.sft.log_every = 3
  c.sft.checkpoint_every = 6
  c.sft.eval_examples = 0
  c.rl_loop.iterations = 2
  c.rl_loop.prompts_per_iter = 2
  c.rl.group_size = 4
  c.rl.minibatch_size = 8
  c.rl_sampling.max_new_tokens = 8
  c.rl_loop.eval_every = 0  # before and after only
  c.rl_loop.eval_examples = 8
  c.rl_loop.eval_samples = 2
  c.rl_loop.checkpoint_every = 1
  c.rl_reward = "math:1.0,format:0.1"
  return c


def test_sft_then_rl_writes_metrics_and_resumes(tmp_path):
  config = _tiny_rl_config()
  config.stages = "sft"
  train_and_evaluate(config, str(tmp_path))
  # the rl stage alone: policy and reference restored from the finished sft stage's checkpoint
  config.stages = "rl"
  rl = train_and_evaluate(config, str(tmp_path))["rl"]
  assert rl["algo"] == "grpo" and rl["iterations"] == 2
  for key in ("before_accuracy_greedy", "after_accuracy_greedy", "after_pass@2", "after_maj@2",
              "after_accuracy_sampled", "teacher_accuracy", "after_flaw_class_fraction"):
    assert 0.0 <= rl[key] <= 1.0, key
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if r["stage"] == "rl"]
  assert [r["step"] for r in train] == [1, 2]
  for key in ("reward_mean", "reward_math", "reward_format", "reward_nan_math", "policy_loss",
              "kl_seq_mean", "think_frac_well_formed", "time_sample_s"):
    assert key in train[0], key
  evals = [r["step"] for r in rows if r["stage"] == "rl_eval"]
  assert evals == [0, 2]
  assert os.path.exists(tmp_path / "plots" / "rl.png")
  # the held-out samples' thinking share, and every held-out completion with its verdict
  last = [r for r in rows if r["stage"] == "rl_eval"][-1]
  assert 0.0 <= last["sampled_think_frac_thinking"] <= 1.0 and "sampled_think_frac_well_formed" in last
  samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  held = [r for r in samples if r["stage"] == "rl_eval"]
  assert [r["mode"] for r in held] == ["greedy"] * 8 + ["sampled"] * 16  # 8 problems x (1 + 2)
  assert all(set(r) >= {"prompt", "completion", "answer", "correct"} for r in held)
  sampled = [r for r in held if r["mode"] == "sampled"]
  assert np.mean([r["correct"] for r in sampled]) == pytest.approx(rl["after_accuracy_sampled"])
  assert [r["prompt"] for r in sampled[::2]] == [r["prompt"] for r in held[:8]]

  # A finished stage resumes at the end: no new iterations, same final numbers.
  config.stages = "sft,rl"
  again = train_and_evaluate(config, str(tmp_path))
  assert again["rl"]["after_accuracy_greedy"] == rl["after_accuracy_greedy"]
  assert again["rl"]["teacher_accuracy"] == rl["teacher_accuracy"]

  # Killed after iteration 1: the re-run continues from that checkpoint to the end.
  shutil.rmtree(tmp_path / "checkpoints" / "rl" / "2")
  train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["stage"] == "rl"] == [1, 2]  # step 2's first row dropped


def test_nan_rewards_mask_or_zero():
  from rlhfjax.rewards import register_reward

  def flaky(prompts, completions, **_):
    return np.array([np.nan if "?" in c else 1.0 for c in completions], np.float32)
  register_reward("test_flaky", flaky, overwrite=True)
  texts = ["a", "b?", "c", "d", "e?", "f?", "g?", "h?"]
  exs = [{"prompt": "q", "answer": "1"}] * 8
  zero, m = verifier_scorer("test_flaky:1.0", "zero")(texts, exs, {})
  np.testing.assert_array_equal(zero, [1, 0, 1, 1, 0, 0, 0, 0])
  assert m["reward_nan_test_flaky"] == 5 and m["reward_test_flaky"] == 1.0
  raw, _ = verifier_scorer("test_flaky:1.0", "mask")(texts, exs, {})
  filled, valid = mask_unscored(raw, group_size=4)
  np.testing.assert_array_equal(valid, [1, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(filled, [1, 1, 1, 1, 0, 0, 0, 0])  # group mean; 0 if none scored
  with pytest.raises(ValueError, match="could not score"):
    verifier_scorer("test_flaky:1.0", "raise")(texts, exs, {})


def test_best_of_n_tied_groups_give_no_signal():
  from rlhfjax.models import PolicyModel, TransformerConfig, init_params
  from rlhfjax.parallel import axes, create_mesh
  from rlhfjax.sampling import Rollout
  from rlhfjax.train.rl import AlgoConfig, RLModels, make_experience_fn
  model = TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                            head_dim=8, d_ff=32, max_len=8)
  cfg = AlgoConfig(algo="best_of_n", group_size=4, minibatch_size=12, best_of_n_k=2)
  params = init_params(PolicyModel(model), jax.random.key(0))
  b = 12
  rollout = Rollout(prompt_ids=jnp.ones((b, 3), jnp.int32), prompt_mask=jnp.ones((b, 3), jnp.int32),
                    response_ids=jnp.full((b, 4), 5, jnp.int32), response_mask=jnp.ones((b, 4)),
                    finished=jnp.ones((b,), bool))
  scores = jnp.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0], jnp.float32)  # all right, all wrong, 1 of 4
  mesh = create_mesh((1, 1, 1), jax.devices()[:1])
  models = RLModels(policy=PolicyModel(model))
  exp, _ = make_experience_fn(cfg, models, mesh, axes.DEFAULT_RULES)(params, params, None, rollout,
                                                                     scores, jnp.float32(0.0))
  adv = np.asarray(exp.advantages[:, 0])
  # group [0, 1, 0, 0], k=2: only the right one is positive (a wrong answer is never "2nd best");
  # the bottom 2 (wrong) are negative; tied groups give nothing
  np.testing.assert_array_equal(adv, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, -1, -1])


def test_a_stage_without_its_inputs_is_one_clear_error(tmp_path):
  config = _tiny_rl_config()
  config.stages = "rl"
  with pytest.raises(FileNotFoundError, match=r"needs the 'sft' stage's parameters: .*put 'sft' before"):
    train_and_evaluate(config, str(tmp_path))
