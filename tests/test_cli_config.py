"""`--config` by experiment name or by path (config_flags semantics), and the packaging that ships
experiments/ as `rlhfjax.experiments`. No training: each test takes well under a second but the
subprocess one (a Python start)."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from rlhfjax.config import available_experiments, experiments_dir, resolve_config_arg
from rlhfjax.main import resolve_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(*argv):
  """What `python -m rlhfjax.main ARGV` hands to main() as the config (a private FlagValues)."""
  argv = ["prog", *resolve_argv(list(argv))]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_name_resolves_to_the_experiment_file():
  path = resolve_config_arg("exceed_teacher")
  assert os.path.samefile(path, os.path.join(ROOT, "experiments", "exceed_teacher.py"))
  assert resolve_config_arg("exceed_teacher:rloo") == path + ":rloo"  # the get_config argument stays
  assert {"exceed_teacher", "preference", "arithmetic", "ppo_preference"} <= set(available_experiments())
  assert "__init__" not in available_experiments()
  assert os.path.isdir(experiments_dir())


def test_by_name_and_by_path_give_the_same_config_and_take_overrides():
  from experiments import exceed_teacher  # the package import (relative sibling import)
  by_name = _parse("--config=exceed_teacher", "--config.sft.steps=3")
  by_path = _parse(f"--config={os.path.join(ROOT, 'experiments', 'exceed_teacher.py')}",
                   "--config.sft.steps=3")
  expected = exceed_teacher.get_config()
  expected.sft.steps = 3
  assert by_name.to_dict() == by_path.to_dict() == expected.to_dict()
  assert by_name.stages == "sft,rl"  # the demo's default stages come from the experiment
  assert _parse("--config", "preference").stages == "sft,rm"
  assert _parse("--config=preference", "--config.stages=sft").stages == "sft"
  assert _parse("--config=exceed_teacher:rloo").rl.algo == "rloo"


def test_locked_config_rejects_a_typo():
  with pytest.raises((AttributeError, KeyError, flags.Error), match="stepz"):  # main.run: one line
    _parse("--config=exceed_teacher", "--config.sft.stepz=3")


def test_unknown_name_and_missing_path_are_one_line_errors():
  with pytest.raises(ValueError, match=r"unknown experiment 'exceed_teachr'; available: .*exceed_teacher"):
    resolve_config_arg("exceed_teachr")
  with pytest.raises(FileNotFoundError, match="nope.py"):
    resolve_config_arg("nope.py")


def test_cli_unknown_name_exits_with_one_line_listing_the_experiments(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "rlhfjax.main", "--config=exceed_teachr",
                        f"--workdir={tmp_path}"], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ValueError: unknown experiment 'exceed_teachr'")
  assert "exceed_teacher" in lines[0] and "preference" in lines[0]


def test_pyproject_lists_every_package():
  """The package list is explicit (for the experiments/ mapping): a new subpackage must be added."""
  import tomllib

  import setuptools
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
  found = {p for p in setuptools.find_namespace_packages(where=ROOT, include=["rlhfjax*"])
           if "__pycache__" not in p}
  assert set(tool["packages"]) == found | {"rlhfjax.experiments"}
  assert tool["package-dir"] == {"rlhfjax.experiments": "experiments"}


def test_moved_rl_keys_keep_working_or_name_their_new_place():
  import ml_collections

  from rlhfjax.config import check_moved_keys, rewrite_moved_flags
  argv, notes = rewrite_moved_flags(["main", "--config.rl.iterations=5", "--config.rl.algo=ppo",
                                     "--config.rl.temperature=0.7"])
  assert argv == ["main", "--config.rl_loop.iterations=5", "--config.rl.algo=ppo",
                  "--config.rl_sampling.temperature=0.7"]
  assert notes == ["note: config.rl.iterations is now config.rl_loop.iterations",
                   "note: config.rl.temperature is now config.rl_sampling.temperature"]
  old = ml_collections.ConfigDict({"rl": {"algo": "grpo", "learning_rate": 1e-4}})
  with pytest.raises(ValueError, match=r"config.rl.learning_rate moved to config.rl_optim.learning_rate"):
    check_moved_keys(old)
