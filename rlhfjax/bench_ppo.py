"""`python -m rlhfjax.bench ppo_update`: the jitted PPO update's throughput and FLOP/s vs the matmul peak.

`bench_ppo_update` has the signature of the functions in `rlhfjax.bench.BENCHES` (keyword `peak` from
`bench.matmul_peak`, the shared flags as keywords) and returns the same row dict. It times the
jitted, sharded, state-donating `rl_update` (`rlhfjax.train.rl.make_rl_update`, or the shard_map
variant with `--variant shard_map`) of PPO — policy + critic, `epochs` x minibatches — on a random
rollout batch of `batch` sequences of `seq` tokens (`prompt` of them prompt, the rest response, all
real), after one warm-up call; `make_experience` (policy, reference and critic forwards, GAE) is
timed separately and reported on an extra line.

FLOPs (analytic, `TransformerConfig.forward_flops_per_token`, 2 per multiply-add):
  * update: per epoch, policy forward + backward = 3 x forward (LM head included) and critic
    forward + backward = 3 x forward (no LM head; the [D] -> 1 value head is negligible), over all
    `batch x seq` tokens; x epochs. Optimizer and loss element-wise work are not counted.
  * experience: policy + reference forwards (LM head) + critic forward over `batch x seq` tokens.

    python -m rlhfjax.bench ppo_update                          # d512 L8 T256, 8 sequences, 1 epoch
    python -m rlhfjax.bench ppo_update --batch=16 --epochs=2 --minibatch=8 --dtype=bfloat16
"""

from __future__ import annotations

import statistics
import time


