"""Checkpointer: round trips (typed keys, bf16, optax state), step management, shardings, crash safety."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhfjax.checkpoint import Checkpointer, abstract_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
  params = {
      "dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + seed,
                "bias": jnp.ones((4,), jnp.bfloat16) * (seed + 1)},
      "embed": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16).reshape(2, 4),
  }
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  return {
      "step": jnp.asarray(7 + seed, jnp.int32),
      "params": params,
      "opt_state": opt_state,
      "rng": jax.random.key(42 + seed),
      "rng_split": jax.random.split(jax.random.key(1), 3),
      "kl": {"coef": jnp.float32(0.05), "count": np.int64(3)},
  }


def _keys_to_data(tree):
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def test_round_trip_typed_key_bf16_adam_meta(tmp_path):
  state = _state()
  meta = {"data": {"epoch": 1, "index": 17}, "stage": "ppo"}
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.save(3, state, meta)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    restored, rmeta = ckpt.restore(abstract_like(state))
  assert rmeta == meta
  assert restored["rng"].dtype == state["rng"].dtype  # a typed key again
  assert restored["rng_split"].shape == (3,)
  assert restored["params"]["embed"].dtype == jnp.bfloat16
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(_keys_to_data(restored), _keys_to_data(state))
  # The restored key is usable and gives the same stream.
  np.testing.assert_array_equal(jax.random.normal(restored["rng"], (4,)),
                                jax.random.normal(state["rng"], (4,)))


def test_restore_with_concrete_target_and_eval_shape(tmp_path):
  state = _state()
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state)
    # Concrete arrays as the target (values ignored).
    restored, meta = ckpt.restore(_state(seed=5))
    assert meta == {}
    chex.assert_trees_all_equal(_keys_to_data(restored), _keys_to_data(state))
    # jax.eval_shape output (no shardings) also works; arrays land on device 0.
    restored, _ = ckpt.restore(jax.eval_shape(_state))
    chex.assert_trees_all_equal(_keys_to_data(restored), _keys_to_data(state))


def test_state_can_be_deleted_right_after_async_save(tmp_path):
  """save() copies to host before returning, so donating the state to the next step is safe."""
  state = {"w": jnp.arange(1000, dtype=jnp.float32), "rng": jax.random.key(3)}
  expected = jax.tree.map(np.asarray, _keys_to_data(state))
  abstract = abstract_like(state)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
    state["w"].delete()
  with Checkpointer(str(tmp_path)) as ckpt:
    restored, _ = ckpt.restore(abstract)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, _keys_to_data(restored)), expected)


def test_max_to_keep_and_interval(tmp_path):
  x = {"a": jnp.zeros(3)}
  with Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=5) as ckpt:
    saved = [s for s in range(1, 21) if ckpt.save(s, x)]
    assert saved == [5, 10, 15, 20]
    assert ckpt.save(23, x, force=True)  # force overrides the interval
    assert not ckpt.save(23, x, force=True)  # already saved: no-op, not an error
    assert not ckpt.save(21, x, force=True)  # older than latest: no-op
    ckpt.wait()
    assert ckpt.all_steps() == [20, 23]
    assert ckpt.latest_step() == 23
    restored, _ = ckpt.restore(x, step=20)
    with pytest.raises(FileNotFoundError, match="step 5"):
      ckpt.restore(x, step=5)
  dirs = sorted(d for d in os.listdir(tmp_path) if d.isdigit())
  assert dirs == ["20", "23"]


def test_restore_with_shardings_on_2_device_mesh(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  state = {"w": jnp.arange(16, dtype=jnp.float32).reshape(4, 4), "b": jnp.ones(4, jnp.bfloat16),
           "rng": jax.random.split(jax.random.key(0), 4)}
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state)
    shardings = {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P()),
                 "rng": NamedSharding(mesh, P("data"))}
    restored, _ = ckpt.restore(abstract_like(jax.eval_shape(lambda: state), shardings))
  assert restored["w"].sharding == shardings["w"]
  assert restored["b"].sharding == shardings["b"]
  assert restored["rng"].sharding == shardings["rng"]
  assert len(restored["w"].addressable_shards) == 2
  assert restored["w"].addressable_shards[0].data.shape == (2, 4)
  chex.assert_trees_all_equal(_keys_to_data(restored), _keys_to_data(state))


def test_empty_directory(tmp_path):
  with Checkpointer(str(tmp_path / "none")) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError) as err:
      ckpt.restore({"a": jnp.zeros(2)})
  assert "\n" not in str(err.value) and "no checkpoint" in str(err.value)


_KILLED_SAVER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from rlhfjax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.zeros((4,), jnp.float32), "rng": jax.random.key(0)}, {"i": 1})
    ckpt.wait()
    big = {"w": jnp.ones((64, 1024, 1024), jnp.float32), "rng": jax.random.key(1)}  # 256 MiB
    jax.block_until_ready(big)
    print("SAVING", flush=True)
    ckpt.save(2, big, {"i": 2})
    print("RETURNED", flush=True)
    time.sleep(60)
""")


def test_sigkill_mid_save_leaves_restorable_latest(tmp_path):
  directory = str(tmp_path / "ckpt")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, directory], stdout=subprocess.PIPE,
                          env=env, text=True)
  try:
    assert proc.stdout.readline().strip() == "SAVING"
    in_flight, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:  # kill as soon as Orbax's tmp dir for step 2 appears
      in_flight = os.listdir(directory)
      if any(d.startswith("2") for d in in_flight):
        break
      time.sleep(0.002)
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  with Checkpointer(directory) as ckpt:
    step = ckpt.latest_step()
    assert step in (1, 2), (step, in_flight)
    restored, meta = ckpt.restore(
        {"w": jax.ShapeDtypeStruct((4,) if step == 1 else (64, 1024, 1024), jnp.float32),
         "rng": jax.eval_shape(lambda: jax.random.key(0))}, step=step)
  assert meta == {"i": step}
  assert float(restored["w"].sum()) == (0.0 if step == 1 else 64 * 1024 * 1024)
  # An unfinished step-2 tmp dir is never listed as a step, and is cleaned up on start-up.
  if step == 1:
    assert not any(d.startswith("2") for d in os.listdir(directory)), os.listdir(directory)
