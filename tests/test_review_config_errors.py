"""Bad config values rejected by `check_config` / the RL dataclasses with one line naming the key,
before any data is built (no training; each test well under a second)."""

import os
import subprocess
import sys

import pytest

from rlhfjax.config import parse_config
from rlhfjax.train.pipeline import check_config, stage_list
from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(*overrides, config="grpo_arith"):
  cfg = parse_config([f"--config={config}", *overrides])
  check_config(cfg, stage_list(cfg))


@pytest.mark.parametrize("override,match", [
    ("--config.rl.minibatch_size=0", r"rl.minibatch_size must be >= 1, got 0"),
    ("--config.rl.minibatch_size=-8", r"rl.minibatch_size must be >= 1, got -8"),
    ("--config.rl.epochs=0", r"rl.epochs must be >= 1, got 0"),
    ("--config.rl.clip_eps=0", r"rl.clip_eps must be > 0, got 0"),
    ("--config.rl.gamma=1.5", r"rl.gamma must be in \[0, 1\], got 1.5"),
    ("--config.rl.lam=-0.1", r"rl.lam must be in \[0, 1\], got -0.1"),
    ("--config.rl.kl_coef=-0.1", r"rl.kl_coef must be >= 0, got -0.1"),
    ("--config.rl.kl_estimator=k4", r"rl.kl_estimator must be one of .*'k4'"),
    ("--config.rl.aggregation=mean", r"rl.aggregation must be one of .*'mean'"),
    ("--config.rl.advantage_scale=std", r"rl.advantage_scale must be group\|batch\|none, got 'std'"),
    ("--config.rl_optim.learning_rate=-1", r"rl_optim.learning_rate must be >= 0, got -1"),
    ("--config.rl_sampling.temperature=0", r"config.rl_sampling.temperature must be > 0, got 0"),
    ("--config.rl_sampling.top_p=1.5", r"config.rl_sampling.top_p must be in \(0, 1\], got 1.5"),
    ("--config.rl_sampling.top_k=-1", r"config.rl_sampling.top_k must be >= 0, got -1"),
    ("--config.rl_sampling.dtype=float16", r"config.rl_sampling.dtype must be .*'float16'"),
    ("--config.rl_loop.prompts_per_iter=0", r"config.rl_loop.prompts_per_iter must be >= 1, got 0"),
    ("--config.data.max_response_len=0", r"config.data.max_response_len must be >= 1, got 0"),
    ("--config.sft.batch_size=0", r"config.sft.batch_size must be >= 1, got 0"),
    ("--config.mesh.shape=(0,1,1)", r"config.mesh.shape=\(0, 1, 1\).*non-positive"),
    ("--config.stages=rl,sft", r"config.stages=rl,sft: sft must come before rl"),
    ("--config.stages=sft,sft", r"config.stages=sft,sft repeats \['sft'\]"),
])
def test_bad_value_is_one_line_naming_the_key(override, match):
  with pytest.raises(ValueError, match=match) as e:
    _check(override)
  assert "\n" not in str(e.value)


def test_valid_values_still_pass():
  _check()  # the experiment as shipped
  _check("--config.rl.algo=best_of_n", "--config.rl.best_of_n_k=4", "--config.rl.dual_clip=3",
         "--config.rl_sampling.top_p=1.0", "--config.stages=rl")
  _check(config="ppo_preference")
  _check(config="dpo_preference")


def test_dataclasses_reject_directly():
  with pytest.raises(ValueError, match=r"rl.best_of_n_k must be in \[1, rl.group_size // 2 = 2\], got 3"):
    AlgoConfig(algo="best_of_n", group_size=4, minibatch_size=4, best_of_n_k=3)
  with pytest.raises(ValueError, match=r"rl.dual_clip must be > 1 \(0 = off\), got 0.5"):
    AlgoConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match=r"rl_optim.grad_clip must be >= 0, got -1"):
    RLOptimConfig(grad_clip=-1)
  AlgoConfig(algo="ppo", group_size=1, minibatch_size=4)  # PPO takes one response per prompt


def test_cli_zero_minibatch_is_one_error_line_not_a_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "rlhfjax.main", "--config=grpo_arith", f"--workdir={tmp_path}",
                        "--config.rl.minibatch_size=0"], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.strip().splitlines() if not l.startswith(("WARNING", "I0", "W0"))]
  assert lines == ["error: ValueError: rl.minibatch_size must be >= 1, got 0"]
  assert not os.path.exists(tmp_path / "tfds")  # rejected before any data is built
