"""The reward-hacking chapter: the PPO stage's gold-free early stop and the study's table builder."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import hacking  # noqa: E402
from rlhfjax.train import ppo_stage  # noqa: E402
from rlhfjax.train.ppo_stage import EarlyStop, PPOStage, PPOStageConfig  # noqa: E402
from rlhfjax.train.rl_stage import RLStage  # noqa: E402


def test_early_stop_rule_rise_and_fall():
  rising = EarlyStop(factor=1.5, baseline=3, patience=2, direction="rise")
  values = [1.0, 1.1, 0.9, 1.2, 1.6, 1.4, 1.7, 1.8, 0.1]  # baseline 1.0 -> threshold 1.5
  got = [rising.update(i, v) for i, v in enumerate(values, 1)]
  assert rising.baseline == pytest.approx(1.0) and rising.threshold == pytest.approx(1.5)
  assert got == [False] * 7 + [True, True]  # 1.6 then 1.4 resets the streak; 1.7, 1.8 stop
  assert rising.stopped_at == 8

  flat = EarlyStop(factor=1.5, baseline=3, patience=2, direction="rise")
  noise = 1.0 + 0.1 * np.sin(np.arange(50))
  assert not any(flat.update(i, v) for i, v in enumerate(noise, 1)) and flat.stopped_at is None

  falling = EarlyStop(factor=0.75, baseline=2, patience=2, direction="fall")
  got = [falling.update(i, v) for i, v in enumerate([0.8, 0.8, 0.7, 0.5, float("nan"), 0.5, 0.4], 1)]
  assert got == [False] * 6 + [True] and falling.stopped_at == 7  # NaN (no pairs) resets the streak
  same = EarlyStop(factor=0.75, baseline=2, patience=2, direction="fall")
  assert not any(same.update(i, v) for i, v in enumerate([0.8, 0.8, 0.9, 0.7, 0.65, 0.7], 1))

  again = EarlyStop(factor=0.75, baseline=2, patience=2, direction="fall")
  again.load(falling.state())  # a resumed run stays stopped where it stopped
  assert again.stopped_at == 7 and again.update(8, 1.0)


def test_early_stop_config_is_checked():
  PPOStageConfig(early_stop="rm_std", early_stop_factor=1.5)
  with pytest.raises(ValueError, match="> 1"):
    PPOStageConfig(early_stop="rm_std", early_stop_factor=0.5)
  with pytest.raises(ValueError, match=r"in \(0, 1\)"):
    PPOStageConfig(early_stop="label_agreement", early_stop_factor=2.0)
  with pytest.raises(ValueError, match="early_stop must be one of"):
    PPOStageConfig(early_stop="gold")
  cfg = hacking.get_config("early_stop")
  cfg.unlock()
  cfg.ppo.early_stop, cfg.ppo.early_stop_factor, cfg.rm.ensemble_size = "rm_std", 2.0, 1
  with pytest.raises(ValueError, match="ensemble_size"):
    PPOStage.check_config(cfg)


def _stage(monkeypatch, signal, **cfg):
  """A PPOStage whose parent step is scripted: iteration `it` reports rm_std = signal[it - 1]."""
  calls = []

  def fake_step(self, state, it):
    calls.append(it)
    return state + 1, {"rm_std": float(signal[it - 1]), "reward_mean": 0.0}, 64.0
  monkeypatch.setattr(RLStage, "step", fake_step)
  stage = PPOStage.__new__(PPOStage)  # no run: only the stop logic is exercised
  stage.stage_cfg = c = PPOStageConfig(early_stop="rm_std", **cfg)
  stage.early = EarlyStop(c.early_stop_factor, c.early_stop_baseline, c.early_stop_patience, "rise")
  stage.name = "ppo"
  return stage, calls


def test_ppo_stage_freezes_the_policy_when_disagreement_rises(monkeypatch):
  signal = [0.2, 0.2, 0.2, 0.25, 0.45, 0.5] + [0.6] * 6
  stage, calls = _stage(monkeypatch, signal, early_stop_factor=2.0, early_stop_baseline=3,
                        early_stop_patience=2)
  state, rows = 0, []
  for it in range(1, 13):
    state, m, _ = stage.step(state, it)
    rows.append(m)
  assert stage.stopped_at == 6  # 0.45 and 0.5 are past 2 x 0.2
  assert calls == [1, 2, 3, 4, 5, 6]  # no sampling / update after the stop
  assert state == 6  # the policy after the stopping iteration's update
  assert [m["early_stopped"] for m in rows] == [0.0] * 6 + [1.0] * 6
  assert np.isnan(rows[0]["early_stop_threshold"]) and rows[5]["early_stop_threshold"] == pytest.approx(0.4)


def test_ppo_stage_runs_on_when_disagreement_does_not_rise(monkeypatch):
  signal = [0.3, 0.28, 0.3] + list(0.3 - 0.005 * np.arange(9))  # falls, as it did in the study
  stage, calls = _stage(monkeypatch, signal, early_stop_factor=1.2, early_stop_baseline=3,
                        early_stop_patience=1)
  state = 0
  for it in range(1, 13):
    state, m, _ = stage.step(state, it)
    assert m["early_stopped"] == 0.0
  assert stage.stopped_at is None and calls == list(range(1, 13)) and state == 12


def test_ppo_stage_reads_the_signal_every_n_iterations(monkeypatch):
  signal = [9.0, 1.0, 9.0, 1.0, 9.0, 3.0, 9.0, 3.0, 9.0, 3.0]  # odd iterations are not read
  stage, calls = _stage(monkeypatch, signal, early_stop_factor=2.0, early_stop_baseline=2,
                        early_stop_patience=2, early_stop_every=2)
  for it in range(1, 11):
    stage.step(0, it)
  assert stage.early.values == [1.0, 1.0] and stage.stopped_at == 8


def _evals(golds, proxies, kls, every=3):
  return [{"step": i * every, "gold_mean": g, "proxy_mean": p, "kl_seq_mean": k}
          for i, (g, p, k) in enumerate(zip(golds, proxies, kls))]


def test_summarize_peak_and_final():
  ev = _evals([1.1, 1.8, 2.1, 1.7, 1.2], [0.0, 0.9, 1.2, 1.3, 1.4], [0.0, 1.0, 2.5, 5.0, 9.0])
  s = hacking.summarize(ev)
  assert (s["peak_gold"], s["peak_step"], s["peak_kl"]) == (2.1, 6, 2.5)
  assert (s["final_gold"], s["final_proxy"], s["final_kl"], s["final_step"]) == (1.2, 1.4, 9.0, 12)
  assert s["start_gold"] == 1.1

  # early stop after iteration 4: evals past it are of the frozen policy (the last one is final)
  frozen = _evals([1.1, 1.9], [0.0, 1.0], [0.0, 1.5]) + [
      {"step": s_, "gold_mean": 2.0, "proxy_mean": 1.1, "kl_seq_mean": 1.8} for s_ in (6, 9, 12)]
  s = hacking.summarize(frozen, stopped_at=4)
  assert (s["peak_gold"], s["peak_step"]) == (2.0, 4)
  assert (s["final_gold"], s["final_kl"], s["final_step"]) == (2.0, 1.8, 4)
  assert hacking.summarize(frozen[:2], stopped_at=3)["peak_step"] == 3  # rows are sorted; final at stop


def test_build_table_ratio_to_the_best_gold_of_any_run():
  base = hacking.summarize(_evals([1.0, 2.0, 1.0], [0, 1, 2], [0, 2, 8]))
  stop = hacking.summarize(_evals([1.0, 1.9], [0, 1], [0, 2]))
  runs = [dict(variant="no_kl", seed=0, summary=base, wall_s=60.0, stopped_at=None),
          dict(variant="early_stop", seed=0, summary=stop, wall_s=30.0, stopped_at=3, labels_used=64)]
  table, extra = hacking.build_table(runs)
  assert extra["best_gold_any_run"] == 2.0
  assert extra["groups"]["no_kl"]["final_over_best"] == pytest.approx(0.5)
  assert extra["groups"]["early_stop"]["final_over_best"] == pytest.approx(0.95)
  assert "| 95% |" in table and "| 50% |" in table and "| 3 | 64 |" in table
  assert ppo_stage.EARLY_STOP_SIGNALS["label_agreement"] == "fall"
