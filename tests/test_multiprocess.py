"""Real multi-process runs: 2 processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), 2 fake
CPU devices each — global batches from process-local rows, checkpoints, and sft,rl through the CLI
against one process over the same 4-device mesh."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each process: its DataIterator shard, its rows -> shard_batch -> gathered global array, and an
# Orbax round trip of a sharded leaf and one restored without a sharding.
WORKER = """
import json, sys
import numpy as np
from rlhfjax.parallel.distributed import initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from jax.experimental.multihost_utils import process_allgather
from rlhfjax.checkpoint import Checkpointer, abstract_like
from rlhfjax.data import DataIterator
from rlhfjax.parallel import batch_sharding, create_mesh, shard_batch
i, mesh = jax.process_index(), create_mesh((-1, 1, 1))
rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)  # the global batch
x = shard_batch({"x": rows[4 * i:4 * (i + 1)]}, mesh)["x"]
local = sorted(int(s.data[0, 0]) // 3 for s in x.addressable_shards)  # first row of each local shard
it = DataIterator(list(range(20)), 5, seed=0)
state = {"w": x, "b": np.float32(7)}
with Checkpointer(sys.argv[3]) as ckpt:
  ckpt.save(1, state, {"p": i})
  restored, meta = ckpt.restore(abstract_like({"w": x, "b": jax.ShapeDtypeStruct((), np.float32)}))
print("RESULT", json.dumps(dict(
    process=i, count=jax.process_count(), devices=jax.device_count(), shape=list(x.shape),
    gathered=process_allgather(x, tiled=True).tolist(), local_rows=local,
    epoch=[int(v) for v in it.epoch_order(0)], w=process_allgather(restored["w"], tiled=True).tolist(),
    w_sharding=restored["w"].sharding == x.sharding, b=float(restored["b"].addressable_data(0)),
    b_devices=len(restored["b"].sharding.device_set), meta=meta)))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(argv_of, env, timeout=240):
  """Starts process 0 and 1 (`argv_of(i)`); returns [(returncode, output)]."""
  procs = [subprocess.Popen(argv_of(i), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    return [(p.returncode, out) for p in procs for out, _ in [p.communicate(timeout=timeout)]]
  finally:
    for p in procs:
      p.kill()


def test_global_batch_from_process_local_rows(tmp_path, cli):
  addr, env = f"127.0.0.1:{_free_port()}", cli("", "", devices=2)[1]  # 2 CPU devices per process
  ckpt = str(tmp_path / "ckpt")
  outs = _two_processes(lambda i: [sys.executable, "-c", WORKER, addr, str(i), ckpt], env)
  assert all(rc == 0 for rc, _ in outs), outs
  res = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for _, out in outs]
  rows = np.arange(8 * 3).reshape(8, 3).tolist()
  for i, r in enumerate(res):
    assert (r["process"], r["count"], r["devices"], r["shape"]) == (i, 2, 4, [8, 3])
    assert r["gathered"] == rows  # what a single process would have built from all 8 rows
    assert r["local_rows"] == [4 * i, 4 * i + 2]  # its devices hold its own rows
    assert r["w"] == rows and r["w_sharding"]
    assert r["b"] == 7.0 and r["b_devices"] == 4  # replicated on all devices, not device 0
    assert r["meta"] == {"p": 0}  # the checkpoint's meta is process 0's
  # the data iterators' shards are disjoint and cover the epoch
  assert sorted(res[0]["epoch"] + res[1]["epoch"]) == list(range(20))


def _load(path):
  """A checkpoint's state as NumPy arrays (no mesh needed)."""
  import orbax.checkpoint as ocp
  from jax import tree
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path).item_metadata.tree
  return ckptr.restore(path, restore_args=tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))


# sft,rl (GRPO; a length term so that advantages are not all zero) small enough for seconds a stage
TINY_RL = ("--config.stages=sft,rl", "--config.sft.steps=2", "--config.sft.log_every=1",
           "--config.sft.checkpoint_every=2", "--config.sft.eval_examples=0", "--config.data.num_train=64",
           "--config.data.num_test=8", "--config.rl.group_size=2", "--config.rl.minibatch_size=8",
           "--config.rl_loop.prompts_per_iter=4", "--config.rl_loop.iterations=6",
           "--config.rl_loop.eval_examples=4", "--config.rl_loop.eval_samples=0",
           "--config.rl_loop.checkpoint_every=1", "--config.eval.batch_size=4",
           "--config.rl_reward=math:1,length:0.1")


