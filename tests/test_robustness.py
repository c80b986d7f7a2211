"""Runs that survive interruption, corruption and bad input: SIGTERM / SIGINT checkpoint and resume,
a damaged latest checkpoint falls back, no metric step twice after a resume, bad input is one line,
failing rewards and non-finite updates are loud."""

import logging
import os
import signal
import subprocess
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.checkpoint import Checkpointer
from rlhfjax.metrics import MetricsWriter, read_metrics, read_samples
from rlhfjax.train.pipeline import check_config, check_resumable, prepare_tokenizer, stage_list
from rlhfjax.train.stage import StopRun

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, "tiny.py")


def _tiny():
  from tests import tiny
  return tiny.get_config()


def _truncate_state(step_dir):
  """Cut every data file of a checkpoint's state in half (a disk that filled up mid-write)."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared"


def _default_signals():
  """The child starts as from a shell: a pytest-xdist worker may hold SIGINT ignored, and an
  ignored signal is inherited (and, as under nohup, rightly left ignored by the run)."""
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_DFL)


def _signal_frozen(proc, signum):
  """`signum` delivered to a stopped `proc` (SIGSTOP at once, then the signal, then SIGCONT): on a
  loaded machine the tiny run must not race on to its last step before the signal lands."""
  proc.send_signal(signal.SIGSTOP)
  proc.send_signal(signum)
  proc.send_signal(signal.SIGCONT)


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints", "sft")) if d.isdigit())


def test_sigterm_sigint_checkpoint_then_resume_past_a_truncated_checkpoint(tmp_path, cli):
  work = tmp_path / "run"
  cmd, env = cli(TINY, work, "--config.sft.steps=300", "--config.sft.checkpoint_every=4",
                 "--config.sft.log_every=4", "--config.sft.eval_examples=0")
  ckpts = work / "checkpoints" / "sft"
  # SIGTERM once step 4 is saved: the current step finishes, is checkpointed, one line says how to resume
  with open(tmp_path / "err1", "w") as err:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                            preexec_fn=_default_signals)
    _wait_for(ckpts / "4", proc)
    _signal_frozen(proc, signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
  line = (tmp_path / "err1").read_text().strip().splitlines()[-1]
  k = _steps(work)[-1]
  assert 4 < k < 300
  assert f"sft: stopped by SIGTERM; checkpoint {ckpts / str(k)} (step {k}); resume: python -m " \
      "rlhfjax.main --config=" in line and f"--workdir={work}" in line, line

  # The latest checkpoint is damaged: the resume falls back to the one before with one warning,
  # and drops the metrics rows logged after it; SIGINT mid-run stops it the same way.
  prev = _steps(work)[-2]
  _truncate_state(ckpts / str(k))
  with open(tmp_path / "err2", "w") as err:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                            preexec_fn=_default_signals)
    _wait_for(ckpts / str(prev + 8), proc)
    _signal_frozen(proc, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
  err2 = (tmp_path / "err2").read_text()
  warnings = [l for l in err2.splitlines() if "does not restore" in l]
  assert len(warnings) == 1 and f"step {k} " in warnings[0] and f"resuming from step {prev}" in warnings[0]
  assert (ckpts / f"{k}.corrupt").is_dir()  # kept aside, not deleted
  assert "stopped by SIGINT" in err2.strip().splitlines()[-1]
  k2 = _steps(work)[-1]

  # The third run finishes; every logged step appears exactly once.
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert k2 > prev + 8 and "sft step 300/300" in out.stderr  # the plain progress line (no TTY)
  steps = [r["step"] for r in read_metrics(work, "sft")]  # every 4 and each interrupted step
  # strictly increasing: a row left from after the fallback's step would repeat or go back
  assert steps == sorted(set(steps)) and steps[-1] == 300 and {k2, 296} <= set(steps), steps
  assert [r["step"] for r in read_metrics(work, "sft_eval")] == [0, 300]


def test_bad_input_is_one_line_on_stderr(tmp_path, cli):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  cases = {"missing config": (str(tmp_path / "nope.py"), tmp_path / "w1", ()),
           "workdir is a file": (TINY, a_file, ()),
           "log_every=0": (TINY, tmp_path / "w2", ("--config.sft.log_every=0",))}
  procs = {}
  for name, (config, workdir, overrides) in cases.items():
    cmd, env = cli(config, workdir, *overrides)
    procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (name, err)
  assert a_file.read_text() == "x"


def test_bad_config_is_rejected_before_any_data(tmp_path):
  config = _tiny()
  check_config(config, ["sft"])
  for key, value in (("log_every", 0), ("checkpoint_every", -1), ("keep_checkpoints", 0),
                     ("eval_every", -2)):
    bad = _tiny()
    bad.sft[key] = value
    with pytest.raises(ValueError, match=rf"config\.sft\.{key} must be >= [01], got {value}"):
      check_config(bad, ["sft"])
  bad = _tiny()
  bad.rl_loop.log_every = 0
  with pytest.raises(ValueError, match="rl_loop.log_every"):
    check_config(bad, ["sft"])  # every section, also of stages not run now
  bad = _tiny()
  bad.rl_reward = "math:1.0,fromat:0.1"
  with pytest.raises(ValueError, match="fromat"):
    check_config(bad, ["sft", "rl"])
  check_config(bad, ["sft"])  # the rl reward only matters when rl runs
  bad = _tiny()
  with bad.unlocked():
    bad.sft.stepz = 3  # an experiment file with a typo
  with pytest.raises(ValueError, match=r"SFTConfig: unknown field\(s\) \['stepz'\]"):
    check_config(bad, ["sft"])
  bad = _tiny()
  bad.stages = "sft,rlhf"
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['rlhf'\]"):
    stage_list(bad)
  # a broken tokenizer.model: one line naming it
  (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="tokenizer.model does not load") as e:
    prepare_tokenizer(config, str(tmp_path), [])
  assert "\n" not in str(e.value)


def test_workdir_binds_only_once_a_checkpoint_exists(tmp_path):
  from rlhfjax.config import to_json
  config = _tiny()
  (tmp_path / "checkpoints" / "sft").mkdir(parents=True)  # what a run that failed at step 1 leaves
  (tmp_path / "config.json").write_text(to_json(config))
  (tmp_path / "tokenizer.model").write_text("trained for the old data")
  corrected = _tiny()
  corrected.model.d_model = 64
  corrected.data.num_train = 300
  check_resumable(corrected, str(tmp_path))  # no checkpoint yet: the corrected config may run
  assert not (tmp_path / "tokenizer.model").exists()  # trained on the old data: rebuilt
  (tmp_path / "checkpoints" / "sft" / "6").mkdir()
  with pytest.raises(ValueError, match=r"different config \(data.num_train, model.d_model differ\)"):
    check_resumable(corrected, str(tmp_path))


def test_rewind_drops_rows_after_the_restored_step(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write("sft", 4, {"loss": 1.0})
    w.write("sft_eval", 0, {"acc": 0.0})
    for step in (2, 4, 6, 8):  # killed after logging 8; its last checkpoint was 4
      w.write("rl", step, {"loss": float(step)})
      w.write_samples("rl", step, [{"completion": str(step)}])
    w.write("rl_eval", 0, {"acc": 0.1})
    w.write("rl_eval", 6, {"acc": 0.2})
    w.rewind("rl", 4)
    for step in (6, 8):  # the resumed run writes them again
      w.write("rl", step, {"loss": -float(step)})
    w.rewind("sft", 4, evals=True)  # a finished stage's final eval at 4 is written again
  assert [(r["stage"], r["step"]) for r in read_metrics(tmp_path)] == [
      ("sft", 4), ("sft_eval", 0), ("rl", 2), ("rl", 4), ("rl_eval", 0), ("rl", 6), ("rl", 8)]
  assert [r["loss"] for r in read_metrics(tmp_path, "rl")] == [2.0, 4.0, -6.0, -8.0]
  assert [r["step"] for r in read_samples(tmp_path)] == [2, 4]


def test_truncated_latest_checkpoint_falls_back_with_one_warning(tmp_path, caplog):
  x = {"w": jnp.arange(4.0)}
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, x, {"i": 1})
    ckpt.save(2, {"w": x["w"] + 1}, {"i": 2})
  _truncate_state(tmp_path / "2")
  with caplog.at_level(logging.WARNING, "rlhfjax"), Checkpointer(str(tmp_path)) as ckpt:
    step, state, meta = ckpt.restore_latest_good(x)
    assert (step, meta) == (1, {"i": 1}) and np.array_equal(state["w"], np.arange(4.0))
    assert ckpt.latest_step() == 1
    assert ckpt.save(2, x)  # the step can be saved again
  [rec] = caplog.records
  assert "checkpoint step 2" in rec.message and "resuming from step 1" in rec.message
  assert "\n" not in rec.message and (tmp_path / "2.corrupt").is_dir()
  # a state that matches no checkpoint: nothing renamed, one line
  with Checkpointer(str(tmp_path)) as ckpt, pytest.raises(ValueError, match="no checkpoint in") as e:
    ckpt.restore_latest_good({"w": jnp.zeros((3, 3)), "extra": jnp.zeros(2)})
  assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path))[:2] == ["1", "2"]


def test_heldout_loss_counts_a_partial_batch(monkeypatch):
  from rlhfjax.train.sft import heldout_loss

  def collate(rows, tokenizer, max_prompt_len, max_response_len):  # example i: i + 1 targets
    lens = np.array([int(r["prompt"]) + 1 for r in rows])
    return {"tokens": np.array([[int(r["prompt"])] * 8 for r in rows]), "mask": np.ones((len(rows), 8)),
            "positions": np.zeros((len(rows), 8)),
            "loss_mask": (np.arange(8)[None] <= lens[:, None]).astype(np.float32)}

  def eval_loss(params, batch):  # every target of example i costs 1 + i nats
    calls.append(batch["loss_mask"].shape[0])
    w = np.asarray(batch["loss_mask"][:, 1:], np.float64)
    per_row = 1.0 + np.asarray(batch["tokens"][:, 0], np.float64)
    return {"loss": (w.sum(1) * per_row).sum() / w.sum(), "target_tokens": w.sum()}

  monkeypatch.setattr("rlhfjax.data.collate_sft", collate)
  run = types.SimpleNamespace(config=_tiny(), tokenizer=None,
                              test_examples=[{"prompt": str(i)} for i in range(5)])
  want = (1 * 1 + 2 * 2 + 3 * 3) / (1 + 2 + 3)  # examples 0..2, token-weighted
  for batch_size, shapes in ((8, [8]), (2, [2, 2])):  # fewer examples than one batch; a ragged tail
    calls = []
    assert heldout_loss(run, None, eval_loss, batch_size, n_examples=3) == pytest.approx(want)
    assert calls == shapes


def test_nan_update_is_skipped_and_params_unchanged(rl_loop, random_rollout, tiny_cfg):
  from rlhfjax.models import PolicyModel, init_params
  from rlhfjax.parallel import create_mesh
  from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

  def nan_scores(seed):
    rollout, scores = random_rollout(seed=seed)
    return rollout, np.full_like(scores, np.nan)

  # the programs of test_rl_update's single-device GRPO run (shared through the compilation cache)
  algo = AlgoConfig(algo="grpo", aggregation="sequence", group_size=4, minibatch_size=8, epochs=2)
  state, [metrics] = rl_loop(algo, create_mesh((1, 1, 1), jax.devices()[:1]), iters=1,
                             rollout_fn=nan_scores)
  assert float(metrics["update_skipped"]) == 1.0 and np.isnan(float(metrics["policy_loss"]))
  # params and optimizer state exactly as rl_loop initialized them (policy from key 0)
  params = init_params(PolicyModel(tiny_cfg), jax.random.key(0))
  tx = RLOptimConfig(learning_rate=1e-3, value_learning_rate=1e-3, warmup_steps=0).optimizers(10)[0]
  chex.assert_trees_all_equal(state.policy.params, jax.device_get(params))
  chex.assert_trees_all_equal(state.policy.opt_state, jax.device_get(tx.init(params)))
  assert int(state.policy.step) == 0 and np.isfinite(float(state.kl.value))


def test_failing_reward_is_loud_then_stops(caplog):
  from rlhfjax.train.rl_stage import RLLoopConfig, RLStage
  stage = types.SimpleNamespace(name="rl", loop=RLLoopConfig(max_unscored_iters=3),
                                streaks={"unscored": 0, "skipped": 0, "warned": 0})
  ok = {"unscored_share": 0.0, "update_skipped": 0.0}
  bad = {"unscored_share": 1.0, "reward_nan_math": 32.0, "update_skipped": 0.0}
  with caplog.at_level(logging.WARNING, "rlhfjax"):
    RLStage.check(stage, 1, {**ok, "unscored_share": 0.1, "reward_nan_math": 3.0})  # below the share
    RLStage.check(stage, 2, bad)
    RLStage.check(stage, 3, bad)
    RLStage.check(stage, 4, ok)  # the streak restarts
    RLStage.check(stage, 5, bad)
    RLStage.check(stage, 6, bad)
    with pytest.raises(StopRun, match="for 3 iterations in a row") as e:
      RLStage.check(stage, 7, bad)
    assert "\n" not in str(e.value)
    assert [r.message.split(":")[1] for r in caplog.records] == [
        " iteration 1", " iteration 2", " iteration 3", " iteration 5", " iteration 6", " iteration 7"]
    assert "from math" in caplog.records[0].message
    caplog.clear()
    for it in (1, 2):
      RLStage.check(stage, it, {**ok, "update_skipped": 0.5})
    with pytest.raises(StopRun, match="non-finite updates skipped for 3 iterations"):
      RLStage.check(stage, 3, {**ok, "update_skipped": 1.0})
  assert len(caplog.records) == 3 and "skipped" in caplog.records[0].message


def test_always_nan_reward_stops_the_run(tmp_path):
  from rlhfjax.rewards import register_reward
  from rlhfjax.train.pipeline import train_and_evaluate
  register_reward("test_always_nan", lambda prompts, completions, **_: np.full(len(completions), np.nan),
                  overwrite=True)
  c = _tiny()  # the shapes of test_rl_stage's tiny run (its programs come from the compilation cache)
  c.stages, c.rl_reward = "sft,rl", "test_always_nan"
  c.data.update(flaw="drop_final_carry", flaw_prob=0.75)
  c.sft.update(steps=6, log_every=3, checkpoint_every=6, eval_examples=0)
  c.rl.update(group_size=4, minibatch_size=8)
  c.rl_sampling.max_new_tokens = 8
  c.rl_loop.update(iterations=2, prompts_per_iter=2, eval_every=0, eval_examples=0,
                   checkpoint_every=1, max_unscored_iters=2)
  with pytest.raises(StopRun, match="unscored .* for 2 iterations in a row") as e:
    train_and_evaluate(c, str(tmp_path))
  assert "\n" not in str(e.value)
  assert [r["unscored_share"] for r in read_metrics(tmp_path, "rl")] == [1.0, 1.0]
