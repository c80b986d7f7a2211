"""bench-peers: the work both sides share, the harness's parsing and table, and the rlhfjax command.

No peer (TRL, Tunix) is installed or run here; the peer scripts are checked for reading the one
work definition (rlhfjax/bench/peer_work.py) rather than their own numbers.
"""

import importlib.util
import os
import re
import subprocess

import pytest

from rlhfjax import bench
from rlhfjax.bench import peer_work as work

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "benchmarks", "peers")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"peers_{name}", os.path.join(PEERS, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_work_definition():
  assert work.VOCAB[:4] == ("<pad>", "<unk>", "<s>", "</s>") and len(work.VOCAB) == 16
  assert work.EOS_ID == 3 and work.VOCAB[work.EOS_ID] == "</s>"
  prompts = work.problems(64, seed=0)
  assert all(len(work.encode(q)) == work.PROMPT_LEN == 8 for q, _ in prompts)
  assert all(work.UNK_ID not in work.encode(q + a) for q, a in prompts)
  q, a = prompts[0]
  assert int(q[:3]) + int(q[4:7]) == int(a) and q[3] == "+" and q.endswith("=")
  assert work.reward(a + "=12", a) == 1.0 and work.reward("9" + a, a) == 0.0
  assert work.decode(work.encode(a) + [work.EOS_ID] + work.encode("77")) == a
  assert work.num_params() == 4_204_800  # the 4.2 M-parameter trunk + embedding + untied head
  g, p = work.workload("grpo"), work.workload("ppo", long=True)
  assert (g["prompts"], g["group"], g["max_new"], g["beta"], g["eos"]) == (8, 8, 16, 0.04, False)
  assert (p["prompts"] * p["group"], p["epochs"], p["minibatches"], p["minibatch"]) == (64, 4, 4, 16)
  assert (p["max_new"], p["eos"], p["missing_eos_penalty"], p["grad_clip"]) == (256, True, -1.0, 0.0)


def test_hf_tokenizer_matches_encode(tmp_path):
  """The peers' Hugging Face tokenizer (character-split BPE, no merges) gives rlhfjax's ids."""
  pytest.importorskip("transformers")
  tok = work.hf_tokenizer(str(tmp_path / "tok"))
  assert len(tok) == 16 and tok.eos_token_id == work.EOS_ID and tok.pad_token_id == work.PAD_ID
  for q, a in work.problems(16, seed=1):
    assert tok(q + a)["input_ids"] == work.encode(q + a)  # no BOS, one token per character
  assert tok.decode(work.encode("12+3=") + [work.EOS_ID], skip_special_tokens=True) == "12+3="


def test_peer_scripts_use_the_shared_work():
  common = _load("common")
  assert os.path.samefile(common.WORK_FILE, work.__file__)
  assert common.work.workload("ppo") == work.workload("ppo")
  for name in ("trl_grpo", "trl_ppo", "tunix_grpo"):
    src = open(os.path.join(PEERS, f"{name}.py")).read()
    assert "from common import" in src and "summary(" in src, name
    # no private copy of the work's numbers: every size comes from the resolved workload `w`
    assert not re.search(r"\b(?:256|1024|0\.04|0\.05|0\.95)\b", src.split('"""', 2)[2]), name
  run = _load("run")
  for suffix, script, algo, _ in run.PEERS.values():
    assert os.path.exists(os.path.join(PEERS, script)) and algo in work.WORK
    req = open(os.path.join(PEERS, f"requirements-{suffix}.txt")).read()
    assert re.search(r"^(trl|google-tunix)==\d", req, re.M), suffix  # pinned
    assert "torch" not in req or "torch==2.13.0" in req


def test_harness_table_from_synthetic_runs():
  run = _load("run")
  out = "noise\nphases={}\niterations=" + '[{"sample": 1.0, "update": 2.0, "total": 3.0}]' + "\ns_per_iter_median=3.0\n"
  assert run.parse(out) == {"s_per_iter_median": 3.0,
                            "iterations": [{"sample": 1.0, "update": 2.0, "total": 3.0}]}
  with pytest.raises(ValueError):
    run.parse("s_per_iter_median=3.0\ntrailing line\n")

  def runs(totals_per_round, sample=0.5):
    return [{"s_per_iter_median": sorted(t)[len(t) // 2], "iterations":
             [{"sample": sample, "update": x - sample, "total": x} for x in t]} for t in totals_per_round]

  peer = runs([[4.0, 6.0, 5.0], [7.0, 3.0]])  # pooled: 3 4 5 6 7 -> median 5
  ours = runs([[1.0, 2.0], [3.0]], sample=0.25)  # pooled: 1 2 3 -> median 2
  s = run.summarize(peer)
  assert (s["median"], s["min"], s["max"], s["n"]) == (5.0, 3.0, 7.0, 5)
  assert s["phases"] == {"sample": 0.5, "update": 4.5}
  table = run.build_table([{"workload": "default", "peer": "X", "peer_runs": peer, "rlhfjax_runs": ours},
                           {"workload": "long", "peer": "Y", "peer_runs": [{"error": "exit 1: boom"}],
                            "rlhfjax_runs": ours}])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].startswith("| workload | peer |")
  assert "| default | X | 5.000 [3.000–7.000] | 2.000 [1.000–3.000] | **2.50×** |" in lines[2]
  assert "sample 0.500 / update 4.500" in lines[2] and "| 5, 3 |" in lines[2]
  assert "failed" in lines[3] and "boom" in lines[3] and "n/a" in lines[3]


def test_harness_sets_each_sides_glibc_environment(monkeypatch):
  # each side's processes get the harness's GLIBC_TUNABLES for that side, whatever the caller had
  run = _load("run")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
  env = run.run_env("glibc.malloc.hugetlb=1")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == os.environ["PATH"]
  assert "GLIBC_TUNABLES" not in run.run_env("")
  seen = []
  monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: seen.append(kw["env"]) or
                      subprocess.CompletedProcess(cmd, 1, "", "x"))
  monkeypatch.setattr(run, "setup", lambda suffix: "peer-python")
  run.main(["--peers=trl_grpo,tunix_grpo", "--workloads=default", "--rounds=1", "--out=/dev/null"])
  trl, ours, tunix, ours2 = seen  # round 1: each peer before its rlhfjax run
  assert "GLIBC_TUNABLES" not in trl and tunix["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert ours["GLIBC_TUNABLES"] == ours2["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  seen.clear()
  run.main(["--peers=trl_grpo", "--workloads=default", "--rounds=1", "--out=/dev/null",
            "--peer_glibc_tunables=glibc.malloc.hugetlb=1", "--glibc_tunables="])
  assert seen[0]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "GLIBC_TUNABLES" not in seen[1]


def test_rl_iteration_command_tiny(capsys):
  """`python -m rlhfjax.bench rl_iteration` end to end on a tiny model: the last line parses."""
  (r,) = bench.main(["rl_iteration", "--algo=grpo", "--d_model=16", "--n_layers=1", "--n_heads=2",
                     "--prompts=2", "--group=2", "--max_new=4", "--steps=1", "--matmul_n=64"])
  assert r["bench"] == "rl_iteration" and "V16 2x2 P8+4" in r["config"]
  out = capsys.readouterr().out.strip().splitlines()
  run = _load("run")
  parsed = run.parse("\n".join(out))
  assert parsed["s_per_iter_median"] > 0 and len(parsed["iterations"]) == 1
  it = parsed["iterations"][0]
  assert it["width"] == 4 and it["decoded"] == 4 and it["response_tokens"] == 16  # EOS off: all decoded
  # short GRPO shares each group's prompt: 2 rows of 7 prompt slots + 2 x 4 response slots
  assert r["config"].endswith("shared-prompt") and (it["rows"], it["slots"]) == (2, 15)
  assert {"sample", "score", "experience", "update", "total"} <= set(it)
  assert any(line.startswith("rl_iteration (grpo): analytic") and "of the matmul peak" in line
             for line in out)


def test_rl_iteration_profile_traces_one_uncounted_iteration(tmp_path, capsys):
  """`--profile DIR`: an xprof trace of one more iteration lands in DIR, and the timings still
  hold exactly the `--steps` timed iterations."""
  (r,) = bench.main(["rl_iteration", "--algo=grpo", "--d_model=16", "--n_layers=1", "--n_heads=2",
                     "--prompts=2", "--group=2", "--max_new=4", "--steps=2", "--matmul_n=64",
                     f"--profile={tmp_path}"])
  assert len(r["iterations"]) == 2
  traces = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".xplane.pb")]
  assert len(traces) == 1
  assert f"traced into {tmp_path}" in capsys.readouterr().out


