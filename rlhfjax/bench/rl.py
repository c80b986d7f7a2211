"""RL benches: `rl_step` (one whole RL iteration, by phase) and `ppo_update` (the jitted PPO update).

Both build the RL core as the `rl` / `ppo` stages do: `builtin_models`, `RLOptimConfig.optimizers`,
`init_rl_state`, `make_experience_fn`, `make_rl_update` (`make_rl_update_shard_map` with
`--variant=shard_map`).

FLOPs (analytic, `TransformerConfig.forward_flops_per_token`, 2 per multiply-add):
  * rl_step: the sample's (as `sample`) + one forward per model in make_experience (policy,
    reference, PPO's critic) + 3 x forward per trained model per epoch.
  * ppo_update: per epoch 3 x forward for the policy (LM head included) and for the critic (no LM
    head) over all `batch x seq` tokens; optimizer and element-wise work not counted.
    make_experience is timed separately and reported on an extra line.

    python -m rlhfjax.bench rl_step --algo grpo        # seconds per RL iteration split by phase
    python -m rlhfjax.bench ppo_update                 # d512 L8 T256, 8 sequences, 1 epoch
    python -m rlhfjax.bench ppo_update --batch=16 --epochs=2 --minibatch=8 --dtype=bfloat16
    python -m rlhfjax.bench ppo_update --epochs=4 --minibatch=4 --variant=shard_map --devices=all
"""

from __future__ import annotations

import statistics
import time

from rlhfjax.bench.common import (bench_model_config, compiled_memory, make_mesh, matmul_peak,
                                  peak_for, result, time_calls)


def rl_core(algo, model_cfg, optim, total_steps: int, mesh, rules, *, variant: str = "jit",
            temperature: float = 1.0):
  """(state, reference params, jitted experience fn, jitted update) of the built-in transformer:
  the policy from key 0 (the reference a copy of it), PPO's critic fresh."""
  import jax
  import jax.numpy as jnp
  from rlhfjax.models import init_params
  from rlhfjax.train.rl import init_rl_state, make_experience_fn, make_rl_update, rl_state_shardings
  from rlhfjax.train.rl_shard_map import make_rl_update_shard_map
  from rlhfjax.train.rl_stage import builtin_models

  if variant not in ("jit", "shard_map"):
    raise ValueError(f"variant must be jit or shard_map, got {variant!r}")
  models = builtin_models(model_cfg, algo)
  ptx, vtx = optim.optimizers(total_steps)
  policy_params = init_params(models.policy, jax.random.key(0))
  state = init_rl_state(models, algo, ptx, vtx, mesh, rules, jax.random.key(1), policy_params)
  _, shardings = rl_state_shardings(models, algo, ptx, vtx, mesh, rules)
  # A copy on the policy's shardings: the update donates the state, the reference must survive it.
  ref = jax.tree.map(jnp.copy, {k: v for k, v in state.policy.params.items() if k != "value_head"})
  experience_fn = make_experience_fn(algo, models, mesh, rules, temperature=temperature)
  make = make_rl_update_shard_map if variant == "shard_map" else make_rl_update
  update_fn = make(algo, models, ptx, vtx, shardings, mesh, rules, temperature=temperature)
  return state, ref, experience_fn, update_fn