def bench_ppo_update(*, peak: dict, d_model: int = 512, n_layers: int = 8, vocab: int = 8192,
                     batch: int = 8, seq: int = 256, prompt: int = 64, epochs: int = 1,
                     minibatch: int = 0, microbatch: int = 0, steps: int = 2,
                     dtype: str = "float32", devices: str = "one", remat: bool = False,
                     variant: str = "jit", **_) -> dict:
  """Response tokens/s and FLOP/s of one PPO update (policy + critic), compile excluded."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from rlhfjax.bench import _memory, _mesh, _peak_for, _time_calls, bench_model_config
  from rlhfjax.models.heads import PolicyModel, ValueModel
  from rlhfjax.parallel import axes, replicated, shard_batch
  from rlhfjax.train.rl import RLConfig, RLState, make_experience_fn, make_rl_update
  from rlhfjax.train.rl_shard_map import make_rl_update_shard_map
  from rlhfjax.train.state import create_train_state, make_optimizer

  if not 0 < prompt < seq:
    raise ValueError(f"need 0 < prompt < seq, got prompt={prompt}, seq={seq}")
  n = seq - prompt
  model = dataclasses.replace(bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers,
                                                 max_len=seq, dtype=dtype), remat=bool(remat))
  cfg = RLConfig(algo="ppo", iterations=steps + 2, prompts_per_iter=batch, group_size=1,
                 epochs=epochs, minibatch_size=minibatch or batch, microbatch_size=microbatch,
                 adaptive_kl=True, warmup_steps=1)
  mesh, rules = _mesh(devices), axes.DEFAULT_RULES
  ptx = make_optimizer(cfg.optim(), 100)
  vtx = make_optimizer(cfg.optim(value=True), 100)
  policy, p_sh = create_train_state(PolicyModel(model), ptx, jax.random.key(0), mesh, rules)
  value, v_sh = create_train_state(ValueModel(model), vtx, jax.random.key(1), mesh, rules)
  rep = replicated(mesh)
  kl = cfg.kl_controller().init()
  state = RLState(policy=policy, value=value, kl=jax.device_put(kl, rep),
                  iteration=jax.device_put(jnp.zeros((), jnp.int32), rep))
  shardings = RLState(policy=p_sh, value=v_sh, kl=jax.tree.map(lambda _: rep, kl), iteration=rep)
  ref = jax.tree.map(jnp.copy, policy.params)

  rng = np.random.default_rng(0)
  rollout = {"prompt_ids": rng.integers(1, vocab, (batch, prompt)).astype(np.int32),
             "prompt_mask": np.ones((batch, prompt), np.int32),
             "response_ids": rng.integers(1, vocab, (batch, n)).astype(np.int32),
             "response_mask": np.ones((batch, n), np.float32),
             "finished": np.ones((batch,), bool)}
  rollout = shard_batch(rollout, mesh, rules)
  scores = jnp.asarray(rng.normal(size=batch).astype(np.float32))

  experience_fn = make_experience_fn(cfg, model, mesh, rules)
  make = make_rl_update_shard_map if variant == "shard_map" else make_rl_update
  t = time.perf_counter()
  exp, _ = jax.block_until_ready(experience_fn(state.policy.params, ref, state.value.params, rollout,
                                               scores, state.kl.value))
  exp_compile_s = time.perf_counter() - t
  exp_sec = statistics.median(_time_calls(
      lambda: experience_fn(state.policy.params, ref, state.value.params, rollout, scores,
                            state.kl.value), steps))

  t = time.perf_counter()
  compiled = make(cfg, model, ptx, vtx, shardings, mesh, rules).lower(
      state, exp, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - t
  memory = _memory(compiled)
  state, _ = compiled(state, exp, jax.random.key(3))  # warm up (state donated: rebind every call)
  jax.block_until_ready(state)
  calls = []

  def call():
    nonlocal state
    state, metrics = compiled(state, exp, jax.random.key(4 + len(calls)))
    calls.append(1)
    return metrics

  sec = statistics.median(_time_calls(call, steps))
  # On a shared CPU one matmul measurement (~1 s) can land in a load spike while the update runs
  # for tens of seconds: measure the peak again right after and divide by the larger of the two.
  from rlhfjax.bench import matmul_peak
  again = matmul_peak(peak.get("n"))
  peak = {k: (max(v, again.get(k, 0.0)) if isinstance(v, float) else v) for k, v in peak.items()}
  tokens = batch * seq
  fwd_policy = model.forward_flops_per_token(seq) * tokens
  fwd_value = model.forward_flops_per_token(seq, lm_head=False) * tokens
  update_flops = epochs * 3.0 * (fwd_policy + fwd_value)
  achieved = update_flops / sec
  peak_v = _peak_for(peak, dtype)
  exp_flops = 2 * fwd_policy + fwd_value
  lines = [f"ppo_update: make_experience (policy + reference + critic forwards, GAE) "
           f"{1e3 * exp_sec:.0f} ms, {exp_flops / exp_sec / 1e9:.3g} GFLOP/s = "
           f"{100 * exp_flops / exp_sec / peak_v:.1f}% of the matmul peak (compile {exp_compile_s:.1f} s); "
           f"update + experience together {100 * (update_flops + exp_flops) / (sec + exp_sec) / peak_v:.1f}%"]
  lines.append(f"ppo_update: matmul peak re-measured after the update: "
               f"{again[dtype if dtype in again else 'float32'] / 1e9:.3g} GFLOP/s; ratios use the larger")
  return {"bench": "ppo_update",
          "config": f"d{d_model} L{n_layers} V{vocab} B{batch} T{seq} (P{prompt}+{n}) "
                    f"E{epochs} mb{cfg.minibatch_size} {dtype} {variant}" + (" remat" if remat else ""),
          "params": 2 * model.num_params(), "tokens_per_s": batch * n * epochs / sec,
          "flops_per_s": achieved, "peak_flops_per_s": peak_v, "ratio": achieved / peak_v,
          "step_s": sec, "compile_s": compile_s, "memory": memory, "lines": lines,
          "experience_s": exp_sec}


def main(argv=None):
  """`python -m rlhfjax.bench_ppo [flags]` = `python -m rlhfjax.bench ppo_update [flags]`, with the
  PPO-only flags (--epochs, --minibatch, --microbatch, --variant)."""
  import argparse
  import sys

  from rlhfjax import bench
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--epochs", type=int)
  p.add_argument("--minibatch", type=int)
  p.add_argument("--microbatch", type=int)
  p.add_argument("--prompt", type=int)
  p.add_argument("--variant", choices=["jit", "shard_map"])
  extra, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  kw = {k: v for k, v in vars(extra).items() if v is not None}
  bench.BENCHES["ppo_update"] = lambda **a: bench_ppo_update(**{**a, **kw})
  if "ppo_update" not in rest:
    rest = ["ppo_update", *rest]
  return bench.main(rest)


if __name__ == "__main__":
  main()
