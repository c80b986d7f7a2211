"""The `ppo` stage end to end (sft -> rm -> ppo, tiny): metrics, plots, and kill -9 resume exactness."""

import json
import os
import shutil
import subprocess

import chex
import numpy as np

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, "tiny_ppo.py")


def _ppo_state(workdir):
  import orbax.checkpoint as ocp
  from rlhfjax.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "ppo"))
  step = ckpt.latest_step()
  ckpt.close()
  with ocp.StandardCheckpointer() as c:  # raw arrays as saved
    return step, c.restore(os.path.join(workdir, "checkpoints", "ppo", str(step), "state"))


def test_ppo_stage_and_kill9_resume_is_exact(tmp_path, cli, kill9):
  # sft + rm once, shared by both PPO runs (a finished stage resumes instantly)
  base, full, killed = tmp_path / "base", tmp_path / "full", tmp_path / "killed"
  cmd, env = cli(TINY, base, "--config.stages=sft,rm")
  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  shutil.copytree(base, full)
  shutil.copytree(base, killed)
  shutil.copytree(base, tmp_path / "shared")

  # ppo alone: policy / reference from checkpoints/sft, reward model and critic trunk from checkpoints/rm
  cmd, env = cli(TINY, full, "--config.stages=ppo")
  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  res = json.load(open(full / "results.json"))["ppo"]
  assert res["algo"] == "ppo" and res["iterations"] == 6 and res["value_init"] == "rm"
  for k in ("before_gold_mean", "after_gold_mean", "before_gold_std", "before_proxy_mean",
            "gold_gain_in_sft_std"):
    assert np.isfinite(res[k]), k
  rows = [json.loads(l) for l in open(full / "metrics.jsonl")]
  ppo = [r for r in rows if r["stage"] == "ppo"]
  assert [r["step"] for r in ppo] == [1, 2, 3, 4, 5, 6]
  for k in ("gold_reward_mean", "reward_mean", "kl_seq_mean", "kl_coef", "entropy", "clipfrac",
            "approx_kl", "explained_variance", "response_length", "eos_rate", "vf_loss"):
    assert all(np.isfinite(r[k]) for r in ppo), k
  assert ppo[-1]["kl_coef"] != ppo[0]["kl_coef"]  # the adaptive controller moved beta
  assert os.path.exists(full / "plots" / "ppo_curves.png")
  assert any(json.loads(l)["stage"] == "ppo_gold_eval" for l in open(full / "samples.jsonl"))

  cmd, env = cli(TINY, killed)
  kill9(cmd, env, killed / "checkpoints" / "ppo" / "2")  # a real kill -9 mid-PPO
  step_killed, _ = _ppo_state(killed)
  assert step_killed < 6, "PPO finished before it was killed"

  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  s_full, t_full = _ppo_state(full)
  s_res, t_res = _ppo_state(killed)
  assert s_full == s_res == 6
  # bit-identical policy, critic, both optimizer states, rngs, KL controller state, iteration
  chex.assert_trees_all_equal(t_full, t_res)

  # the shared-trunk actor-critic under the explicit shard_map update, data-parallel over 2 devices
  shared = tmp_path / "shared"
  cmd, env = cli(TINY, shared, "--config.rl.shared_trunk=True", "--config.rl_loop.update_variant=shard_map",
                  "--config.rl_loop.iterations=2", devices=2)
  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  res = json.load(open(shared / "results.json"))["ppo"]
  assert res["value_init"] == "shared_trunk" and res["update_variant"] == "shard_map"
  ppo = [json.loads(l) for l in open(shared / "metrics.jsonl")]
  ppo = [r for r in ppo if r["stage"] == "ppo"]
  assert [r["step"] for r in ppo] == [1, 2]
  for k in ("vf_loss", "explained_variance", "policy_grad_norm", "kl_seq_mean"):
    assert all(np.isfinite(r[k]) for r in ppo), k
  assert all("value_grad_norm" not in r for r in ppo)  # one optimizer: no separate critic step
  _, t_shared = _ppo_state(shared)
  assert "value_head" in t_shared["policy"]["params"] and not t_shared.get("value")
