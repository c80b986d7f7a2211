"""Sweeps: the point helpers, the commands of a dry run, and a real 2-point local sweep (its table,
plot, and the re-run that skips finished points)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from rlhfjax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = f'''
import sys
sys.path.insert(0, {ROOT!r})
from tests import tiny
from rlhfjax.sweep import product

def get_config():
  c = tiny.get_config()
  c.sft.steps, c.sft.log_every, c.sft.checkpoint_every, c.sft.eval_examples = 2, 1, 2, 0
  return c

def get_sweep():
  return product({{"seed": [0, 1]}}, {{"sft.learning_rate": [0.001]}})
'''


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(EXPERIMENT)
  return str(path)


def test_product_zip_and_names():
  assert sweep.product({"a": [1, 2], "b": ["x", "y"]}) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert sweep.zip_({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert sweep.product(sweep.zip_({"a": [1, 2], "b": [3, 4]}), {"seed": [0, 1]}) == [
      {"a": 1, "b": 3, "seed": 0}, {"a": 1, "b": 3, "seed": 1},
      {"a": 2, "b": 4, "seed": 0}, {"a": 2, "b": 4, "seed": 1}]
  with pytest.raises(ValueError, match="different lengths"):
    sweep.zip_({"a": [1, 2], "b": [3]})
  assert sweep.point_name({"rl_optim.learning_rate": 1e-05, "seed": 1}) == "rl_optim.learning_rate=1e-05_seed=1"
  # the shipped sweep parses as main would parse it: lr x seed on grpo_arith
  points = sweep.load_sweep("grpo_arith")
  assert len(points) == len({sweep.point_name(p) for p in points}) >= 4
  assert {"rl_optim.learning_rate", "seed"} <= set(points[0])


def test_dry_run_lists_the_commands(experiment, tmp_path, capfd):
  root = str(tmp_path / "sw")
  args = [f"--config={experiment} --workdir={root}/seed={s}_sft.learning_rate=0.001 --config.seed={s} "
          "--config.sft.learning_rate=0.001" for s in (0, 1)]
  assert sweep.sweep(experiment, root, dry_run=True) == 0
  assert capfd.readouterr().out.splitlines() == [f"{sys.executable} -m rlhfjax.main {a}" for a in args]
  assert sweep.sweep(experiment, root, launch="slurm", dry_run=True) == 0  # launch/'s own --dry-run
  out = capfd.readouterr().out
  assert [l.split(" -- ", 1)[1] for l in out.splitlines() if l.startswith("+ sbatch")] == args, out
  assert not os.path.exists(root)  # a dry run writes nothing
  typo = tmp_path / "typo_sweep.py"  # a typo in one point fails before anything runs
  typo.write_text(EXPERIMENT.replace('"sft.learning_rate"', '"sft.stepz"'))
  with pytest.raises(Exception, match="stepz"):
    sweep.sweep(str(typo), root, dry_run=True)
  assert capfd.readouterr().out == ""


def test_local_sweep_writes_the_table_and_skips_finished_points(experiment, tmp_path, monkeypatch, capsys):
  root = str(tmp_path / "sw")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
  assert sweep.sweep(experiment, root, metric="sft.loss") == 0
  names = [f"seed={s}_sft.learning_rate=0.001" for s in (0, 1)]
  with open(os.path.join(root, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == names and [r["seed"] for r in rows] == ["0", "1"]
  for name, row in zip(names, rows):
    with open(os.path.join(root, name, "results.json")) as f:
      steps = json.load(f)["sft"]["steps"]  # a results.json number
    with open(os.path.join(root, name, "metrics.jsonl")) as f:
      loss = [r["loss"] for r in map(json.loads, f) if r["stage"] == "sft"][-1]  # the last logged loss
    assert row["status"] == "done" and int(row["sft.steps"]) == steps == 2
    assert float(row["sft.loss"]) == pytest.approx(loss)
  md = open(os.path.join(root, "sweep.md")).read()
  assert all(n in md for n in names) and "sft.loss" in md
  assert os.path.getsize(os.path.join(root, "sweep.png")) > 0
  capsys.readouterr()

  def no_run(*a, **k):
    raise AssertionError(f"ran {a}")
  monkeypatch.setattr(subprocess, "run", no_run)  # a re-run starts nothing: both points finished
  assert sweep.sweep(experiment, root, metric="sft.loss") == 0
  assert capsys.readouterr().out.count("finished, skipped") == 2
