"""End to end on a tiny config: sft -> simulated labels -> rm (pairs), then a rankings ensemble
from the SFT checkpoint alone; normalization saved with the checkpoint; re-running resumes."""

import json
import os
import shutil

import numpy as np
import pytest

from rlhfjax.checkpoint import Checkpointer
from rlhfjax.train.pipeline import train_and_evaluate


def _config(**rm):
  from tests import tiny
  c = tiny.get_config()
  c.unlock()
  from experiments import preference
  c.rm = preference.rm_config()
  c.labeler = preference.labeler_config()
  c.stages = "sft,rm"
  c.sft.eval_examples = 0
  c.labeler.label_budget = 48
  c.labeler.test_comparisons = 24
  c.labeler.sample_batch_size = 64
  c.rm.batch_size = 8
  c.rm.epochs = 1.0  # 6 steps over the 48 pairs
  c.rm.norm_samples = 16
  c.rm.eval_batch_size = 32
  c.rm.log_every = 2
  c.rm.checkpoint_every = 4
  for k, v in rm.items():
    c.rm[k] = v
  c.lock()
  return c


def test_sft_then_rm_pairs_and_ranking_ensemble(tmp_path):
  pairs_dir = tmp_path / "pairs"
  res = train_and_evaluate(_config(), str(pairs_dir))["rm"]
  assert res["format"] == "pairs" and res["train_records"] == 48 and res["steps"] == 6
  assert res["train_kept"] == 48 and res["train_skipped"] == 0
  for k in ("after_accuracy", "after_gold_accuracy", "before_gold_accuracy", "after_labeler_gold_agreement"):
    assert 0.0 <= res[k] <= 1.0, k
  assert res["norm_ref_mean"] == pytest.approx(0.0, abs=1e-4)
  assert res["norm_ref_std"] == pytest.approx(1.0, abs=1e-4)
  # gold agreement split by what separates a pair: no answer / right vs wrong / style only
  splits = [s for s in ("no_answer", "correctness", "style") if f"after_gold_pairs_{s}" in res]
  assert splits and sum(res[f"after_gold_pairs_{s}"] for s in splits) == res["after_gold_pairs"]
  assert sum(res[f"after_gold_accuracy_{s}"] * res[f"after_gold_pairs_{s}"] for s in splits) == \
      pytest.approx(res["after_gold_accuracy"] * res["after_gold_pairs"])
  ckpt = Checkpointer(str(pairs_dir / "checkpoints" / "rm"))
  assert ckpt.latest_step() == 6
  ckpt.close()
  meta = json.load(open(pairs_dir / "checkpoints" / "rm" / "6" / "meta" / "metadata"))
  assert meta["normalized"] and meta["norm"]["samples"] == 16
  rows = [json.loads(l) for l in open(pairs_dir / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["stage"] == "rm"] == [2, 4, 6]
  # re-running the finished run: nothing retrained, same held-out numbers
  again = train_and_evaluate(_config(), str(pairs_dir))["rm"]
  assert again["after_accuracy"] == res["after_accuracy"]
  assert again["after_margin"] == pytest.approx(res["after_margin"], abs=1e-6)

  # rankings + a bootstrap ensemble, the rm stage alone: SFT params come from its checkpoint
  rank_dir = tmp_path / "rank"
  os.makedirs(rank_dir / "checkpoints")
  for name in ("tokenizer.model", "tfds"):
    src = pairs_dir / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, rank_dir / name)
  shutil.copytree(pairs_dir / "checkpoints" / "sft", rank_dir / "checkpoints" / "sft")
  cfg = _config(format="rankings", ranking_size=3, ensemble_size=2, bootstrap=True)
  cfg.unlock()
  cfg.stages = "rm"
  cfg.lock()
  res = train_and_evaluate(cfg, str(rank_dir))["rm"]
  # 48 comparisons / 3 per ranking = 16 asked; the tiny policy's pools are sometimes too small
  assert res["ranking_size"] == 3 and 0 < res["train_records"] <= 16
  assert res["ensemble_size"] == 2 and 0.0 <= res["after_member_accuracy"] <= 1.0
  assert res["after_member_std"] > 0
  assert res["norm_ref_mean"] == pytest.approx(0.0, abs=1e-4)
  assert res["norm_ref_std"] == pytest.approx(1.0, abs=1e-4)
  test = [json.loads(l) for l in open(rank_dir / "preferences" / "rankings_test.jsonl")]
  assert all(len(r["responses"]) == 2 for r in test)  # held-out comparisons are pairs