def bench_rl_step(*, peak: dict, algo: str = "grpo", d_model: int = 128, n_layers: int = 4,
                  batch: int = 16, group: int = 8, new_tokens: int = 40, steps: int = 3,
                  epochs: int = 1, minibatch: int = 0, microbatch: int = 0, variant: str = "jit",
                  dtype: str = "float32", devices: str = "one", **_) -> dict:
  """Seconds per phase of one verifier-reward RL iteration on the arithmetic task: sample -> score
  (decode + `math_reward` on the host) -> experience -> update, each blocked until ready.

  A fresh policy with EOS disabled decodes all `new_tokens` for `batch` prompts x `group` samples;
  one minibatch of all of them unless `minibatch`.
  """
  import os
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.data.arithmetic import ArithmeticConfig, generate_problems
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.rewards import math_reward
  from rlhfjax.sampling import Rollout, SamplingConfig, generate
  from rlhfjax.tokenizer import Tokenizer, template_texts, train_tokenizer
  from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

  problems = generate_problems(ArithmeticConfig(), max(batch, 512), seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    train_tokenizer(template_texts(problems), os.path.join(tmp, "tok.model"), vocab_size=96)
    tok = Tokenizer.load(os.path.join(tmp, "tok.model"))
  prompt = 16
  vocab = -(-tok.vocab_size // 8) * 8
  model = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers,
                             max_len=prompt + new_tokens, head_dim=32, dtype=dtype)
  b = batch * group
  cfg = AlgoConfig(algo=algo, group_size=group, epochs=epochs, minibatch_size=minibatch or b,
                   microbatch_size=microbatch)
  mesh, rules = make_mesh(devices), axes.DEFAULT_RULES
  sc = SamplingConfig(model=model, max_new_tokens=new_tokens, eos_id=-1, pad_id=tok.pad_id,
                      temperature=1.0)
  state, ref, experience_fn, update_fn = rl_core(cfg, model, RLOptimConfig(), steps + 1, mesh, rules,
                                                 variant=variant, temperature=sc.temperature)

  def iteration(i: int) -> dict:
    nonlocal state
    exs = [problems[(i * batch + j) % len(problems)] for j in range(batch) for _ in range(group)]
    ids, mask = tok.encode_prompts([e["prompt"] for e in exs], prompt)
    ids, mask = shard_batch((ids, mask), mesh, rules)
    t0 = time.perf_counter()
    out = generate(state.policy.params, ids, mask, jax.random.key(10 + i), sc)
    tokens, resp_mask = jax.device_get((out.tokens, out.mask))
    t1 = time.perf_counter()
    texts = tok.decode_batch(np.asarray(tokens), np.asarray(resp_mask))
    scores = jnp.asarray(math_reward(texts, [e["answer"] for e in exs]))
    t2 = time.perf_counter()
    vparams = state.value.params if cfg.separate_critic else None
    exp, _ = jax.block_until_ready(experience_fn(state.policy.params, ref, vparams,
                                                 Rollout.from_sample(ids, mask, out), scores,
                                                 state.kl.value))
    t3 = time.perf_counter()
    state, _ = jax.block_until_ready(update_fn(state, exp, jax.random.key(100 + i)))
    t4 = time.perf_counter()
    return {"sample": t1 - t0, "score": t2 - t1, "experience": t3 - t2, "update": t4 - t3}

  t = time.perf_counter()
  iteration(0)  # compile + warm up
  compile_s = time.perf_counter() - t
  runs = [iteration(i + 1) for i in range(steps)]
  phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
  sec = sum(phases.values())
  seq = prompt + new_tokens
  n_models = 3 if cfg.has_critic else 2  # experience: policy + reference (+ critic) forwards
  flops = (b * prompt * model.forward_flops_per_token(prompt)
           + b * new_tokens * model.forward_flops_per_token(2 * prompt + new_tokens)
           + n_models * b * seq * model.forward_flops_per_token(seq)
           + cfg.epochs * 3 * (n_models - 1) * b * seq * model.forward_flops_per_token(seq))
  split = ", ".join(f"{k} {v:.3f} s ({100 * v / sec:.0f}%)" for k, v in phases.items())
  extra = "".join([f" E{epochs}" if epochs != 1 else "", f" mb{minibatch}" if minibatch else "",
                   f" {variant}" if variant != "jit" else ""])
  return result("rl_step", f"{algo} d{d_model} L{n_layers} V{vocab} {batch}x{group} "
                           f"P{prompt}+{new_tokens} {dtype}{extra}",
                params=model.num_params(), tokens_per_s=b * new_tokens / sec, flops_per_s=flops / sec,
                peak=peak, dtype=dtype, step_s=sec, compile_s=compile_s, phases=phases,
                lines=[f"rl_step ({algo}) seconds per iteration: {sec:.3f} s = {split}"])


def bench_ppo_update(*, peak: dict, d_model: int = 512, n_layers: int = 8, vocab: int = 8192,
                     batch: int = 8, seq: int = 256, prompt: int | None = None, epochs: int = 1,
                     minibatch: int = 0, microbatch: int = 0, steps: int = 2,
                     dtype: str = "float32", devices: str = "one", remat: bool = False,
                     variant: str = "jit", **_) -> dict:
  """Response tokens/s and FLOP/s of one jitted PPO update (policy + critic, `epochs` x minibatches,
  compile excluded) on `batch` random sequences of `seq` real tokens, `prompt` (default `seq // 4`)
  of them prompt."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhfjax.parallel import axes, shard_batch
  from rlhfjax.sampling import Rollout
  from rlhfjax.train.rl import AlgoConfig, RLOptimConfig

  prompt = seq // 4 if prompt is None else prompt
  if not 0 < prompt < seq:
    raise ValueError(f"need 0 < prompt < seq, got prompt={prompt}, seq={seq}")
  n = seq - prompt
  model = bench_model_config(vocab=vocab, d_model=d_model, n_layers=n_layers, max_len=seq, dtype=dtype,
                             remat=remat)
  cfg = AlgoConfig(algo="ppo", group_size=1, epochs=epochs, minibatch_size=minibatch or batch,
                   microbatch_size=microbatch, adaptive_kl=True)
  mesh, rules = make_mesh(devices), axes.DEFAULT_RULES
  state, ref, experience_fn, update_fn = rl_core(cfg, model, RLOptimConfig(warmup_steps=1), 100, mesh,
                                                 rules, variant=variant)

  rng = np.random.default_rng(0)
  rollout = Rollout(prompt_ids=rng.integers(1, vocab, (batch, prompt)).astype(np.int32),
                    prompt_mask=np.ones((batch, prompt), np.int32),
                    response_ids=rng.integers(1, vocab, (batch, n)).astype(np.int32),
                    response_mask=np.ones((batch, n), np.float32),
                    finished=np.ones((batch,), bool))
  rollout = shard_batch(rollout, mesh, rules)
  scores = jnp.asarray(rng.normal(size=batch).astype(np.float32))

  def experience():
    return experience_fn(state.policy.params, ref, state.value.params, rollout, scores, state.kl.value)

  t = time.perf_counter()
  exp, _ = jax.block_until_ready(experience())
  exp_compile_s = time.perf_counter() - t
  exp_sec = statistics.median(time_calls(experience, steps))

  t = time.perf_counter()
  compiled = update_fn.lower(state, exp, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - t
  memory = compiled_memory(compiled)
  state, _ = compiled(state, exp, jax.random.key(3))  # warm up (state donated: rebind every call)
  jax.block_until_ready(state)
  calls = []

  def call():
    nonlocal state
    state, metrics = compiled(state, exp, jax.random.key(4 + len(calls)))
    calls.append(1)
    return metrics

  sec = statistics.median(time_calls(call, steps))
  # On a shared CPU one matmul measurement (~1 s) can land in a load spike while the update runs
  # for tens of seconds: measure the peak again right after and divide by the larger of the two.
  again = matmul_peak(peak.get("n"))
  peak = {k: (max(v, again.get(k, 0.0)) if isinstance(v, float) else v) for k, v in peak.items()}
  tokens = batch * seq
  fwd_policy = model.forward_flops_per_token(seq) * tokens
  fwd_value = model.forward_flops_per_token(seq, lm_head=False) * tokens
  update_flops = epochs * 3.0 * (fwd_policy + fwd_value)
  peak_v = peak_for(peak, dtype)
  exp_flops = 2 * fwd_policy + fwd_value
  lines = [f"ppo_update: make_experience (policy + reference + critic forwards, GAE) "
           f"{1e3 * exp_sec:.0f} ms, {exp_flops / exp_sec / 1e9:.3g} GFLOP/s = "
           f"{100 * exp_flops / exp_sec / peak_v:.1f}% of the matmul peak (compile {exp_compile_s:.1f} s); "
           f"update + experience together {100 * (update_flops + exp_flops) / (sec + exp_sec) / peak_v:.1f}%",
           f"ppo_update: matmul peak re-measured after the update: "
           f"{again[dtype if dtype in again else 'float32'] / 1e9:.3g} GFLOP/s; ratios use the larger"]
  return result("ppo_update",
                f"d{d_model} L{n_layers} V{vocab} B{batch} T{seq} (P{prompt}+{n}) "
                f"E{epochs} mb{cfg.minibatch_size} {dtype} {variant}" + (" remat" if remat else ""),
                params=2 * model.num_params(), tokens_per_s=batch * n * epochs / sec,
                flops_per_s=update_flops / sec, peak=peak, dtype=dtype, step_s=sec,
                compile_s=compile_s, memory=memory, lines=lines, experience_s=exp_sec)
