"""The bench code paths run end to end on a tiny model (this checks the plumbing, not speed)."""

from rlhfjax import bench

# batch 8 divides the 8 fake CPU devices of tests/conftest.py, so --devices=all shards the batch.
TINY = ["--d_model=32", "--n_layers=1", "--vocab=64", "--batch=8", "--seq=16", "--prompt=4",
        "--new_tokens=4", "--steps=1", "--matmul_n=128", "--devices=all"]


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


def test_matmul_peak():
  peak = bench.matmul_peak(n=64, iters=2)
  assert peak["n"] == 64 and peak["float32"] > 0
