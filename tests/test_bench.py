"""The bench code paths run end to end on a tiny model (this checks the plumbing, not speed)."""

from rlhfjax import bench

# batch 8 divides the 8 fake CPU devices of tests/conftest.py, so --devices=all shards the batch.
TINY = ["--d_model=32", "--n_layers=1", "--vocab=64", "--batch=8", "--seq=16", "--prompt=4",
        "--new_tokens=4", "--steps=1", "--matmul_n=128", "--bandwidth_mib=8", "--devices=all"]


def test_benches_registered_in_one_place():
  assert set(bench.BENCHES) == {"sample", "sft", "rl_step", "ppo_update", "rm_score", "rl_iteration"}


def test_bench_all_tiny(capsys):
  results = bench.main(["all", *TINY])
  assert [r["bench"] for r in results] == list(bench.BENCHES)
  for r in results:
    assert r["tokens_per_s"] > 0, r
    assert r["flops_per_s"] > 0, r
    assert r["peak_flops_per_s"] > 0, r
    assert 0 < r["ratio"] < 10, r
    assert isinstance(r["memory"], dict)
  out = capsys.readouterr().out
  assert out.count("| matmul |") == 1
  assert "| sample |" in out and "| sft |" in out
  assert "| rm_score |" in out and "| ppo_update |" in out


def test_bench_ppo_update_flags(capsys):
  """The PPO-only flags are the one parser's: 2 epochs x 2 minibatches of 8 (one row per device),
  the shard_map update."""
  (r,) = bench.main(["ppo_update", *TINY, "--batch=16", "--epochs=2", "--minibatch=8",
                     "--variant=shard_map"])
  assert r["bench"] == "ppo_update" and "E2 mb8" in r["config"] and "shard_map" in r["config"]
  assert r["tokens_per_s"] > 0 and r["experience_s"] > 0
  assert "| ppo_update |" in capsys.readouterr().out


def test_bench_rm_score_ensemble(capsys):
  (r,) = bench.main(["rm_score", *TINY, "--ensemble=2"])
  assert r["bench"] == "rm_score" and r["config"].endswith("N2")
  assert r["responses_per_s"] > 0 and 0 < r["ratio"] < 10
  assert "| rm_score |" in capsys.readouterr().out


def test_matmul_peak():
  peak = bench.matmul_peak(n=64, iters=2)
  assert peak["n"] == 64 and peak["float32"] > 0


def test_hf_init_draws_weights_keeps_scales():
  """The peer-work init: every weight N(0, 0.02) as a fresh HF Llama's, norm scales left at one."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.bench.rl import hf_init

  params = {"layer": {"kernel": jnp.zeros((256, 256)), "norm": {"scale": jnp.ones((256,))},
                      "bias": jnp.zeros((256,))}}
  out = hf_init(params, jax.random.key(0))
  np.testing.assert_array_equal(out["layer"]["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(out["layer"]["bias"], 0.0)
  k = np.asarray(out["layer"]["kernel"])
  assert abs(k.std() - 0.02) < 1e-3 and abs(k.mean()) < 1e-3
  assert out["layer"]["kernel"].sharding == params["layer"]["kernel"].sharding
