"""Every stage runs alone on a workdir whose earlier stages finished: `--config.stages=rl` (or rm,
ppo) restores the parameters it needs from those stages' final checkpoints."""

import json
import os

import numpy as np
import pytest

from rlhfjax.train.pipeline import train_and_evaluate


def _config(stages):
  from tests import tiny_ppo
  c = tiny_ppo.get_config()
  c.stages = stages
  c.rl_loop.iterations = 2
  return c


def test_each_stage_alone_restores_its_inputs(tmp_path):
  w = str(tmp_path)
  sft = train_and_evaluate(_config("sft"), w)["sft"]
  # rl alone: the policy and the reference from checkpoints/sft
  rl = train_and_evaluate(_config("rl"), w)["rl"]
  assert rl["iterations"] == 2 and rl["algo"] == "ppo"
  assert os.path.isdir(os.path.join(w, "checkpoints", "rl", "2"))
  # rm alone: the labels are sampled from the SFT policy restored from its checkpoint
  rm = train_and_evaluate(_config("rm"), w)["rm"]
  assert 0.0 <= rm["after_accuracy"] <= 1.0 and rm["train_records"] > 0
  # ppo alone: policy/reference from sft, reward model and critic trunk from rm
  ppo = train_and_evaluate(_config("ppo"), w)["ppo"]
  assert np.isfinite(ppo["before_gold_mean"]) and np.isfinite(ppo["after_proxy_mean"])
  assert np.isfinite(ppo["kl_seq_mean"])
  # the stages ran on the restored parameters: one metrics row per step of each
  rows = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r["stage"] == "rl"] == [1, 2]
  assert [r["step"] for r in rows if r["stage"] == "ppo"] == [1, 2]
  assert sft["steps"] == 24


def test_a_stage_without_its_inputs_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"needs the 'sft' stage's parameters: .*put 'sft' before"):
    train_and_evaluate(_config("rl"), str(tmp_path))
