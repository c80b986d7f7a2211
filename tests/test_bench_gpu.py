"""The accelerator figures' plumbing (benchmarks/gpu/): the `--size` presets, the decode HBM roofline
and the README table, on CPU at toy sizes (the H100 / H200 numbers come from benchmarks/gpu/run.sh)."""

import importlib.util
import json
import os

import pytest

from rlhfjax import bench
from rlhfjax.bench.common import SIZES, bench_model_config, memory_bandwidth, result
from rlhfjax.bench.lm import decode_roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_1b_preset_is_a_llama_like_1b():
  """Analytic, nothing allocated: d2048 L16, 16 heads / 8 kv of 128, SwiGLU 8192, V32000, tied."""
  cfg = bench_model_config(**SIZES["1b"], max_len=2048)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (16, 8, 128, 8192)
  assert cfg.num_params() == 1_072_236_544 and 0.9e9 <= cfg.num_params() <= 1.3e9
  assert set(bench.SIZED) == {"sample", "sft", "ppo_update", "rm_score"}


def test_explicit_flags_override_the_preset(monkeypatch, capsys):
  seen = {}

  def fake(*, peak, **flags):
    seen.update(flags)
    return result("sft", "fake", params=1, tokens_per_s=1.0, flops_per_s=1.0, peak=peak,
                  dtype="float32", step_s=1.0, compile_s=0.0)

  monkeypatch.setitem(bench.BENCHES, "sft", fake)
  bench.main(["sft", "--size=1b", "--d_model=512", "--d_ff=1024", "--matmul_n=32"])
  assert seen["d_model"] == 512 and seen["d_ff"] == 1024  # explicit
  assert (seen["n_layers"], seen["vocab"], seen["head_dim"]) == (16, 32000, 128)  # the preset's
  assert "size" not in seen and "json" not in seen
  assert "| sft | fake |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["sft", "--size=2b"], "unknown size '2b', choose from tiny, 1b"),
    (["rl_step", "--size=1b"], "--size applies to sample, sft, ppo_update, rm_score, not rl_step"),
    (["sample", "--d_ff=0"], "expected a positive integer, got '0'"),
])
def test_bad_values_error_in_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err and err.startswith("python -m rlhfjax.bench: error:")


def test_decode_roofline_by_hand():
  """d64 / head_dim 16: 4 heads, 2 kv heads; 2 layers. Per filled slot K + V = 2 x 2 layers x 2 kv
  heads x 16 x 4 bytes = 512 B. The prefill gives the first of 8 tokens, 7 decode steps the rest;
  step s reads 8 + s + 1 slots, mean 12; 4 rows: 24,576 B of KV cache + 1,000 B of weights = 25,576 B
  per step; at 1 GB/s: 4 rows x 8 tokens x 1e9 / (7 x 25,576) tokens/s."""
  cfg = bench_model_config(vocab=64, d_model=64, n_layers=2, max_len=16, head_dim=16)
  r = decode_roofline(cfg, batch=4, prompt=8, new_tokens=8, weight_bytes=1000, bandwidth=1e9)
  assert r["kv_bytes"] == 24_576 and r["bytes_per_step"] == 25_576
  assert r["tokens_per_s"] == pytest.approx(4 * 8 * 1e9 / (7 * 25_576))
  bf16 = bench_model_config(vocab=64, d_model=64, n_layers=2, max_len=16, head_dim=16, dtype="bfloat16")
  assert decode_roofline(bf16, batch=4, prompt=8, new_tokens=8, weight_bytes=1000,
                         bandwidth=1e9)["kv_bytes"] == 12_288  # the cache holds the compute dtype


def test_memory_bandwidth():
  bw, nbytes = memory_bandwidth(1, iters=2, reps=2)
  assert nbytes == 2**20 and bw > 0


def test_sample_tiny_roofline_line_json_and_table(tmp_path, capsys):
  """`sample --size=tiny` on CPU: the ratio line, its row in the JSON, the README table from it."""
  path = tmp_path / "decode.json"
  (r,) = bench.main(["sample", "--size=tiny", "--dtype=bfloat16", "--param_dtype=bfloat16",
                     "--batch=4", "--prompt=4", "--new_tokens=4", "--steps=1", "--matmul_n=64",
                     "--bandwidth_mib=4", f"--json={path}"])
  assert r["config"] == "d64 L2 V512 hd16 ff192 B4 P4+4 bfloat16"
  assert 0 < r["roofline_ratio"] and r["hbm_bytes_per_s"] > 0
  assert r["tokens_per_s"] == pytest.approx(r["roofline_ratio"] * r["roofline_tokens_per_s"])
  params = bench_model_config(**SIZES["tiny"], max_len=8).num_params()
  # bf16 weights + 4 rows x K, V x 2 layers x 2 kv heads x 16 x 2 bytes x mean 4 + 4 / 2 slots
  # (3 decode steps after the prefill's token, reading 5, 6, 7 slots)
  assert r["bytes_per_step"] == pytest.approx(2 * params + 4 * 2 * 2 * 2 * 16 * 2 * (4 + 2))
  out = capsys.readouterr().out
  assert any(line.startswith("sample: decode ") and "% of the HBM roofline" in line
             for line in out.splitlines())
  run = json.loads(path.read_text())
  assert run["platform"] == "cpu" and run["rows"][0]["roofline_ratio"] == r["roofline_ratio"]
  spec = importlib.util.spec_from_file_location("gpu_table", os.path.join(ROOT, "benchmarks/gpu/table.py"))
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  md = table.main([str(path), str(tmp_path / "missing.json")]).splitlines()
  assert md[0] == table.HEADER.splitlines()[0] and len(md) == 3
  assert "decode vs HBM roofline" in md[2] and f"**{100 * r['roofline_ratio']:.1f}%**" in md[2]
