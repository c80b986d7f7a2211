"""Test setup: 8 fake CPU devices so sharding code really runs, f32 matmuls for exact comparisons,
and a persistent compilation cache for this test session (shared with the xdist workers and the
subprocesses the end-to-end tests start, which compile the same programs again). LLVM runs at -O0
(`FAST_COMPILE`): the test programs are tiny, so compiling them costs far more than running them."""
import os
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rlhfjax_jit_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


# ---------------------------------------------------------------------------------------------
# Shared fixtures: a tiny transformer, random ragged rollouts, RL states and loops, the CLI and
# the kill -9 harness. Tests take them as arguments; no test imports another test module.
# ---------------------------------------------------------------------------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="session")
def tiny_cfg():
  """A 2-layer transformer small enough to train in a test (GQA: 4 query heads, 2 kv heads)."""
  from rlhfjax.models import TransformerConfig
  return TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                           d_ff=64, max_len=20)


def _random_rollout(b=16, p=6, n=10, seed=0, vocab=40, group=1):
  """A `Rollout` of NumPy arrays: ragged left-padded prompts (each repeated over `group`
  consecutive rows) and right-padded responses of random tokens, and random scores [b]."""
  from rlhfjax.sampling import Rollout
  rng = np.random.default_rng(seed)
  pad = np.repeat(rng.integers(0, 3, b // group), group)
  pmask = (np.arange(p)[None] >= pad[:, None]).astype(np.int32)
  pids = np.repeat(rng.integers(4, vocab, (b // group, p)), group, axis=0).astype(np.int32) * pmask
  lens = rng.integers(2, n + 1, b)
  rmask = (np.arange(n)[None] < lens[:, None]).astype(np.float32)
  rids = (rng.integers(4, vocab, (b, n)) * rmask).astype(np.int32)
  scores = rng.normal(size=b).astype(np.float32)
  return Rollout(prompt_ids=pids, prompt_mask=pmask, response_ids=rids, response_mask=rmask,
                 finished=lens < n), scores


@pytest.fixture
def random_rollout():
  return _random_rollout


@pytest.fixture
def rl_loop(tiny_cfg):
  """`run(algo, mesh, iters=2, ...) -> (host RLState, [metrics per iteration])`: `iters` rounds of
  make_experience + update on random rollouts (seeds 0, 1, ...), from a policy initialized with
  key 0 (also the reference) and the given models (default: the built-in transformer's)."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import PolicyModel, PolicyValueModel, ValueModel, init_params
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.train.rl import (RLModels, RLOptimConfig, init_rl_state, make_experience_fn,
                                make_rl_update, pack_rollout, rl_state_shardings)

  def run(algo, mesh, iters=2, *, optim=None, models=None, policy_params=None, make_update=None,
          rollout_fn=_random_rollout):
    rules = axes.DEFAULT_RULES
    optim = optim or RLOptimConfig(learning_rate=1e-3, value_learning_rate=1e-3, warmup_steps=0)
    models = models or RLModels(policy=PolicyModel(tiny_cfg),
                                critic=ValueModel(tiny_cfg) if algo.separate_critic else None,
                                actor_critic=PolicyValueModel(tiny_cfg) if algo.shared_trunk else None)
    ptx, vtx = optim.optimizers(10)
    if policy_params is None:
      policy_params = init_params(models.policy, jax.random.key(0))
    state = init_rl_state(models, algo, ptx, vtx, mesh, rules, jax.random.key(1), policy_params)
    _, shardings = rl_state_shardings(models, algo, ptx, vtx, mesh, rules)
    ref_params = {k: v for k, v in policy_params.items() if k != "value_head"}
    ref = jax.device_put(ref_params, {k: shardings.policy.params[k] for k in ref_params})
    exp_fn = make_experience_fn(algo, models, mesh, rules)
    upd = (make_update or make_rl_update)(algo, models, ptx, vtx, shardings, mesh, rules)
    metrics = []
    for i in range(iters):
      rollout, scores = rollout_fn(seed=i)
      rollout = shard_batch(rollout, mesh, rules)
      if algo.packs:
        rollout = pack_rollout(rollout, algo, mesh, rules)
      vparams = state.value.params if algo.separate_critic else None
      exp, em = exp_fn(state.policy.params, ref, vparams, rollout, jnp.asarray(scores), state.kl.value)
      state, um = upd(state, exp, jax.random.key(10 + i))
      metrics.append({**em, **um})
    return jax.device_get(state), jax.device_get(metrics)
  return run


@pytest.fixture
def cli():
  """`cli(config_path, workdir, *overrides, devices=1) -> (argv, env)` for `python -m rlhfjax.main`."""
  def make(config, workdir, *overrides, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
               JAX_PLATFORMS="cpu")
    return [sys.executable, "-m", "rlhfjax.main", f"--config={config}", f"--workdir={workdir}",
            *overrides], env
  return make


@pytest.fixture
def kill9():
  """`kill9(argv, env, path)`: start the command, and as soon as `path` exists (a checkpoint step
  directory) freeze it and kill -9 it: a real crash mid-run, at a known point."""
  def run(cmd, env, path, timeout=300):
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # freeze at once, then a real kill -9
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
  return run


# The end-to-end and multi-device files, longest first: started first, so that the two xdist workers
# finish together instead of one starting a five-minute test at the end.
LONGEST_FIRST = ("test_multiprocess", "test_ppo_stage", "test_pipeline", "test_reward_pipeline", "test_bench",
                 "test_rl_shard_map", "test_rl_stage", "test_reward_step", "test_rl_update",
                 "test_robustness", "test_dpo", "test_sweep", "test_plan",
                 "test_shared_trunk", "test_sft_sharding", "test_hf_e2e", "test_models", "test_humaneval")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