def test_rl_iteration_long_packed_tiny(capsys):
  """`--long` packs the rollout (`rl.pack`): the forwards see packed rows at the full width, the
  warm-up compiled every row count (no timed iteration compiles), `--remat` is named."""
  (r,) = bench.main(["rl_iteration", "--algo=grpo", "--long", "--d_model=16", "--n_layers=1",
                     "--n_heads=2", "--prompts=2", "--group=2", "--max_new=24", "--steps=2",
                     "--matmul_n=64", "--remat"])
  assert r["config"].endswith("remat packed") and "eos" in r["config"]
  for it in r["iterations"]:
    assert it["width"] == 24 and 1 <= it["rows"] <= 4
  assert "packed rows" in capsys.readouterr().out


def test_rl_iteration_ppo_sampler_logprobs_flops(capsys):
  """PPO's old log-probs from the sampler (the default, as TRL's PPOTrainer): the analytic FLOPs
  drop by exactly one policy forward over the rows and slots the experience saw."""
  from rlhfjax.models.transformer import TransformerConfig
  flags = ["rl_iteration", "--algo=ppo", "--d_model=16", "--n_layers=1", "--n_heads=2", "--prompts=4",
           "--max_new=4", "--steps=1", "--warmup=0", "--matmul_n=64"]
  (on,) = bench.main(flags)
  (off,) = bench.main(flags + ["--sampler_logprobs=false"])
  it = on["iterations"][0]
  assert (it["rows"], it["slots"]) == (off["iterations"][0]["rows"], off["iterations"][0]["slots"]) == (4, 11)
  w = work.workload("ppo")
  cfg = TransformerConfig(vocab_size=len(work.VOCAB), d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                          head_dim=8, d_ff=w["d_ff"] * 16 // w["d_model"], max_len=work.PROMPT_LEN + 4,
                          tie_embeddings=False, embed_scale=False)
  flops = lambda r: r["flops_per_s"] * r["step_s"]  # noqa: E731
  assert flops(off) - flops(on) == pytest.approx(4 * 11 * cfg.forward_flops_per_token(11), rel=1e-6)