def test_sft_rl_through_the_cli_as_two_processes(tmp_path, cli):
  import jax
  work, ref, addr = tmp_path / "run", tmp_path / "ref", f"127.0.0.1:{_free_port()}"
  config = os.path.join(ROOT, "tests", "tiny.py")
  argv, env = cli(config, work, *TINY_RL, f"--coordinator_address={addr}", "--num_processes=2", devices=2)
  ref_argv, ref_env = cli(config, ref, *TINY_RL, devices=4)  # one process, the same 4-device mesh
  one = subprocess.Popen(ref_argv, env=ref_env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  outs = _two_processes(lambda i: argv + [f"--process_id={i}"], env)
  ref_out = one.communicate(timeout=240)[0]
  assert all(rc == 0 for rc, _ in outs), outs[0][1][-3000:] + outs[1][1][-3000:]
  assert one.returncode == 0, ref_out[-3000:]
  # both processes computed the same global numbers (their summaries agree)
  summaries = [[l for l in out.splitlines() if "held-out" in l] for _, out in outs]
  assert len(summaries[0]) == 6 and summaries[0] == summaries[1]
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  # process 0 alone wrote: one line per log step and eval, one TensorBoard event file
  assert [(r["stage"], r["step"]) for r in rows] == [
      ("sft_eval", 0), ("sft", 1), ("sft", 2), ("sft_eval", 2), ("rl_eval", 0),
      *[("rl", i) for i in range(1, 7)], ("rl_eval", 6)]
  assert len(os.listdir(work / "tb")) == 1
  assert sorted(os.listdir(work / "checkpoints" / "rl")) == ["5", "6"]
  assert (work / "report.md").exists() and (work / "results.json").exists()
  # the host metrics are over all rows: they match the one-process run's
  ref_rows = {(r["stage"], r["step"]): r for r in map(json.loads, open(ref / "metrics.jsonl"))}
  for r in rows:
    if r["stage"] == "rl":
      for k in ("reward_mean", "reward_length", "think_mean_completion_words", "kl_seq_mean"):
        np.testing.assert_allclose(r[k], ref_rows["rl", r["step"]][k], rtol=1e-5, atol=1e-5,
                                   err_msg=k)
  # the final RL parameters are those of one process over the same mesh, and they moved
  got, want = (_load(str(w / "checkpoints" / "rl" / "6" / "state"))["policy"]["params"] for w in (work, ref))
  sft = _load(str(work / "checkpoints" / "sft" / "2" / "state"))["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got, sft))
  assert max(moved) > 3e-5  # 6 steps at lr 1e-4 (the two runs differ by ~6e-8)

  # Preemption: SIGTERM to process 1 alone mid-RL -> both checkpoint the same step, say so in one
  # line and exit 143; the re-run resumes, is killed -9 (process 1) mid-RL, both are restarted, and
  # the run ends bit-identical to the uninterrupted two-process one.
  pre, rl_dir = tmp_path / "preempted", tmp_path / "preempted" / "checkpoints" / "rl"

  def launch(stop=None):
    """Both processes; `stop(procs)` acts on them mid-run. Returns [(returncode, output)]."""
    a = f"127.0.0.1:{_free_port()}"
    argv_pre, _ = cli(config, pre, *TINY_RL, f"--coordinator_address={a}", "--num_processes=2", devices=2)
    procs = [subprocess.Popen(argv_pre + [f"--process_id={i}"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
      if stop:
        stop(procs)
      return [(p.returncode, out) for p in procs for out, _ in [p.communicate(timeout=240)]]
    finally:
      for p in procs:
        p.kill()

  def wait_for(path, procs):
    deadline = time.time() + 240
    while not path.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
      time.sleep(0.005)
    assert path.exists(), f"{path} never appeared"

  def sigterm_one(procs):
    wait_for(rl_dir / "1", procs)
    procs[1].send_signal(signal.SIGTERM)

  outs = launch(sigterm_one)
  assert [rc for rc, _ in outs] == [143, 143], outs[0][1][-2000:] + outs[1][1][-2000:]
  lines = [[l for l in out.splitlines() if "rl: stopped by SIGTERM; checkpoint" in l] for _, out in outs]
  assert len(lines[0]) == 1 and len(lines[1]) == 1, outs[0][1][-2000:]
  stopped = max(int(d) for d in os.listdir(rl_dir))
  assert 1 < stopped < 5 and f"(step {stopped})" in lines[0][0] and f"(step {stopped})" in lines[1][0]

  def kill9_one(procs):
    wait_for(rl_dir / str(stopped + 1), procs)  # resumed, and trained past the stop
    procs[1].send_signal(signal.SIGSTOP)  # freeze at once, then a real kill -9
    os.kill(procs[1].pid, signal.SIGKILL)
    time.sleep(1)
    procs[0].kill()  # its peer is gone: a real preemption takes the whole slice down

  outs = launch(kill9_one)
  assert outs[1][0] == -signal.SIGKILL
  assert max(int(d) for d in os.listdir(rl_dir)) < 6, "the run finished before it was killed"
  outs = launch()
  assert all(rc == 0 for rc, _ in outs), outs[0][1][-3000:] + outs[1][1][-3000:]
  assert all("rl: resumed at step" in out for _, out in outs)
  full, resumed = (_load(str(w / "checkpoints" / "rl" / "6" / "state")) for w in (work, pre))
  jax.tree.map(np.testing.assert_array_equal, resumed, full)  # params, optimizer state, rng, KL state
