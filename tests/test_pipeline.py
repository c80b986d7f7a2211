"""End to end: train_and_evaluate on a tiny config; CLI errors; kill -9 resume exactness."""

import json
import os
import subprocess

import chex
import jax
import numpy as np
import pytest

from rlhfjax.checkpoint import Checkpointer
from rlhfjax.train.pipeline import train_and_evaluate

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, "tiny.py")


def _final_state(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "sft"))
  step = ckpt.latest_step()
  path = os.path.join(workdir, "checkpoints", "sft", str(step), "state")
  # restore without a target: raw arrays as saved
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(path)
  return step, tree


def test_train_and_evaluate_tiny(tmp_path):
  from tests import tiny
  config = tiny.get_config()
  results = train_and_evaluate(config, str(tmp_path))
  sft = results["sft"]
  assert sft["after_heldout_loss"] < sft["before_heldout_loss"]
  for key in ("before_accuracy_greedy", "after_accuracy_greedy", "after_accuracy_sampled"):
    assert 0.0 <= sft[key] <= 1.0
  for name in ("config.json", "metrics.jsonl", "samples.jsonl", "report.md", "tokenizer.model",
               "results.json"):
    assert os.path.exists(tmp_path / name), name
  assert os.listdir(tmp_path / "plots")
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  steps = [r["step"] for r in rows if r["stage"] == "sft"]
  assert steps == [4, 6, 8, 12, 16, 18, 20, 24]  # every log_every=4 and checkpoint_every=6
  # re-running the finished run resumes at the end: no training, same results
  again = train_and_evaluate(config, str(tmp_path))
  assert again["sft"]["after_heldout_loss"] == pytest.approx(sft["after_heldout_loss"], abs=1e-6)


def test_config_typo_is_one_clear_line(tmp_path, cli):
  cmd, env = cli(TINY, tmp_path, "--config.sft.stepz=3")
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0
  assert "stepz" in out.stderr and "steps" in out.stderr  # names the bad key and the valid ones
  assert "Traceback" not in out.stderr


def test_kill9_resume_is_exact(tmp_path, cli, kill9):
  overrides = ["--config.sft.steps=60", "--config.sft.checkpoint_every=10", "--config.sft.eval_examples=0"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  cmd, env = cli(TINY, full, *overrides)
  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)

  cmd, env = cli(TINY, killed, *overrides)
  kill9(cmd, env, killed / "checkpoints" / "sft" / "10")  # a real kill -9 mid-training
  step_killed, _ = _final_state(killed)
  assert step_killed < 60, "the run finished before it was killed"

  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  s_full, t_full = _final_state(full)
  s_res, t_res = _final_state(killed)
  assert s_full == s_res == 60
  chex.assert_trees_all_equal(t_full, t_res)  # bit-identical params, opt state, rng


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  from tests import tiny
  config = tiny.get_config()
  config.sft.learning_rate = 1e30  # the first update blows the parameters up
  config.sft.checkpoint_every = 1
  config.sft.eval_examples = 0
  with pytest.raises(FloatingPointError, match=r"at step 2; .* last good checkpoint: step 1"):
    train_and_evaluate(config, str(tmp_path))
  ckpt = Checkpointer(os.path.join(tmp_path, "checkpoints", "sft"))
  assert ckpt.all_steps() == [1]  # complete on disk; the non-finite state was never saved


def test_workdir_with_another_model_is_a_one_line_error(tmp_path):
  from rlhfjax.config import to_json
  from rlhfjax.train.pipeline import check_resumable
  from tests import tiny
  config = tiny.get_config()
  (tmp_path / "checkpoints" / "sft" / "6").mkdir(parents=True)
  (tmp_path / "config.json").write_text(to_json(config))
  config.sft.steps = 99  # training length may change on resume
  check_resumable(config, str(tmp_path))
  config.model.remat, config.model.attention = True, "dot_product"  # so may how the model computes
  config.model.remat_policy = "dots"
  check_resumable(config, str(tmp_path))
  import json
  old = json.loads(to_json(config))
  del old["model"]["attention"]  # and a workdir written before a compute key existed resumes
  (tmp_path / "config.json").write_text(json.dumps(old))
  check_resumable(config, str(tmp_path))
  config.model.d_model = 64
  with pytest.raises(ValueError, match=r"different config \(model.d_model differ\); use a new"):
    check_resumable(config, str(tmp_path))
